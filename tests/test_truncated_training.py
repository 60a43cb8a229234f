"""Meta-training with the truncated estimators: a run stopped mid-episode resumes to the weights of an unbroken run,
bit for bit (inner states of every problem, perturbation accumulators, keys and all)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lopt.meta.config import EstimatorSection, MetaTrainConfig, OptimizerSection, TaskSection
from lopt.meta.train import meta_train


def config(estimator: str, num_steps: int, **task) -> MetaTrainConfig:
  fields = {"meta_batch_size": 2, "truncation": 5}
  if estimator == "mixed":
    fields["num_particles"] = 2
  return MetaTrainConfig(task=TaskSection(**{"name": "linear_regression", "horizon": 20, **task}),
                         optimizer=OptimizerSection("mlp", {"hidden_size": 8, "num_layers": 1}),
                         estimator=EstimatorSection(estimator, fields),
                         num_steps=num_steps, learning_rate=3e-3, eval_every=3, log_every=1, checkpoint_every=3,
                         num_eval_problems=4)


def raw(tree) -> list:
  """``tree``'s leaves as numpy arrays, typed PRNG keys as their key data."""
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
          for x in jax.tree.leaves(tree)]


def leaves(state):
  return raw((state.theta, state.outer_state, state.estimator_state, state.best_theta))


# pes (an accumulator per pair) in the default run; the others share its machinery and run with -m slow.
@pytest.mark.parametrize("estimator", ["pes", *(pytest.param(name, marks=pytest.mark.slow)
                                                for name in ("mixed", "tbptt", "es", "nres"))])
def test_resume_mid_episode_is_bit_identical(estimator, tmp_path):
  unbroken = meta_train(config(estimator, 7), tmp_path / "unbroken", progress=False)
  meta_train(config(estimator, 3), tmp_path / "run", progress=False)  # episodes of 4 truncations: mid-episode
  resumed = meta_train(config(estimator, 7), tmp_path / "run", resume=True, progress=False)
  assert resumed.step == unbroken.step == 7
  for a, b in zip(leaves(unbroken), leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_run_without_its_checkpoints_continues_from_its_meta_checkpoint(tmp_path, capsys):
  """checkpoints/ (the inner problems' states) left behind: the run resumes from meta_checkpoint.safetensors, its
  meta-parameters and outer state exactly those it stopped with, its inner problems in new episodes, and goes on."""
  import json
  import shutil
  stopped = meta_train(config("pes", 3), tmp_path / "run", progress=False)
  shutil.rmtree(tmp_path / "run" / "checkpoints")
  same = meta_train(config("pes", 3), tmp_path / "run", resume=True, progress=False)  # nothing left to train
  assert same.step == 3
  for a, b in zip(raw((stopped.theta, stopped.outer_state, stopped.best_theta)),
                  raw((same.theta, same.outer_state, same.best_theta)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(raw(stopped.estimator_state), raw(same.estimator_state),
                                                      strict=True)), "the inner problems should start afresh"
  assert "start new episodes" in capsys.readouterr().err
  resumed = meta_train(config("pes", 7), tmp_path / "run", resume=True, progress=False)
  steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert resumed.step == 7 and steps == list(range(1, 8)), steps
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(resumed.theta))
