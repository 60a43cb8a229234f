"""Meta-training over several devices and hosts: one mesh axis, ``"batch"``, over which the per-problem work is split.

The contract (docs/SCALING.md):

* **Sharded**: the leading axis of every leaf of an estimator's state (its trajectories: problems, or antithetic
  pairs of problems x particles; ``Grouped`` holds one such state per task group), and the per-problem arrays an
  estimator builds inside a step when it passes them through ``constrain`` (full backpropagation's meta-batch keys,
  restart keys, perturbation draws). The population axis of a population of optimizers is sharded the same way.
* **Replicated**: theta, the outer optimizer's state, the step key, the metrics.
* **Divisibility**: every sharded leading axis that crosses a step boundary (the estimator state) must be a multiple
  of the number of devices in the mesh; otherwise ``ShardingError`` at start, naming the array and the sizes that
  would work (no padding: padded problems would change the estimate). Arrays that exist only inside a step may have
  any length (XLA pads uneven shards internally).
* **Nothing device-specific is stored**: states are gathered to the host before they are written, so a checkpoint
  written on N devices resumes on M.
* **Several hosts** (``jax.distributed``): every process runs the same program on the same command line; the mesh
  takes ``devices`` local devices of every process (process-major); only process 0 writes files (``writes``), and
  what it reads (a saved config, a checkpoint) is broadcast to the others (``from_writer``).

A ``Layout`` with ``mesh`` None (one device, one process) changes nothing: the single-device path is exactly
today's, numbers included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lopt.errors import UserError

AXIS = "batch"
# Where the distributed settings come from when no option gives them: JAX's own variable for the coordinator, ours for
# the process count and index (JAX reads those only from cluster managers it detects).
ENVIRONMENT = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "LOPT_NUM_PROCESSES",
               "process_id": "LOPT_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id"}


ESTIMATOR_FIX = ("choose a meta_batch_size (and, with task families, num_groups) giving a multiple of {devices} "
                 "problems per group, or run on fewer devices with --devices")


class ShardingError(UserError, ValueError):
  """A device count, a size that does not divide over the devices, or distributed settings that cannot work."""


# -- several hosts ---------------------------------------------------------------------------------------------------

def distributed_settings(coordinator: str | None = None, num_processes: int | str | None = None,
                         process_id: int | str | None = None, environ=None) -> dict | None:
  """The validated ``jax.distributed`` settings from the options, or else the environment (``ENVIRONMENT``); None
  when none of them is given (one process). ShardingError when only some are, or one is malformed."""
  environ = os.environ if environ is None else environ
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  values = {k: v if v is not None else environ.get(ENVIRONMENT[k]) for k, v in given.items()}
  values = {k: None if v == "" else v for k, v in values.items()}
  if all(v is None for v in values.values()):
    return None
  where = {k: FLAGS[k] if given[k] is not None else f"${ENVIRONMENT[k]}" for k in values}
  missing = [f"{FLAGS[k]} (or ${ENVIRONMENT[k]})" for k, v in values.items() if v is None]
  if missing:
    named = ", ".join(f"{where[k]}={v}" for k, v in values.items() if v is not None)
    raise ShardingError(f"several processes: {named} given, but not {', '.join(missing)}; all three are needed")
  host, _, port = str(values["coordinator"]).rpartition(":")
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ShardingError(f"{where['coordinator']}: {values['coordinator']!r} is not HOST:PORT (e.g. 10.0.0.1:1234; "
                        f"the host of process 0, a free port there)")
  count = _integer(values["num_processes"], where["num_processes"], 1)
  index = _integer(values["process_id"], where["process_id"], 0)
  if index >= count:
    raise ShardingError(f"{where['process_id']}={index}: process ids run from 0 to {count - 1} "
                        f"({where['num_processes']}={count})")
  return {"coordinator_address": str(values["coordinator"]), "num_processes": count, "process_id": index}


def _integer(value, where: str, low: int) -> int:
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or isinstance(value, bool) or number < low:
    raise ShardingError(f"{where}: {value!r} is not an integer >= {low}")
  return number


def initialize(coordinator: str | None = None, num_processes: int | str | None = None,
               process_id: int | str | None = None) -> bool:
  """Joins the ``jax.distributed`` cluster the settings describe (see ``distributed_settings``); False when there
  are none (one process). Must run before any JAX computation. ShardingError when the cluster cannot be joined."""
  settings = distributed_settings(coordinator, num_processes, process_id)
  if settings is None:
    return False
  try:
    jax.distributed.initialize(**settings)
  except (RuntimeError, ValueError) as e:
    raise ShardingError(f"cannot join the cluster at {settings['coordinator_address']} as process "
                        f"{settings['process_id']} of {settings['num_processes']}: {e}") from None
  return True


# -- the mesh --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
  """Where meta-training runs: ``mesh`` (one axis, ``AXIS``) or None for one device in one process."""
  mesh: Mesh | None = None

  @property
  def size(self) -> int:
    return 1 if self.mesh is None else self.mesh.size

  @property
  def sharded(self) -> bool:
    return self.mesh is not None

  @property
  def several_processes(self) -> bool:
    return jax.process_count() > 1

  @property
  def writes(self) -> bool:
    """Whether this process writes files (process 0)."""
    return jax.process_index() == 0

  @property
  def replica(self) -> NamedSharding:
    """The replicated sharding (as a jit in/out sharding it serves a whole pytree)."""
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def split(self) -> NamedSharding:
    """The leading axis split over the mesh (as a jit sharding it serves a pytree whose leaves all have it)."""
    return NamedSharding(self.mesh, PartitionSpec(AXIS))

  def leading(self, tree, what: str = "estimator state", fix: str = ESTIMATOR_FIX):
    """A pytree like ``tree`` (arrays or ShapeDtypeStructs) of shardings of the leading axis over the mesh.
    ShardingError (``what`` and ``fix`` in its message) for a leaf without a leading axis a multiple of the device
    count."""
    sizes = leading_sizes(tree)
    bad = [s for s in sizes if s == 0 or s % self.size]
    if bad:
      raise ShardingError(f"{what}: leading axes of {sorted(sizes)} do not split over {self.size} devices (each must "
                          f"be a multiple of {self.size}; found {bad}); {fix.format(devices=self.size)}")
    return jax.tree.map(lambda _: self.split, tree)

  def put(self, tree, shardings):
    """``tree`` placed as ``shardings`` (one, or a pytree like ``tree``) say; identity without a mesh. Every process
    must hold the same values: each keeps the slices its devices hold."""
    if self.mesh is None:
      return tree
    if not self.several_processes:
      return jax.device_put(tree, shardings)
    if isinstance(shardings, NamedSharding):
      shardings = jax.tree.map(lambda _: shardings, tree)

    def put_one(x, sharding):
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put_one(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
      whole = np.asarray(x)
      return jax.make_array_from_callback(whole.shape, sharding, lambda index: whole[index])

    return jax.tree.map(put_one, tree, shardings)

  def jit(self, fn: Callable, in_shardings, out_shardings) -> Callable:
    """``fn`` jitted with these shardings and traced under the mesh (so that ``constrain`` inside it applies)."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)

    def call(*args):
      with jax.set_mesh(self.mesh):
        return jitted(*args)

    return call

  def local(self, tree):
    """Replicated arrays as plain arrays on this process's first device (no communication); identity without a
    mesh. For work that needs one copy only: held-out evaluation, counters."""
    if self.mesh is None:
      return tree
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)

  def to_host(self, tree):
    """Every leaf as a whole numpy array (typed PRNG keys as their key data) on every process: a collective when
    the arrays span processes, so all processes must call it together."""
    def host(x):
      if not isinstance(x, jax.Array):
        return x
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(host(jax.random.key_data(x)), impl=jax.random.key_impl(x))
      if x.is_fully_addressable:
        return np.asarray(x)
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return tree if self.mesh is None else jax.tree.map(host, tree)

  def any_process(self, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective with several processes)."""
    if not self.several_processes:
      return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))

  def from_writer(self, tree):
    """Process 0's value of a pytree of numpy arrays (PRNG keys as key data), on every process; identity with one
    process. Every process passes a tree of the same structure, shapes and dtypes."""
    if not self.several_processes:
      return tree
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(tree)


def layout(devices: int | None = None, sizes: tuple[int, ...] = ()) -> Layout:
  """The layout over ``devices`` local devices of every process. None: all of them; in one process, with ``sizes``
  (the lengths of the axes to split), the most devices that every size is a multiple of, so that the default
  always runs. ShardingError for a count this process does not have."""
  local = jax.local_devices()
  count = len(local) if devices is None else devices
  if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(local):
    raise ShardingError(f"--devices {devices}: this process has {len(local)} {local[0].platform.upper()} device(s); "
                        f"choose 1 to {len(local)}")
  if devices is None and jax.process_count() == 1:
    count = max(c for c in range(1, count + 1) if all(size % c == 0 for size in sizes))
  if count == 1 and jax.process_count() == 1:
    return Layout(None)
  chosen = [d for p in range(jax.process_count()) for d in
            sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)[:count]]
  return Layout(Mesh(np.array(chosen), (AXIS,)))


def leading_sizes(tree) -> tuple[int, ...]:
  """The distinct lengths of the leading axes of ``tree``'s leaves (arrays or shapes; 0 for a scalar leaf)."""
  return tuple(sorted({leaf.shape[0] if leaf.ndim else 0 for leaf in jax.tree.leaves(tree)}))


def constrain(tree):
  """Shards the leading axis of every leaf over the ambient mesh's ``AXIS`` (``Layout.jit`` sets it); changes
  nothing without one. For per-problem arrays an estimator creates inside a step (any length: XLA pads uneven
  shards)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec(AXIS)), tree)


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON-serializable ``value`` on every process (others may pass anything); identity with one
  process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
  length = int(multihost_utils.broadcast_one_to_all(np.asarray(data.size, np.int64)))
  padded = np.zeros(length, np.uint8)
  padded[:min(length, data.size)] = data[:length]
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(padded)).decode())


__all__ = ["AXIS", "ENVIRONMENT", "Layout", "ShardingError", "broadcast_json", "constrain", "distributed_settings",
           "initialize", "layout", "leading_sizes"]
