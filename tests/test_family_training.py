"""`lopt train --task-family ... --estimator E` end to end on the CPU: progress, metrics, a loadable optimizer; and
bad combinations refused with one line and exit code 2."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt
from lopt.cli import main

SMALL = ["--optimizer", "mlp", "--optimizer-option", "hidden_size=8", "--optimizer-option", "num_layers=1",
         "--horizon", "10", "--steps", "2", "--meta-batch-size", "2", "--eval-every", "2",
         "--eval-problems", "2", "--task-option", "num_groups=1", "--task-option", "max_step_flops=2e5"]


def train(tmp_path, family: str, estimator: str, *extra) -> int:
  return main(["train", "--task-family", family, "--estimator", estimator, *SMALL, *extra,
               "--out", str(tmp_path / f"{family}-{estimator}")])


@pytest.mark.parametrize("family, estimator", [
    ("mlp", "nres"),  # the default run's one; every other pair with -m slow (each estimator's contract runs anyway)
    *(pytest.param(f, e, marks=pytest.mark.slow) for f in ("mlp", "logistic_regression")
      for e in ("full", "tbptt", "es", "pes", "nres", "mixed")),
])
def test_family_training_end_to_end(tmp_path, capsys, family, estimator):
  extra = [] if estimator == "full" else ["--truncation", "5"]  # full backpropagation unrolls whole episodes
  assert train(tmp_path, family, estimator, *extra) == 0
  run = tmp_path / f"{family}-{estimator}"
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["step"] == 2 and records[-1]["inner_steps"] > 0
  assert all(jnp.isfinite(r["meta_loss"]) for r in records) and "held_out_loss" in records[-1]
  assert "meta-training: step 2/2" in capsys.readouterr().err  # the progress line
  groups = json.loads((run / "task_groups.json").read_text())
  assert [g["family"] for g in groups["training"] + groups["held_out"]] == [family] * 2
  trained = lopt.load(run)
  params = {"w": jnp.ones((3, 2))}
  tx = trained.as_optax()
  updates, _ = tx.update({"w": jnp.full((3, 2), 0.5)}, tx.init(params), params)
  assert bool(jnp.all(jnp.isfinite(updates["w"])))


@pytest.mark.parametrize("extra, message", [
    (["--estimator", "tbptt", "--num-particles", "4"], "has no field(s) ['num_particles']"),
    (["--estimator", "full", "--truncation", "5"], "has no field(s) ['truncation']"),
    (["--estimator", "pes", "--truncation", "50"], "truncation 50 is longer than the horizon 10"),
    (["--estimator", "mixed", "--truncation", "5", "--meta-batch-size", "1", "--num-particles", "1"], "needs at least 2 antithetic pairs"),
    (["--estimator", "pes", "--task-family", "nonesuch"], "nonesuch"),
    (["--estimator", "pes", "--objective", "validation"], "objective"),
    (["--estimator", "pes", "--task-option", "batch_noise=1"], "'batch_noise' must be true or false, found 1"),
    (["--estimator", "pes", "--task-option", "param_scale_probability=2"],
     "'param_scale_probability' must be a number in [0, 1], found 2"),
    (["--estimator", "nres", "--truncation", "5", "--estimator-option", "step_calibration=1.0"],
     "step_calibration 1.0 needs reference_learning_rates"),
    (["--estimator", "nres", "--truncation", "5", "--estimator-option", "reference_learning_rates=[0.01]",
      "--estimator-option", "step_calibration=-1"], "'step_calibration' must be a non-negative finite number"),
])
def test_bad_combinations_exit_2_with_one_line(tmp_path, capsys, extra, message):
  args = ["train", "--task-family", "mlp", *SMALL, *extra, "--out", str(tmp_path / "bad")]
  assert main(args) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("estimator", ["nres", pytest.param("tbptt", marks=pytest.mark.slow)])  # tbptt: 35 s
def test_step_calibration_trains_and_is_logged(tmp_path, capsys, estimator):
  """--estimator-option step_calibration with references (ES, or backpropagated): the run trains, the config keeps
  it, and every log line has the term's mean (before lambda) and the mean signed log-step gap."""
  assert train(tmp_path, "mlp", estimator, "--truncation", "5", "--estimator-option",
               "reference_learning_rates=[0.001,0.1]", "--estimator-option", "step_calibration=0.5") == 0
  run = tmp_path / f"mlp-{estimator}"
  assert json.loads((run / "config.json").read_text())["estimator"]["step_calibration"] == 0.5
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert all(r["step_calibration"] > 0 and np.isfinite(r["step_log_gap"]) for r in records if "meta_loss" in r)


def test_batch_noise_trains_and_is_recorded(tmp_path, capsys):
  """--task-option batch_noise=true: the run config keeps the option; the training groups are the shapes a run
  without it trains on, plus a drawn batch_fraction; held-out groups have none."""
  from lopt.meta.config import MetaTrainConfig
  from lopt.meta.train import family_configs
  assert train(tmp_path, "logistic_regression", "pes", "--truncation", "5", "--task-option", "batch_noise=true") == 0
  run = tmp_path / "logistic_regression-pes"
  config = MetaTrainConfig.from_dict(json.loads((run / "config.json").read_text()))
  assert config.task.options["batch_noise"] is True
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["step"] == 2 and all(jnp.isfinite(r["meta_loss"]) for r in records)
  groups = json.loads((run / "task_groups.json").read_text())
  assert all(0 < g["batch_fraction"] <= 1 for g in groups["training"])
  assert not any("batch_fraction" in g for g in groups["held_out"])
  plain = dataclasses.replace(config.task, options={"num_groups": 1, "max_step_flops": 2e5})
  assert groups["held_out"] == family_configs(plain, config.seed, held_out=True)
  without = [{k: v for k, v in g.items() if k != "batch_fraction"} for g in groups["training"]]
  assert without == family_configs(plain, config.seed)


def test_the_share_of_augmented_parameter_scales_is_a_training_option():
  """param_scale_probability changes the training groups' parameter-scale draws only: the same shapes, and
  held-out groups as without it."""
  from types import SimpleNamespace

  from lopt.meta.train import family_configs, family_groups
  plain = SimpleNamespace(family="all", options={"num_groups": 6, "max_step_flops": 2e6})
  always = SimpleNamespace(family="all", options={**plain.options, "param_scale_probability": 1})
  shapes = lambda configs: [{k: v for k, v in c.items() if k not in ("param_scale",)} for c in configs]  # noqa
  assert shapes(family_configs(always, 0)) == shapes(family_configs(plain, 0))
  assert family_configs(always, 0, held_out=True) == family_configs(plain, 0, held_out=True)
  assert all(c["param_scale"] != 1.0 for c in family_configs(always, 0))
  assert all(g.options == h.options for g, h in zip(family_groups(always, 0), family_groups(plain, 0)))


def test_an_opt_in_family_joins_a_run_that_names_it_and_leaves_the_mix_as_it_was():
  """"all,ill_conditioned_regression": the six families' groups as "all" draws them, then the opt-in family's, in
  training and held-out groups alike; its group task builds and gives a finite loss."""
  from types import SimpleNamespace

  from lopt.meta.train import family_configs, family_groups
  options = {"num_groups": 7, "max_step_flops": 2e6}
  plain = SimpleNamespace(family="all", options=options)
  extended = SimpleNamespace(family="all,ill_conditioned_regression", options=options)
  for held_out in (False, True):
    with_it, without = family_configs(extended, 0, held_out=held_out), family_configs(plain, 0, held_out=held_out)
    assert with_it[:6] == without[:6] and with_it[6]["family"] == "ill_conditioned_regression"
  group = family_groups(SimpleNamespace(family="ill_conditioned_regression", options={"num_groups": 1}), 0)[0]
  key = jax.random.key(0)
  assert jnp.isfinite(group.loss(group.init(key), key, 0))


def test_the_range_of_augmented_parameter_scales_is_a_training_option(tmp_path, capsys):
  """param_scale_range=[low, high] draws the training groups' augmented scales from there; held-out groups are as
  without it; a bad range is a one-line exit 2."""
  from types import SimpleNamespace

  from lopt.meta.train import family_configs
  plain = SimpleNamespace(family="all", options={"num_groups": 6, "max_step_flops": 2e6})
  large = SimpleNamespace(family="all", options={**plain.options, "param_scale_probability": 1,
                                                 "param_scale_range": [2, 10]})
  assert all(2 <= c["param_scale"] <= 10 for c in family_configs(large, 0))
  assert family_configs(large, 0, held_out=True) == family_configs(plain, 0, held_out=True)
  for bad in ("[10,2]", "[0,1]", "2", "[1,true]"):
    assert main(["train", "--task-family", "all", "--task-option", f"param_scale_range={bad}",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "param_scale_range" in err and "Traceback" not in err


def test_the_distance_scale_is_a_training_option(tmp_path, capsys):
  """distance_scale_range=[low, high]: the training configurations are the plain ones plus a distance scale in
  [low, high] or 1, the training groups' tasks draw it per problem, held-out configurations have none; a bad range
  is a one-line exit 2."""
  from types import SimpleNamespace

  from lopt.meta.train import family_configs, family_groups
  plain = SimpleNamespace(family="all", options={"num_groups": 6, "max_step_flops": 2e6})
  far = SimpleNamespace(family="all", options={**plain.options, "distance_scale_range": [2, 20]})
  for got, expected in zip(family_configs(far, 0), family_configs(plain, 0)):
    assert got == {**expected, "distance_scale": got["distance_scale"]}
    assert got["distance_scale"] == 1.0 or 2 <= got["distance_scale"] <= 20
  assert family_configs(far, 0, held_out=True) == family_configs(plain, 0, held_out=True)
  assert all("distance_scale" not in c for c in family_configs(far, 0, held_out=True))
  from lopt.tasks import families
  plain_group, far_group = family_groups(plain, 0)[0], family_groups(far, 0)[0]
  space = families.get(family_configs(far, 0)[0]["family"]).with_distance_scale(2, 20).problem_space
  scales = []
  for i in range(6):  # each problem key draws its own d; the gradient at the start is the plain one over d
    key = jax.random.key(i)
    scales.append(float(families.distance_scale(key, space)))
    params = far_group.init(key)
    for a, b in zip(jax.tree.leaves(jax.grad(plain_group.loss)(params, key, 1)),
                    jax.tree.leaves(jax.grad(far_group.loss)(params, key, 1))):
      # atol: float32 rounding of the largest entry (an entry 1e-3 of the largest differs by more than rtol).
      np.testing.assert_allclose(b, a / scales[-1], rtol=1e-4, atol=1e-6 * float(np.abs(a).max()) / scales[-1])
  assert any(d > 1 for d in scales)
  always = SimpleNamespace(family="all", options={**far.options, "distance_scale_probability": 1})
  assert all(2 <= c["distance_scale"] <= 20 for c in family_configs(always, 0))
  for option, bad in [("distance_scale_range", v) for v in ("[10,2]", "[0,1]", "3", "[1,false]")] + [
      ("distance_scale_probability", v) for v in ("2", "-0.5", "true")]:
    assert main(["train", "--task-family", "all", "--task-option", f"{option}={bad}",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err


def test_the_range_of_batch_sizes_is_a_training_option(tmp_path, capsys):
  """batch_size_range=[low, high] draws the training groups' batch sizes from there; held-out groups are as without
  it; a bad range is a one-line exit 2."""
  from types import SimpleNamespace

  from lopt.meta.train import family_configs
  plain = SimpleNamespace(family="mlp,cnn,logistic_regression", options={"num_groups": 6})
  large = SimpleNamespace(family=plain.family, options={**plain.options, "batch_size_range": [300, 500]})
  assert all(300 <= c["batch_size"] <= 500 for c in family_configs(large, 0))
  assert family_configs(large, 0, held_out=True) == family_configs(plain, 0, held_out=True)
  for bad in ("[500,300]", "[0,8]", "64", "[8,1.5]", "[8,true]"):
    assert main(["train", "--task-family", "all", "--task-option", f"batch_size_range={bad}",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "batch_size_range" in err and "Traceback" not in err


def test_the_range_of_initialization_scales_is_a_training_option(tmp_path, capsys):
  """init_scale_range=[low, high] draws the training problems' initialization scales from there, per problem key as
  training draws them; held-out groups are as without it; a bad range is a one-line exit 2."""
  from types import SimpleNamespace

  from lopt.meta.train import _family, family_configs, family_groups
  from lopt.tasks.families import problem_fields
  plain = SimpleNamespace(family="mlp,cnn", options={"num_groups": 2, "max_step_flops": 2e6})
  small = SimpleNamespace(family=plain.family, options={**plain.options, "init_scale_range": [0.05, 0.2]})
  assert all(0.05 <= c["init_scale"] <= 0.2 for c in family_configs(small, 0))
  assert family_configs(small, 0, held_out=True) == family_configs(plain, 0, held_out=True)
  space = _family("mlp", small, held_out=False).problem_space
  keys = jax.random.split(jax.random.key(3), 128)
  drawn = jax.vmap(lambda k: problem_fields(k, space))(keys)[0]
  assert bool(jnp.all((drawn >= 0.05) & (drawn <= 0.2))) and drawn.max() > 0.15 and drawn.min() < 0.08
  # The same problem key, the same parameter scale: the initialization is 0.05/2 .. 0.2/0.5 times the plain one.
  norm = lambda tree: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
  plain_task, small_task = family_groups(plain, 0)[0], family_groups(small, 0)[0]
  for key in keys[:4]:
    ratio = float(norm(small_task.init(key)) / norm(plain_task.init(key)))
    assert 0.025 <= ratio <= 0.4
    assert bool(jnp.isfinite(small_task.loss(small_task.init(key), key)))
  for bad in ("[2,0.5]", "[0,1]", "0.5", "[0.1,true]"):
    assert main(["train", "--task-family", "all", "--task-option", f"init_scale_range={bad}",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "init_scale_range" in err and "Traceback" not in err


def test_task_and_family_are_exclusive(tmp_path, capsys):
  assert main(["train", "linear_regression", "--task-family", "mlp", "--out", str(tmp_path / "x")]) == 2
  assert "not both" in capsys.readouterr().err
  assert main(["train", "--out", str(tmp_path / "x")]) == 2
  assert "--task-family" in capsys.readouterr().err


def test_group_task_keys_are_distinct_problems():
  """Problems of one shape group differ by key (initialization and problem fields), as a meta-batch needs."""
  from lopt.tasks import families
  task = families.group_task(families.sample([0, 0], "mlp", max_step_flops=1e6))
  a, b = task.init(jax.random.key(1)), task.init(jax.random.key(2))
  assert any(not bool(jnp.allclose(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_warm_start_and_trainable_subset(tmp_path, capsys):
  """--init-from starts theta at a trained optimizer's; --trainable meta-trains only the named meta-parameters
  (the others are neither perturbed nor updated); mismatches are user errors."""
  from lopt.pytree import flatten_by_path
  assert train(tmp_path, "logistic_regression", "nres", "--truncation", "5") == 0
  source = tmp_path / "logistic_regression-nres"
  out = tmp_path / "warm"
  args = ["train", "--task-family", "logistic_regression", "--estimator", "nres", "--truncation", "5", *SMALL,
          "--init-from", str(source), "--trainable", "layers/1", "--sigma", "0.1", "--out", str(out)]
  assert main(args) == 0
  before, after = flatten_by_path(lopt.load(source).theta), flatten_by_path(lopt.load(out).theta)
  changed = {name for name in before if not jnp.array_equal(before[name], after[name])}
  assert changed and changed <= {"layers/1/w", "layers/1/b"}, changed
  capsys.readouterr()
  for extra, message in ((["--trainable", "layers/9"], "name no meta-parameter"),
                         (["--init-from", str(source), "--optimizer-option", "hidden_size=4"], "they must match")):
    bad = args[:args.index("--init-from")] + extra + ["--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_checkpointed_by_lopt_0_2_resumes(tmp_path, capsys):
  """runs/general-heads-cpu-2 was checkpointed by lopt 0.2, which stored the hierarchical optimizer's per-tensor
  states one tensor at a time; it resumes (into the stacked layout) and takes its next outer steps."""
  import shutil
  from pathlib import Path
  source = Path(__file__).resolve().parents[1] / "runs" / "general-heads-cpu-2"
  run = tmp_path / "run"
  shutil.copytree(source, run, ignore=shutil.ignore_patterns(".lock"))
  assert main(["train", "--resume", "--out", str(run), "--steps", "2010"]) == 0
  last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["step"] == 2010 and jnp.isfinite(last["meta_loss"]), last


def test_groups_compiled_side_by_side_give_the_one_programs_numbers():
  """A run of several shape groups steps through one program per group (compiled side by side on the first call)
  and one that combines them: theta, the outer state, the estimator state and the metrics are bit for bit those of
  the whole step as one program; so are the held-out scores of the groups' evaluators compiled side by side."""
  from lopt.meta import train as meta
  from lopt.meta.config import PRESETS, EstimatorSection, OptimizerSection, TaskSection
  task = TaskSection(name="logistic_regression", family="logistic_regression", horizon=10,
                     options={"num_groups": 2, "max_step_flops": 2e5})
  config = PRESETS["demo"].replace(
      task=task, optimizer=OptimizerSection("gru", {"hidden_size": 4, "input_scale": 0.1, "output_scale": 10.0}),
      estimator=EstimatorSection("nres", {"meta_batch_size": 4, "truncation": 5}))
  groups, optimizer = meta.task_from(config), meta.optimizer_from(config)
  theta = meta.initial_theta(config, optimizer)
  estimator = meta.estimator_from(config, groups, optimizer)
  outer = meta.outer_optimizer_from(config, optimizer)
  split, whole = meta.build_outer_step(estimator, outer), jax.jit(meta._outer_step(estimator, outer))
  assert isinstance(split, meta.GroupedOuterStep)
  a = b = (theta, outer.init(theta), estimator.init(theta, jax.random.key(0)))
  for step in range(2):
    *a, metrics_a = split(*a, jax.random.key(step))
    *b, metrics_b = whole(*b, jax.random.key(step))
  raw = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x  # noqa: E731
  for x, y in zip(jax.tree.leaves((a, metrics_a)), jax.tree.leaves((b, metrics_b))):
    np.testing.assert_array_equal(raw(x), raw(y))
  evaluate = meta.build_evaluator(groups, optimizer, 10)
  keys = meta.held_out_keys(config.seed, 3)
  first, again = evaluate(theta, keys), evaluate(theta, keys)  # side by side, then one after the other
  parts = jnp.array_split(jnp.arange(3), 2)
  alone = [meta.build_evaluator(g, optimizer, 10)(theta, keys[p]) for g, p in zip(groups, parts)]
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(first, jnp.concatenate(alone))
  # Traced inside another jit, the groups stay in the tracing thread (a self-training population's evaluator
  # crashed otherwise; -m slow runs it through selftrain.build_population_evaluator).
  np.testing.assert_allclose(jax.jit(meta.build_evaluator(groups, optimizer, 10))(theta, keys), first, rtol=1e-5)


@pytest.mark.slow
def test_a_family_population_is_evaluated_in_the_tracing_thread():
  from lopt.meta import train as meta
  from lopt.meta.config import PRESETS, OptimizerSection, TaskSection
  from lopt.meta.selftrain import build_population_evaluator
  task = TaskSection(name="logistic_regression", family="logistic_regression", horizon=10,
                     options={"num_groups": 2, "max_step_flops": 2e5})
  config = PRESETS["demo"].replace(task=task, optimizer=OptimizerSection("gru", {"hidden_size": 4}))
  groups, optimizer = meta.task_from(config), meta.optimizer_from(config)
  theta = meta.initial_theta(config, optimizer)
  keys = meta.held_out_keys(config.seed, 3)
  alone = meta.build_evaluator(groups, optimizer, 10)(theta, keys)
  population = jax.tree.map(lambda x: jnp.stack([x, x]), theta)
  scores = build_population_evaluator(groups, optimizer, 10)(population, keys)
  np.testing.assert_allclose(scores, [float(jnp.mean(alone))] * 2, rtol=1e-5)
