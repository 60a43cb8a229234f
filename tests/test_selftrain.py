"""Self-training (lopt.meta.selftrain, `lopt selftrain`) and learned outer optimizers (`lopt train --outer-optimizer`):
no hand-designed optimizer in the self-training loop, exact resume of a population, PBT's pieces, the learned outer
transformation, and bad values refused with one line and exit code 2."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import lopt
from lopt.cli import main
from lopt.meta import outer, selftrain
from lopt.meta.config import (EstimatorSection, LoggingSection, MetaTrainConfig, OptimizerSection, OuterSection,
                              TaskSection)
from lopt.meta.train import load_metrics

MLP = {"hidden_size": 4, "num_layers": 1, "step_scale": 0.01, "magnitude_scale": 0.1}
TINY = selftrain.SelfTrainConfig(
    MetaTrainConfig(task=TaskSection("rosenbrock", horizon=10), optimizer=OptimizerSection("mlp", MLP),
                    estimator=EstimatorSection("nres", {"truncation": 5, "meta_batch_size": 2, "num_particles": 1}),
                    outer=OuterSection(num_steps=6, seed=3),
                    logging=LoggingSection(eval_every=2, num_eval_problems=2, log_every=1, checkpoint_every=2)),
    selftrain.PopulationSection(size=4))

# Hand-designed optimizers optax can build: every optimizer alias (optax._src.alias), every scale_by_* transformation
# (the pieces optimizers are chained from), every lower-case callable of optax.contrib, and aliases made elsewhere.
HAND_DESIGNED_EXTRA = ("nadam", "nadamw", "adamw", "sgd", "adafactor", "lion", "lamb", "rmsprop", "adagrad")


def hand_designed_constructors() -> list[tuple[object, str]]:
  from optax._src import alias, transform
  found = []
  for module in (optax, alias, transform):
    for name in dir(module):
      value = getattr(module, name)
      if not callable(value) or name.startswith("_") or isinstance(value, type):
        continue
      if getattr(value, "__module__", "") == "optax._src.alias" or name.startswith("scale_by_") \
         or name in HAND_DESIGNED_EXTRA:
        found.append((module, name))
  for name in dir(optax.contrib):
    value = getattr(optax.contrib, name)
    if name[:1].islower() and callable(value) and not isinstance(value, type):
      found.append((optax.contrib, name))
  return found


class HandDesigned(AssertionError):
  pass


def _forbidden(name):
  def refuse(*args, **kwargs):
    raise HandDesigned(f"the self-training loop built a hand-designed optimizer: optax {name}")
  return refuse


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted tiny self-training run with every hand-designed optax constructor made to raise."""
  path = tmp_path_factory.mktemp("selftrain") / "reference"
  constructors = hand_designed_constructors()
  with pytest.MonkeyPatch.context() as patch:
    for module, name in constructors:
      patch.setattr(module, name, _forbidden(name))
    with pytest.raises(HandDesigned):
      optax.adam(1e-3)  # the patches are in force
    with pytest.raises(HandDesigned):
      optax.scale_by_adam()
    state = selftrain.selftrain(TINY, path, progress=False)
  return state, path, {name for _, name in constructors}


def test_selftraining_uses_no_hand_designed_optimizer(reference):
  state, path, patched = reference
  assert {"adam", "adamw", "sgd", "rmsprop", "adagrad", "lion", "lamb", "nadam", "nadamw", "adafactor",
          "scale_by_adam", "scale_by_rms"} <= patched and len(patched) > 60
  assert state.step == 6
  records = load_metrics(path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  judged = [r for r in records if "held_out_losses" in r]
  assert [r["step"] for r in judged] == [2, 4, 6] and all(len(r["held_out_losses"]) == 4 for r in judged)
  # PBT acted at every judging: one of four members replaced each time.
  assert [len(r["exploit"]) for r in judged] == [1, 1, 1]
  event = judged[0]["exploit"][0]
  scores = judged[0]["held_out_losses"]
  assert scores[event["from"]] <= min(scores) + 1e-12 or scores[event["from"]] < scores[event["member"]]
  assert state.best_score == min(min(r["held_out_losses"]) for r in judged)
  # The population is the leading axis of every per-member array (what the scale issue shards).
  for tree in (state.theta, state.outer_state, state.estimator_state, state.scale, state.score, state.founder):
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(tree))
  # The best member is a normal trained optimizer.
  trained = lopt.load(path)
  np.testing.assert_array_equal(np.asarray(trained.theta["layers"][1]["w"]),
                                np.asarray(state.best_theta["layers"][1]["w"]))
  assert trained.config["info"]["self_training"]["population"]["size"] == 4


def test_interrupted_population_resumes_bit_identically(reference, tmp_path):
  state, path, _ = reference

  class Stop(Exception):
    pass

  def stop_at_step_5(step, total, record):
    if step == 5:
      raise Stop  # after the checkpoint at step 4: step 5 is redone on resume

  with pytest.raises(Stop):
    selftrain.selftrain(TINY, tmp_path / "run", progress=stop_at_step_5)
  resumed = selftrain.selftrain(TINY, tmp_path / "run", resume=True, progress=False)
  for name in ("theta", "outer_state", "estimator_state", "scale", "score", "founder", "best_theta"):
    for a, b in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(resumed, name))):
      if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  assert (resumed.best_score, resumed.best_step) == (state.best_score, state.best_step)
  strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
  assert strip(load_metrics(tmp_path / "run")) == strip(load_metrics(path))


def test_pbt_pieces():
  scores = np.array([0.5, np.inf, 0.1, 0.3, 0.2, np.nan, 0.4, 0.25])
  source = selftrain.exploit_sources(scores, 0.25, jax.random.key(0))
  kept = source == np.arange(8)
  assert sorted(np.flatnonzero(~kept)) == [1, 5]  # the two non-finite ones are the worst
  assert set(source[~kept]) <= {2, 4}  # copied from the best two
  assert list(selftrain.exploit_sources(scores, 0.0, jax.random.key(0))) == list(range(8))
  assert list(selftrain.applier_index("self", scores)) == list(range(8))
  assert list(selftrain.applier_index("best", scores)) == [2] * 8
  assert list(selftrain.applier_index("next", scores)) == [1, 2, 3, 4, 5, 6, 7, 0]
  theta = {"w": jnp.zeros((8, 3))}
  section = selftrain.PopulationSection(size=8, perturb_factor=2.0, perturb_noise=0.1)
  new_theta, scale = selftrain.explore(theta, jnp.ones(8), ~kept, section, jax.random.key(1))
  assert np.all(np.asarray(new_theta["w"])[kept] == 0) and np.all(np.asarray(new_theta["w"])[~kept] != 0)
  assert set(np.asarray(scale)[kept]) == {1.0} and set(np.asarray(scale)[~kept]) <= {0.5, 2.0}


def test_initial_population_moves():
  """Every member of a fresh population makes nonzero updates (the architecture alone would be inert)."""
  optimizer = lopt.architectures.get("mlp").build(MLP)
  theta, scale = selftrain.initial_population(optimizer, selftrain.PopulationSection(size=3), jax.random.key(0))
  assert outer.is_inert(optimizer, optimizer.init(jax.random.key(0)))
  assert not any(outer.is_inert(optimizer, selftrain.member(theta, i)) for i in range(3))
  assert np.all((np.asarray(scale) >= 0.01) & (np.asarray(scale) <= 1.0))


def test_learned_outer_transformation():
  """A fixed applier gives the optimizer's own update of the clipped gradient times scale; ``self`` refreshes its
  copy of theta every K updates; the held-out hint is passed once."""
  optimizer = lopt.architectures.get("mlp").build(MLP)
  applier = jax.tree.map(lambda x: x + 0.5 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                         optimizer.init(jax.random.key(0)))  # a moving rule: the init's readout is zero
  theta = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda x: 0.5 * jnp.sin(7 * x), theta)
  tx = outer.learned_outer(optimizer, applier, clip_value=0.1, scale=3.0)
  updates, state = jax.jit(tx.update)(grads, tx.init(theta), theta, value=jnp.ones(()))
  clipped = jax.tree.map(lambda g: jnp.clip(g, -0.1, 0.1), grads)
  expected, _ = optimizer.update(applier, optimizer.init_state(applier, theta), clipped, theta)
  for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(u), 3.0 * np.asarray(e), rtol=1e-5, atol=1e-7)  # jit vs eager, float32
  assert int(state.step) == 1 and bool(jnp.isnan(state.valid_loss))
  state = outer.record_valid_loss(state, 0.25)
  assert float(state.valid_loss) == 0.25

  tx = outer.learned_outer(optimizer, None, clip_value=None, refresh=2)
  state = tx.init(applier)
  seen = []
  current = applier
  update = jax.jit(tx.update)
  for _ in range(4):
    updates, state = update(jax.tree.map(jnp.ones_like, current), state, current)
    seen.append(state.applier)
    current = optax.apply_updates(current, updates)

  def same(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  assert same(seen[0], seen[1]) and not same(seen[1], seen[2]) and same(seen[2], seen[3])


SMALL_TRAIN = ["train", "linear_regression", "--horizon", "5", "--meta-batch-size", "2", "--steps", "2",
               "--eval-every", "2", "--eval-problems", "2"]


def _run_with_outer(tmp_path, name: str, extra: list) -> None:
  """A tiny `lopt train` whose meta-gradient a learned optimizer applies: recorded in the run config and the
  metrics; theta moved between the checkpoints of steps 1 and 2 and stayed finite."""
  from lopt.io.checkpoint import read_tensors
  run = tmp_path / name
  assert main([*SMALL_TRAIN, *extra, "--outer-scale", "0.01", "--checkpoint-every", "1", "--out", str(run)]) == 0
  assert json.loads((run / "config.json").read_text())["outer"]["outer_optimizer"] == extra[1]
  records = load_metrics(run)
  assert records[-1]["outer_scale"] == 0.01 and "learning_rate" not in records[-1]

  def theta_at(step):
    tensors, _ = read_tensors(run / "checkpoints" / f"step_{step:08d}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("theta/")}

  first, last = theta_at(1), theta_at(2)
  assert any(not np.array_equal(first[k], last[k]) for k in first)
  assert all(np.all(np.isfinite(v)) for v in last.values())


def test_outer_optimizer_shipped_name(tmp_path):
  """From the GRU's inert initialization the shipped optimizer alone moves theta."""
  _run_with_outer(tmp_path, "named", ["--outer-optimizer", "linear_regression"])


@pytest.mark.slow
def test_outer_optimizer_path_and_self(tmp_path, capsys):
  """The path of a run as the outer optimizer, then ``self`` warm-started from that run (so that it moves)."""
  _run_with_outer(tmp_path, "named", ["--outer-optimizer", "linear_regression"])
  _run_with_outer(tmp_path, "path", ["--outer-optimizer", str(tmp_path / "named")])
  _run_with_outer(tmp_path, "self", ["--outer-optimizer", "self", "--outer-refresh", "1",
                                     "--init-from", str(tmp_path / "named")])
  assert "makes zero updates" not in capsys.readouterr().err


def test_outer_optimizer_values_resolve(tmp_path):
  """What each --outer-optimizer value builds (the run itself is the same code for all): ``self`` the optimizer
  being trained with no fixed applier, a name or a path the trained optimizer; the Adam default is untouched."""
  import shutil
  from lopt.meta.train import outer_optimizer_from, optimizer_from
  config = MetaTrainConfig(num_steps=3)
  optimizer = optimizer_from(config)
  assert outer.resolve("self", optimizer) == (optimizer, None)
  shipped = lopt.load("linear_regression")
  shutil.copytree(shipped.path, tmp_path / "copy")
  for source in ("linear_regression", str(tmp_path / "copy")):
    applying, applier = outer.resolve(source, optimizer)
    assert applying.config() == shipped.optimizer.config()
    np.testing.assert_array_equal(applier["readout_weights"], shipped.theta["readout_weights"])
  assert not isinstance(outer_optimizer_from(config).init(optimizer.init(jax.random.key(0))), outer.LearnedOuterState)
  learned = outer_optimizer_from(config.replace(outer_optimizer="self"), optimizer)
  assert isinstance(learned.init(optimizer.init(jax.random.key(0))), outer.LearnedOuterState)


def test_outer_optimizer_self_from_an_inert_initialization_warns(capsys):
  from lopt.cli import _warn_if_inert_outer
  _warn_if_inert_outer(MetaTrainConfig(outer_optimizer="self"))
  assert "the untrained 'gru' makes zero updates" in capsys.readouterr().err
  _warn_if_inert_outer(MetaTrainConfig(outer_optimizer="linear_regression"))
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args, message", [
    (["--outer-optimizer", "nonesuch"], "--outer-optimizer 'nonesuch'"),
    (["--outer-optimizer", ""], "'outer_optimizer'"),
])
def test_bad_outer_optimizer_exit_2(tmp_path, capsys, args, message):
  assert main([*SMALL_TRAIN, *args, "--out", str(tmp_path / "bad")]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "bad").exists()


SMALL_SELF = ["selftrain", "rosenbrock", "--horizon", "10", "--truncation", "5", "--meta-batch-size", "2",
              "--num-particles", "1", "--steps", "2", "--eval-every", "2", "--eval-problems", "2"]


@pytest.mark.parametrize("args, message", [
    (["--population", "1"], "'size' (section 'population') must be an integer in [2, 4096]"),
    (["--exploit-fraction", "0.9"], "'exploit_fraction' (section 'population') must be a number in [0, 0.5]"),
    (["--perturb-factor", "0.5"], "'perturb_factor'"),
    (["--optimizer", "nonesuch"], "nonesuch"),
    (["--truncation", "50"], "truncation 50 is longer than the horizon 10"),
])
def test_bad_selftrain_values_exit_2(tmp_path, capsys, args, message):
  assert main([*SMALL_SELF, *args, "--out", str(tmp_path / "bad")]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args", [["--applier", "worst"], ["--scale-range", "2,1"], ["--learning-rate", "0.1"],
                                  ["--outer-optimizer", "self"]])
def test_selftrain_rejects_options_that_do_not_apply(tmp_path, capsys, args):
  with pytest.raises(SystemExit) as exit_info:
    main([*SMALL_SELF, *args, "--out", str(tmp_path / "bad")])
  assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_resume_with_another_population_is_refused(reference, tmp_path):
  import dataclasses
  _, path, _ = reference
  from lopt.meta.run import RunError
  other = dataclasses.replace(TINY, population=dataclasses.replace(TINY.population, applier="next"))
  with pytest.raises(RunError, match=r"population.applier"):
    selftrain.selftrain(other, path, resume=True, progress=False)
