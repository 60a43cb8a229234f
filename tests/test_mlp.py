"""The per-parameter MLP optimizer: spec conformance, the equations, inertness, transformations, scale invariance,
and float64 parity of the JAX optimizer and the PyTorch rule over 100 steps of a conv + dense model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from lopt.architectures.mlp.optimizer import Factored, MLPOptimizer, MLPState, update_second_moment
from lopt.architectures.mlp.spec import SPEC, TIME_SCALES
from lopt.architectures.mlp.torch import MLPRule
from lopt.architectures.spec import OptimizerConfigError

SMALL = dict(hidden_size=8, num_layers=2)


def _key_paths(theta) -> dict:
  """{'layers/i/w': array, ...} from the nested theta (the file layout)."""
  return {f"layers/{i}/{name}": value for i, layer in enumerate(theta["layers"]) for name, value in layer.items()}


# Random arrays come from numpy: eager jax.random compiles once per shape, seconds on a 2-core CPU.

def _random_theta(optimizer, seed=0, scale=0.5, dtype=None):
  """Every meta-parameter ~ scale * N(0, 1), the last layer included, so that updates are non-zero."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(optimizer.init, jax.random.key(0))
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), dtype or s.dtype), shapes)


def _model_params(dtype=jnp.float32, conv=False):
  """A dense matrix (factored second moment), a vector bias and a 0-d scale; with ``conv``, an OIHW conv kernel too.
  (Few tensors: every tensor adds about 0.4 s of XLA compilation on a 2-core CPU.)"""
  rng = np.random.default_rng(7)
  params = {"dense": rng.normal(size=(16, 5)), "bias": rng.normal(size=5), "scale": np.array(0.7)}
  if conv:
    params["conv"] = rng.normal(size=(4, 2, 3, 3))
  return {name: jnp.asarray(value, dtype) for name, value in params.items()}


def _size(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# -- spec conformance ----------------------------------------------------------------------------------------------

def test_defaults_config_and_meta_parameters_follow_the_spec():
  optimizer = MLPOptimizer()
  assert optimizer.config() == SPEC.config(SPEC.defaults()) == {"architecture": "mlp", **optimizer.config()}
  assert SPEC.build(optimizer.config()) == optimizer
  theta = optimizer.init(jax.random.key(0))
  assert {k: v.shape for k, v in _key_paths(theta).items()} == optimizer.param_shapes() == SPEC.param_shapes(
      SPEC.defaults())
  count = _size(theta)
  assert count == SPEC.num_meta_parameters(SPEC.defaults()) == 1730  # 18*32+32 + 32*32+32 + 32*2+2
  assert theta["layers"][0]["w"].shape[0] == optimizer.num_inputs == 3 + 2 * 3 + len(TIME_SCALES)
  # He-normal hidden weights, zero biases, zero last layer.
  first = theta["layers"][0]["w"]
  assert 0.6 < float(jnp.std(first)) / math.sqrt(2.0 / first.shape[0]) < 1.4
  assert all(float(jnp.max(jnp.abs(layer["b"]))) == 0.0 for layer in theta["layers"])
  assert float(jnp.max(jnp.abs(theta["layers"][-1]["w"]))) == 0.0


def test_fields_are_validated_and_normalized():
  optimizer = MLPOptimizer(momentum_decays=[0.5, 0.9], step_scale=1, num_layers=0)
  assert optimizer.momentum_decays == (0.5, 0.9) and isinstance(optimizer.step_scale, float)
  hash(optimizer)  # usable as a static jit argument
  assert _size(optimizer.init(jax.random.key(0))) == (3 + 4 + len(TIME_SCALES)) * 2 + 2
  for bad in [dict(hidden_size=0), dict(momentum_decays=[]), dict(momentum_decays=[1.0]), dict(rms_decay=1.0),
              dict(step_scale=-1.0), dict(magnitude_scale=float("nan")), dict(num_layers=9)]:
    with pytest.raises(OptimizerConfigError, match="MLPOptimizer"):
      MLPOptimizer(**bad)


def test_state_layout_size_and_torch_state_shapes():
  optimizer = MLPOptimizer()
  shapes = {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "b2": (10,)}
  params = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}
  state = jax.eval_shape(optimizer.init_state, None, params)
  assert isinstance(state, MLPState) and state.step.dtype == jnp.int32 and state.step.shape == ()
  assert state.momentum["w1"].shape == (64, 32, 3)
  moment = state.second_moment["w1"]
  assert isinstance(moment, Factored) and (moment.rows.shape, moment.cols.shape) == ((64, 1), (1, 32))
  assert state.second_moment["b1"].shape == (32,)
  ratio = (_size(state) - 1) / _size(params)  # 3 momenta + factored second moment + full for the biases
  assert ratio <= 4.0, ratio
  assert ratio == pytest.approx((3 * 2410 + 64 + 32 + 32 + 32 + 10 + 10) / 2410)
  # The torch rule's state has the same layout, leaf for leaf.
  rule = MLPRule(SPEC.validate({}), {k: torch.zeros(shape) for k, shape in optimizer.param_shapes().items()})
  for name, p in _model_params(conv=True).items():
    jax_state = jax.eval_shape(optimizer.init_state, None, p)
    shapes = rule.state_shapes(torch.zeros(p.shape))
    moment = jax_state.second_moment
    expected = {"momentum": jax_state.momentum.shape, "step": (),
                **({"rows": moment.rows.shape, "cols": moment.cols.shape} if isinstance(moment, Factored)
                   else {"second_moment": moment.shape})}
    assert shapes == expected, name


def test_conv_kernels_factor_over_their_channels_in_any_layout():
  """OIHW (PyTorch) and HWIO (JAX) 3x3 kernels both factor over (in, out) channels: state ~1x, not 1/3 + 1/3."""
  from lopt.architectures.mlp.spec import factored_axes, factored_shapes
  assert factored_axes((16, 8, 3, 3)) == (0, 1) and factored_axes((3, 3, 8, 16)) == (2, 3)
  assert factored_shapes((16, 8, 3, 3)) == ((16, 1, 3, 3), (1, 8, 3, 3))
  assert factored_axes((4, 4)) == (0, 1) and factored_axes((5,)) is None
  assert factored_axes((2, 7, 7)) == (1, 2)  # ties: both 7s


# -- the equations --------------------------------------------------------------------------------------------------

def _reference_update(optimizer, theta, p, gradients):
  """Plain numpy, straight from the docstring's equations: the update at the last of ``gradients`` (float64)."""
  decays, d = np.array(optimizer.momentum_decays), optimizer.rms_decay
  m = np.zeros(p.shape + (len(decays),))
  axes = sorted(sorted(range(p.ndim), key=lambda i: (p.shape[i], i))[-2:]) if p.ndim >= 2 else None
  r = c = v = np.zeros(p.shape)
  for t, g in enumerate(gradients, start=1):
    m = decays * m + (1 - decays) * g[..., None]
    g2 = g * g + 1e-30
    if p.ndim >= 2:
      a, b = axes  # the two largest axes
      r = d * r + (1 - d) * g2.mean(b, keepdims=True)
      c = d * c + (1 - d) * g2.mean(a, keepdims=True)
      v_hat = r * c / r.mean(a, keepdims=True)
    else:
      v = d * v + (1 - d) * g2
      v_hat = v
    rs = 1 / np.sqrt(v_hat / (1 - d**t) + 1e-12)
    columns = [g, p, *np.moveaxis(m, -1, 0), g * rs, *np.moveaxis(m * rs[..., None], -1, 0)]
    columns = [f.reshape(-1) / np.sqrt(np.mean(f * f) + 1e-12) for f in columns]
    columns += [np.full(p.size, np.tanh(t / tau)) for tau in TIME_SCALES]
  x = np.stack(columns, axis=1)
  layers = [(np.asarray(layer["w"]), np.asarray(layer["b"])) for layer in theta["layers"]]
  for w, b in layers[:-1]:
    x = np.maximum(x @ w + b, 0.0)
  out = x @ layers[-1][0] + layers[-1][1]
  update = out[:, 0] * np.exp(optimizer.magnitude_scale * out[:, 1]) * optimizer.step_scale
  return update.reshape(p.shape)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (5, 3, 2), (3, 3, 4, 6), (6,), ()])
def test_update_matches_the_equations(shape):
  with jax.enable_x64(True):
    optimizer = MLPOptimizer(**SMALL, step_scale=0.1, magnitude_scale=0.2)
    theta = _random_theta(optimizer)
    rng = np.random.default_rng(0)
    p = rng.normal(size=shape)
    gradients = [rng.normal(size=shape) for _ in range(3)]
    state, update_fn = optimizer.init_state(theta, jnp.asarray(p)), jax.jit(optimizer.update)
    for g in gradients:
      update, state = update_fn(theta, state, jnp.asarray(g), jnp.asarray(p))
    np.testing.assert_allclose(update, _reference_update(optimizer, theta, p, gradients), rtol=1e-12, atol=1e-15)


def test_factored_estimate_is_exact_for_a_rank_one_square():
  # g^2 = a_i b_j (rank one): Adafactor's r_i c_j / mean(r) recovers it exactly, so v = (1 - d) g^2 after one step.
  with jax.enable_x64(True):
    g = jnp.outer(jnp.array([1.0, -2.0, 3.0]), jnp.array([0.5, 4.0]))
    zeros = Factored(jnp.zeros((3, 1)), jnp.zeros((1, 2)))
    _, estimate = update_second_moment(zeros, g, 0.9)
    np.testing.assert_allclose(estimate, 0.1 * (g * g + 1e-30), rtol=1e-14)


# -- behaviour ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x64", [False, True])
def test_untrained_optimizer_is_inert(x64):
  with jax.enable_x64(x64):
    optimizer = MLPOptimizer()
    theta = optimizer.init(jax.random.key(0))
    params = _model_params(jnp.float64 if x64 else jnp.float32)
    grads = jax.tree.map(lambda p: 3.0 * p + 1.0, params)
    state, update = optimizer.init_state(theta, params), jax.jit(optimizer.update)
    for _ in range(3):
      updates, state = update(theta, state, grads, params)
      for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        assert u.dtype == g.dtype and u.shape == g.shape and float(jnp.max(jnp.abs(u))) == 0.0
    assert int(state.step) == 3


@pytest.mark.parametrize("theta_dtype, grad_dtype", [("float32", "float64"), ("float64", "float32"),
                                                     ("float64", "float64"), ("float32", "float32")])
def test_updates_have_the_gradient_dtype_and_the_state_keeps_its_dtype(theta_dtype, grad_dtype):
  with jax.enable_x64(True):
    optimizer = MLPOptimizer(**SMALL)
    theta = _random_theta(optimizer, dtype=jnp.dtype(theta_dtype))
    params = _model_params(jnp.dtype(grad_dtype))
    state = optimizer.init_state(theta, params)
    updates, new_state = jax.jit(optimizer.update)(theta, state, params, params)
    assert all(u.dtype == jnp.dtype(grad_dtype) for u in jax.tree.leaves(updates))
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)


def test_random_theta_gives_finite_nonzero_updates_and_skips_masked_leaves():
  optimizer = MLPOptimizer()
  theta = _random_theta(optimizer)
  params = {**_model_params(), "frozen": optax.MaskedNode()}
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
  state, update = optimizer.init_state(theta, params), jax.jit(optimizer.update)
  assert isinstance(state.momentum["frozen"], optax.MaskedNode)
  for _ in range(2):
    updates, state = update(theta, state, grads, params)
  assert isinstance(updates["frozen"], optax.MaskedNode)
  for name in ("dense", "bias", "scale"):
    u = updates[name]
    assert bool(jnp.all(jnp.isfinite(u))) and float(jnp.max(jnp.abs(u))) > 0.0, name


def test_jit_and_vmap_over_problems_match_one_problem_at_a_time():
  optimizer = MLPOptimizer(**SMALL)
  theta = _random_theta(optimizer)
  problems = [jax.tree.map(lambda p, s=s: p * (1.0 + s), _model_params()) for s in range(3)]
  batched = jax.tree.map(lambda *p: jnp.stack(p), *problems)
  update, batched_update = jax.jit(optimizer.update), jax.jit(jax.vmap(optimizer.update, in_axes=(None, 0, 0, 0)))
  state = jax.vmap(optimizer.init_state, in_axes=(None, 0))(theta, batched)
  for _ in range(2):
    updates, state = batched_update(theta, state, jax.tree.map(jnp.sin, batched), batched)
  for i, params in enumerate(problems):
    single_state = optimizer.init_state(theta, params)
    for _ in range(2):
      single, single_state = update(theta, single_state, jax.tree.map(jnp.sin, params), params)
    jax.tree.map(lambda b, s: np.testing.assert_allclose(b[i], s, rtol=2e-5, atol=1e-8), updates, single)
  assert state.step.tolist() == [2, 2, 2]


def _meta_loss(optimizer, theta, params, num_steps=8):
  """Loss of a quadratic-plus-tanh problem after ``num_steps`` optimizer steps (lax.scan, differentiable)."""
  def loss(p):
    return sum(jnp.sum(0.5 * x * x + jnp.tanh(x)) for x in jax.tree.leaves(p))

  def body(carry, _):
    p, state = carry
    updates, state = optimizer.update(theta, state, jax.grad(loss)(p), p)
    return (optax.apply_updates(p, updates), state), None
  (final, _), _ = jax.lax.scan(body, (params, optimizer.init_state(theta, params)), None, length=num_steps)
  return loss(final)


def test_meta_gradient_through_theta_matches_finite_differences():
  with jax.enable_x64(True):
    optimizer = MLPOptimizer(**SMALL, step_scale=0.05, magnitude_scale=0.1)
    params = _model_params(jnp.float64)
    value_and_grad = jax.jit(jax.value_and_grad(lambda th: _meta_loss(optimizer, th, params)))
    # With a zero last layer (as at initialization) only the last layer gets a meta-gradient (the others feed a zero
    # readout).
    theta = _random_theta(optimizer, scale=0.3)
    _, zero = value_and_grad({"layers": theta["layers"][:-1] + [jax.tree.map(jnp.zeros_like, theta["layers"][-1])]})
    assert float(jnp.max(jnp.abs(zero["layers"][-1]["w"]))) > 0.0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(zero))
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(zero["layers"][:-1]))
    _, grad = value_and_grad(theta)
    assert all(float(jnp.max(jnp.abs(x))) > 0.0 for x in jax.tree.leaves(grad))
    # A central difference along a random direction (float64: eps 1e-6 leaves about 1e-10 of rounding).
    direction, eps = _random_theta(optimizer, seed=5, scale=1.0), 1e-6
    plus, _ = value_and_grad(jax.tree.map(lambda t, v: t + eps * v, theta, direction))
    minus, _ = value_and_grad(jax.tree.map(lambda t, v: t - eps * v, theta, direction))
    expected = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose((plus - minus) / (2 * eps), expected, rtol=1e-5)


def test_rescaling_one_tensors_gradients_changes_no_update():
  """Every feature is invariant to g -> c g on one tensor (every step): m scales by c and v by c^2, so g rs and m rs
  do not change, and the per-tensor normalization removes c from g and m; p and the time features do not depend on
  g. So the whole parameter trajectory is unchanged, up to the epsilons: rs moves by about 1e-12 / (2 v) relative,
  and v is about (1 - rms_decay) g^2 = 1e-3 g^2 at first, so the gradients here stay in [0.5, 2.5] before the
  scales (>= 1) are applied: rs moves by at most 4e-9, which this random MLP amplifies to at most 5e-8 of an update
  (measured; the 1e-12 next to the features' mean squares matters even less). Asserted: every update of every step
  agrees to 1e-6 of its tensor's largest update (a gradient-scale-dependent update would differ at order 1)."""
  with jax.enable_x64(True):
    optimizer = MLPOptimizer(**SMALL, step_scale=0.05)
    theta = _random_theta(optimizer)
    # Not the 0-d tensor: its normalized features are f / sqrt(f^2 + 1e-12), which moves with f where |f| ~ 1e-6.
    scales = {"dense": 100.0, "bias": 10.0, "scale": 1.0}
    update = jax.jit(optimizer.update)

    def gradient(p):  # a deterministic function of the parameters, entries in [0.5, 2.5]
      return jax.tree.map(lambda x: 1.5 + jnp.sin(3.0 * x), p)

    def trajectory(rescale):
      params = _model_params(jnp.float64)
      state, history = optimizer.init_state(theta, params), []
      for _ in range(20):
        grads = gradient(params)
        if rescale:
          grads = {name: scales[name] * g for name, g in grads.items()}
        updates, state = update(theta, state, grads, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
      return history

    for original, rescaled in zip(trajectory(False), trajectory(True)):
      for name in scales:
        difference = float(jnp.max(jnp.abs(rescaled[name] - original[name])))
        assert difference <= 1e-6 * float(jnp.max(jnp.abs(original[name]))), name
    assert float(jnp.max(jnp.abs(original["dense"]))) > 1e-3  # the trajectory moves


# -- PyTorch --------------------------------------------------------------------------------------------------------

@pytest.fixture
def one_torch_thread():
  """Tensors of a few dozen elements: torch's intra-op threads only add waiting, and on a busy 2-core machine they
  made the 100 steps below 50x slower (15 s instead of 0.2 s)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


class _Model(torch.nn.Module):
  """conv (OIHW) -> tanh -> dense, times a 0-d scale: the parameter shapes the JAX side mirrors."""

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(2, 3, kernel_size=3)
    self.dense = torch.nn.Linear(3 * 4 * 4, 2)
    self.scale = torch.nn.Parameter(torch.tensor(0.8))

  def forward(self, x):
    return self.scale * self.dense(torch.tanh(self.conv(x)).flatten(1))


def _jax_forward(params, x):
  hidden = jax.lax.conv_general_dilated(x, params["conv.weight"], (1, 1), "VALID",
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"))
  hidden = jnp.tanh(hidden + params["conv.bias"][None, :, None, None]).reshape(x.shape[0], -1)
  return params["scale"] * (hidden @ params["dense.weight"].T + params["dense.bias"])


def test_torch_rule_matches_jax_in_float64_over_100_steps(one_torch_thread):
  torch.manual_seed(0)
  model = _Model().double()
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(8, 2, 6, 6)), rng.normal(size=(8, 2))
  fields = SPEC.validate({**SMALL, "hidden_size": 16, "step_scale": 1e-2})
  start = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}

  with jax.enable_x64(True):
    optimizer = MLPOptimizer(**fields)
    theta = _random_theta(optimizer, dtype=jnp.float64)
    params = {name: jnp.asarray(value) for name, value in start.items()}
    loss = lambda p: jnp.mean((_jax_forward(p, jnp.asarray(x)) - jnp.asarray(y)) ** 2)  # noqa: E731

    @jax.jit
    def step(params, state):
      updates, state = optimizer.update(theta, state, jax.grad(loss)(params), params)
      return optax.apply_updates(params, updates), state
    state = optimizer.init_state(theta, params)
    for _ in range(100):
      params, state = step(params, state)
    jax_params = {name: np.asarray(value) for name, value in params.items()}
    jax_state = state

  rule = MLPRule(fields, {k: torch.tensor(np.asarray(v)) for k, v in _key_paths(theta).items()})
  named = dict(model.named_parameters())
  states = [{} for _ in named]
  tx, ty = torch.from_numpy(x), torch.from_numpy(y)
  for _ in range(100):
    model.zero_grad()
    torch.mean((model(tx) - ty) ** 2).backward()
    rule.step(None, list(named.values()), states, lr=1.0)

  for (name, p), state in zip(named.items(), states):
    final = p.detach().numpy()
    assert np.max(np.abs(final - start[name])) > 0.05 * np.max(np.abs(start[name])), name  # it moved
    difference = np.max(np.abs(jax_params[name] - final)) / np.max(np.abs(final))
    assert difference < 1e-10, (name, difference)
    assert {k: tuple(v.shape) for k, v in state.items()} == rule.state_shapes(p)
    assert all(v.dtype == torch.float64 for k, v in state.items() if k != "step")
    assert state["step"].dtype == torch.int32 and int(state["step"]) == 100
    moment = jax_state.second_moment[name]
    jax_entries = {"momentum": jax_state.momentum[name], "step": jax_state.step,
                   **(moment._asdict() if isinstance(moment, Factored) else {"second_moment": moment})}
    assert set(jax_entries) == set(state)
    for entry, value in state.items():  # the same layout and, to rounding, the same values
      np.testing.assert_allclose(value.numpy(), jax_entries[entry], rtol=1e-9, atol=1e-14, err_msg=entry)


def test_torch_rule_float32_is_inert_untrained_and_moves_with_random_theta(one_torch_thread):
  optimizer = MLPOptimizer()
  model = _Model()
  before = [p.detach().clone() for p in model.parameters()]
  for theta, moves in [(optimizer.init(jax.random.key(0)), False), (_random_theta(optimizer), True)]:
    tensors = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in _key_paths(theta).items()}
    rule, states = MLPRule(SPEC.validate({}), tensors), [{} for _ in before]
    for p in model.parameters():
      p.grad = torch.randn_like(p)
    rule.step(("group", "cpu"), list(model.parameters()), states, lr=0.5)
    changed = [float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before)]
    assert all(c > 0 for c in changed) if moves else all(c == 0 for c in changed)
    assert all(p.dtype == torch.float32 and s["momentum"].dtype == torch.float32
               for p, s in zip(model.parameters(), states))


def test_learned_optimizer_from_a_file_matches_as_optax_in_float64(one_torch_thread, tmp_path):
  """End to end: one saved file, ``lopt.load(path).as_optax()`` in JAX and ``lopt.torch.LearnedOptimizer(params,
  path)`` in PyTorch, conv + dense + bias + scalar parameters, 100 steps: relative difference < 1e-10."""
  import lopt
  from lopt.checkpoint import save_optimizer
  from lopt.torch import LearnedOptimizer
  torch.manual_seed(1)
  model = _Model().double()
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(8, 2, 6, 6)), rng.normal(size=(8, 2))
  start = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
  with jax.enable_x64(True):
    optimizer = MLPOptimizer(**SPEC.validate({**SMALL, "hidden_size": 16, "step_scale": 1e-2}))
    save_optimizer(tmp_path / "opt", optimizer, _random_theta(optimizer, seed=3, dtype=jnp.float64))
    tx = lopt.load(tmp_path / "opt").as_optax()
    params = {name: jnp.asarray(value) for name, value in start.items()}
    loss = lambda p: jnp.mean((_jax_forward(p, jnp.asarray(x)) - jnp.asarray(y)) ** 2)  # noqa: E731

    @jax.jit
    def step(params, state):
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = tx.update(grads, state, params, value=value)
      return optax.apply_updates(params, updates), state
    state = tx.init(params)
    for _ in range(100):
      params, state = step(params, state)
    jax_params = {name: np.asarray(value) for name, value in params.items()}

  torch_optimizer = LearnedOptimizer(model.parameters(), tmp_path / "opt")
  tx_, ty = torch.from_numpy(x), torch.from_numpy(y)
  for _ in range(100):
    torch_optimizer.zero_grad()
    torch.mean((model(tx_) - ty) ** 2).backward()
    torch_optimizer.step()
  for name, p in model.named_parameters():
    final = p.detach().numpy()
    assert np.max(np.abs(final - start[name])) > 0.05 * np.max(np.abs(start[name])), name
    assert np.max(np.abs(jax_params[name] - final)) / np.max(np.abs(final)) < 1e-10, name


@pytest.mark.slow  # ~30 s on 2 cores: kept out of CI's 20 minutes (test_family_training trains mlp too)
def test_a_short_meta_training_on_two_moons_lowers_the_held_out_loss(tmp_path):
  """Through the registry and the trainer, as `lopt train two_moons --optimizer mlp` runs it (shortened): the
  untrained optimizer does not move (held-out normalized mean loss 1), a few outer steps make it optimize."""
  from lopt.meta.config import MetaTrainConfig, OptimizerSection
  from lopt.meta.train import meta_train
  config = MetaTrainConfig(task="two_moons", optimizer=OptimizerSection("mlp", {"hidden_size": 8}), horizon=20,
                           meta_batch_size=2, meta_gradient="first_order", num_steps=6, eval_every=3,
                           num_eval_problems=4, learning_rate=3e-2, checkpoint_every=6)
  state = meta_train(config, tmp_path / "run", progress=False)
  assert state.best_score < 0.99, state.best_score
  from lopt.meta.train import load_metrics
  held_out = [m["held_out_loss"] for m in load_metrics(tmp_path / "run") if "held_out_loss" in m]
  assert len(held_out) == 2 and min(held_out) == state.best_score
