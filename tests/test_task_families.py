"""Task families: deterministic sampling, finite losses and gradients under jit and vmap, the parameter-scale
augmentation, the opt-in batch-fraction (gradient-noise) and distance augmentations, the exact 64-32-10 digits MLP, the offline
datasets, and `lopt tasks`."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.cli import main
from lopt.data import datasets
from lopt.tasks import families
from lopt.tasks.families import BATCH_NOISE_SPACE, FamilyError, _nn, batch_fraction, problem_fields

NAMES = sorted(families.FAMILIES)  # the default mix ("all")
EVERY = families.known()  # and the opt-in families
SMALL = 2e6  # a step budget that keeps each family's test problem (and its compile) small


def small_config(name, seed=0):
  return families.sample([seed, 11], name, max_step_flops=SMALL)


def finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_six_families_at_least():
  assert {"mlp", "cnn", "rnn_lm", "transformer_lm", "autoencoder", "logistic_regression"} <= set(NAMES)


@pytest.mark.parametrize("name", EVERY)
def test_sample_is_deterministic_in_the_key(name):
  family = families.get(name)
  for key in (3, [3, 4], jax.random.key(3)):
    assert families.sample(key, name) == families.sample(key, name) == family.sample(key)
  assert families.sample(jax.random.key(3), name) != families.sample(jax.random.key(4), name)
  config = family.sample([5, 6])
  assert list(config) == ["family", *family.space, *family.problem_space, "step_flops"]
  assert json.loads(json.dumps(config)) == config
  assert config["step_flops"] == family.step_flops(family.shape_config(config)) > 0


@functools.lru_cache(maxsize=None)
def group_run(name):
  """One compile per family (CPU compiles dominate this file's time): for 4 problem keys of the group task, its
  loss, gradients and held-out loss, its initial parameters beside the unaugmented task's, the drawn scales, and the
  unaugmented loss at init_scale times its initial parameters; and the same group with batch noise: its drawn
  fraction, loss and held-out loss at the same parameters."""
  config = small_config(name)
  family = families.get(name)
  group, base = families.group_task(config), family.build(family.shape_config(config))
  noisy = family.with_batch_noise().group_task(config)

  @jax.jit
  @jax.vmap
  def run(key):
    init_scale, param_scale = problem_fields(key)
    params, base_params = group.init(key), base.init(key)
    loss, grads = jax.value_and_grad(group.loss)(params, key, 3)
    base_loss = base.loss(jax.tree.map(lambda p: init_scale * p, base_params), key, 3)
    return dict(loss=loss, grads=grads, valid=group.valid_loss(params, key, 3), params=params,
                base_params=base_params, init_scale=init_scale, param_scale=param_scale, base_loss=base_loss,
                fraction=batch_fraction(key, BATCH_NOISE_SPACE), noisy_loss=noisy.loss(params, key, 3),
                noisy_valid=noisy.valid_loss(params, key, 3), noisy_init=noisy.init(key))

  return config, group, jax.tree.map(np.asarray, run(jax.random.split(jax.random.key(9), 4)))


@pytest.mark.parametrize("name", EVERY)
def test_task_of_a_configuration_is_finite(name):
  config = small_config(name)
  task = families.task(config)
  assert task.valid_loss is not None and task.horizon == config["horizon"]
  loss, valid = jax.jit(lambda key: (task.loss(task.init(key), key, 0), task.valid_loss(task.init(key), key, 0)))(
      jax.random.key(1))
  assert finite((loss, valid)) and loss.shape == valid.shape == ()


@pytest.mark.parametrize("name", EVERY)
def test_group_task_is_finite_under_jit_and_vmap(name):
  _, group, out = group_run(name)
  assert group.valid_loss is not None and group.traits["horizon_range"] == (100, 2000)
  assert out["loss"].shape == out["valid"].shape == (4,) and finite((out["loss"], out["valid"], out["grads"]))
  assert len(set(out["loss"].tolist())) == 4  # each key its own problem
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(out["grads"]))


@pytest.mark.parametrize("name", EVERY)
def test_parameter_scale_augmentation_rescales_and_keeps_the_loss(name):
  _, _, out = group_run(name)
  init_scale, param_scale = out["init_scale"], out["param_scale"]
  assert np.all((param_scale == 1) | ((param_scale >= 0.1) & (param_scale <= 10))) and np.any(param_scale != 1)
  assert np.all((init_scale >= 0.5) & (init_scale <= 2))
  factor = init_scale * param_scale
  for p, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(out["base_params"])):
    np.testing.assert_allclose(p, factor.reshape(-1, *[1] * (b.ndim - 1)) * b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out["loss"], out["base_loss"], rtol=1e-4)


# -- batch noise (opt-in) --------------------------------------------------------------------------------------------

def test_without_batch_noise_the_draws_are_what_they_were():
  """Known answers from before the batch fraction existed (numpy sampling, with a step budget that makes it redraw,
  and the jax draws of a group task); with batch noise the same configurations plus a batch_fraction."""
  assert families.sample([0, 11], "mlp") == {
      "family": "mlp", "dataset": "iris", "data_seed": 519, "depth": 1, "width": 38, "activation": "relu",
      "layer_norm": True, "batch_size": 228, "init_scale": 1.3193756309103883, "param_scale": 1.0, "horizon": 107,
      "step_flops": 363888.0}
  assert families.sample([1, 5], "transformer_lm", max_step_flops=2e6) == {
      "family": "transformer_lm", "data": "markov", "data_seed": 951, "layers": 1, "d_model": 24, "heads": 4,
      "seq_len": 9, "batch_size": 4, "init_scale": 0.9957236851336823, "param_scale": 0.6444650398457091,
      "horizon": 172, "step_flops": 1752192.0}
  keys = jax.random.split(jax.random.key(9), 4)
  init_scale, param_scale = jax.vmap(problem_fields)(keys)
  np.testing.assert_allclose(init_scale, [0.6502353, 0.6272419, 1.1219814, 1.3804904], rtol=1e-6)
  np.testing.assert_allclose(param_scale, [1.0, 1.0, 2.9317913, 1.0], rtol=1e-6)
  for name in NAMES:
    family, noisy = families.get(name), families.get(name).with_batch_noise()
    assert "batch_fraction" not in family.problem_space and "batch_fraction" in noisy.problem_space
    for key, budget in [([s, 5], b) for s in range(10) for b in (None, families.min_step_flops(name) * 4)]:
      plain, drawn = family.sample(key, max_step_flops=budget), noisy.sample(key, max_step_flops=budget)
      assert "batch_fraction" not in plain and drawn == {**plain, "batch_fraction": drawn["batch_fraction"]}
      assert list(drawn) == ["family", *noisy.space, *noisy.problem_space, "step_flops"]
  noisy_space = families.get("mlp").with_batch_noise().problem_space
  for got, expected in zip(jax.vmap(lambda k: problem_fields(k, noisy_space))(keys), (init_scale, param_scale)):
    np.testing.assert_array_equal(got, expected)


def test_the_share_of_problems_with_an_augmented_parameter_scale():
  """with_param_scale_probability(p): the same shapes, the same draws of every other field; the parameter scale is
  augmented for every problem at p = 1 and for none at p = 0 (numpy and jax draws alike)."""
  family = families.get("mlp")
  always, never = family.with_param_scale_probability(1.0), family.with_param_scale_probability(0.0)
  keys = jax.random.split(jax.random.key(4), 64)
  for space, check in ((always.problem_space, lambda s: np.all(s != 1.0)), (never.problem_space,
                                                                         lambda s: np.all(s == 1.0))):
    init_scale, param_scale = jax.vmap(lambda k: problem_fields(k, space))(keys)
    assert check(np.asarray(param_scale))
    np.testing.assert_array_equal(init_scale, jax.vmap(problem_fields)(keys)[0])
  for seed in range(20):
    plain, drawn = family.sample([seed, 3]), always.sample([seed, 3])
    assert drawn["param_scale"] != 1.0 and {**drawn, "param_scale": plain["param_scale"]} == plain
  assert family.problem_space["param_scale"].probability == 0.5  # the family itself is unchanged


def test_the_range_of_augmented_parameter_scales():
  """with_param_scale_range(low, high): augmented scales drawn from [low, high] (numpy and jax draws alike), every
  other field as before."""
  family = families.get("cnn")
  large = family.with_param_scale_probability(1.0).with_param_scale_range(1.0, 10.0)
  keys = jax.random.split(jax.random.key(5), 256)
  init_scale, param_scale = jax.vmap(lambda k: problem_fields(k, large.problem_space))(keys)
  param_scale = np.asarray(param_scale)
  assert np.all((param_scale >= 1.0) & (param_scale <= 10.0)) and param_scale.max() > 5 and param_scale.min() < 2
  np.testing.assert_array_equal(init_scale, jax.vmap(problem_fields)(keys)[0])
  for seed in range(20):
    plain, drawn = family.sample([seed, 3]), large.sample([seed, 3])
    assert 1.0 <= drawn["param_scale"] <= 10.0 and {**drawn, "param_scale": plain["param_scale"]} == plain
  assert family.problem_space["param_scale"].distribution.low == 0.1  # the family itself is unchanged


def test_the_distance_scale_moves_the_solution_away_and_nothing_else():
  """with_distance_scale(low, high): the configurations of the plain family plus a distance_scale (drawn last, in
  [low, high] or 1); a task at distance d starts where the plain one does, with the same loss, and its gradient is
  the plain one over d, so its solution lies d times farther away; group draws stay in range and leave the other
  problem fields as they were; held-out draws of the plain family never have one."""
  family = families.get("mlp")
  far = family.with_distance_scale(2.0, 8.0)
  assert "distance_scale" not in family.problem_space
  values = []
  for seed in range(20):
    plain, drawn = family.sample([seed, 3]), far.sample([seed, 3])
    assert drawn == {**plain, "distance_scale": drawn["distance_scale"]}
    values.append(drawn["distance_scale"])
  assert 1.0 in values and all(v == 1.0 or 2.0 <= v <= 8.0 for v in values) and max(values) > 2.0
  config = {**family.sample([1, 4], max_step_flops=SMALL), "param_scale": 2.0}
  plain, moved = families.task(config), families.task({**config, "distance_scale": 4.0})
  key = jax.random.key(3)
  start = plain.init(key)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(moved.init(key))):
    np.testing.assert_array_equal(a, b)
  value, grads = jax.value_and_grad(plain.loss)(start, key, 2)
  moved_value, moved_grads = jax.value_and_grad(moved.loss)(start, key, 2)
  np.testing.assert_allclose(moved_value, value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(moved_grads)):
    np.testing.assert_allclose(b, a / 4.0, rtol=1e-4, atol=1e-9)
  # a sign step (Adam's, to first order: blind to the gradient's scale) of lr on the plain task goes where one of
  # 4 lr goes on the moved task: an optimizer of that kind needs a step d times larger there
  step = lambda task, lr: jax.tree.map(lambda p, g: p - lr * jnp.sign(g), start,  # noqa: E731
                                       jax.grad(task.loss)(start, key, 2))
  np.testing.assert_allclose(moved.loss(step(moved, 0.04), key, 5), plain.loss(step(plain, 0.01), key, 5),
                             rtol=1e-5)
  assert abs(float(moved.loss(step(moved, 0.01), key, 5)) - float(plain.loss(step(plain, 0.01), key, 5))) > 1e-4
  keys = jax.random.split(jax.random.key(6), 128)
  drawn = np.asarray(jax.vmap(lambda k: families.distance_scale(k, far.problem_space))(keys))
  assert np.all((drawn == 1.0) | ((drawn >= 2.0) & (drawn <= 8.0))) and 30 < np.sum(drawn > 1.0) < 98
  for got, expected in zip(jax.vmap(lambda k: problem_fields(k, far.problem_space))(keys),
                           jax.vmap(problem_fields)(keys)):
    np.testing.assert_array_equal(got, expected)
  with pytest.raises(FamilyError, match="distance_scale"):
    families.task({**config, "distance_scale": -1.0})


def test_the_range_of_batch_sizes():
  """with_batch_size_range(low, high): every family draws its batch size from [low, high], the family itself is
  unchanged, and a configuration beyond the default range builds a task with finite gradients."""
  for name in NAMES:
    family = families.get(name)
    large = family.with_batch_size_range(300, 500)
    drawn = [large.sample([seed, 9])["batch_size"] for seed in range(30)]
    assert all(300 <= b <= 500 for b in drawn) and max(drawn) > 420 and min(drawn) < 380
    assert family.space["batch_size"].high <= 256
  config = families.get("mlp").with_batch_size_range(300, 300).sample([1, 2])
  assert config["batch_size"] == 300
  task = families.task(config)
  params = task.init(jax.random.key(0))
  grads = jax.grad(lambda p: task.loss(p, jax.random.key(1)))(params)
  assert finite(jax.tree.leaves(grads)[0])


@pytest.mark.parametrize("name", NAMES)
def test_batch_noise_changes_only_the_training_loss_of_problems_drawing_a_fraction(name):
  config, _, out = group_run(name)
  fraction, full = out["fraction"], out["fraction"] == 1
  assert full.any() and (~full).any() and np.all((fraction >= 1 / 64) & (fraction <= 1))
  for noisy, plain in zip(jax.tree.leaves(out["noisy_init"]), jax.tree.leaves(out["params"])):
    np.testing.assert_array_equal(noisy, plain)
  np.testing.assert_array_equal(out["noisy_valid"], out["valid"])  # held-out losses: the whole minibatch
  np.testing.assert_allclose(out["noisy_loss"][full], out["loss"][full], rtol=2e-6)  # a mask of ones: a mean
  assert finite(out["noisy_loss"]) and out["noisy_loss"].shape == (4,)
  if round(float(fraction[~full][0]) * config["batch_size"]) < config["batch_size"]:
    assert not np.allclose(out["noisy_loss"][~full], out["loss"][~full])


def test_a_batch_fraction_averages_the_first_examples_of_each_minibatch():
  """The loss of logistic regression with batch_fraction f, by hand: the cross-entropy of the first round(f * 50)
  examples of the minibatch (at least one), plus the whole L2 penalty; the held-out loss keeps all 50. A
  configuration naming batch_fraction 1 is the task without one, exactly."""
  config = {"family": "logistic_regression", "dataset": "iris", "data_seed": 3, "l2": 0.01, "batch_size": 50,
            "init_scale": 1.0, "param_scale": 1.0, "horizon": 100}
  (train_x, train_y), _ = datasets.tabular("iris", 3)
  key, step = jax.random.key(4), 2
  rows = np.asarray(_nn.batch_index(key, step, _nn.TRAIN_STREAM, 50, len(train_y)))
  plain = families.task(config)
  params = jax.tree.map(np.float64, plain.init(key))
  penalty = 0.5 * 0.01 * np.sum(params["w"] ** 2)
  named = families.task({**config, "batch_fraction": 1.0})
  assert float(named.loss(plain.init(key), key, step)) == float(plain.loss(plain.init(key), key, step))
  for fraction, count in ((0.3, 15), (0.5, 25), (0.01, 1), (1 / 64, 1)):
    task = families.task({**config, "batch_fraction": fraction})
    logits = train_x[rows[:count]] @ params["w"] + params["b"]
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    expected = -np.mean(log_probs[np.arange(count), train_y[rows[:count]]]) + penalty
    assert float(task.loss(plain.init(key), key, step)) == pytest.approx(expected, rel=1e-5)
    assert float(task.valid_loss(plain.init(key), key, step)) == float(plain.valid_loss(plain.init(key), key, step))


def test_gradient_noise_grows_as_the_batch_fraction_shrinks():
  """The variance of the minibatch gradient over 256 minibatches at fixed parameters (summed over coordinates) goes
  as 1/k for k examples drawn with replacement: x4 per quartering of the fraction; asserted above x2."""
  family = families.get("logistic_regression")
  base = family.build({"dataset": "digits", "data_seed": 0, "l2": 0.0, "batch_size": 64})
  key = jax.random.key(0)
  params = base.init(key)

  @jax.jit
  def variance(fraction):
    grads = jax.vmap(lambda step: jax.grad(base.loss)(params, key, step, batch_fraction=fraction))(jnp.arange(256))
    return sum(jnp.sum(jnp.var(g, axis=0)) for g in jax.tree.leaves(grads))

  full, quarter, sixteenth = (float(variance(f)) for f in (1.0, 0.25, 1 / 16))  # k = 64, 16, 4
  assert quarter > 2 * full and sixteenth > 2 * quarter, (full, quarter, sixteenth)


def test_a_fixed_parameter_scale_multiplies_the_parameters_not_the_loss():
  config = {**small_config("mlp"), "init_scale": 1.5}
  key = jax.random.key(0)
  runs = {}
  for scale in (1.0, 7.0):
    task = families.task({**config, "param_scale": scale})
    params = task.init(key)
    runs[scale] = params, float(jax.jit(task.loss)(params, key, 0))
  for p7, p1 in zip(jax.tree.leaves(runs[7.0][0]), jax.tree.leaves(runs[1.0][0])):
    np.testing.assert_allclose(p7, 7.0 * p1, rtol=1e-6)
  assert runs[7.0][1] == pytest.approx(runs[1.0][1], rel=1e-5)


def test_the_64_32_10_digits_mlp_is_expressible_exactly():
  config = {"family": "mlp", "dataset": "digits", "data_seed": 0, "depth": 1, "width": 32, "activation": "relu",
            "layer_norm": False, "batch_size": 64}
  task = families.task(config)
  shapes = jax.tree.map(lambda x: x.shape, jax.eval_shape(task.init, jax.random.key(0)))
  assert shapes == {"layer_0": {"w": (64, 32), "b": (32,)}, "output": {"w": (32, 10), "b": (10,)}}
  assert task.num_params() == 64 * 32 + 32 + 32 * 10 + 10
  # Problem fields left out: natural scale, the middle of the horizon range.
  assert task.horizon == 447 and task.options["dataset"] == "digits"
  assert families.get("mlp").step_flops(config) == 6 * (64 * 32 + 32 * 10) * 64


@pytest.mark.parametrize("change, message", [
    ({"dataset": "imagenet"}, "field 'dataset' must be one of digits"),
    ({"width": 32.0}, "field 'width' must be a positive integer"),
    ({"layer_norm": 1}, "field 'layer_norm' must be one of false, true"),
    ({"param_scale": -1.0}, "field 'param_scale' must be 1 or a positive number"),
    ({"batch_fraction": 1.5}, r"field 'batch_fraction' must be 1 or a number in \(0, 1\]"),
    ({"batch_fraction": 0}, r"field 'batch_fraction' must be 1 or a number in \(0, 1\]"),
    ({"batch_fraction": "half"}, r"field 'batch_fraction' must be 1 or a number in \(0, 1\]"),
    ({"colour": "red"}, "unknown field"),
    ({"family": "nope"}, "unknown task family 'nope'; known: autoencoder"),
])
def test_bad_configurations_say_what_is_allowed(change, message):
  config = {**small_config("mlp"), **change}
  with pytest.raises(FamilyError, match=message):
    families.task(config)


def test_the_mix_draws_what_each_family_would_and_respects_the_budget():
  configs = [families.sample([0, i]) for i in range(300)]
  assert {c["family"] for c in configs} == set(NAMES)
  for i, c in enumerate(configs[:20]):
    assert c == families.sample([0, i], c["family"])
  budget = 1e5
  cheap = [families.sample([1, i], max_step_flops=budget) for i in range(200)]
  assert max(c["step_flops"] for c in cheap) <= budget and len({c["family"] for c in cheap}) >= 3
  assert all(families.min_step_flops(n) > budget for n in {"rnn_lm", "transformer_lm"})
  with pytest.raises(FamilyError, match="no task family has a configuration within"):
    families.sample(0, max_step_flops=10)


def test_names_from_reads_one_several_or_all():
  assert families.names_from("all") == NAMES
  assert families.names_from(" mlp, cnn ,mlp") == ["mlp", "cnn"]
  assert families.names_from("all, ill_conditioned_regression") == [*NAMES, "ill_conditioned_regression"]
  assert families.names_from("ill_conditioned_regression,mlp,all") == [
      "ill_conditioned_regression", "mlp", *[n for n in NAMES if n != "mlp"]]
  with pytest.raises(FamilyError, match="unknown task family 'cnnn'; known: autoencoder"):
    families.names_from("mlp,cnnn")


def test_opt_in_families_are_never_drawn_by_the_mix_or_all():
  """The mix and "all" draw what they drew before any opt-in family existed: every recorded run depends on it."""
  assert set(families.OPT_IN).isdisjoint(NAMES)
  assert {families.sample([0, i])["family"] for i in range(300)} == set(NAMES)
  assert set(families.OPT_IN) >= {"ill_conditioned_regression", "deep_linear_regression"}
  for name in families.OPT_IN:
    assert name in EVERY and families.sample(7, name)["family"] == name
    assert families.names_from(f"all,{name}") == [*NAMES, name]


@pytest.mark.parametrize("condition", [1.0, 30.0, 1000.0])
def test_ill_conditioned_regression_has_the_condition_number_it_draws(condition):
  """The features' covariance (so the squared error's Hessian in w) has the drawn condition number, to the sampling
  error of 2048 rows (Marchenko-Pastur); the targets' signal has unit variance, plus the drawn noise."""
  from lopt.tasks.families import ill_conditioned_regression as family
  shape = {"features": 32, "condition": condition, "noise": 0.1, "data_seed": 4, "batch_size": 16}
  (x, y), (valid_x, valid_y) = family.data(shape)
  assert x.shape == (family.NUM_TRAIN, 32) and valid_x.shape == (family.NUM_VALID, 32) and x.dtype == np.float32
  eigenvalues = np.linalg.eigvalsh(x.T.astype(np.float64) @ x / len(x))
  spread = ((1 + 1.1 * np.sqrt(32 / len(x))) / (1 - 1.1 * np.sqrt(32 / len(x)))) ** 2  # a sample covariance's, at most
  assert condition / spread <= eigenvalues.max() / eigenvalues.min() <= condition * spread
  assert np.var(y) == pytest.approx(1.0 + 0.1 ** 2, rel=0.15)
  fitted, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
  assert np.std(y - x @ fitted) == pytest.approx(0.1, rel=0.15)  # the noise is all that a linear fit leaves


DEEP_LINEAR = {"features": 32, "outputs": 16, "rank": 3, "depth": 3, "width": 24, "init_gain": 0.3, "noise": 0.01,
               "data_seed": 5, "batch_size": 16}


@pytest.mark.parametrize("change, rank", [({"rank": 1}, 1), ({"rank": 3}, 3), ({"rank": 8}, 8),
                                          ({"rank": 8, "outputs": 2}, 2), ({"rank": 5, "outputs": 1}, 1)])
def test_deep_linear_regression_targets_have_the_rank_it_draws(change, rank):
  """A* has the drawn rank (capped by its outputs), and so has the least-squares fit of y on x from the data itself
  (all but the drawn rank's singular values at the noise's level); the signal has unit variance per output."""
  from lopt.tasks.families import deep_linear_regression as family
  shape = {**DEEP_LINEAR, **change}
  target = family.target_map(shape)
  assert target.shape == (32, shape["outputs"]) and np.linalg.matrix_rank(target) == rank == family.rank(shape)
  (x, y), (valid_x, valid_y) = family.data(shape)
  assert x.shape == (family.NUM_TRAIN, 32) and y.shape == (family.NUM_TRAIN, shape["outputs"]) and y.dtype == np.float32
  assert valid_x.shape == (family.NUM_VALID, 32) and valid_y.shape == (family.NUM_VALID, shape["outputs"])
  np.testing.assert_allclose(np.var(y, axis=0), 1.0, rtol=0.15)
  fitted, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
  singular = np.linalg.svd(fitted, compute_uv=False)
  assert np.sum(singular > 0.1) == rank  # the noise's: ~0.01 (sqrt(32) + sqrt(16)) / sqrt(2048) = 2e-3 at most
  np.testing.assert_allclose(fitted, target, atol=0.01)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_deep_linear_regression_has_the_depth_it_draws_and_a_small_start(depth):
  """depth weight matrices chaining features -> width -> ... -> outputs, no biases, each LeCun times init_gain."""
  from lopt.tasks.families import deep_linear_regression as family
  shape = {**DEEP_LINEAR, "depth": depth, "width": 64, "features": 64}
  params = family.build(shape).init(jax.random.key(0))
  layers = [params[f"layer_{i}"]["w"] for i in range(len(params))]
  assert len(layers) == len(jax.tree.leaves(params)) == depth
  assert [w.shape for w in layers] == list(zip(family.sizes(shape)[:-1], family.sizes(shape)[1:]))
  assert family.sizes(shape) == [64, *[64] * (depth - 1), 16]
  for w in layers:
    assert float(jnp.std(w)) * np.sqrt(w.shape[0]) == pytest.approx(0.3, rel=0.1)
  macs = 64 * 64 * (depth - 1) + 64 * 16
  assert family.step_flops(shape) == 6 * macs * shape["batch_size"]


def test_a_sampled_deep_linear_regression_trains():
  """A sampled problem builds, and a few Adam steps lower its training loss from the start near the saddle."""
  import optax
  config = families.sample([3, 11], "deep_linear_regression", max_step_flops=SMALL)
  task, key = families.task(config), jax.random.key(2)
  adam = optax.adam(3e-2)

  @jax.jit
  def train(params):
    def step(carry, step):
      params, state = carry
      grads = jax.grad(task.loss)(params, key, step)
      updates, state = adam.update(grads, state)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(step, (params, adam.init(params)), jnp.arange(50))[0][0]

  mean_loss = jax.jit(lambda params: jnp.mean(jax.vmap(lambda s: task.loss(params, key, s))(jnp.arange(8))))
  start = task.init(key)
  before, after = float(mean_loss(start)), float(mean_loss(train(start)))
  assert np.isfinite(after) and after < 0.5 * before


# -- datasets --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(datasets.TABULAR))
def test_tabular_datasets_match_their_declared_sizes_and_are_standardized(name):
  features, classes = datasets.TABULAR[name]
  train, valid = datasets.tabular(name, 3)
  assert train.inputs.shape[1] == valid.inputs.shape[1] == features and train.inputs.dtype == np.float32
  axis = None if name in datasets.IMAGES else 0  # pixels: standardized as a whole
  assert np.abs(train.inputs.mean(axis)).max() < 1e-4
  assert np.all(np.isclose(train.inputs.std(axis), 1, atol=1e-3) | (train.inputs.std(axis) == 0))
  assert np.abs(valid.inputs.mean(axis)).max() < 0.5 and np.abs(valid.inputs).max() < 20
  if classes:
    assert train.labels.dtype == np.int32 and set(train.labels.tolist()) == set(range(classes))
  else:
    assert train.labels.dtype == np.float32 and abs(float(train.labels.std()) - 1) < 1e-4
  assert datasets.tabular(name, 3) is datasets.tabular(name, 3)  # cached
  if name in datasets.GENERATED:
    assert not np.array_equal(datasets.tabular(name, 4)[0].inputs[:5], train.inputs[:5])


def test_token_streams_are_offline_and_deterministic():
  text = datasets.text_corpus()
  assert text.dtype == np.uint8 and len(text) == datasets.TEXT_LENGTH and text.max() < datasets.TEXT_VOCAB
  assert np.mean(text == 0) < 0.01  # nearly all of it is printable ASCII
  chain = datasets.markov_sequences(5)
  assert chain.dtype == np.uint8 and chain.max() < datasets.MARKOV_VOCAB
  np.testing.assert_array_equal(chain, datasets.markov_sequences.__wrapped__(5))
  assert not np.array_equal(chain[:100], datasets.markov_sequences(6)[:100])


# -- lopt tasks ------------------------------------------------------------------------------------------------------

def run_cli(capsys, *args):
  code = main(["tasks", *args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_lopt_tasks_lists_every_family_and_field(capsys):
  code, out, _ = run_cli(capsys)
  assert code == 0
  for name in EVERY:
    family = families.get(name)
    assert f"{name}: {family.description}" in out
    for field_name in {**family.space, **family.problem_space}:
      assert f"  {field_name} " in out
  assert out.count("  batch_fraction  problem  1 (with --task-option batch_noise=true: log-uniform") == len(EVERY)


def test_lopt_tasks_sample_2000_is_varied_and_deterministic(capsys):
  code, out, _ = run_cli(capsys, "--sample", "2000")
  lines = out.splitlines()
  assert code == 0 and len(lines) == 2000
  configs = [json.loads(line) for line in lines]
  assert len(set(lines)) >= 1000 and len({c["family"] for c in configs}) >= 5
  shapes = {json.dumps({k: c[k] for k in families.get(c["family"]).space}, sort_keys=True) for c in configs}
  assert len(shapes) >= 1000  # varied architectures and data, not only varied scales
  assert all({"family", "step_flops", "init_scale", "param_scale", "horizon"} <= set(c) for c in configs)
  _, prefix, _ = run_cli(capsys, "--sample", "5")
  assert prefix.splitlines() == lines[:5]
  _, other, _ = run_cli(capsys, "--sample", "5", "--seed", "1")
  assert other.splitlines() != lines[:5]


def test_lopt_tasks_respects_family_and_max_step_flops(capsys):
  code, out, _ = run_cli(capsys, "--sample", "50", "--max-step-flops", "5e4", "--seed", "3")
  configs = [json.loads(line) for line in out.splitlines()]
  assert code == 0 and len(configs) == 50 and max(c["step_flops"] for c in configs) <= 5e4
  code, out, _ = run_cli(capsys, "--sample", "20", "--family", "cnn", "--max-step-flops", "1e6")
  configs = [json.loads(line) for line in out.splitlines()]
  assert code == 0 and {c["family"] for c in configs} == {"cnn"} and max(c["step_flops"] for c in configs) <= 1e6


@pytest.mark.parametrize("args, message", [
    (("--sample", "3", "--family", "nope"), "unknown task family 'nope'; known: autoencoder, cnn"),
    (("--family", "nope"), "unknown task family 'nope'"),
    (("--sample", "3", "--seed", "-1"), "--seed must be a non-negative integer"),
    (("--sample", "3", "--max-step-flops", "10"), "no task family has a configuration within"),
])
def test_lopt_tasks_errors_are_one_line_exit_2(capsys, args, message):
  code, out, err = run_cli(capsys, *args)
  assert code == 2 and out == "" and message in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_lopt_tasks_bad_sample_count_exits_2(capsys, value):
  with pytest.raises(SystemExit) as exit_info:
    main(["tasks", "--sample", value])
  assert exit_info.value.code == 2
  assert "expected a positive integer" in capsys.readouterr().err
