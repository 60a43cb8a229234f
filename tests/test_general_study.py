"""scripts/general_study.py: the 1/2 (x - y)^2 helpers on an optimizer whose answer is known, and the JSON and
figures of a tiny study."""

import json
import math

import jax
import numpy as np
import optax
import pytest
from conftest import load_script

from lopt.evaluation import benchmark


@pytest.mark.slow  # runs the generalization study script end to end (~20 s)
def test_xy_helpers_and_tiny_study(tmp_path):
  gs = load_script("scripts/general_study.py")
  # Gradient descent on 1/2 (x - y)^2 moves along (1, -1) only: from (2, 0) it reaches the projection (1, 1).
  for layout in gs.XY_LAYOUTS:
    positions, losses = gs.xy_trajectory(optax.sgd(0.1), (2.0, 0.0), 200, layout)
    assert positions.shape == (201, 2) and losses.shape == (200,)
    d = gs.xy_distances(positions[-1], (2.0, 0.0))
    assert d["line"] < 1e-5 and d["projection"] < 1e-5 and abs(d["along"] - 1) < 1e-5
    assert abs(d["origin"] - math.sqrt(2)) < 1e-5 and d["nearest_minimum"] == [1.0, 1.0]
  # A start whose nearest minimum is the origin has no along-line position; the origin itself is at distance 0.
  assert gs.xy_distances((0.0, 0.0), (1.0, -1.0))["along"] is None
  assert gs.xy_distances((0.5, 0.5), (0.0, 2.0))["along"] == 0.5

  # The study's unroll is benchmark's, plus the final parameters' losses on the whole splits.
  c = gs.config(1, 16, 12)
  task, whole = gs.mlp_task(c), gs.mlp_task({**c, "batch_size": gs.TRAIN_ROWS})
  key = jax.random.key(3)
  train, valid = benchmark.unroll_with_validation(task, optax.adam(1e-2), key, 12)
  train_2, valid_2, end = gs.unroll_with_endpoint(task, optax.with_extra_args_support(optax.adam(1e-2)), key, 12,
                                                  whole.loss)
  np.testing.assert_allclose(train_2, train, rtol=1e-6)
  np.testing.assert_allclose(valid_2, valid, rtol=1e-6)
  assert end.shape == (2,) and np.all(np.isfinite(end))

  # The whole pipeline on two 10-step configurations, 2 learning rates and 3 starts of 10 steps.
  studies = {"width": [gs.config(1, 16, 10)], "batch": [gs.config(1, 16, 10)], "horizon": [gs.config(1, 16, 10)]}
  result = gs.run_study("general", tmp_path, seeds=1, studies=studies, learning_rates=(1e-3, 1e-2), xy_steps=10,
                        xy_starts=gs.XY_STARTS[:3], say=lambda *_: None)
  stored = json.loads((tmp_path / "general_study.json").read_text())
  assert stored["format"] == gs.FORMAT and stored["studies"]["batch"] == ["w1_b16_t10"]
  row = stored["configs"]["w1_b16_t10"]
  assert np.isclose(row["adam"]["hyperparameters"]["learning_rate"], (1e-3, 1e-2)).any()
  assert np.isclose(row["ratio"]["mean_loss"], row["learned"]["mean_loss"] / row["adam"]["mean_loss"])
  assert np.isclose(row["learned"]["gap"], row["learned"]["end_valid_loss"] - row["learned"]["end_train_loss"])
  assert np.isclose(row["adam"]["gap_window"], row["adam"]["final_valid_loss"] - row["adam"]["final_loss"])
  assert len(stored["xy"]["learned_scalars"]["starts"]) == 3
  assert np.isclose(stored["xy"]["adam"]["learning_rate"], (1e-3, 1e-2)).any()
  for name in ("width", "batch", "horizon", "gap", "xy"):
    assert (tmp_path / f"general_study_{name}.png").stat().st_size > 1000
  assert "w1_b16_t10" in gs.summary_text(result)
  assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
