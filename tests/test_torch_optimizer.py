"""lopt.torch.LearnedOptimizer: parity with the JAX optimizer, state dicts, schedulers, checkpoint errors."""

import copy
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lopt  # noqa: E402
from lopt.checkpoint import CheckpointError, save_optimizer  # noqa: E402
from lopt.optimizers import GRUOptimizer  # noqa: E402
from lopt.torch import LearnedOptimizer  # noqa: E402

HIDDEN = 6
STEPS = 100


def trained_theta(optimizer: GRUOptimizer, seed: int = 0) -> dict:
  """A non-trivial theta: random GRU weights plus random biases, h0 and readout, so updates are non-zero."""
  theta = {k: np.asarray(v) for k, v in optimizer.init(jax.random.key(seed)).items()}
  rng = np.random.default_rng(seed)
  size = optimizer.hidden_size
  theta["bias"] = (0.3 * rng.standard_normal(3 * size)).astype(np.float32)
  theta["initial_state"] = (0.3 * rng.standard_normal(size)).astype(np.float32)
  theta["readout_weights"] = (0.02 * rng.standard_normal((size, 1))).astype(np.float32)
  theta["readout_bias"] = np.asarray([0.001], np.float32)
  return theta


@pytest.fixture(scope="module", params=["scale", "log1p_sign"])
def checkpoint(request, tmp_path_factory):
  optimizer = GRUOptimizer(HIDDEN, input_scale=2.0, output_scale=0.5, input_encoding=request.param)
  theta = trained_theta(optimizer)
  path = save_optimizer(tmp_path_factory.mktemp(request.param), optimizer, theta)
  return path, optimizer, theta


# -- the model: conv (rank 4) -> tanh -> dense (rank 2), with biases (rank 1), written once per framework ------------

def model_init(seed: int = 1) -> dict:
  rng = np.random.default_rng(seed)
  return {"conv_w": 0.3 * rng.standard_normal((4, 2, 3, 3)), "conv_b": 0.1 * rng.standard_normal(4),
          "dense_w": 0.1 * rng.standard_normal((4 * 6 * 6, 3)), "dense_b": 0.1 * rng.standard_normal(3)}


def model_data(seed: int = 2):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((8, 2, 8, 8)), rng.standard_normal((8, 3))


def jax_loss(params, x, y):
  z = jax.lax.conv_general_dilated(x, params["conv_w"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
  z = jnp.tanh(z + params["conv_b"][None, :, None, None]).reshape(x.shape[0], -1)
  return jnp.mean(jnp.square(z @ params["dense_w"] + params["dense_b"] - y))


def torch_loss(params, x, y):
  z = torch.nn.functional.conv2d(x, params["conv_w"], params["conv_b"])
  z = torch.tanh(z).reshape(x.shape[0], -1)
  return torch.mean(torch.square(z @ params["dense_w"] + params["dense_b"] - y))


def train_jax(optimizer, theta, dtype, steps=STEPS):
  x, y = (jnp.asarray(a, dtype) for a in model_data())
  params = {k: jnp.asarray(v, dtype) for k, v in model_init().items()}
  transformation = lopt.as_optax(optimizer, theta)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(jax_loss)(params, x, y)
    updates, state = transformation.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  state = transformation.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return {k: np.asarray(v) for k, v in params.items()}


def train_torch(path, dtype, steps=STEPS, device="cpu"):
  x, y = (torch.tensor(a, dtype=dtype, device=device) for a in model_data())
  params = {k: torch.tensor(v, dtype=dtype, device=device, requires_grad=True) for k, v in model_init().items()}
  optimizer = LearnedOptimizer(params.values(), path)
  for _ in range(steps):
    optimizer.zero_grad()
    torch_loss(params, x, y).backward()
    optimizer.step()
  return {k: v.detach().cpu().numpy() for k, v in params.items()}


def relative_error(a: dict, b: dict) -> float:
  return max(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(a[k])) for k in a)


def test_parity_float64(checkpoint):
  path, optimizer, theta = checkpoint
  with jax.enable_x64(True):
    expected = train_jax(optimizer, theta, jnp.float64)
  found = train_torch(path, torch.float64)
  moved = relative_error(model_init(), expected)
  assert moved > 1e-2, f"the optimizer barely moved the parameters ({moved}): the parity check would be vacuous"
  assert relative_error(expected, found) < 1e-10


def test_parity_float32(checkpoint):
  path, optimizer, theta = checkpoint
  expected = train_jax(optimizer, theta, jnp.float32)
  found = train_torch(path, torch.float32)
  assert all(v.dtype == np.float32 for v in found.values())
  assert relative_error(expected, found) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parity_cuda_float32(checkpoint, monkeypatch):
  path, optimizer, theta = checkpoint
  # Both frameworks default to TF32 (10-bit mantissa) for convolutions on recent GPUs; the *model* in this test is a
  # conv net, so compare full float32 on both sides: the JAX reference on the CPU, cuDNN's TF32 off.
  monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
  monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
  with jax.default_device(jax.devices("cpu")[0]):
    expected = train_jax(optimizer, theta, jnp.float32)
  assert relative_error(expected, train_torch(path, torch.float32, device="cuda")) < 1e-4


def test_accepts_a_loaded_trained_optimizer(checkpoint):
  path, _, _ = checkpoint
  expected = train_torch(path, torch.float64, steps=5)
  x, y = (torch.tensor(a) for a in model_data())
  params = {k: torch.tensor(v, requires_grad=True) for k, v in model_init().items()}
  optimizer = LearnedOptimizer(params.values(), lopt.load(path))
  for _ in range(5):
    optimizer.zero_grad()
    torch_loss(params, x, y).backward()
    optimizer.step()
  assert all(np.array_equal(expected[k], params[k].detach().numpy()) for k in expected)


# -- optimizer mechanics -------------------------------------------------------------------------------------------

def make_params(seed=3, dtype=torch.float64):
  generator = torch.Generator().manual_seed(seed)
  return [torch.randn(shape, generator=generator, dtype=dtype, requires_grad=True)
          for shape in [(3, 2, 2, 2), (5, 4), (4,)]]


def gradient_sequence(params, steps, seed=4):
  generator = torch.Generator().manual_seed(seed)
  return [[torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params] for _ in range(steps)]


def apply(optimizer, params, grads, scheduler=None):
  deltas = []
  for step_grads in grads:
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, step_grads):
      p.grad = g.clone()
    optimizer.step()
    if scheduler is not None:
      scheduler.step()
    deltas.append([p.detach() - b for p, b in zip(params, before)])
  return deltas


def test_state_dict_round_trip_continues_identically(checkpoint):
  path, _, _ = checkpoint
  params = make_params()
  optimizer = LearnedOptimizer(params, path)
  grads = gradient_sequence(params, 20)
  apply(optimizer, params, grads[:10])
  buffer = io.BytesIO()
  torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, buffer)
  buffer.seek(0)
  saved = torch.load(buffer, weights_only=True)

  resumed_params = [p.clone().requires_grad_(True) for p in saved["params"]]
  resumed = LearnedOptimizer(resumed_params, path)
  resumed.load_state_dict(saved["optimizer"])
  apply(optimizer, params, grads[10:])
  apply(resumed, resumed_params, grads[10:])
  for p, q in zip(params, resumed_params):
    assert torch.equal(p, q)
  assert resumed.state[resumed_params[0]]["step"].item() == 20
  assert resumed.state[resumed_params[0]]["hidden"].shape == (3, 2, 2, 2, HIDDEN)


def test_state_dict_from_another_optimizer_is_refused(checkpoint, tmp_path):
  path, optimizer, theta = checkpoint
  params = make_params()
  first = LearnedOptimizer(params, path)
  apply(first, params, gradient_sequence(params, 2))
  other_theta = dict(theta, readout_bias=np.asarray([0.5], np.float32))
  other = LearnedOptimizer(make_params(), save_optimizer(tmp_path / "other", optimizer, other_theta))
  with pytest.raises(ValueError, match="weights SHA-256"):
    other.load_state_dict(first.state_dict())


def test_lr_scales_the_update_and_schedulers_work(checkpoint):
  """The hidden state does not depend on lr, so under the same gradients delta_t(lr_t) = lr_t * delta_t(1)."""
  path, _, _ = checkpoint
  reference_params, scheduled_params = make_params(), make_params()
  grads = gradient_sequence(reference_params, 6)
  reference = apply(LearnedOptimizer(reference_params, path), reference_params, grads)
  optimizer = LearnedOptimizer(scheduled_params, path, lr=0.8)
  scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)
  scheduled = apply(optimizer, scheduled_params, grads, scheduler)
  rates = [0.8, 0.8, 0.08, 0.08, 0.008, 0.008]
  for rate, expected_step, found_step in zip(rates, reference, scheduled):
    for e, f in zip(expected_step, found_step):
      assert torch.count_nonzero(e) == e.numel()
      torch.testing.assert_close(f, rate * e, rtol=1e-9, atol=0)


def test_param_groups_take_their_own_lr_and_zero_grad(checkpoint):
  path, _, _ = checkpoint
  params, reference_params = make_params(), make_params()
  grads = gradient_sequence(params, 3)
  optimizer = LearnedOptimizer([{"params": params[:2]}, {"params": params[2:], "lr": 0.25}], path)
  found = apply(optimizer, params, grads)
  expected = apply(LearnedOptimizer(reference_params, path), reference_params, grads)
  for e, f in zip(expected, found):
    torch.testing.assert_close(f[0], e[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(f[2], 0.25 * e[2], rtol=1e-9, atol=0)
  optimizer.zero_grad()
  assert all(p.grad is None for p in params)
  before = [p.detach().clone() for p in params]
  optimizer.step()  # no gradients: nothing moves
  assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_one_batched_gru_call_per_group(checkpoint, monkeypatch):
  from lopt.architectures.gru import torch as gru
  path, _, _ = checkpoint
  calls = []
  original = gru.cell
  monkeypatch.setattr(gru, "cell", lambda theta, hidden, *a: calls.append(hidden.shape) or original(theta, hidden, *a))
  params = make_params()
  apply(LearnedOptimizer(params, path), params, gradient_sequence(params, 2))
  assert calls == [(3 * 8 + 20 + 4, HIDDEN)] * 2


def test_chunked_gru_step_equals_the_unchunked_one(checkpoint):
  """The GRU runs chunk_size coordinates at a time (bounded transient memory), updating its hidden-state buffer in
  place: chunks of 5 coordinates (chunks straddling tensors, a short last one) give the one-chunk result."""
  path, _, _ = checkpoint
  results = []
  for chunk_size in (None, 5):
    params = make_params()
    optimizer = LearnedOptimizer(params, path)
    if chunk_size is not None:
      optimizer.rule.chunk_size = chunk_size
    grads = gradient_sequence(params, 4)
    apply(optimizer, params, grads)
    results.append(([p.detach().clone() for p in params], [optimizer.state[p]["hidden"] for p in params]))
  (params, hidden), (chunked_params, chunked_hidden) = results
  for expected, found in zip(params + hidden, chunked_params + chunked_hidden):
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-14)


def test_mixed_dtypes_in_one_group(checkpoint):
  path, _, _ = checkpoint
  params = make_params(dtype=torch.float32)[:2] + make_params(dtype=torch.float64)[2:]
  apply(LearnedOptimizer(params, path), params, gradient_sequence(params, 2))
  assert [p.dtype for p in params] == [torch.float32, torch.float32, torch.float64]


# -- checkpoint errors ---------------------------------------------------------------------------------------------

def copy_checkpoint(path, tmp_path):
  target = tmp_path / "copy"
  target.mkdir()
  for name in ("config.json", "weights.safetensors"):
    (target / name).write_bytes((path / name).read_bytes())
  return target


def edit_config(path, change):
  config = json.loads((path / "config.json").read_text())
  change(config)
  (path / "config.json").write_text(json.dumps(config))


def test_missing_checkpoint_names_the_places_searched(tmp_path, monkeypatch):
  monkeypatch.setenv("LOPT_OPTIMIZER_PATH", str(tmp_path))
  with pytest.raises(CheckpointError, match=f"no such trained optimizer.*{tmp_path}/not-there"):
    LearnedOptimizer(make_params(), "not-there")
  with pytest.raises(CheckpointError, match="no such trained optimizer"):
    LearnedOptimizer(make_params(), tmp_path / "missing" / "dir")


def test_found_by_name(checkpoint, tmp_path, monkeypatch):
  path, _, _ = checkpoint
  copy_checkpoint(path, tmp_path)
  monkeypatch.setenv("LOPT_OPTIMIZER_PATH", str(tmp_path))
  assert LearnedOptimizer(make_params(), "copy").spec.hidden_size == HIDDEN


@pytest.mark.parametrize("problem, message", [
    ("no weights", r"weights.safetensors: weights file not found"),
    ("altered weights", r"weights.safetensors: checksum mismatch .* SHA-256 [0-9a-f]{64} .*found [0-9a-f]{64}"),
    ("hidden size", r"weights.safetensors: tensor 'input_weights' has shape \(\d, 18\), expected \(\d, 24\)"),
    ("encoding", r"config.json: field 'optimizer.input_encoding' must be one of .*found 'sign'"),
    ("architecture", r"config.json: field 'optimizer.architecture': unknown learned-optimizer architecture 'lstm'"),
    ("version", r"config.json: field 'format_version' must be one of \[1, 2\] .*found 7"),
    ("hidden size type", r"config.json: field 'optimizer.hidden_size' must be an integer in \[1, 65536\], found '6'"),
])
def test_mismatched_checkpoint_gives_a_precise_error(checkpoint, tmp_path, problem, message):
  path = copy_checkpoint(checkpoint[0], tmp_path)
  if problem == "no weights":
    (path / "weights.safetensors").unlink()
  elif problem == "altered weights":
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "weights.safetensors").write_bytes(bytes(data))
  else:
    field, value = {"hidden size": ("hidden_size", 8), "encoding": ("input_encoding", "sign"),
                    "architecture": ("architecture", "lstm"), "version": (None, 7),
                    "hidden size type": ("hidden_size", "6")}[problem]
    if field is None:
      edit_config(path, lambda c: c.update(format_version=value))
    else:
      edit_config(path, lambda c: c["optimizer"].update({field: value}))
  with pytest.raises(CheckpointError, match=message):
    LearnedOptimizer(make_params(), path)


def test_importing_lopt_torch_does_not_import_jax():
  code = "import sys, lopt.torch; assert 'jax' not in sys.modules, 'jax imported'; print('ok')"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_deepcopy_and_invalid_lr(checkpoint):
  path, _, _ = checkpoint
  with pytest.raises(ValueError, match="lr must be a non-negative (finite )?number"):
    LearnedOptimizer(make_params(), path, lr=-1.0)
  params = make_params()
  optimizer = LearnedOptimizer(params, path)
  apply(optimizer, params, gradient_sequence(params, 2))
  assert copy.deepcopy(optimizer.state_dict())["lopt"]["optimizer"]["hidden_size"] == HIDDEN


def test_float32_rounding_on_the_host_is_numpy_s():
  """``lopt.float32`` (the losses and global features rounded on the host) rounds as numpy's cast does: across the
  float32 range, subnormals, beyond it (infinities of either sign), NaN."""
  from lopt.float32 import to_float32, to_float32s
  rng = np.random.default_rng(0)
  values = list(rng.normal(size=300) * 10.0 ** rng.integers(-48, 42, size=300)) + [
      3.4028235e38, 3.5e38, -3.5e38, math.inf, -math.inf, 1e-46, -0.0, 0.1, math.nan]
  with np.errstate(over="ignore"):
    expected = np.asarray(values).astype(np.float32).astype(np.float64)
  for found in (np.asarray([to_float32(v) for v in values]), np.asarray(to_float32s(values))):
    np.testing.assert_array_equal(found, expected)
