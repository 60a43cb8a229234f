"""The shipped general-purpose optimizers' numbers, pinned: a few float32 steps on a small model, in JAX and in
PyTorch. ``general-v1`` (``general`` until 2026-12-03) against values recorded before its step was restructured for
speed (tests/data/general_step_pins.json, written at commit 51ce45d); ``general`` against values recorded when it
was shipped (tests/data/general_step_pins_general.json). Written by ``python tests/test_general_pins.py --write
NAME``. A faster step must give the same numbers up to float32 rounding, and a shipped optimizer must keep them."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt

PINS = {"general-v1": Path(__file__).parent / "data" / "general_step_pins.json",
        "general": Path(__file__).parent / "data" / "general_step_pins_general.json"}
STEPS, HORIZON = 12, 30
# Per tensor, the relative error (norm-wise) allowed: on the final parameters, and on their displacement from the
# initial ones (float32 rounding of reordered sums, through the LSTM and the clipping, over STEPS steps).
PARAM_TOLERANCE, DISPLACEMENT_TOLERANCE = 1e-6, 2e-5


@pytest.fixture(autouse=True)
def full_float32_products():
  """float32 products in full precision: on a GPU, JAX's default lets them round to TF32 (10-bit mantissas), which
  moves these steps by more than the tolerance (seen on the H200; with this, the pins hold there too)."""
  with jax.default_matmul_precision("highest"):
    yield


def model() -> dict:
  """A dense weight (factored second moment), an OIHW conv kernel, a bias and a 0-d scalar, float32."""
  rng = np.random.default_rng(11)
  return {"w": 0.3 * rng.normal(size=(37, 23)), "conv": 0.5 * rng.normal(size=(3, 5, 3, 3)),
          "b": 0.1 * rng.normal(size=23), "s": np.array(0.7)}


def schedule() -> list:
  """Per step: gradients (growing, one spike at step 6 to exercise the clipping), a training loss, and a validation
  loss every 4 steps (NaN otherwise: none this step)."""
  rng = np.random.default_rng(12)
  shapes = {k: v.shape for k, v in model().items()}
  return [({k: (1 + 0.2 * t) * (30.0 if t == 6 else 1.0) * rng.normal(size=s) for k, s in shapes.items()},
           2.0 * np.exp(-0.05 * t) + 0.1 * rng.random(), 2.2 * np.exp(-0.04 * t) if t % 4 == 0 else np.nan)
          for t in range(STEPS)]


def run_jax(name: str) -> dict:
  tx = lopt.load(name).as_optax(num_steps=HORIZON)
  params = {k: jnp.asarray(v, jnp.float32) for k, v in model().items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads, loss, valid in schedule():
    updates, state = update({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}, state, params,
                            value=jnp.float32(loss), valid_loss=jnp.float32(valid))
    params = optax.apply_updates(params, updates)
  return {k: np.asarray(v, np.float64) for k, v in params.items()}


def run_torch(name: str) -> dict:
  torch = pytest.importorskip("torch")
  from lopt.torch import LearnedOptimizer
  params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for k, v in model().items()}
  optimizer = LearnedOptimizer(params.values(), name, num_steps=HORIZON)
  for grads, loss, valid in schedule():
    for k, g in grads.items():
      params[k].grad = torch.tensor(g, dtype=torch.float32)
    optimizer.step(loss=float(np.float32(loss)), valid_loss=None if np.isnan(valid) else float(np.float32(valid)))
  return {k: p.detach().numpy().astype(np.float64) for k, p in params.items()}


def check(found: dict, expected: dict) -> None:
  start = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in model().items()}
  for k, value in expected.items():
    value = np.asarray(value)
    moved = np.linalg.norm(value - start[k]) / np.linalg.norm(start[k])
    assert moved > 1e-3, f"{k} barely moved ({moved}): the check would be vacuous"
    error = np.linalg.norm(found[k] - value) / np.linalg.norm(value)
    assert error < PARAM_TOLERANCE, (k, error)
    displacement = np.linalg.norm((found[k] - start[k]) - (value - start[k])) / np.linalg.norm(value - start[k])
    assert displacement < DISPLACEMENT_TOLERANCE, (k, displacement)


@pytest.mark.parametrize("name", sorted(PINS))
def test_jax_general_matches_the_pinned_values(name):
  check(run_jax(name), json.loads(PINS[name].read_text())["jax"])


@pytest.mark.parametrize("name", sorted(PINS))
def test_jax_general_unit_by_unit_matches_the_pinned_values(name, monkeypatch):
  """The per-coordinate MLP as accelerators write it (unit by unit; a CPU uses matrix products): the same numbers."""
  from lopt.architectures.hierarchical.optimizer import HierarchicalOptimizer
  monkeypatch.setattr(HierarchicalOptimizer, "_units_form", lambda self: True)
  check(run_jax(name), json.loads(PINS[name].read_text())["jax"])


@pytest.mark.parametrize("name", sorted(PINS))
def test_torch_general_matches_the_pinned_values(name):
  check(run_torch(name), json.loads(PINS[name].read_text())["torch"])


def test_the_versions_pinned_differ():
  """Each pin file pins its own optimizer: the shipped `general` is not `general-v1` under another name."""
  pins = {name: json.loads(path.read_text())["jax"] for name, path in PINS.items()}
  assert not np.allclose(pins["general"]["w"], pins["general-v1"]["w"], rtol=1e-4)


if __name__ == "__main__" and "--write" in sys.argv:
  name = sys.argv[sys.argv.index("--write") + 1]
  pins = {"written_by": f"tests/test_general_pins.py --write {name}", "steps": STEPS,
          "jax": {k: v.tolist() for k, v in run_jax(name).items()},
          "torch": {k: v.tolist() for k, v in run_torch(name).items()}}
  PINS[name].write_text(json.dumps(pins) + "\n")
