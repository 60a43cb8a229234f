"""Tasks: known answers (minimum, gradients, spectra), shapes and parameter counts, determinism, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt import tasks
from lopt.data import DataFileError, load_mnist
from lopt.tasks.quadratic import sample_quadratic


@pytest.mark.parametrize("seed", range(5))
def test_linear_regression_minimum_is_exactly_zero(seed):
  key = jax.random.key(seed)
  task = tasks.get("linear_regression")
  with jax.enable_x64(True):
    hessian, linear, offset = sample_quadratic(key, 5, -3.0, 0.0)
    solution = jnp.linalg.solve(hessian, -linear)
    assert abs(float(task.loss(solution, key, 0))) < 1e-9 * max(1.0, float(jnp.abs(offset)))
    grad = jax.grad(task.loss)(solution, key, 0)
    np.testing.assert_allclose(grad, 0.0, atol=1e-9)
    # Any other point is strictly above the minimum.
    assert float(task.loss(solution + 0.1, key, 0)) > 0


@pytest.mark.parametrize("dim,low,high", [(5, -3.0, 0.0), (12, -1.0, 1.0)])
def test_linear_regression_hessian_spectrum_in_range(dim, low, high):
  for seed in range(10):
    hessian, _, _ = sample_quadratic(jax.random.key(seed), dim, low, high)
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
    assert eigenvalues.min() >= 10**low * (1 - 1e-3)
    assert eigenvalues.max() <= 10**high * (1 + 1e-3)
    np.testing.assert_allclose(hessian, np.asarray(hessian).T, atol=1e-6)
  task = tasks.get("linear_regression", dim=dim, log10_min_eig=low, log10_max_eig=high)
  hessian_from_loss = jax.hessian(task.loss)(jnp.zeros(dim), jax.random.key(3), 0)
  np.testing.assert_allclose(hessian_from_loss, sample_quadratic(jax.random.key(3), dim, low, high)[0], atol=1e-5)


def test_rosenbrock_gradient_zero_at_minimum():
  task = tasks.get("rosenbrock")
  point = jnp.array([1.0, 1.0])
  assert float(task.loss(point, None, 0)) == 0.0
  np.testing.assert_array_equal(jax.grad(task.loss)(point, None, 0), [0.0, 0.0])
  assert float(jnp.linalg.norm(jax.grad(task.loss)(jnp.array([0.0, 0.0]), None, 0))) > 1
  starts = jax.vmap(task.init)(jax.random.split(jax.random.key(0), 1000))
  assert starts[:, 0].min() >= -2 and starts[:, 0].max() <= 2 and starts[:, 1].min() >= -1 and starts[:, 1].max() <= 3


@pytest.mark.parametrize("name,options,count", [
    ("linear_regression", {}, 5),
    ("rosenbrock", {}, 2),
    ("two_moons", {}, 2 * 64 + 64 + 2 * (64 * 64 + 64) + 64 + 1),  # 8,577 as in the paper's network
    ("digits_cnn", {}, (5 * 5 * 32 + 32) + (3 * 3 * 32 * 16 + 16) + (3 * 3 * 16 * 16 + 16) + (16 * 10 + 10)),
])
def test_shapes_and_parameter_counts(name, options, count):
  task = tasks.get(name, **options)
  assert task.num_params() == count
  assert task.horizon == 200
  keys = jax.random.split(jax.random.key(1), 3)
  params = jax.vmap(task.init)(keys)
  losses = jax.vmap(task.loss, in_axes=(0, 0, None))(params, keys, 0)
  assert losses.shape == (3,) and bool(jnp.all(jnp.isfinite(losses)))
  # Different keys give different problems/initializations; the same key gives the same.
  leaves = jax.tree.leaves(params)
  assert not np.allclose(leaves[0][0], leaves[0][1])
  np.testing.assert_array_equal(jax.tree.leaves(task.init(keys[0]))[0], leaves[0][0])


def test_digits_cnn_minibatches_are_deterministic_and_vary_with_step():
  task = tasks.get("digits_cnn")
  key = jax.random.key(4)
  params = task.init(key)
  assert float(task.loss(params, key, 3)) == float(task.loss(params, key, 3))
  assert float(task.loss(params, key, 3)) != float(task.loss(params, key, 4))
  assert np.isfinite(float(task.valid_loss(params, key, 0)))


def _write_idx(path, array, type_code):
  header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
  path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_mnist_from_small_local_files(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 40, dtype=np.uint8)
  _write_idx(tmp_path / "train-images-idx3-ubyte", images, 0x08)
  _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 0x08)
  data = load_mnist(tmp_path)
  assert data.inputs.shape == (40, 28, 28, 1) and data.inputs.max() <= 1.0
  np.testing.assert_array_equal(data.labels, labels)
  np.savez(tmp_path / "mnist.npz", x=images, y=labels)
  task = tasks.get("mnist_cnn", path=str(tmp_path / "mnist.npz"), batch_size=8)
  assert task.num_params() == 832 + 4624 + 2320 + (4 * 4 * 16 * 10 + 10)
  key = jax.random.key(0)
  assert np.isfinite(float(task.loss(task.init(key), key, 0)))


def test_mnist_errors_name_the_file(tmp_path):
  with pytest.raises(DataFileError, match="missing.npz: file not found"):
    tasks.get("mnist_cnn", path=str(tmp_path / "missing.npz"))
  bad = tmp_path / "bad.npz"
  np.savez(bad, a=np.zeros(3))
  with pytest.raises(DataFileError, match="bad.npz: npz must hold arrays 'x' and 'y'"):
    tasks.get("mnist_cnn", path=str(bad))
  (tmp_path / "t-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") * 3 + b"\0" * 5)
  (tmp_path / "t-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\0" * 10)
  with pytest.raises(DataFileError, match="t-images-idx3-ubyte: idx header says shape"):
    load_mnist(tmp_path / "t-images-idx3-ubyte")


def test_unknown_task_and_option_errors():
  with pytest.raises(tasks.TaskError, match="unknown task 'nope'; choose one of: linear_regression"):
    tasks.get("nope")
  with pytest.raises(tasks.TaskError, match="has no option 'width'"):
    tasks.get("rosenbrock", width=3)
  with pytest.raises(tasks.TaskError, match="needs option"):
    tasks.get("mnist_cnn")


@pytest.mark.parametrize("option, value, kind", [("dim", "abc", "an integer"), ("dim", 2.5, "an integer"),
                                                 ("log10_min_eig", "low", "a number"), ("dim", True, "an integer")])
def test_task_options_of_the_wrong_type_say_what_is_allowed(option, value, kind):
  with pytest.raises(tasks.TaskError, match=rf"task 'linear_regression': option '{option}' must be {kind}, found"):
    tasks.get("linear_regression", **{option: value})


def test_cli_task_option_of_the_wrong_type_exits_2(tmp_path, capsys):
  from lopt.cli import main
  assert main(["train", "linear_regression", "--out", str(tmp_path / "run"), "--task-option", "dim=abc"]) == 2
  err = capsys.readouterr().err
  assert "option 'dim' must be an integer, found 'abc'" in err and "not supported" not in err
