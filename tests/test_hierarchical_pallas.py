"""The Pallas passes of the JAX step (``pallas_passes``, GPUs) against XLA's: the same updates, states and
meta-gradients, for lone and batched matrices of sizes that do not fill the tiles. On a CPU the kernels run in
Pallas's interpreter (the arithmetic); on a GPU as compiled Triton kernels (the tiles' edges, the launch)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.architectures.hierarchical import optimizer as hierarchical
from lopt.architectures.hierarchical.optimizer import HierarchicalOptimizer
from lopt.errors import UserError
from test_hierarchical import OPTIMIZER, random_theta

FAST = "auto" if jax.default_backend() == "gpu" else "interpret"
SHAPES = {"w1": (19, 133), "w2": (19, 133), "w3": (40, 17), "conv": (3, 2, 17, 21), "b": (17,), "s": ()}


def _problem(seed=3, steps=3):
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s) * (1 + t), jnp.float32) for k, s in SHAPES.items()}
           for t in range(steps)]
  return params, grads


def _use(monkeypatch, mode: str, batched: bool, units: bool = True) -> None:
  monkeypatch.setattr(hierarchical, "PALLAS", mode)
  monkeypatch.setattr(hierarchical, "PALLAS_MIN_SIZE", 256)  # every matrix here, none of the vectors
  monkeypatch.setattr(HierarchicalOptimizer, "_units_form", lambda self: units)
  monkeypatch.setattr(HierarchicalOptimizer, "_batches_tensors", lambda self: batched)


# Batched (31 s in Pallas's interpreter on 2 cores) and the meta-gradients (38 s) with -m slow, to keep CI under 20
# minutes; all of them run compiled on the H200 (-m gpu).
@pytest.mark.parametrize("batched", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pallas_passes_step_as_xla_does(monkeypatch, batched):
  theta = random_theta(OPTIMIZER)
  params, grads = _problem()

  def run(mode):
    _use(monkeypatch, mode, batched)
    update = functools.partial(OPTIMIZER.update, num_steps=10)
    p, state, steps = params, OPTIMIZER.init_state(theta, params), []
    # Which passes the step takes: two kernels per matrix or convolution kernel (one pair per group when batched).
    calls = str(jax.make_jaxpr(update)(theta, state, grads[0], p, loss=2.0)).count("pallas_call")
    assert calls == (0 if mode == "off" else 6 if batched else 8)
    update = jax.jit(update)
    for t, g in enumerate(grads):
      u, state = update(theta, state, g, p, loss=2.0 - 0.1 * t, valid_loss=2.1 if t % 2 else np.nan)
      p = jax.tree.map(lambda a, b: a + b, p, u)
      steps.append(u)
    return steps, state

  xla, pallas = run("off"), run(FAST)
  for a, b in zip(jax.tree.leaves(xla), jax.tree.leaves(pallas)):
    np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=2e-5, atol=1e-7)
  assert float(jnp.min(jnp.abs(pallas[0][-1]["w1"]))) > 0  # not vacuous: every coordinate moved


def test_pallas_passes_only_take_large_float32_matrices(monkeypatch):
  _use(monkeypatch, FAST, False)
  g = jnp.zeros((19, 133), jnp.float32)
  factored = hierarchical.init_second_moment(g)
  m = jnp.zeros((19, 133, 2), jnp.float32)
  assert OPTIMIZER._pallas(g, g, m, g, factored)
  assert not OPTIMIZER._pallas(g[:1, :10], g[:1, :10], m[:1, :10], g[:1, :10],
                               hierarchical.init_second_moment(g[:1, :10]))   # below PALLAS_MIN_SIZE
  assert not OPTIMIZER._pallas(g.astype(jnp.bfloat16), g, m, g, factored)
  v = jnp.zeros((4096,), jnp.float32)
  assert not OPTIMIZER._pallas(v, v, jnp.zeros((4096, 2)), v, v)             # no factored second moment
  for shape, taken in (((3, 3, 16, 32), True), ((32, 16, 3, 3), False)):     # factored over the last two axes only
    c = jnp.zeros(shape, jnp.float32)
    assert OPTIMIZER._pallas(c, c, jnp.zeros(shape + (2,)), c, hierarchical.init_second_moment(c)) == taken
  monkeypatch.setattr(hierarchical, "PALLAS", "auto")
  assert OPTIMIZER._pallas(g, g, m, g, factored) == (jax.default_backend() == "gpu")  # elsewhere XLA's passes
  monkeypatch.setattr(hierarchical, "PALLAS", "on")  # LOPT_JAX_PALLAS=on: not a mode
  with pytest.raises(UserError, match="LOPT_JAX_PALLAS is 'on'; allowed: auto, off, interpret"):  # CLI: exit 2
    OPTIMIZER._pallas(g, g, m, g, factored)


@pytest.mark.slow
def test_meta_gradients_through_pallas_passes_are_xlas(monkeypatch):
  """Reverse-mode derivatives through a step (meta-training's backpropagation) come from XLA's arithmetic. (XLA's MLP
  as matrix products on a CPU, which compiles faster under derivatives; the interpreter's kernels are unit by unit.)"""
  theta = random_theta(OPTIMIZER)
  params, grads = _problem(seed=5, steps=2)
  params = {k: params[k] for k in ("w1", "w2", "b")}
  grads = [{k: g[k] for k in params} for g in grads]

  def meta_loss(theta):
    state = OPTIMIZER.init_state(theta, params)
    p = params
    for g in grads:
      u, state = OPTIMIZER.update(theta, state, g, p, loss=1.0)
      p = jax.tree.map(lambda a, b: a + b, p, u)
    return sum(jnp.sum(x * x) for x in jax.tree.leaves(p))

  gradients = {}
  for mode in ("off", FAST):
    _use(monkeypatch, mode, True, units=jax.default_backend() == "gpu")
    gradients[mode] = jax.jit(jax.grad(meta_loss))(theta)
  for a, b in zip(jax.tree.leaves(gradients["off"]), jax.tree.leaves(gradients[FAST])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
