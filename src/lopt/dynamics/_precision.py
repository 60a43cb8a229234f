"""Float64 on request, and callables evaluated in one dtype whatever 64-bit mode other calls ran in.

Every function of the toolkit runs its JAX work under one mode, chosen per call: 64-bit enabled while a float64
analysis runs (``precision``), JAX's default otherwise. JAX keys its jit caches on that mode, so the toolkit's own
compiled functions never mix modes. What does mix them is JAX's conversion of numpy arrays: it is cached per array
object, whatever the mode (jax 0.10), and a traced function keeps the converted array alive. So once ``step`` had
been traced in one mode, the numpy arrays bound into it kept that mode's dtype in the other: after a float64 search,
float32 calls (search, speeds) crashed with XLA type errors (an f64 constant meeting f32 states, or an executable
built for f32 handed the cached f64 buffer), and after a float32 call a float64 one crashed likewise or ran on
float32-rounded weights. Making the mode a static jit argument would not help (it already is one). Instead
``bind`` casts every input explicitly, the parameters bound into ``step`` and ``readout`` included: each call
evaluates them through a copy whose bound arrays are fresh JAX arrays of the working dtype, so JAX never converts
the caller's numpy arrays, and results come back in that dtype.
"""

from __future__ import annotations

import contextlib
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

MAX_DEPTH = 8  # how deep bind follows callables bound into callables


def wants_float64(dtype) -> bool:
  return dtype is not None and np.dtype(dtype) == np.float64


@contextlib.contextmanager
def precision(dtype):
  """Enables 64-bit JAX inside the block when ``dtype`` is float64 (a no-op otherwise, or when already enabled).

  JAX silently truncates float64 arrays to float32 unless 64-bit mode is on, so asking for float64 without this
  would quietly give float32 answers.
  """
  if wants_float64(dtype) and not jax.config.jax_enable_x64:
    with jax.enable_x64(True):
      yield
  else:
    yield


def default_dtype(dtype):
  """The floating dtype computations run in: ``dtype`` if given, else float64 when 64-bit mode is on, else float32."""
  if dtype is not None:
    return np.dtype(dtype)
  return np.dtype(np.float64) if jax.config.jax_enable_x64 else np.dtype(np.float32)


def as_state(x, dtype=None) -> jax.Array:
  """``x`` as a floating JAX array of ``dtype`` (default: its own floating dtype as the current mode has it)."""
  x = jnp.asarray(x)
  if dtype is None:
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else default_dtype(None)
    dtype = jax.dtypes.canonicalize_dtype(dtype)
  return x.astype(dtype)


def as_input(x, dtype) -> jax.Array:
  """An input of the map (gradient, x*) as a JAX array of ``dtype`` (J_in differentiates with respect to it)."""
  return jnp.asarray(x).astype(dtype)


class Bound:
  """``original`` evaluated in ``dtype``: its bound arrays cast to ``dtype`` (see ``bind``), floating results too.

  Equal (and hashing equal) to any other Bound of an equal callable and dtype, so the jit caches keyed on it as a
  static argument are hit across calls.
  """

  def __init__(self, original, dtype):
    self.original, self.dtype = original, np.dtype(dtype)
    self.function = _rebind(original, self.dtype, {}, 0)

  def __call__(self, *args):
    return jax.tree.map(self._cast, self.function(*args))

  def _cast(self, y):
    y = jnp.asarray(y)
    return y.astype(self.dtype) if jnp.issubdtype(y.dtype, jnp.floating) and y.dtype != self.dtype else y

  def __eq__(self, other):
    return type(other) is Bound and other.dtype == self.dtype and other.original == self.original

  def __hash__(self):
    return hash((self.original, self.dtype))

  def __repr__(self):
    return f"Bound({self.original!r}, {self.dtype})"


def bind(function, dtype) -> Bound:
  """``function`` (a ``step`` or ``readout``) evaluated in ``dtype``, its bound arrays fresh JAX arrays of ``dtype``.

  Follows functools.partial arguments and Python closures (cells and defaults, through dicts, lists and other
  pytrees, and callables bound in them); numpy arrays there become JAX arrays (floating ones of ``dtype``, others
  as the current mode has them), concrete floating JAX arrays are cast to ``dtype``. Arrays reachable otherwise
  (module globals, object attributes) are left as they are: bind JAX arrays there. Must run in the mode of
  ``dtype`` (inside ``precision(dtype)`` for float64).
  """
  dtype = np.dtype(dtype)
  if isinstance(function, Bound):
    function = function.original
  try:
    return _bind_cached(function, dtype)
  except TypeError:  # unhashable: nothing to reuse
    return Bound(function, dtype)


@functools.lru_cache(maxsize=64)
def _bind_cached(function, dtype) -> Bound:
  # Only saves redoing the conversion per call; the jit caches hold the callables anyway.
  return Bound(function, dtype)


def _convert_leaf(leaf, dtype, memo, depth):
  if isinstance(leaf, np.ndarray):
    if leaf.dtype == object:
      return leaf
    # A copy: JAX's conversion cache is keyed on the array object, which the caller may use in the other mode.
    copy = np.array(leaf, dtype=dtype if np.issubdtype(leaf.dtype, np.floating) else None)
    return jnp.asarray(copy)
  if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
    return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype else leaf
  if callable(leaf):
    return _rebind(leaf, dtype, memo, depth + 1)
  return leaf


def _convert_tree(tree, dtype, memo, depth):
  """``tree`` with its array leaves converted, or ``tree`` itself when nothing changed."""
  try:
    leaves, treedef = jax.tree.flatten(tree)
  except Exception:  # noqa: BLE001  not a pytree JAX can take apart (e.g. a dict with unsortable keys)
    return tree
  converted = [_convert_leaf(leaf, dtype, memo, depth) for leaf in leaves]
  if all(new is old for new, old in zip(converted, leaves)):
    return tree
  return jax.tree.unflatten(treedef, converted)


def _rebind(function, dtype, memo, depth):
  """A copy of ``function`` whose bound arrays are converted, or ``function`` itself when it binds none."""
  if depth > MAX_DEPTH or id(function) in memo:
    return memo.get(id(function), function)
  memo[id(function)] = function  # a callable bound into itself stays as it is
  if isinstance(function, functools.partial):
    inner = _rebind(function.func, dtype, memo, depth + 1)
    args = _convert_tree(function.args, dtype, memo, depth)
    keywords = _convert_tree(function.keywords, dtype, memo, depth)
    if inner is not function.func or args is not function.args or keywords is not function.keywords:
      memo[id(function)] = type(function)(inner, *args, **keywords)
  elif isinstance(function, types.FunctionType):
    cells = function.__closure__ or ()
    contents = [_cell_contents(cell) for cell in cells]
    new_contents = [c if c is _EMPTY else _convert_tree(c, dtype, memo, depth) for c in contents]
    defaults = _convert_tree(function.__defaults__, dtype, memo, depth)
    kwdefaults = _convert_tree(function.__kwdefaults__, dtype, memo, depth)
    if (any(new is not old for new, old in zip(new_contents, contents)) or defaults is not function.__defaults__
        or kwdefaults is not function.__kwdefaults__):
      # Unchanged cells are shared with the original; changed ones get a new cell holding the converted value.
      closure = tuple(cell if new is old else types.CellType(new)
                      for cell, new, old in zip(cells, new_contents, contents)) or None
      copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, defaults, closure)
      copy.__kwdefaults__ = kwdefaults
      copy.__qualname__, copy.__doc__ = function.__qualname__, function.__doc__
      copy.__dict__.update(function.__dict__)
      memo[id(function)] = copy
  return memo[id(function)]


_EMPTY = object()


def _cell_contents(cell):
  try:
    return cell.cell_contents
  except ValueError:  # a cell not yet filled (a closure variable assigned later)
    return _EMPTY
