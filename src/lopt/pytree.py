"""Pytrees by key path: how meta-parameters and estimator states of any structure are stored in flat tensor files.

A leaf's key path is its sequence of dict keys, sequence indices and NamedTuple/dataclass field names joined with
'/': ``{"layers": [{"w": ...}]}`` stores ``layers/0/w``. Reading back needs the structure (a template, e.g.
``jax.eval_shape(optimizer.init, key)``); the names then say exactly which leaf is missing, extra or misshapen.
"""

from __future__ import annotations

import jax
import numpy as np

SEPARATOR = "/"


def _key_name(key) -> str:
  for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey (NamedTuples, dataclasses)
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_string(key_path) -> str:
  return SEPARATOR.join(_key_name(key) for key in key_path)


def flatten_by_path(tree) -> dict[str, object]:
  """{key path: leaf} in the tree's leaf order. Raises ValueError when two leaves would share a name."""
  flat = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = path_string(key_path)
    if name in flat:
      raise ValueError(f"two leaves share the key path {name!r} (a dict key containing {SEPARATOR!r}?)")
    flat[name] = leaf
  return flat


def unflatten_by_path(flat: dict, template):
  """The pytree shaped like ``template`` whose leaves are ``flat[key path]``; KeyError names a missing path."""
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  return jax.tree_util.tree_unflatten(treedef, [flat[path_string(path)] for path, _ in paths_and_leaves])


def shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  return {name: tuple(np.shape(leaf)) for name, leaf in flatten_by_path(tree).items()}


def prefix_mask(tree, prefixes: tuple[str, ...]) -> tuple[object, list[str]]:
  """(a pytree like ``tree`` of bools: True where the leaf's key path is one of ``prefixes`` or lies under one,
  the prefixes that matched no leaf)."""
  def selected(name: str) -> bool:
    return any(name == p or name.startswith(p + SEPARATOR) for p in prefixes)
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [path_string(path) for path, _ in paths_and_leaves]
  unmatched = [p for p in prefixes if not any(n == p or n.startswith(p + SEPARATOR) for n in names)]
  return jax.tree_util.tree_unflatten(treedef, [selected(n) for n in names]), unmatched
