"""The hierarchical optimizer: the untrained optimizer is Adam, losses are optional, scale invariance, state size;
the PyTorch rule against the JAX optimizer in float64 (learning rate, weight decay, losses, validation losses, the
horizon hint); lopt.torch's state dicts, skipped steps and refused group keys with a rule that keeps global state."""

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
from lopt.architectures.hierarchical import optimizer as hjax
from lopt.architectures.hierarchical.optimizer import HierarchicalOptimizer, TensorState, coordinate_groups
from lopt.architectures.hierarchical.spec import FRACTION_POWERS, TIME_SCALES
from lopt.io.checkpoint import save_optimizer

torch = pytest.importorskip("torch")
from lopt.architectures.hierarchical import torch as htorch  # noqa: E402
from lopt.torch import LearnedOptimizer  # noqa: E402

STEPS, HORIZON, VALID_EVERY = 30, 40, 5


@functools.cache
def default_theta(optimizer=HierarchicalOptimizer()):
  """``optimizer.init`` (numpy leaves, read-only: shared)."""
  return jax.tree.map(np.asarray, jax.jit(optimizer.init)(jax.random.key(0)))


def random_theta(optimizer, seed=1, scale=0.3):
  """The default init plus scale * N(0, 1) on every meta-parameter (numpy: eager jax.random compiles per shape), so
  that every part matters -- the init zeroes the MLP's last layer, the step readout and the schedule."""
  theta = default_theta(optimizer)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.array(x + scale * rng.normal(size=x.shape), np.float32), theta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  optimizer = HierarchicalOptimizer()
  return save_optimizer(tmp_path_factory.mktemp("hierarchical") / "opt", optimizer, random_theta(optimizer))


def model() -> dict:
  """A dense weight (factored second moment), an OIHW conv kernel, a vector bias and a 0-d scalar."""
  rng = np.random.default_rng(2)
  return {"w": rng.normal(size=(5, 4)), "conv": 0.5 * rng.normal(size=(3, 2, 3, 3)), "b": 0.1 * rng.normal(size=4),
          "s": np.array(0.7)}


def schedule(steps=STEPS, seed=3):
  """Per step: gradients, a training loss, and a validation loss every VALID_EVERY steps (None otherwise)."""
  rng = np.random.default_rng(seed)
  shapes = {k: v.shape for k, v in model().items()}
  return [({k: (1 + 0.1 * t) * rng.normal(size=s) for k, s in shapes.items()},
           2.0 * np.exp(-0.05 * t) + 0.1 * rng.random(),
           2.2 * np.exp(-0.04 * t) if t % VALID_EVERY == 0 else None) for t in range(steps)]


def train_jax(saved):
  """The JAX run in float64 (learning rate 0.5, weight decay 0.1): final parameters and the final state."""
  tx = lopt.load(saved).as_optax(learning_rate=0.5, weight_decay=0.1)
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, model())
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads, loss, valid in schedule():
      updates, state = update(jax.tree.map(jnp.asarray, grads), state, params, loss=loss,
                              valid_loss=np.nan if valid is None else valid, num_steps=HORIZON)
      params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, state.inner)


@pytest.fixture(scope="module")
def jax_run(saved):
  return train_jax(saved)


# Float64 global features for both sides (test_torch_matches_jax_given_float64_global_features): fixed loss
# features, and the time features of optimizer.time_features in float64.
FIXED_LOSS_FEATURES = np.random.default_rng(6).uniform(-1, 1, size=hjax.loss_features(
    hjax.init_accumulator(), hjax.init_accumulator()).shape)


def jax_time_features(step, num_steps):
  t = step.astype(jnp.float64)
  return jnp.concatenate([jnp.tanh(t / jnp.asarray(TIME_SCALES, jnp.float64)),
                          (t / num_steps) ** jnp.asarray(FRACTION_POWERS, jnp.float64)])


def torch_time_features(step, num_steps):
  t = step.to(torch.float64)
  return torch.cat([torch.tanh(t / torch.tensor(TIME_SCALES, dtype=torch.float64)),
                    (t / num_steps) ** torch.tensor(FRACTION_POWERS, dtype=torch.float64)]).tolist()


@pytest.fixture(scope="module")
def jax_run_float64_features(saved):
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hjax, "loss_features", lambda train, valid: jnp.asarray(FIXED_LOSS_FEATURES))
    patch.setattr(hjax, "time_features", jax_time_features)
    return train_jax(saved)


def torch_params(dtype=torch.float64) -> dict:
  return {k: torch.nn.Parameter(torch.tensor(v, dtype=dtype)) for k, v in model().items()}


def train_torch(optimizer, params, steps):
  for grads, loss, valid in steps:
    for k, g in grads.items():
      params[k].grad = torch.tensor(g, dtype=params[k].dtype)
    optimizer.step(loss=loss, valid_loss=valid)


def relative_errors(expected: dict, params: dict) -> dict:
  return {k: float(np.linalg.norm(params[k].detach().numpy() - expected[k]) / np.linalg.norm(expected[k]))
          for k in expected}


# -- PyTorch against JAX -----------------------------------------------------------------------------------------

def test_torch_matches_jax_given_float64_global_features(saved, jax_run_float64_features, monkeypatch):
  """Everything but the float32 global features -- clipping, momenta, factored second moments, the slow average,
  the batched LSTM, the learned schedule, the MLP, learning rate and weight decay -- in float64 to rounding, when
  both sides compute the global features in float64 (see test_torch_matches_jax)."""
  expected, _ = jax_run_float64_features
  monkeypatch.setattr(htorch, "loss_features", lambda state: FIXED_LOSS_FEATURES.tolist())
  monkeypatch.setattr(htorch, "time_features", torch_time_features)
  params = torch_params()
  train_torch(LearnedOptimizer(params.values(), saved, lr=0.5, weight_decay=0.1, num_steps=HORIZON), params,
              schedule())
  moved = relative_errors(expected, {k: torch.tensor(v) for k, v in model().items()})
  assert min(moved.values()) > 1e-2, f"the parameters barely moved ({moved}): the check would be vacuous"
  errors = relative_errors(expected, params)
  assert max(errors.values()) < 1e-12, errors


def test_torch_matches_jax(saved, jax_run):
  """End to end, the global features included. Both sides keep the loss accumulators and compute the global
  features in float32 (``optimizer.py``), and XLA's float32 tanh and log differ from torch's in the last bit for
  many inputs (about 60% and 10% of them): ~1e-7 relative noise on the LSTM's global inputs, which moves the log
  steps by ~1e-6 and the parameters by up to ~1e-6 relative over this run (measured 8e-7)."""
  expected, state = jax_run
  params = torch_params()
  optimizer = LearnedOptimizer(params.values(), saved, lr=0.5, weight_decay=0.1, num_steps=HORIZON)
  train_torch(optimizer, params, schedule())
  errors = relative_errors(expected, params)
  assert max(errors.values()) < 1e-5, errors
  found = optimizer.state["lopt_global"]
  assert int(found["step"]) == int(state.step) == STEPS
  for name in ("train", "valid"):
    for part in ("seen", "first", "last", "ema"):
      np.testing.assert_allclose(found[f"{name}_{part}"].numpy(), getattr(getattr(state, name), part), rtol=1e-6)
  tensors = HierarchicalOptimizer().tensor_states(state, expected)
  coordinates = HierarchicalOptimizer().coordinate_states(state, expected)
  for k, p in params.items():  # per-tensor state: float64 like its parameter, the layout of the JAX state
    np.testing.assert_allclose(optimizer.state[p]["log_step"].numpy(), tensors[k].log_step, atol=1e-4)
    np.testing.assert_allclose(optimizer.state[p]["momentum"].numpy(), coordinates[k].momentum, rtol=1e-5,
                               atol=1e-12)
    assert optimizer.state[p]["h"].dtype == torch.float64 and int(optimizer.state[p]["step"]) == STEPS


@pytest.mark.parametrize("num_steps", [None, 0, 40])
def test_global_features_match_jax(num_steps):
  """The accumulators and the global features, torch against JAX on the same float32 inputs (to float32
  rounding: the two use different tanh and log)."""
  rng = np.random.default_rng(7)
  train, valid = hjax.init_accumulator(), hjax.init_accumulator()
  state = htorch.init_global_state()
  for t in range(1, 25):
    loss = float(np.exp(rng.normal()))
    valid_loss = float(np.exp(rng.normal())) if t % 4 == 0 else (np.inf if t % 7 == 0 else None)
    train, valid = hjax.accumulate(train, loss), hjax.accumulate(valid, valid_loss)
    htorch.accumulate(state, "train", torch.tensor(loss, dtype=torch.float32))
    htorch.accumulate(state, "valid", None if valid_loss is None else torch.tensor(valid_loss, dtype=torch.float32))
    for name, acc in (("train", train), ("valid", valid)):
      for part in ("seen", "first", "last", "ema"):
        np.testing.assert_allclose(state[f"{name}_{part}"].numpy(), getattr(acc, part), rtol=1e-6, atol=1e-6)
    step = np.int32(t)
    expected = np.concatenate([hjax.loss_features(train, valid), hjax.time_features(jnp.asarray(step), num_steps)])
    found = np.asarray(htorch.loss_features(state) + htorch.time_features(torch.tensor(step), num_steps))
    assert np.array_equal(found.astype(np.float32), found)   # float32 values
    np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-6)


# -- the JAX optimizer ---------------------------------------------------------------------------------------------

# The tests of one vector parameter share these compiled updates (one per combination of given losses).
OPTIMIZER = HierarchicalOptimizer()
UPDATE = jax.jit(OPTIMIZER.update)


def test_untrained_optimizer_is_adam_with_a_hypergradient_step():
  """Default init: the first update is -step_scale * m_hat / sqrt(v_hat) (Adam's first step, ~ -step_scale *
  sign(g)); at the second step with the same gradient the log step grows by the alignment gain * cos = 1. (To
  1e-4: in float32, 1 - rms_decay^t alone is off by 1e-5.)"""
  theta = default_theta(OPTIMIZER)
  g = jnp.asarray([0.3, -0.3, 0.3, -0.3, 0.3], jnp.float32)
  params = {"b": jnp.linspace(-1, 1, 5, dtype=jnp.float32)}
  state = OPTIMIZER.init_state(theta, params)
  updates, state = UPDATE(theta, state, {"b": g}, params)
  b1, rho = OPTIMIZER.momentum_decays[0], OPTIMIZER.rms_decay
  g = np.asarray(g, np.float64)
  m_hat = (1 - b1) * g / (1 - b1)
  v_hat = (1 - rho) * (g * g + 1e-30) / (1 - rho)
  np.testing.assert_allclose(updates["b"], -OPTIMIZER.step_scale * m_hat / np.sqrt(v_hat + 1e-12), rtol=1e-4)
  assert float(OPTIMIZER.tensor_states(state, params)["b"].log_step) == 0.0
  _, state = UPDATE(theta, state, {"b": jnp.asarray(g, jnp.float32)}, params)
  np.testing.assert_allclose(OPTIMIZER.tensor_states(state, params)["b"].log_step, theta["step"]["alignment"][0],
                             rtol=1e-5)


@pytest.mark.parametrize("units", [False, pytest.param(True, marks=pytest.mark.slow)])  # True: 24 s of CI
def test_tensors_of_one_shape_stepped_as_a_batch_give_the_same_steps(monkeypatch, units):
  """Accelerators step tensors of one shape and dtype as one batch (``_batches_tensors``): the same updates and
  states as one tensor at a time, with the MLP in either form, for a mix of grouped and lone tensors."""
  theta = random_theta(OPTIMIZER)
  rng = np.random.default_rng(3)
  shapes = {"w1": (7, 5), "w2": (7, 5), "w3": (7, 5), "b1": (5,), "b2": (5,), "conv": (3, 2, 3, 3), "s": ()}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s) * (1 + t), jnp.float32) for k, s in shapes.items()} for t in range(4)]
  monkeypatch.setattr(HierarchicalOptimizer, "_units_form", lambda self: units)

  def run(batched):
    monkeypatch.setattr(HierarchicalOptimizer, "_batches_tensors", lambda self: batched)
    update = jax.jit(functools.partial(OPTIMIZER.update, num_steps=10))
    p, state, steps = params, OPTIMIZER.init_state(theta, params), []
    for t, g in enumerate(grads):
      u, state = update(theta, state, g, p, loss=2.0 - 0.1 * t, valid_loss=2.1 if t % 2 else np.nan)
      p = jax.tree.map(lambda a, b: a + b, p, u)
      steps.append(u)
    return steps, state

  groups = coordinate_groups(jax.tree.leaves(params))
  assert sorted(len(g) for g in groups) == [1, 1, 2, 3]
  (one, one_state), (batch, batch_state) = run(False), run(True)
  for a, b in zip(jax.tree.leaves((one, one_state)), jax.tree.leaves((batch, batch_state))):
    np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=2e-5, atol=1e-7)


def test_the_mlp_form_setting_chooses_the_form_and_refuses_unknown_values(monkeypatch):
  """LOPT_JAX_MLP_FORM: ``auto`` is the backend's choice (units on accelerators), ``matrix`` never units, ``units``
  wherever the MLP is small; an MLP above UNITS_LIMIT products is never written unit by unit; anything else is a
  clear error (exit 2 from the CLI). Both forms give the same steps (the test above)."""
  from lopt.errors import UserError
  accelerator = jax.default_backend() != "cpu"
  for form, expected in (("auto", accelerator), ("matrix", False), ("units", True)):
    monkeypatch.setattr(hjax, "MLP_FORM", form)
    assert OPTIMIZER._units_form() == expected, form
    monkeypatch.setattr(hjax, "UNITS_LIMIT", 1)  # OPTIMIZER's MLP is larger than this
    assert not OPTIMIZER._units_form()
    monkeypatch.undo()
  monkeypatch.setattr(hjax, "MLP_FORM", "unit")
  with pytest.raises(UserError, match="LOPT_JAX_MLP_FORM is 'unit'; allowed: auto, matrix, units"):
    OPTIMIZER._units_form()


def test_losses_are_optional_and_a_missing_validation_loss_changes_nothing():
  theta = random_theta(OPTIMIZER)
  params, grads = {"b": jnp.ones(5)}, {"b": jnp.linspace(-1, 1, 5)}
  state = OPTIMIZER.init_state(theta, params)
  for _ in range(3):  # no losses, no horizon
    updates, state = UPDATE(theta, state, grads, params)
    assert bool(jnp.all(jnp.isfinite(updates["b"]))) and float(jnp.max(jnp.abs(updates["b"]))) > 0
  assert float(state.train.seen) == float(state.valid.seen) == 0.0
  _, with_valid = UPDATE(theta, state, grads, params, loss=1.5, valid_loss=2.0)
  assert float(with_valid.valid.seen) == 1.0
  _, after = UPDATE(theta, with_valid, grads, params, loss=1.2, valid_loss=np.nan)
  for a, b in zip(after.valid, with_valid.valid):
    np.testing.assert_array_equal(a, b)
  assert float(after.train.last) == pytest.approx(np.log(1.2))


def test_a_zero_tensor_with_a_zero_gradient_stays_finite():
  theta = default_theta(OPTIMIZER)
  params = {"b": jnp.zeros(5)}
  state = OPTIMIZER.init_state(theta, params)
  _, state = UPDATE(theta, state, {"b": jnp.zeros(5)}, params)
  updates, _ = UPDATE(theta, state, {"b": jnp.ones(5)}, params)
  assert bool(jnp.all(jnp.isfinite(updates["b"])))


def test_the_update_of_a_tensor_does_not_depend_on_its_gradient_scale():
  """g -> 10 g, every step, the losses the same: the updates do not change (up to the epsilons).
  Every feature is scale-free but the log RMS of g, an LSTM input by design: its weights are zeroed here."""
  optimizer = HierarchicalOptimizer()
  theta = random_theta(optimizer)
  theta["lstm"]["w"][0] = 0.0
  params = {"w": jnp.asarray(np.random.default_rng(4).normal(size=(6, 4)), jnp.float32)}
  update = jax.jit(optimizer.update)

  def run(factor):
    p, state, found = params, optimizer.init_state(theta, params), []
    rng = np.random.default_rng(5)
    for t in range(6):
      grads = {"w": jnp.asarray(factor * rng.normal(size=(6, 4)), jnp.float32)}
      updates, state = update(theta, state, grads, p, loss=1.0 / (t + 1), num_steps=10)
      p = optax.apply_updates(p, updates)
      found.append(updates["w"])
    return found

  for a, b in zip(run(1.0), run(10.0)):
    assert float(jnp.max(jnp.abs(a))) > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(a))))


def test_state_is_about_three_times_the_parameters():
  """Two momenta, the slow average and an Adafactor second moment: ~3 numbers per parameter, plus per tensor."""
  optimizer = HierarchicalOptimizer()
  theta = jax.eval_shape(optimizer.init, jax.random.key(0))
  params = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32), "b": jax.ShapeDtypeStruct((256,), jnp.float32)}
  state = jax.eval_shape(optimizer.init_state, theta, params)
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))  # noqa: E731
  assert count(state) <= 3.2 * count(params)


def test_a_fresh_state_shares_no_buffer_with_the_parameters_and_steps_donated():
  """init_state's slow averages are copies of p (stacked for a group, copied for a lone tensor), so that a jitted step
  may donate both the parameters and the state."""
  theta = default_theta(OPTIMIZER)
  params = {"w1": jnp.ones((4, 3)), "w2": jnp.full((4, 3), 2.0), "w3": jnp.ones((5, 2))}
  state = OPTIMIZER.init_state(theta, params)
  pointers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)}
  assert not pointers & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)}
  assert [tuple(m.shape) for m in state.momentum] == [(2, 4, 3, 2), (5, 2, 2)]
  np.testing.assert_array_equal(state.average[0], np.stack([np.ones((4, 3)), np.full((4, 3), 2.0)]))

  def step(params, state, grads):
    updates, state = OPTIMIZER.update(theta, state, grads, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state
  params, state = jax.jit(step, donate_argnums=(0, 1))(params, state, jax.tree.map(jnp.ones_like, params))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


# -- lopt.torch with a rule that keeps global state ----------------------------------------------------------------

def test_zero_tensor_with_zero_gradient_stays_finite_in_torch(saved):
  params = {"w": torch.nn.Parameter(torch.ones(3, 2)), "b": torch.nn.Parameter(torch.zeros(2))}
  optimizer = LearnedOptimizer(params.values(), saved)
  for g in (0.0, 1.0, 1.0):
    params["w"].grad, params["b"].grad = torch.ones(3, 2), torch.full((2,), g)
    optimizer.step(loss=1.0)
  assert all(torch.isfinite(p).all() for p in params.values())


def test_state_dict_round_trip_continues_identically(saved):
  steps = schedule()
  params = torch_params()
  optimizer = LearnedOptimizer(params.values(), saved, lr=0.5, weight_decay=0.1, num_steps=HORIZON)
  train_torch(optimizer, params, steps[:12])
  buffer = io.BytesIO()
  torch.save({"params": {k: p.detach().clone() for k, p in params.items()}, "optimizer": optimizer.state_dict()},
             buffer)
  buffer.seek(0)
  saved_state = torch.load(buffer, weights_only=True)
  resumed_params = {k: torch.nn.Parameter(v) for k, v in saved_state["params"].items()}
  resumed = LearnedOptimizer(resumed_params.values(), saved)  # lr, weight decay and horizon come from the state
  resumed.load_state_dict(saved_state["optimizer"])
  assert resumed.num_steps == HORIZON and resumed.param_groups[0]["weight_decay"] == 0.1
  train_torch(optimizer, params, steps[12:])
  train_torch(resumed, resumed_params, steps[12:])
  for k in params:
    assert torch.equal(params[k], resumed_params[k])
  assert int(resumed.state["lopt_global"]["step"]) == STEPS


def test_state_dicts_do_not_share_the_global_state(saved):
  params = torch_params()
  optimizer = LearnedOptimizer(params.values(), saved)
  train_torch(optimizer, params, schedule(3))
  state = optimizer.state_dict()
  other = LearnedOptimizer(torch_params().values(), saved)
  other.load_state_dict(state)
  train_torch(optimizer, params, schedule(2))
  assert int(state["state"]["lopt_global"]["step"]) == int(other.state["lopt_global"]["step"]) == 3


def test_low_precision_parameters_keep_a_float32_recurrent_state_across_state_dicts(saved):
  """As the JAX layout: a bfloat16 parameter's momenta are bfloat16, its LSTM state float32 -- also after
  load_state_dict, which would cast every floating state tensor to the parameter's dtype."""
  params = {k: p.to(torch.bfloat16) for k, p in torch_params().items()}
  params = {k: torch.nn.Parameter(p.detach()) for k, p in params.items()}
  optimizer = LearnedOptimizer(params.values(), saved)
  train_torch(optimizer, params, schedule(3))
  resumed_params = {k: torch.nn.Parameter(p.detach().clone()) for k, p in params.items()}
  resumed = LearnedOptimizer(resumed_params.values(), saved)
  resumed.load_state_dict(optimizer.state_dict())
  for p in resumed_params.values():
    state = resumed.state[p]
    assert state["momentum"].dtype == torch.bfloat16 and state["h"].dtype == state["log_step"].dtype == torch.float32
  for (k, p), q in zip(params.items(), resumed_params.values()):
    for name, value in optimizer.state[p].items():
      assert torch.equal(value, resumed.state[q][name]), (k, name)


def test_non_finite_gradients_skip_the_step_and_leave_the_global_state(saved):
  params = torch_params()
  optimizer = LearnedOptimizer(params.values(), saved, weight_decay=0.1)
  steps = schedule(4)
  train_torch(optimizer, params, steps[:2])
  snapshot = lambda: ({k: v.clone() for k, v in optimizer.state["lopt_global"].items()},  # noqa: E731
                      {k: {n: v.clone() for n, v in optimizer.state[p].items()} for k, p in params.items()},
                      {k: p.detach().clone() for k, p in params.items()})
  before = snapshot()
  grads, _, _ = steps[2]
  grads = dict(grads, b=np.array([1.0, np.nan, 1.0, 1.0]))
  train_torch(optimizer, params, [(grads, 0.5, 0.7)])
  assert optimizer.skipped_steps == 1
  after = snapshot()
  for found, expected in ((after[0], before[0]), (after[2], before[2])):  # global state, parameters
    assert all(torch.equal(found[k], expected[k]) for k in expected)
  assert all(torch.equal(after[1][k][n], before[1][k][n]) for k in before[1] for n in before[1][k])
  train_torch(optimizer, params, steps[3:])
  assert int(optimizer.state["lopt_global"]["step"]) == 3 and optimizer.skipped_steps == 1


def test_losses_through_the_closure_or_keywords(saved):
  params = torch_params()
  optimizer = LearnedOptimizer(params.values(), saved)
  for p in params.values():
    p.grad = torch.ones_like(p)
  assert optimizer.step(lambda: torch.tensor(2.0)).item() == 2.0  # the closure's loss is the training loss
  state = optimizer.state["lopt_global"]
  assert float(state["train_seen"]) == 1.0 and float(state["train_last"]) == pytest.approx(np.log(2.0))
  optimizer.step(loss=torch.tensor([1.0]), valid_loss=float("nan"))  # a one-element tensor; NaN: none this step
  assert float(optimizer.state["lopt_global"]["valid_seen"]) == 0.0
  with pytest.raises(ValueError, match="not both"):
    optimizer.step(lambda: 1.0, loss=1.0)
  with pytest.raises(ValueError, match="loss must be a scalar"):
    optimizer.step(loss=torch.ones(2))
  with pytest.raises(ValueError, match="num_steps must be None or a positive integer"):
    LearnedOptimizer(params.values(), saved, num_steps=0)


@pytest.mark.parametrize("group, message", [
    ({"momentum": 0.9}, r"unknown key\(s\) \['momentum'\]"),
    ({"num_steps": 100}, r"unknown key\(s\) \['num_steps'\]"),  # an optimizer-level setting, not a group's
])
def test_unknown_group_keys_are_refused(saved, group, message):
  with pytest.raises(ValueError, match=message):
    LearnedOptimizer([{"params": [torch.nn.Parameter(torch.ones(3))], **group}], saved)


def test_the_rule_does_not_import_jax():
  import subprocess
  import sys
  code = ("import sys, lopt.torch, lopt.architectures.hierarchical.torch; "
          "assert 'jax' not in sys.modules, 'jax imported'; print('ok')")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# -- the PyTorch rule's cost: no host synchronization, a compiled path ---------------------------------------------

def test_the_torch_step_never_reads_a_tensor_on_the_host(saved):
  """On a GPU every host read of a device value (.item(), bool(), float(), a Python ``if`` on a tensor) waits for
  the device: ``HierarchicalRule.step`` has none (the step skipping non-finite gradients has its one per step)."""
  from torch.utils._python_dispatch import TorchDispatchMode

  class Reads(TorchDispatchMode):
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
      if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
        Reads.count += 1
      return func(*args, **(kwargs or {}))

  params = torch_params(torch.float32)
  optimizer = LearnedOptimizer(params.values(), saved, num_steps=HORIZON)
  step = optimizer.rule.step

  def watched(*args, **kwargs):
    with Reads():
      step(*args, **kwargs)
  optimizer.rule.step = watched
  train_torch(optimizer, params, schedule(3))
  assert Reads.count == 0 and int(optimizer.state[params["w"]]["step"]) == 3


def test_compile_without_a_compiler_warns_once_and_runs_eager(saved, monkeypatch):
  monkeypatch.setattr(htorch, "_missing_compiler", lambda device: "no C++ compiler was found")
  steps = schedule(4)
  eager_params, compiled_params = torch_params(), torch_params()
  train_torch(LearnedOptimizer(eager_params.values(), saved, num_steps=HORIZON), eager_params, steps)
  with pytest.warns(UserWarning, match="no C.. compiler was found; running eager") as caught:
    train_torch(LearnedOptimizer(compiled_params.values(), saved, num_steps=HORIZON, compile=True), compiled_params,
                steps)
  assert len([w for w in caught if "running eager" in str(w.message)]) == 1
  assert all(torch.equal(eager_params[k], compiled_params[k]) for k in eager_params)
  with pytest.raises(ValueError, match="compile must be a bool"):
    LearnedOptimizer(eager_params.values(), saved, compile=1)


@pytest.mark.slow
@pytest.mark.skipif(htorch._missing_compiler(torch.device("cpu")) is not None, reason="needs a C++ compiler")
def test_compiled_update_matches_eager_in_float64(saved):
  """torch.compile's graph of the update (the MLP as broadcast sums, a 0-d parameter as a (1,) view) against the
  eager update: the same to rounding, learning rate changes included (a tensor input: no recompilation)."""
  steps = schedule(6)
  results = []
  for compile in (False, True):
    params = torch_params()
    optimizer = LearnedOptimizer(params.values(), saved, lr=0.5, weight_decay=0.1, num_steps=HORIZON,
                                 compile=compile)
    train_torch(optimizer, params, steps[:3])
    optimizer.param_groups[0]["lr"] = 0.25
    train_torch(optimizer, params, steps[3:])
    results.append((params, optimizer))
  (eager, eager_optimizer), (compiled, compiled_optimizer) = results
  assert not compiled_optimizer.rule._compile_failed
  errors = relative_errors({k: v.detach().numpy() for k, v in eager.items()}, compiled)
  assert max(errors.values()) < 1e-12, errors
  for k in eager:
    for name, value in eager_optimizer.state[eager[k]].items():
      np.testing.assert_allclose(compiled_optimizer.state[compiled[k]][name].numpy(), value.numpy(), rtol=1e-9,
                                 atol=1e-12, err_msg=f"{k} {name}")


def test_meta_training_can_withhold_the_validation_loss_per_problem():
  """valid_withheld: a drawn fraction of problems never gets a validation loss for its whole episode."""
  from lopt.meta.unroll import advance, init_inner
  from lopt.tasks import families
  from lopt.optax_adapter import as_optax
  task = families.group_task(families.get("logistic_regression").sample([0, 0, 0], max_step_flops=2e5))
  tx = as_optax(OPTIMIZER, OPTIMIZER.init(jax.random.key(0)))

  @jax.jit
  def seen(keys):  # (n,) 1 where the problem's optimizer saw a validation loss in 4 steps (fed every 2)
    def one(key):
      inner, _ = advance(task, tx, init_inner(task, tx, key), 4, valid_every=2, horizon=4, valid_withheld=0.5)
      return inner.opt_state.valid.seen
    return jax.vmap(one)(keys)

  keys = jax.random.split(jax.random.key(1), 32)
  half = np.asarray(seen(keys))
  assert set(half.tolist()) == {0.0, 1.0} and 4 <= half.sum() <= 28  # some problems get it, the others never
  np.testing.assert_array_equal(half[::-1], np.asarray(seen(keys[::-1])))  # a pure function of the problem's key


@pytest.mark.parametrize("version, sibling", [("0.2", True), ("0.4", True), ("0.4", False)])
def test_checkpoints_of_earlier_layouts_restore_into_the_current_one(version, sibling):
  """lopt 0.2 stored one TensorState per tensor (``.../tensors/<param path>/<field>``, shapes B + F) and lopt 0.2-0.4
  the per-coordinate states like params (``.../momentum/<param path>``, B + S + (K,)); restoring stacks them into
  ``.../tensors/<field>`` (B + (T,) + F) and one entry per group of same-shaped tensors (``.../momentum/<k>``, B +
  (n,) + S + (K,), a lone tensor's B + S + (K,)), the tensors in the tree order of params -- taken from the
  estimator's inner parameters, a sibling tree, or without one from the paths (list indices as numbers) -- leaving
  every other tensor as it was."""
  from lopt.architectures.hierarchical.optimizer import upgrade_legacy_states
  from lopt.pytree import flatten_by_path
  # Lists of more than ten entries: tree order is not the paths' string order ("10" < "2").
  params = {"z": jnp.ones((3,)), "a": {"w": jnp.ones((2, 4)), "b": jnp.ones((4,))},
            "list": [jnp.ones(()), *(jnp.ones((5,)) for _ in range(10)), jnp.ones((2, 4))]}
  state = OPTIMIZER.init_state(default_theta(OPTIMIZER), params)
  batch = (2, 3)  # e.g. problems x particles, as in an estimator's state
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: rng.normal(size=batch + x.shape).astype(x.dtype), state)
  inner = {"opt_state": state}
  if sibling:
    inner["params"] = jax.tree.map(lambda x: np.zeros(batch + x.shape, x.dtype), params)
  wanted = {f"estimator_state/inner/{k}": np.asarray(v) for k, v in flatten_by_path(inner).items()}
  shapes = {k: v.shape for k, v in wanted.items()}
  prefix = "estimator_state/inner/opt_state/"
  legacy = {k: v for k, v in wanted.items()
            if not k.startswith(tuple(prefix + f for f in ("momentum/", "average/", "second_moment/")))}
  paths = list(flatten_by_path(params))
  leaves = jax.tree.leaves(params)
  groups = coordinate_groups(leaves)
  assert sorted(len(group) for group in groups) == [1, 1, 1, 2, 10]
  for k, group in enumerate(groups):
    row = (lambda x, j: x) if len(group) == 1 else (lambda x, j: x[:, :, j])  # noqa: E731
    for j, i in enumerate(group):
      for field in ("momentum", "average"):
        legacy[f"{prefix}{field}/{paths[i]}"] = row(wanted[f"{prefix}{field}/{k}"], j)
      for part in (("/rows", "/cols") if leaves[i].ndim >= 2 else ("",)):
        legacy[f"{prefix}second_moment/{paths[i]}{part}"] = row(wanted[f"{prefix}second_moment/{k}{part}"], j)
  if version == "0.2":
    for field in TensorState._fields:
      stacked = legacy.pop(f"{prefix}tensors/{field}")
      for i, path in enumerate(paths):
        legacy[f"{prefix}tensors/{path}/{field}"] = stacked[:, :, i]
  restored = upgrade_legacy_states(legacy, shapes)
  for name, value in wanted.items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)
  assert upgrade_legacy_states(wanted, shapes) is wanted  # a current checkpoint passes through
  # A damaged file (one tensor of a group in another shape): that entry is left out, for the reader to report.
  damaged = dict(legacy, **{f"{prefix}momentum/list/3": np.zeros((2, 3, 4, 2), np.float32)})
  k = next(k for k, group in enumerate(groups) if len(group) == 10)
  assert f"{prefix}momentum/{k}" not in upgrade_legacy_states(damaged, shapes)


# -- the direct step head (``direct_step``) ----------------------------------------------------------------------------

DIRECT = HierarchicalOptimizer(direct_step=True)


def run_updates(optimizer, theta, steps=6):
  """(updates of the last step, final state) of ``steps`` jitted float32 steps on model() with schedule()'s
  gradients and losses."""
  params = {k: jnp.asarray(v, jnp.float32) for k, v in model().items()}
  state, update = optimizer.init_state(theta, params), jax.jit(optimizer.update)
  for grads, loss, valid in schedule(steps):
    updates, state = update(theta, state, {k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}, params,
                            loss=loss, valid_loss=np.nan if valid is None else valid, num_steps=HORIZON)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(np.asarray, updates), state


def test_a_zero_direct_step_head_changes_nothing():
  """At its initialization (the head zero) the direct step head leaves every step as it was without one."""
  theta = default_theta(OPTIMIZER)
  with_head = {**theta, "step": {**theta["step"], "direct": np.zeros(DIRECT.param_shapes()["step/direct"],
                                                                      np.float32)}}
  assert jax.tree.map(np.shape, with_head) == jax.tree.map(np.shape, default_theta(DIRECT))
  expected, _ = run_updates(OPTIMIZER, random_theta(OPTIMIZER))
  random = random_theta(OPTIMIZER)
  found, _ = run_updates(DIRECT, {**random, "step": {**random["step"], "direct": with_head["step"]["direct"]}})
  for k in expected:
    np.testing.assert_array_equal(found[k], expected[k])


@pytest.mark.slow
def test_the_direct_step_head_moves_the_log_step_by_its_inputs():
  """One step from the same state: the log step with the head minus without it is the head's gain times the LSTM's
  inputs (``lstm_inputs``), per tensor."""
  theta = random_theta(DIRECT)
  without = {**theta, "step": {k: v for k, v in theta["step"].items() if k != "direct"}}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in model().items()}
  grads = {k: jnp.asarray(g, jnp.float32) for k, g in schedule(1)[0][0].items()}
  _, with_state = DIRECT.update(theta, DIRECT.init_state(theta, params), grads, params, loss=2.0)
  _, plain_state = OPTIMIZER.update(without, OPTIMIZER.init_state(without, params), grads, params, loss=2.0)
  inputs = np.asarray(DIRECT.lstm_inputs(theta, DIRECT.init_state(theta, params), grads, params, loss=2.0))
  shift = np.asarray(with_state.tensors.log_step) - np.asarray(plain_state.tensors.log_step)
  np.testing.assert_allclose(shift, inputs @ theta["step"]["direct"], rtol=1e-4, atol=1e-6)
  assert np.max(np.abs(shift)) > 1e-2  # the check is not vacuous


@pytest.fixture(scope="module")
def saved_direct(tmp_path_factory):
  return save_optimizer(tmp_path_factory.mktemp("hierarchical_direct") / "opt", DIRECT, random_theta(DIRECT))


def test_torch_matches_jax_with_the_direct_step_head(saved_direct, monkeypatch):
  """As test_torch_matches_jax_given_float64_global_features, for an optimizer with a (random) direct step head."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hjax, "loss_features", lambda train, valid: jnp.asarray(FIXED_LOSS_FEATURES))
    patch.setattr(hjax, "time_features", jax_time_features)
    expected, _ = train_jax(saved_direct)
  monkeypatch.setattr(htorch, "loss_features", lambda state: FIXED_LOSS_FEATURES.tolist())
  monkeypatch.setattr(htorch, "time_features", torch_time_features)
  params = torch_params()
  train_torch(LearnedOptimizer(params.values(), saved_direct, lr=0.5, weight_decay=0.1, num_steps=HORIZON), params,
              schedule())
  errors = relative_errors(expected, params)
  assert max(errors.values()) < 1e-12, errors


def test_files_saved_before_the_direct_step_head_load_without_it(saved, tmp_path):
  """A config.json without ``direct_step`` (every hierarchical optimizer saved by lopt 0.3 and earlier, the shipped
  `general` included) loads as an optimizer without the head, with the same meta-parameters."""
  import json
  import shutil
  old = tmp_path / "old"
  shutil.copytree(saved, old)
  config = json.loads((old / "config.json").read_text())
  del config["optimizer"]["direct_step"]
  (old / "config.json").write_text(json.dumps(config))
  loaded = lopt.load(old)
  assert loaded.optimizer == HierarchicalOptimizer() and "direct" not in loaded.theta["step"]
  assert lopt.load("general").optimizer.direct_step is False


def test_a_run_with_the_head_warm_starts_from_an_optimizer_without_it():
  """`lopt train --init-from general --optimizer-option direct_step=true`: general's meta-parameters, plus the
  head at zero; any other difference of fields is still refused."""
  from types import SimpleNamespace

  from lopt.errors import UserError
  from lopt.meta.train import initial_theta
  from lopt.pytree import flatten_by_path
  config = SimpleNamespace(seed=0, outer=SimpleNamespace(init_from="general"))
  flat = flatten_by_path(initial_theta(config, DIRECT))
  general = flatten_by_path(lopt.load("general").theta)
  assert set(flat) - set(general) == {"step/direct"} and not np.any(np.asarray(flat["step/direct"]))
  assert all(np.array_equal(np.asarray(flat[k]), general[k]) for k in general)
  with pytest.raises(UserError, match="they must match"):
    initial_theta(config, HierarchicalOptimizer(direct_step=True, lstm_size=16))


def test_a_state_made_for_other_parameters_is_refused_with_what_it_needs():
  """The per-coordinate states are stored by group of same-shaped tensors (``coordinate_groups``); a state made for
  other parameters is refused, naming the shapes found and needed, rather than read with the wrong rows."""
  theta = default_theta(OPTIMIZER)
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3)), "c": jnp.ones((4,))}
  state = OPTIMIZER.init_state(theta, params)
  assert [m.shape for m in state.momentum] == [(2, 2, 3, 2), (4, 2)]
  assert OPTIMIZER.coordinate_states(state, params)["b"].momentum.shape == (2, 3, 2)
  other = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 2)), "c": jnp.ones((4,))}
  with pytest.raises(ValueError, match=r"not made for these parameters.*\(2, 2, 3, 2\)"):
    OPTIMIZER.update(theta, state, other, other)


# -- the log step's upper bound ------------------------------------------------------------------------------------

BOUNDED = HierarchicalOptimizer(max_log_step=0.5)


def climbing_theta(optimizer):
  """random_theta with the log step's bias at +0.2: the log step climbs by about that every step."""
  theta = random_theta(optimizer)
  return {**theta, "step": {**theta["step"], "b": np.float32(0.2)}}


@pytest.fixture(scope="module")
def saved_bounded(tmp_path_factory):
  return save_optimizer(tmp_path_factory.mktemp("hierarchical_bounded") / "opt", BOUNDED, climbing_theta(BOUNDED))


def test_max_log_step_bounds_the_log_step_and_nothing_below_it():
  """With ``max_log_step`` the per-tensor log step stops there (a climbing one otherwise passes it); the steps
  before it gets there are the unbounded optimizer's, bit for bit."""
  theta = climbing_theta(OPTIMIZER)
  _, free = run_updates(OPTIMIZER, theta, steps=12)
  _, bounded = run_updates(BOUNDED, theta, steps=12)
  assert np.max(np.asarray(free.tensors.log_step)) > 1.0   # the bound binds: the check is not vacuous
  np.testing.assert_allclose(np.max(np.asarray(bounded.tensors.log_step)), 0.5)
  early_free, _ = run_updates(OPTIMIZER, theta, steps=1)
  early_bounded, _ = run_updates(BOUNDED, theta, steps=1)
  for k in early_free:
    np.testing.assert_array_equal(early_bounded[k], early_free[k])


def test_torch_matches_jax_with_a_log_step_bound(saved_bounded, monkeypatch):
  """As test_torch_matches_jax_given_float64_global_features, for an optimizer whose log step reaches its bound:
  PyTorch bounds it where JAX does."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hjax, "loss_features", lambda train, valid: jnp.asarray(FIXED_LOSS_FEATURES))
    patch.setattr(hjax, "time_features", jax_time_features)
    expected, state = train_jax(saved_bounded)
  assert np.max(state.tensors.log_step) == 0.5   # reached, so the bound is compared
  monkeypatch.setattr(htorch, "loss_features", lambda state: FIXED_LOSS_FEATURES.tolist())
  monkeypatch.setattr(htorch, "time_features", torch_time_features)
  params = torch_params()
  optimizer = LearnedOptimizer(params.values(), saved_bounded, lr=0.5, weight_decay=0.1, num_steps=HORIZON)
  train_torch(optimizer, params, schedule())
  errors = relative_errors(expected, params)
  assert max(errors.values()) < 1e-12, errors
  assert max(float(optimizer.state[p]["log_step"].max()) for p in params.values()) == 0.5


def test_files_saved_before_the_log_step_bound_load_with_the_old_limit(saved, tmp_path):
  """A config.json without ``max_log_step`` (lopt 0.4 and earlier) loads with the limit it was stepped with (8);
  the shipped `general` has its bound; a run may start from it with another (the bound shapes no meta-parameter),
  and other fields must still match; a bound outside (0, 8] is refused naming the field."""
  import json
  import shutil
  from types import SimpleNamespace

  from lopt.architectures.spec import OptimizerConfigError
  from lopt.errors import UserError
  from lopt.meta.train import initial_theta
  old = tmp_path / "old"
  shutil.copytree(saved, old)
  config = json.loads((old / "config.json").read_text())
  del config["optimizer"]["max_log_step"]
  (old / "config.json").write_text(json.dumps(config))
  assert lopt.load(old).optimizer.max_log_step == 8.0 == HierarchicalOptimizer().max_log_step
  general = lopt.load("general")
  assert general.optimizer.max_log_step == 5.0
  run = SimpleNamespace(seed=0, outer=SimpleNamespace(init_from="general"))
  theta = initial_theta(run, HierarchicalOptimizer())
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(general.theta)))
  with pytest.raises(UserError, match="they must match"):
    initial_theta(run, HierarchicalOptimizer(lstm_size=16))
  for bad in (0.0, 9.0, float("nan")):
    with pytest.raises(OptimizerConfigError, match="max_log_step"):
      HierarchicalOptimizer(max_log_step=bad)
