"""The truncated estimators against the exact gradient of the Gaussian-smoothed meta-loss.

A learned optimizer with a known answer: plain gradient descent whose log learning rate is the meta-parameter (plus
three meta-parameters that do nothing, where estimator noise is easy to see), on a fixed 2-D quadratic. The loss
after any schedule of learning rates is a closed form, so every smoothed objective is an integral that Gauss-Hermite
quadrature computes to float precision: the reference each estimator's mean is compared with, within its standard
error over many independent replicates.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.meta import estimators
from lopt.meta.estimators import es
from lopt.tasks.base import Task

CURVATURES = jnp.array([1.0, 0.05])
START = jnp.array([1.0, 1.0])
LOG_LR = float(np.log(0.5))
SIGMA = 0.1
WIDTH, TRUNCATIONS = 5, 4  # inner steps per truncation, truncations per episode
HORIZON = WIDTH * TRUNCATIONS


class LogLearningRate:
  """update = -exp(theta["log_lr"]) * g; theta["unused"] (3,) does nothing."""

  def init(self, key):
    del key
    return {"log_lr": jnp.asarray(LOG_LR, jnp.float32), "unused": jnp.zeros(3)}

  def init_state(self, theta, params):
    return ()

  def update(self, theta, state, grads, params, **_):
    return jax.tree.map(lambda g: -jnp.exp(theta["log_lr"]) * g, grads), state

  def config(self):
    return {"architecture": "log_lr"}

  def param_shapes(self):
    return {"log_lr": (), "unused": (3,)}


def quadratic_loss(x):
  return 0.5 * jnp.sum(CURVATURES * x**2)


TASK = Task("quadratic", init=lambda key: START, loss=lambda params, key, step: quadratic_loss(params),
            horizon=HORIZON, valid_loss=lambda params, key, step: quadratic_loss(params))


def truncation_losses(log_lrs):
  """Closed form: (K,) log learning rates, one per truncation -> (K,) meta-losses (mean of loss_t / loss_0 over
  each truncation's steps, loss_t before update t)."""
  factors = (1 - jnp.exp(log_lrs)[:, None] * CURVATURES) ** 2  # per truncation, per coordinate, per step
  out, carried = [], jnp.ones_like(CURVATURES)
  for k in range(log_lrs.shape[0]):
    steps = carried * factors[k] ** jnp.arange(WIDTH)[:, None]  # (W, 2) squared-distance ratios
    out.append(jnp.mean(steps @ (CURVATURES * START**2)) / quadratic_loss(START) / 2)
    carried = carried * factors[k] ** WIDTH
  return jnp.stack(out)


def smoothed_gradient(objective, dims: int) -> float:
  """d/d theta of E[objective(theta + eps)], eps ~ N(0, SIGMA^2 I_dims), at theta = LOG_LR in every coordinate
  (one shared meta-parameter): Gauss-Hermite quadrature of the gradient of the sum of the partials."""
  x, w = np.polynomial.hermite.hermgauss(16 if dims <= 2 else 10)  # exact for polynomials of degree < 2 nodes
  grad = jax.grad(objective)
  points = np.array(list(itertools.product(x, repeat=dims)))
  weights = np.prod(np.array(list(itertools.product(w, repeat=dims))), axis=1) / np.pi ** (dims / 2)
  partials = jax.vmap(grad)(jnp.asarray(LOG_LR + np.sqrt(2) * SIGMA * points, jnp.float32))
  total = np.sum(weights[:, None] * np.asarray(partials, np.float64))
  return float(total)


def episode_gradients(name: str, *, replicates: int, pairs: int, seed: int = 0, **fields):
  """(replicates, K) estimates of d/d log_lr and (replicates, K, 3) of the unused coordinates, the k-th estimate of
  an episode that starts at step 0 (no stagger: the first episode is made full length)."""
  values = {"meta_batch_size": pairs, "truncation": WIDTH, "loss_cap": 1e6, **fields}
  estimator = estimators.get(name).create(TASK, LogLearningRate(), values, HORIZON)
  theta = LogLearningRate().init(None)
  truncations = HORIZON // estimator.unroll.schedule.truncation

  def replicate(key):
    state = estimator.init(theta, jax.random.fold_in(key, 0))
    full = lambda e: e._replace(length=jnp.full_like(e.length, HORIZON))  # noqa: E731
    state = state._replace(episodes=full(state.episodes)) if hasattr(state, "episodes") else full(state)
    out = []
    for k in range(truncations):
      state, grads, _ = estimator.estimate(theta, state, jax.random.fold_in(key, k + 1))
      out.append(grads)
    return jax.tree.map(lambda *g: jnp.stack(g), *out)

  grads = jax.jit(jax.vmap(replicate))(jax.random.split(jax.random.key(seed), replicates))
  return np.asarray(grads["log_lr"], np.float64), np.asarray(grads["unused"], np.float64)


def assert_matches(estimates: np.ndarray, exact: float, *, sigmas: float = 4.0):
  mean, error = estimates.mean(), estimates.std(ddof=1) / np.sqrt(estimates.size)
  assert error < 0.1 * abs(exact), (mean, error, exact)  # the test can tell a wrong answer from a right one
  assert abs(mean - exact) < sigmas * error, f"mean {mean:.5g} +- {error:.2g}, exact {exact:.5g}"


def test_closed_form_matches_an_unroll():
  from lopt.meta.estimators.truncated import Truncation, Unroller, start_episode
  optimizer, theta = LogLearningRate(), LogLearningRate().init(None)
  unroll = Unroller(TASK, optimizer, Truncation(WIDTH, (HORIZON, HORIZON)))
  episode = start_episode(TASK, optimizer, theta, jax.random.key(0), HORIZON)
  for k in range(TRUNCATIONS):
    value, episode = unroll(theta, episode)
    np.testing.assert_allclose(value, truncation_losses(jnp.full(TRUNCATIONS, LOG_LR))[k], rtol=1e-5)


def test_full_unroll_es_is_unbiased():
  """Antithetic ES over whole episodes: mean = gradient of the smoothed meta-loss of the episode."""
  exact = smoothed_gradient(lambda t: jnp.mean(truncation_losses(jnp.full(TRUNCATIONS, t[0]))), 1)
  estimates, _ = episode_gradients("es", replicates=400, pairs=32, truncation=None, sigma=SIGMA)
  assert_matches(estimates[:, 0], exact)


@pytest.mark.parametrize("k", [0, TRUNCATIONS - 1])
def test_pes_is_unbiased_at_every_truncation(k):
  """PES's k-th estimate: the gradient of E[L_k(theta + eps_1, ..., theta + eps_k)], one eps per truncation."""
  exact = smoothed_gradient(lambda t: truncation_losses(jnp.pad(t, (0, TRUNCATIONS - k - 1)))[k], k + 1)
  estimates, _ = episode_gradients("pes", replicates=400, pairs=32, sigma=SIGMA)
  assert_matches(estimates[:, k], exact)


def test_nres_is_unbiased_at_every_truncation():
  """NRES's k-th estimate: the gradient of E[L_k(theta + eps, ..., theta + eps)], one eps per episode."""
  estimates, _ = episode_gradients("nres", replicates=400, pairs=32, sigma=SIGMA)
  for k in range(TRUNCATIONS):
    exact = smoothed_gradient(lambda t: truncation_losses(jnp.full(TRUNCATIONS, t[0]))[k], 1)
    assert_matches(estimates[:, k], exact)


def test_mixed_full_unroll_matches_the_smoothed_gradient():
  """Metz 2019's combination over whole episodes: both parts estimate the smoothed gradient, so does the mix (the
  weights come from the same samples: a small bias, well inside 4 standard errors here)."""
  exact = smoothed_gradient(lambda t: jnp.mean(truncation_losses(jnp.full(TRUNCATIONS, t[0]))), 1)
  estimates, _ = episode_gradients("mixed", replicates=400, pairs=16, truncation=None, sigma=SIGMA)
  assert_matches(estimates[:, 0], exact)


def test_truncated_backpropagation_is_biased_toward_short_horizons():
  """TBPTT's k-th gradient sees the last truncation's learning rate only; the true gradient of L_k also counts what
  earlier learning rates did to the state it starts from. From the second truncation on they differ, by far more
  than float error (TBPTT has no noise here: one replicate says it)."""
  estimates, _ = episode_gradients("tbptt", replicates=1, pairs=1)
  for k in range(TRUNCATIONS):
    total = float(jax.grad(lambda t: truncation_losses(jnp.full(TRUNCATIONS, t))[k])(jnp.float32(LOG_LR)))
    last_only = float(jax.grad(lambda t: truncation_losses(
        jnp.full(TRUNCATIONS, LOG_LR).at[k].set(t))[k])(jnp.float32(LOG_LR)))
    np.testing.assert_allclose(estimates[0, k], last_only, rtol=1e-4)
    if k == 0:
      np.testing.assert_allclose(estimates[0, k], total, rtol=1e-4)
    else:
      assert abs(estimates[0, k] - total) > 0.2 * abs(total), (k, estimates[0, k], total)


def expected_square_difference(objective, dims: int) -> float:
  """E[(objective(theta + eps) - objective(theta - eps))^2] by Gauss-Hermite quadrature (theta = LOG_LR)."""
  x, w = np.polynomial.hermite.hermgauss(16 if dims <= 2 else 10)
  points = jnp.asarray(np.sqrt(2) * SIGMA * np.array(list(itertools.product(x, repeat=dims))), jnp.float32)
  weights = np.prod(np.array(list(itertools.product(w, repeat=dims))), axis=1) / np.pi ** (dims / 2)
  differences = jax.vmap(lambda e: objective(LOG_LR + e) - objective(LOG_LR - e))(points)
  return float(np.sum(weights * np.asarray(differences, np.float64) ** 2))


@pytest.mark.slow  # a statistical property over many estimates (~12 s); the unbiasedness tests stay in CI
def test_pes_variance_grows_with_truncations_and_nres_does_not():
  """On meta-parameters without effect an estimate is pure noise, (L+ - L-) / (2 sigma^2) times the weight: its
  variance is E[(L+ - L-)^2] / (4 sigma^4) times the weight's. PES's weight at the k-th truncation (from 0) is the
  sum of k + 1 perturbations, NRES's one perturbation; so, scaled by E[(L+ - L-)^2] sigma^2 / (4 sigma^4) (computed
  exactly), PES's variance is k + 1 and NRES's stays 1."""
  pairs = 16
  _, pes = episode_gradients("pes", replicates=200, pairs=pairs, sigma=SIGMA, seed=1)
  _, nres = episode_gradients("nres", replicates=200, pairs=pairs, sigma=SIGMA, seed=1)
  for k in range(TRUNCATIONS):
    pes_scale = expected_square_difference(
        lambda t: truncation_losses(jnp.pad(t, (0, TRUNCATIONS - k - 1)))[k], k + 1) / (4 * SIGMA**2) / pairs
    nres_scale = expected_square_difference(
        lambda t: truncation_losses(jnp.full(TRUNCATIONS, t[0]))[k], 1) / (4 * SIGMA**2) / pairs
    pes_relative, nres_relative = pes[:, k].var() / pes_scale, nres[:, k].var() / nres_scale
    assert abs(pes_relative / (k + 1) - 1) < 0.25, (k, pes_relative)
    assert abs(nres_relative - 1) < 0.25, (k, nres_relative)


def test_validation_objective_reads_the_validation_loss():
  """objective=valid scores the task's validation loss: equal to the training objective where the two losses are the
  same function, different where they are not."""
  shifted = Task("quadratic", init=TASK.init, loss=TASK.loss, horizon=HORIZON,
                 valid_loss=lambda params, key, step: quadratic_loss(params - 0.5))
  theta = LogLearningRate().init(None)
  values = {"meta_batch_size": 4, "truncation": WIDTH, "sigma": SIGMA}
  results = {}
  for name, task, objective in (("train", TASK, "train"), ("same", TASK, "valid"), ("shifted", shifted, "valid")):
    estimator = estimators.get("pes").create(task, LogLearningRate(), {**values, "objective": objective}, HORIZON)
    state = estimator.init(theta, jax.random.key(0))
    results[name] = jax.jit(estimator.estimate)(theta, state, jax.random.key(1))[1]["log_lr"]
  assert float(results["train"]) == float(results["same"])
  assert float(results["train"]) != float(results["shifted"])


def test_adam_references_weigh_nothing_where_every_problem_is_the_same():
  """With reference_learning_rates each pair is divided by its problem's best Adam meta-loss, normalized to mean 1:
  on identical problems at the same step (episodes of one truncation) every weight is exactly 1 and the estimate
  is unchanged, bit for bit."""
  theta = LogLearningRate().init(None)
  values = {"meta_batch_size": 4, "truncation": WIDTH, "sigma": SIGMA}
  grads = {}
  for references in ([], [0.01, 0.3]):
    estimator = estimators.get("nres").create(TASK, LogLearningRate(),
                                              {**values, "reference_learning_rates": references}, WIDTH)
    state = estimator.init(theta, jax.random.key(0))
    for k in range(3):
      state, grads[len(references)], _ = jax.jit(estimator.estimate)(theta, state, jax.random.key(k + 1))
  assert float(grads[0]["log_lr"]) == float(grads[2]["log_lr"]) != 0.0


def test_adam_references_follow_their_pairs_problems_and_weigh_the_ones_adam_solves():
  # Problems of different curvature: the references restart with their pair (same problem, same step) at every
  # episode boundary, and pairs whose problem Adam solves faster weigh more.
  def curvatures(key):
    return CURVATURES * jnp.exp(2.0 * jax.random.normal(key, ()))
  task = Task("scaled", init=lambda key: START, horizon=HORIZON,
              loss=lambda params, key, step: 0.5 * jnp.sum(curvatures(key) * params**2),
              traits={"horizon_range": (WIDTH, 3 * WIDTH)})
  theta = LogLearningRate().init(None)
  values = {"meta_batch_size": 8, "truncation": WIDTH, "sigma": SIGMA, "reference_learning_rates": [0.01, 0.1]}
  estimator = estimators.get("nres").create(task, LogLearningRate(), values, None)
  assert estimator.inner_steps_per_estimate == 4 * 8 * WIDTH
  state = estimator.init(theta, jax.random.key(0))
  step = jax.jit(estimator.estimate)
  for k in range(7):  # episodes of 1-3 truncations: several restarts
    state, grads, _ = step(theta, state, jax.random.key(k + 1))
    pair_steps, reference_steps = state.episodes.inner.step[:, 0], state.references.inner.step
    np.testing.assert_array_equal(reference_steps, np.repeat(np.asarray(pair_steps)[:, None], 2, axis=1))
    np.testing.assert_array_equal(jax.random.key_data(state.references.inner.key[:, 0]),
                                  jax.random.key_data(state.episodes.inner.key[:, 0]))
  np.testing.assert_allclose(state.references.inner.opt_state.hyperparams["learning_rate"],
                             np.tile([0.01, 0.1], (8, 1)))
  assert np.isfinite(float(grads["log_lr"]))

  weights = es.relative_weights(jnp.array([0.5, 0.05, 0.001, jnp.nan]))
  np.testing.assert_allclose(weights, np.array([2.0, 20.0, 100.0, 100.0]) / 55.5, rtol=1e-6)


@pytest.mark.parametrize("value", [[-0.1], [0.0], "0.1", [True], [1e-3] * 17])
def test_bad_reference_learning_rates_are_refused(value):
  with pytest.raises(estimators.EstimatorConfigError, match="reference_learning_rates"):
    estimators.get("nres").validate({"reference_learning_rates": value})


# -- the step-calibration term (step_calibration, with reference_learning_rates) -----------------------------------

def scaled_task(horizon_range=(HORIZON, HORIZON)):
  """Quadratics whose curvature and start (distance to the minimum) depend on the problem key, so that Adam's best
  learning rate and the pairs' relative weights differ: (task, curvatures(key) (2,), start(key) (2,))."""
  def curvatures(key):
    return CURVATURES * jnp.exp(0.5 * jax.random.normal(jax.random.fold_in(key, 0), ()))

  def start(key):
    return START * jnp.exp(1.5 * jax.random.normal(jax.random.fold_in(key, 1), ()))
  return Task("scaled", init=start, horizon=HORIZON,
              loss=lambda params, key, step: 0.5 * jnp.sum(curvatures(key) * params**2),
              traits={"horizon_range": horizon_range}), curvatures, start


def test_measuring_the_update_changes_nothing_else():
  """advance(measure_update=True) returns the same state and losses bit for bit, and each step's log update RMS:
  for gradient descent on the quadratic, log sqrt(mean((lr * c * x_t)^2))."""
  from lopt.meta.unroll import advance, init_inner
  from lopt.optax_adapter import as_optax
  tx = as_optax(LogLearningRate(), LogLearningRate().init(None))
  start = init_inner(TASK, tx, jax.random.key(0))
  plain_state, plain = advance(TASK, tx, start, WIDTH)
  state, (losses, log_rms) = advance(TASK, tx, start, WIDTH, measure_update=True)
  np.testing.assert_array_equal(losses, plain)
  jax.tree.map(np.testing.assert_array_equal, state.params, plain_state.params)
  lr, c = np.exp(LOG_LR), np.asarray(CURVATURES, np.float64)
  x = np.asarray(START, np.float64) * (1 - lr * c) ** np.arange(WIDTH)[:, None]  # (T, 2) params before each step
  np.testing.assert_allclose(log_rms, 0.5 * np.log(np.mean((lr * c * x) ** 2, axis=1)), rtol=1e-5)


def test_step_calibration_zero_is_the_plain_referenced_estimate():
  task, _, _ = scaled_task((WIDTH, 3 * WIDTH))
  theta = LogLearningRate().init(None)
  values = {"meta_batch_size": 4, "truncation": WIDTH, "sigma": SIGMA, "reference_learning_rates": [0.01, 0.1]}
  out = []
  for extra in ({}, {"step_calibration": 0.0}):
    estimator = estimators.get("nres").create(task, LogLearningRate(), {**values, **extra}, None)
    state = estimator.init(theta, jax.random.key(0))
    for k in range(4):
      state, grads, metrics = jax.jit(estimator.estimate)(theta, state, jax.random.key(k + 1))
    out.append((grads, metrics.meta_loss))
    assert metrics.extra is None
  assert float(out[0][0]["log_lr"]) == float(out[1][0]["log_lr"]) != 0.0
  assert float(out[0][1]) == float(out[1][1])


def adam_steps(lr: float, c: np.ndarray, x0: np.ndarray, steps: int):
  """float64 Adam (b1 0.9, b2 0.999, eps 1e-8) from x0 on 0.5 * sum(c x^2): (losses (T,), log update RMS (T,))."""
  x, m, v = x0, 0.0, 0.0
  losses, log_rms = [], []
  for t in range(1, steps + 1):
    g = c * x
    losses.append(0.5 * np.sum(c * x**2))
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
    update = -lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    log_rms.append(0.5 * np.log(np.mean(update**2)))
    x = x + update
  return np.array(losses), np.array(log_rms)


def descent_steps(log_lr: float, c: np.ndarray, x0: np.ndarray, steps: int):
  """float64 gradient descent at exp(log_lr), the same outputs as ``adam_steps``."""
  lr = np.exp(log_lr)
  x = x0 * (1 - lr * c) ** np.arange(steps)[:, None]
  return 0.5 * np.sum(c * x**2, axis=1), 0.5 * np.log(np.mean((lr * c * x) ** 2, axis=1))


def test_step_calibration_term_matches_a_direct_computation():
  """One estimate from step 0 on problems of different curvature, computed again in float64 from the closed forms:
  per trajectory O = (relative weight) * L + lambda * mean_t (r_t - r*_t)^2, r the log RMS of the update, r* that of
  the pair's best Adam reference; the estimate is the mean over pairs of (O+ - O-) / (2 sigma^2) * eps."""
  task, curvatures, start = scaled_task()  # curvatures below 4 here: descent at 0.5 +- eps does not diverge
  theta = LogLearningRate().init(None)
  rates, lam, pairs = [0.01, 0.1, 0.5], 0.7, 8
  values = {"meta_batch_size": pairs, "truncation": WIDTH, "sigma": SIGMA, "reference_learning_rates": rates,
            "step_calibration": lam}
  estimator = estimators.get("nres").create(task, LogLearningRate(), values, None)
  state = estimator.init(theta, jax.random.key(3))
  key = jax.random.key(4)
  _, grads, metrics = jax.jit(estimator.estimate)(theta, state, key)
  _, _, used, _ = estimator.prepare(theta, state, key)  # the perturbations this estimate used

  eps = np.asarray(used["log_lr"], np.float64)
  terms, losses, gaps, best, best_losses = np.zeros((pairs, 2)), np.zeros((pairs, 2)), [], [], np.zeros(pairs)
  for p in range(pairs):
    problem = state.episodes.inner.key[p, 0]
    c, x0 = (np.asarray(f(problem), np.float64) for f in (curvatures, start))
    references = [adam_steps(lr, c, x0, WIDTH) for lr in rates]
    scores = [np.mean(r_losses / r_losses[0]) for r_losses, _ in references]
    best.append(int(np.argmin(scores)))
    best_losses[p] = min(scores)
    target = references[best[-1]][1]
    for s, sign in enumerate((1.0, -1.0)):
      l_losses, l_log_rms = descent_steps(LOG_LR + sign * eps[p], c, x0, WIDTH)
      losses[p, s] = np.mean(l_losses / l_losses[0])
      gaps.append(l_log_rms - target)
      terms[p, s] = np.mean((l_log_rms - target) ** 2)
  weights = 1 / np.maximum(best_losses, es.REFERENCE_FLOOR)
  objectives = (weights / weights.mean())[:, None] * losses + lam * terms
  expected = np.mean((objectives[:, 0] - objectives[:, 1]) / (2 * SIGMA**2) * eps)

  assert np.all(losses < 10.0) and metrics.diverged_problems == 0  # no loss cap: the closed forms apply
  assert len(set(best)) > 1 and np.ptp(weights / weights.mean()) > 0.2  # the best reference and weights vary
  assert terms.mean() > 0.1  # the term is not negligible here, so the comparison tests it
  np.testing.assert_allclose(float(grads["log_lr"]), expected, rtol=1e-3)
  np.testing.assert_allclose(float(metrics.extra["step_calibration"]), terms.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics.extra["step_log_gap"]), np.mean(gaps), rtol=1e-4)
  np.testing.assert_allclose(float(metrics.meta_loss), losses.mean(), rtol=1e-5)


def test_step_calibration_gaps_are_bounded():
  """An all-zero update (log RMS -inf) or a diverged one (NaN, inf) gives a large finite gap, never a NaN."""
  learned = jnp.array([[[-jnp.inf, jnp.nan], [jnp.inf, 0.0]]])  # (1 pair, 2, T=2)
  gaps = es.step_gaps(learned, jnp.array([[0.0, -jnp.inf]]))
  low, high = es.LOG_RMS_BOUNDS
  np.testing.assert_allclose(gaps, [[[low, high - low], [high, -low]]], rtol=1e-6)
  assert np.all(np.isfinite(es.step_calibration_terms(gaps)))


def test_an_all_zero_update_gives_the_calibration_a_zero_derivative_not_a_nan():
  """Backpropagated (tbptt), a learned optimizer whose update is exactly zero (a zero-initialized output layer) has
  a finite bounded log step with derivative 0, so the step-calibration term does not void its meta-gradient; an
  update with a NaN still counts as the upper bound."""
  from lopt.meta.unroll import log_update_rms
  x = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}

  def bounded(scale, extra=0.0):
    return es.bounded_log_rms(log_update_rms(jax.tree.map(lambda u: scale * u + extra, x)))
  value, slope = jax.value_and_grad(bounded)(0.0)
  assert float(value) == pytest.approx(es.LOG_RMS_BOUNDS[0]) and float(slope) == 0.0
  np.testing.assert_allclose(jax.grad(bounded)(1e-3), 1e3, rtol=1e-5)  # inside the bounds: d log(s r) / ds = 1 / s
  assert float(bounded(1.0, jnp.nan)) == pytest.approx(es.LOG_RMS_BOUNDS[1])


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "1", True, [1.0]])
def test_bad_step_calibration_is_refused(value):
  with pytest.raises(estimators.EstimatorConfigError, match="step_calibration"):
    estimators.get("nres").validate({"step_calibration": value, "reference_learning_rates": [0.01]})


def test_step_calibration_needs_references():
  with pytest.raises(estimators.EstimatorConfigError, match="needs reference_learning_rates"):
    estimators.get("pes").validate({"step_calibration": 1.0})
  with pytest.raises(estimators.EstimatorConfigError, match="unknown"):  # mixed has no references
    estimators.get("mixed").validate({"step_calibration": 1.0})
  estimators.get("es").validate({"step_calibration": 0.0})  # off: fine without references
  with pytest.raises(ValueError, match="needs reference_learning_rates"):  # built directly, not through a spec
    es.Antithetic(None, es.ES_RULE, 1, step_calibration=1.0)


# -- the same term backpropagated (tbptt with references) -----------------------------------------------------------

def test_tbptt_references_at_lambda_zero_weigh_nothing_where_every_problem_is_the_same():
  """tbptt relative to Adam references, on identical problems at the same step: every weight is exactly 1 and the
  estimate is the plain one, bit for bit; the references follow their problems (same key, same step)."""
  theta = LogLearningRate().init(None)
  values = {"meta_batch_size": 4, "truncation": WIDTH}
  grads, states = {}, {}
  for references in ([], [0.01, 0.3]):
    estimator = estimators.get("tbptt").create(TASK, LogLearningRate(),
                                               {**values, "reference_learning_rates": references}, WIDTH)
    assert estimator.inner_steps_per_estimate == (1 + len(references)) * 4 * WIDTH
    state = estimator.init(theta, jax.random.key(0))
    for k in range(3):
      state, grads[len(references)], metrics = jax.jit(estimator.estimate)(theta, state, jax.random.key(k + 1))
    states[len(references)] = state
    assert metrics.extra is None
  assert float(grads[0]["log_lr"]) == float(grads[2]["log_lr"]) != 0.0
  referenced = states[2]
  np.testing.assert_array_equal(referenced.references.inner.step,
                                np.repeat(np.asarray(referenced.episodes.inner.step)[:, None], 2, axis=1))
  np.testing.assert_array_equal(jax.random.key_data(referenced.references.inner.key[:, 0]),
                                jax.random.key_data(referenced.episodes.inner.key))


def test_tbptt_step_calibration_is_the_gradient_of_the_objective():
  """One tbptt estimate from step 0 with the step-calibration term, against float64 central differences of the
  closed forms: the mean over problems of d/d log_lr [w L + lambda mean_t (r_t - r*_t)^2], w the relative weight
  and r* the best Adam reference's log update RMS (constants of theta)."""
  task, curvatures, start = scaled_task()
  theta = LogLearningRate().init(None)
  rates, lam, problems = [0.01, 0.1, 0.5], 0.7, 8
  values = {"meta_batch_size": problems, "truncation": WIDTH, "reference_learning_rates": rates,
            "step_calibration": lam}
  estimator = estimators.get("tbptt").create(task, LogLearningRate(), values, None)
  state = estimator.init(theta, jax.random.key(3))
  _, grads, metrics = jax.jit(estimator.estimate)(theta, state, jax.random.key(4))

  def objective(log_lr, c, x0, weight, target):
    losses, log_rms = descent_steps(log_lr, c, x0, WIDTH)
    return weight * np.mean(losses / losses[0]) + lam * np.mean((log_rms - target) ** 2)

  setups, best_losses, terms, gaps = [], [], [], []
  for p in range(problems):
    problem = state.episodes.inner.key[p]
    c, x0 = (np.asarray(f(problem), np.float64) for f in (curvatures, start))
    references = [adam_steps(lr, c, x0, WIDTH) for lr in rates]
    scores = [np.mean(r_losses / r_losses[0]) for r_losses, _ in references]
    best_losses.append(min(scores))
    target = references[int(np.argmin(scores))][1]
    setups.append((c, x0, target))
    log_rms = descent_steps(LOG_LR, c, x0, WIDTH)[1]
    terms.append(np.mean((log_rms - target) ** 2))
    gaps.append(np.mean(log_rms - target))
  weights = 1 / np.maximum(best_losses, es.REFERENCE_FLOOR)
  weights = weights / weights.mean()
  h = 1e-5
  expected = np.mean([(objective(LOG_LR + h, c, x0, w, t) - objective(LOG_LR - h, c, x0, w, t)) / (2 * h)
                      for (c, x0, t), w in zip(setups, weights)])
  calibration_only = np.mean([(objective(LOG_LR + h, c, x0, 0.0, t) - objective(LOG_LR - h, c, x0, 0.0, t))
                              / (2 * h) for c, x0, t in setups])

  assert np.ptp(weights) > 0.2 and np.mean(terms) > 0.1  # the weights vary and the term is not negligible
  assert abs(calibration_only) > 0.1 * abs(expected)  # the term's share of the gradient is visible
  np.testing.assert_allclose(float(grads["log_lr"]), expected, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(grads["unused"]), 0.0)
  np.testing.assert_allclose(float(metrics.extra["step_calibration"]), np.mean(terms), rtol=1e-4)
  np.testing.assert_allclose(float(metrics.extra["step_log_gap"]), np.mean(gaps), rtol=1e-4, atol=1e-6)


# -- which reference is the best: on the truncation, or on the episode so far (reference_window) ---------------------

def reference_truncation_losses(rates, c, x0, steps):
  """(R, steps // WIDTH) float64 meta-losses of each Adam reference's truncations from step 0 (each the mean of the
  losses over the truncation divided by the episode's first), and their (R, steps) log update RMS."""
  runs = [adam_steps(lr, c, x0, steps) for lr in rates]
  losses = np.array([(r_losses / r_losses[0]).reshape(-1, WIDTH).mean(axis=1) for r_losses, _ in runs])
  return losses, np.array([log_rms for _, log_rms in runs])


@pytest.mark.parametrize("name", ["nres", "tbptt"])
def test_episode_window_scores_are_the_references_sums_since_their_episode_began(name):
  """reference_window="episode": the state carries each reference's meta-losses summed over the truncations since
  its problem's episode began (float64 closed forms), reset at a restart; the default keeps no scores."""
  task, curvatures, start = scaled_task((2 * WIDTH, 4 * WIDTH))
  theta = LogLearningRate().init(None)
  rates = [0.01, 0.1, 0.5]
  values = {"meta_batch_size": 8, "truncation": WIDTH, "reference_learning_rates": rates,
            "reference_window": "episode", **({"sigma": SIGMA} if name == "nres" else {})}
  estimator = estimators.get(name).create(task, LogLearningRate(), values, None)
  state = estimator.init(theta, jax.random.key(0))
  step = jax.jit(estimator.estimate)
  for k in range(5):  # episodes of 1-4 truncations: some restart on the way
    state, _, _ = step(theta, state, jax.random.key(k + 1))
  episodes = state.episodes
  keys, steps = (episodes.inner.key[:, 0], episodes.inner.step[:, 0]) if name == "nres" else (
      episodes.inner.key, episodes.inner.step)
  assert len(set(np.asarray(steps).tolist())) > 1  # problems at different points of their episodes
  for p in range(8):
    c, x0 = (np.asarray(f(keys[p]), np.float64) for f in (curvatures, start))
    losses, _ = reference_truncation_losses(rates, c, x0, int(steps[p]))
    np.testing.assert_allclose(state.scores[p], losses.sum(axis=1), rtol=1e-4)
  plain = estimators.get(name).create(task, LogLearningRate(), {**values, "reference_window": "truncation"}, None)
  assert plain.init(theta, jax.random.key(0)).scores is None  # no new leaves: older checkpoints still match


@pytest.mark.parametrize("weight_window", ["truncation", "episode"])
def test_tbptt_episode_window_calibrates_to_the_reference_best_over_the_episode(weight_window):
  """The second truncation of each episode, backpropagated with reference_window="episode": the target step and
  the weight are those of the reference with the lowest meta-loss summed over both truncations, which here differs
  from the best on the second truncation alone for some problems; against float64 central differences. The weight
  divides by that reference's meta-loss on the second truncation, or with weight_window="episode" by its mean over
  both (the first truncation's losses are larger, so the second weighs less there)."""
  task, curvatures, start = scaled_task((2 * WIDTH, 2 * WIDTH))
  theta = LogLearningRate().init(None)
  rates, lam, problems = [0.01, 0.1, 0.5], 0.7, 16
  values = {"meta_batch_size": problems, "truncation": WIDTH, "reference_learning_rates": rates,
            "step_calibration": lam, "reference_window": "episode", "weight_window": weight_window}
  estimator = estimators.get("tbptt").create(task, LogLearningRate(), values, None)
  state = estimator.init(theta, jax.random.key(3))
  state, _, _ = jax.jit(estimator.estimate)(theta, state, jax.random.key(4))
  # one truncation done and one to go; the others (first episodes of one truncation) restart with a new problem
  second = np.asarray(state.episodes.length) == 2 * WIDTH
  assert 4 <= second.sum() < problems
  state, grads, metrics = jax.jit(estimator.estimate)(theta, state, jax.random.key(5))
  assert np.all(np.asarray(state.episodes.inner.step) == np.where(second, 2 * WIDTH, WIDTH))

  lr = np.exp(LOG_LR)
  def objective(log_lr, c, x_start, initial, weight, target):
    losses, log_rms = descent_steps(log_lr, c, x_start, WIDTH)
    return weight * np.mean(losses / initial) + lam * np.mean((log_rms - target) ** 2)

  setups, chosen, switched = [], [], 0
  for p in range(problems):
    c, x0 = (np.asarray(f(state.episodes.inner.key[p]), np.float64) for f in (curvatures, start))
    done = WIDTH if second[p] else 0  # a problem restarted by this estimate starts its episode here
    losses, log_rms = reference_truncation_losses(rates, c, x0, done + WIDTH)
    best = int(np.argmin(losses.sum(axis=1)))
    switched += best != int(np.argmin(losses[:, -1]))
    chosen.append(losses[best, -1] if weight_window == "truncation" else losses[best].mean())
    setups.append((c, x0 * (1 - lr * c) ** done, 0.5 * np.sum(c * x0**2), log_rms[best, done:]))
  weights = 1 / np.maximum(chosen, es.REFERENCE_FLOOR)
  weights = weights / weights.mean()
  h = 1e-5
  expected = np.mean([(objective(LOG_LR + h, *setup[:3], w, setup[3]) - objective(LOG_LR - h, *setup[:3], w, setup[3]))
                      / (2 * h) for setup, w in zip(setups, weights)])
  assert switched > 0  # the episode's best is not the truncation's for some problems: the window matters here
  np.testing.assert_allclose(float(grads["log_lr"]), expected, rtol=1e-3)
  assert metrics.extra["step_calibration"] > 0


def test_reference_window_is_checked():
  with pytest.raises(estimators.EstimatorConfigError, match="'reference_window' must be one of"):
    estimators.get("nres").validate({"reference_window": "run", "reference_learning_rates": [0.01]})
  with pytest.raises(estimators.EstimatorConfigError, match="reference_window 'episode' needs reference_learning"):
    estimators.get("tbptt").validate({"reference_window": "episode"})
  with pytest.raises(ValueError, match="reference_window 'run'"):
    es.Antithetic(None, es.ES_RULE, 1, reference_learning_rates=(0.01,), reference_window="run")


def test_weight_window_is_checked():
  with pytest.raises(estimators.EstimatorConfigError, match="'weight_window' must be one of"):
    estimators.get("pes").validate({"weight_window": "run", "reference_learning_rates": [0.01],
                                    "reference_window": "episode"})
  with pytest.raises(estimators.EstimatorConfigError, match="weight_window 'episode' needs reference_window=episode"):
    estimators.get("tbptt").validate({"weight_window": "episode", "reference_learning_rates": [0.01]})
  with pytest.raises(ValueError, match="weight_window 'episode' needs reference_window 'episode'"):
    es.Antithetic(None, es.ES_RULE, 1, reference_learning_rates=(0.01,), weight_window="episode")


def test_nres_episode_weights_are_the_truncation_weights_on_first_truncations_only():
  """nres with weight_window="episode": on the first truncation of every episode the episode's mean is that
  truncation's meta-loss, so the estimate equals the default's bit for bit; on the second it differs (the weight
  divides by the mean over both truncations)."""
  task, _, _ = scaled_task((2 * WIDTH, 2 * WIDTH))
  theta = LogLearningRate().init(None)
  values = {"meta_batch_size": 8, "truncation": WIDTH, "reference_learning_rates": [0.01, 0.1, 0.5],
            "reference_window": "episode", "sigma": SIGMA}
  grads = {}
  for window in ("truncation", "episode"):
    estimator = estimators.get("nres").create(task, LogLearningRate(), {**values, "weight_window": window}, None)
    state = estimator.init(theta, jax.random.key(0))
    state = state._replace(episodes=state.episodes._replace(length=jnp.full_like(state.episodes.length, 2 * WIDTH)))
    step = jax.jit(estimator.estimate)
    state, first, _ = step(theta, state, jax.random.key(1))
    _, second, _ = step(theta, state, jax.random.key(2))
    grads[window] = (float(first["log_lr"]), float(second["log_lr"]))
  assert grads["truncation"][0] == grads["episode"][0] != 0.0
  assert abs(grads["truncation"][1] - grads["episode"][1]) > 1e-3 * abs(grads["truncation"][1])


def test_tbptt_step_calibration_needs_references():
  with pytest.raises(estimators.EstimatorConfigError, match="needs reference_learning_rates"):
    estimators.get("tbptt").validate({"step_calibration": 1.0})
  from lopt.meta.estimators.tbptt import TruncatedBPTT
  with pytest.raises(ValueError, match="needs reference_learning_rates"):
    TruncatedBPTT(None, 1, step_calibration=1.0)


def test_soft_count_terms_telescope_to_the_soft_loss_of_the_run_so_far():
  """win_temperature: the truncations' objectives g_k - g_(k-1) sum over an episode to sigmoid(log(the members'
  summed meta-losses / the best reference's) / tau) - 1/2, whichever reference is best at each truncation; sums left
  over from an earlier episode are ignored where the episode starts."""
  rng = np.random.default_rng(0)
  pairs, references, tau = 6, 3, 0.1
  sums, scores = jnp.full((pairs, 2), 123.0), jnp.full((pairs, references), 7.0)  # stale: the episode starts
  total, losses, reference_losses = 0.0, [], []
  for k in range(TRUNCATIONS):
    losses.append(rng.uniform(0.1, 1.0, (pairs, 2)).astype(np.float32))
    reference_losses.append(rng.uniform(0.1, 1.0, (pairs, references)).astype(np.float32))
    steps = jnp.full(pairs, k * WIDTH)
    new_scores = es.episode_scores(scores, jnp.asarray(reference_losses[-1]), steps == 0)
    count = es.soft_count_terms(sums, jnp.asarray(losses[-1]), scores, new_scores, steps, WIDTH, tau)
    total, sums, scores = total + count.objective, count.sums, new_scores
  ratio = np.sum(losses, axis=0) / np.min(np.sum(reference_losses, axis=0), axis=1)[:, None]
  expected = 1 / (1 + np.exp(-np.log(ratio) / tau))
  np.testing.assert_allclose(count.soft, expected, rtol=1e-5)
  np.testing.assert_allclose(total, expected - 0.5, atol=1e-5)
  soft = es.soft_losses(jnp.array([[1.0, 100.0], [0.0, jnp.nan]]), jnp.array([[1.0, 2.0], [0.0, 0.0]]),
                        jnp.array([1, 2]), tau)
  np.testing.assert_allclose(soft, [[0.5, 1.0], [0.0, 1.0]], atol=1e-6)  # a tie; lost by far; won; not finite


def test_nres_soft_count_moves_a_too_small_step_toward_the_best_reference():
  """On quadratics where gradient descent at 0.5 beats 0.05, the soft count's estimate (tau 1: not saturated) says
  to raise the learning rate and reports the soft losses above 1/2 (losing)."""
  task, _, _ = scaled_task((2 * WIDTH, 2 * WIDTH))
  theta = {**LogLearningRate().init(None), "log_lr": jnp.asarray(np.log(0.05), jnp.float32)}
  values = {"meta_batch_size": 64, "truncation": WIDTH, "sigma": SIGMA, "reference_learning_rates": [0.01, 0.1, 0.5],
            "reference_window": "episode", "win_temperature": 1.0}
  estimator = estimators.get("nres").create(task, LogLearningRate(), values, None)
  state = estimator.init(theta, jax.random.key(0))
  assert state.learned_sums.shape == (64, 2)
  step = jax.jit(estimator.estimate)
  total = 0.0
  for k in range(4):  # two episodes of two truncations
    state, grads, metrics = step(theta, state, jax.random.key(k + 1))
    total += float(grads["log_lr"])
    assert 0.5 < float(metrics.extra["soft_losses"]) < 1.0
  assert total < 0.0


def test_win_temperature_is_checked():
  with pytest.raises(estimators.EstimatorConfigError, match="win_temperature 0.1 needs reference_window=episode"):
    estimators.get("nres").validate({"win_temperature": 0.1, "reference_learning_rates": [0.01]})
  with pytest.raises(estimators.EstimatorConfigError, match="win_temperature"):
    estimators.get("nres").validate({"win_temperature": -1.0})
  with pytest.raises(estimators.EstimatorConfigError, match="win_temperature"):  # not a backpropagation field
    estimators.get("tbptt").validate({"win_temperature": 0.1, "reference_learning_rates": [0.01],
                                      "reference_window": "episode"})
  with pytest.raises(ValueError, match="win_temperature needs reference_learning_rates"):
    es.Antithetic(None, es.ES_RULE, 1, win_temperature=0.1)
