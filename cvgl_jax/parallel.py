"""The device mesh and moving per-host numpy data onto it.

Data parallelism over every device of every process: a 1-D mesh with one
axis, `data`. Parameters and optimizer state are replicated
(`replicated(mesh)`); batches are sharded on their leading axis
(`batch_sharding(mesh)`). Each process loads its own share of a global
batch as numpy (grain pipelines, `cvgl_jax.data.pipeline`) and `to_global`
turns the shares into one global `jax.Array`, so the same code runs on one
CPU, one GPU, eight simulated CPU devices or a multi-host pod.

Start-up (`initialize`, called by `cvgl_jax.main` before anything touches a
device): one process per host (TPU VM worker, GPU node) or per GPU joins
JAX's multi-controller runtime through `jax.distributed.initialize`. Where
the environment names a cluster JAX detects (a SLURM step with several
tasks, Open MPI, a GKE TPU slice) it is called without arguments; on a
Cloud TPU VM pod (known only from its metadata server) the launcher asks for
that with `auto=True`; elsewhere the coordinator address, process count and
process id are given explicitly. A plain single process calls nothing.
Every process then runs the same program; `is_main_process` picks the one
that writes files, and `sync` makes the others wait for them.

The mesh axis is Auto (XLA propagates shardings through the model), not
Explicit (`jax.make_mesh`'s default since JAX 0.9): the augmentations vmap
gathers, switches and per-example random numbers over the batch, whose
sharding rules Explicit mode would make us spell out op by op. The loss
puts its collectives in `jax.shard_map`, which works with either
(`cvgl_jax.train.losses`).
"""

from __future__ import annotations

import functools
import os
import signal
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

DATA_AXIS = "data"


# Environments whose variables JAX's `jax.distributed.initialize()` reads by
# itself (jax/_src/clusters), as (name, variable holding the process count,
# variables that must also be set). A count of 1 is a single process.
_CLUSTERS = (
    ("SLURM", "SLURM_NTASKS", ("SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                               "SLURM_PROCID", "SLURM_LOCALID")),
    ("Open MPI", "OMPI_COMM_WORLD_SIZE", ("OMPI_MCA_orte_hnp_uri",)),
)


def detected_cluster() -> Optional[str]:
  """The multi-process cluster JAX would configure itself from, or None.

  SLURM counts only inside an `srun` step with more than one task (JAX reads
  `SLURM_STEP_NODELIST`, which the batch script itself does not have), Open
  MPI only with more than one rank, a GKE TPU slice only with more than one
  worker in `TPU_WORKER_HOSTNAMES`. A Cloud TPU VM pod on GCE is not
  recognisable from its environment: pass `auto=True` there.
  """
  for name, count, others in _CLUSTERS:
    if all(v in os.environ for v in others) and int(
        os.environ.get(count, "1") or 1) > 1:
      return name
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES",
                         os.environ.get("TPU_WORKER_HOSTNAMES", ""))
  if len([h for h in hosts.split(",") if h]) > 1:
    return "TPU"
  return None


_VISIBLE_GPUS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                 "HIP_VISIBLE_DEVICES")


def task_bound_device_ids(environ: Mapping[str, str] = os.environ
                          ) -> Optional[list[int]]:
  """The GPUs of a SLURM task its site bound GPUs to, else None.

  JAX's SLURM detection gives task k of a node GPU k, which assumes every
  task sees all GPUs of its node. A site that binds GPUs to tasks
  (`--gpus-per-task`, `--gpu-bind`, cgroups) shows each task only its own,
  numbered from 0: task 3 would ask for a GPU 3 it cannot see. A task is
  bound when `SLURM_GPUS_PER_TASK` is set, when it sees fewer GPUs than
  the job has on the node (`SLURM_STEP_GPUS` / `SLURM_JOB_GPUS`), or when
  its local index is past the GPUs it sees; it then takes all of those.
  """
  visible = next((environ[v] for v in _VISIBLE_GPUS if environ.get(v)), "")
  ids = [x for x in visible.split(",") if x.strip()]
  if not ids or "SLURM_LOCALID" not in environ:
    return None
  node_gpus = environ.get("SLURM_STEP_GPUS") or environ.get(
      "SLURM_JOB_GPUS", "")
  bound = (bool(environ.get("SLURM_GPUS_PER_TASK"))
           or len([x for x in node_gpus.split(",") if x.strip()]) > len(ids)
           or int(environ["SLURM_LOCALID"]) >= len(ids))
  return list(range(len(ids))) if bound else None


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None,
               auto: Optional[bool] = None) -> bool:
  """Joins the processes of a multi-process run; call before any device use.

  Args:
    coordinator_address: "host:port" of process 0's coordinator service;
      with `num_processes` and `process_id`, all three or none.
    num_processes: how many processes the run has.
    process_id: this process's index, 0 <= process_id < num_processes.
    local_device_ids: the accelerators this process uses (e.g. [0, 1, 2, 3]
      for one SLURM task per node that owns all four GPUs; JAX's SLURM
      detection alone gives task k of a node GPU k only). None: JAX's choice
      (also read from `JAX_LOCAL_DEVICE_IDS`).
    auto: with no explicit arguments: True calls `jax.distributed.
      initialize()` and lets JAX detect the cluster (Cloud TPU VM pods);
      False stays a single process; None (default) does the former only
      where `detected_cluster()` names one.

  Returns:
    True if `jax.distributed.initialize` was called (now or before), False
    for a single process.

  Raises:
    ValueError: only some of the explicit arguments given, or values that
      cannot describe a run (named), before contacting anyone.
  """
  explicit = {"coordinator_address": coordinator_address,
              "num_processes": num_processes, "process_id": process_id}
  given = {k for k, v in explicit.items() if v is not None}
  if given and given != set(explicit):
    missing = sorted(set(explicit) - given)
    raise ValueError(
        f"Multi-process start-up: {sorted(given)} given without {missing}; "
        f"give all three of coordinator_address (host:port of process 0), "
        f"num_processes and process_id, or none to let JAX detect the "
        f"cluster.")
  if local_device_ids is not None:
    local_device_ids = [int(i) for i in local_device_ids]
    if not local_device_ids or min(local_device_ids) < 0 or len(
        set(local_device_ids)) != len(local_device_ids):
      raise ValueError(f"local_device_ids must be distinct device numbers "
                       f">= 0, got {local_device_ids}.")
  if jax.distributed.is_initialized():
    return True
  if given:
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"coordinator_address must be host:port, e.g. "
                       f"10.0.0.1:1234, got {coordinator_address!r}.")
    if int(num_processes) < 1 or not 0 <= int(process_id) < int(
        num_processes):
      raise ValueError(f"Need num_processes >= 1 and 0 <= process_id < "
                       f"num_processes, got num_processes={num_processes}, "
                       f"process_id={process_id}.")
    if int(num_processes) == 1 and local_device_ids is None:
      return False
    jax.distributed.initialize(coordinator_address, int(num_processes),
                               int(process_id), local_device_ids)
  else:
    cluster = detected_cluster()
    if auto is False or (auto is None and cluster is None):
      return False
    if (cluster == "SLURM" and local_device_ids is None
        and not os.environ.get("JAX_LOCAL_DEVICE_IDS")):
      local_device_ids = task_bound_device_ids()
      if local_device_ids is not None:
        logging.info("SLURM bound GPUs to this task: using its %d visible "
                     "GPU(s).", len(local_device_ids))
    logging.info("Joining the multi-process run detected from %s.",
                 cluster or "the cluster environment")
    jax.distributed.initialize(local_device_ids=local_device_ids)
  logging.info("JAX process %d of %d, %d local of %d devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


class Preempted(Exception):
  """A SIGTERM (a scheduler's time limit, scancel, pre-emption, TPU
  maintenance) was answered with a checkpoint; the run stopped there and
  the same command resumes it."""


_preemption = {"calls": 0, "requested": False}


def watch_for_preemption() -> None:
  """Makes SIGTERM a request to checkpoint and stop at the next step.

  One process: a handler that sets a flag. Several: JAX's preemption
  service (started by `jax.distributed.initialize`) already catches
  SIGTERM and agrees with the other processes on the step to stop at;
  installing a handler here would take the signal from it.
  """
  if jax.distributed.is_initialized():
    return

  def request(signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM: checkpointing at the next training step.")
    _preemption["requested"] = True
  signal.signal(signal.SIGTERM, request)


def preemption_point() -> bool:
  """Whether to checkpoint and stop now; call once after every training
  step of every stage, on every process (the count of calls is the step
  id the processes agree on, so it must be the same everywhere)."""
  _preemption["calls"] += 1
  if jax.distributed.is_initialized():
    return multihost_utils.reached_preemption_sync_point(
        _preemption["calls"])
  return _preemption["requested"]


def sync(name: str) -> None:
  """Waits until every process reaches `sync(name)` (a no-op for one).

  Used where process 0 writes files that the others read next (generated
  data, the outputs of a stage); `name` must be the same on every process.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def sum_over_processes(count: int) -> int:
  """The sum of an integer count (e.g. files this process wrote) over all
  processes, on every process; the count itself for one process."""
  if jax.process_count() == 1:
    return int(count)
  return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def min_over_processes(value: int) -> int:
  """The least of an integer (e.g. the index of the first bad file each
  process found in its share) over all processes, on every process."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.min(multihost_utils.process_allgather(np.int64(value))))


def from_main_process(tree: Any) -> Any:
  """Process 0's values of a pytree of host arrays, on every process.

  For results every process computes but every process must agree on
  bit for bit (e.g. an epoch's pseudo pairing); shapes must be the same on
  every process. Returns numpy arrays of the input dtypes.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  tree = jax.tree.map(np.asarray, tree)
  out = multihost_utils.broadcast_one_to_all(tree)
  return jax.tree.map(lambda o, x: np.asarray(o).astype(x.dtype), out, tree)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """A 1-D mesh, axis `data`, over `devices` (default: all of them)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices given.")
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def devices_for_batch(global_batch: int, name: str = "batch_size"
                      ) -> list[jax.Device]:
  """The devices a global batch too small for all of them is split over.

  The same number k of devices on every process (the first k local ones),
  k the largest that divides the process's share of the batch: all
  devices when the batch is a multiple of the device count, one device per
  process for a batch of one per process. For models trained with small
  batches (the CycleGAN's official batch is 1), where splitting a batch of
  one is impossible and training the same model on every device is waste.

  Raises:
    ValueError naming `name` when the batch does not split over the
    processes (each must hold the same number of rows).
  """
  n_proc = jax.process_count()
  if global_batch <= 0 or global_batch % n_proc:
    raise ValueError(
        f"{name}: the global batch {global_batch} must be a positive "
        f"multiple of the {n_proc} processes; choose e.g. "
        f"{n_proc * jax.local_device_count()} (one image per device).")
  share = global_batch // n_proc
  k = max(d for d in range(1, jax.local_device_count() + 1) if share % d == 0)
  by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return [d for p in range(n_proc)
          for d in [d for d in by_process if d.process_index == p][:k]]


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Every device holds the whole array (params, optimizer state, scalars)."""
  return jax.sharding.NamedSharding(mesh, jax.P())


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over `data`; other axes whole."""
  return jax.sharding.NamedSharding(mesh, jax.P(DATA_AXIS))


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, metrics and files."""
  return jax.process_index() == 0


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh,
                     name: str = "batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh
  and over the processes."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch <= 0 or global_batch % n_dev or global_batch % n_proc:
    raise ValueError(
        f"{name}: the global batch {global_batch} must be a positive "
        f"multiple of the {n_dev} devices (and {n_proc} processes); choose "
        f"e.g. {max(n_dev, n_dev * round(max(global_batch, 1) / n_dev))}.")


def process_batch_size(global_batch: int, mesh: jax.sharding.Mesh,
                       name: str = "batch_size") -> int:
  """The rows each process loads of a `global_batch` (a config's batch
  sizes are global): global_batch / process count, after
  `check_batch_size`."""
  check_batch_size(global_batch, mesh, name)
  return global_batch // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray],
              mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's share of a batch -> global arrays sharded on `data`.

  Args:
    batch: {name: [b, ...] numpy array}, b = global batch / process count,
      the rows this process loaded (every process calls this with its own
      rows, in step).
    mesh: the data mesh.

  Returns:
    {name: [b * process_count, ...] jax.Array} sharded on the batch axis.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """A pytree of host values (the same on every process) -> replicated
  global arrays. Works across processes, unlike `jax.device_put`."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
  return jax.tree.map(put, tree)


def replicate_local(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Arrays on this process's first device, the same on every process ->
  replicated global arrays (device-to-device copies, no host round trip).

  For state each process computes by itself but checkpoints with orbax,
  which saves only global arrays in a multi-process run. `local_copy` is
  the way back.
  """
  sharding = replicated(mesh)

  def put(x):
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding,
        [jax.device_put(x, d) for d in sharding.addressable_devices])
  return jax.tree.map(put, tree)


def local_copy(tree: Any) -> Any:
  """Replicated global arrays -> single-device arrays on this process's
  first device (where un-sharded jitted functions run)."""
  device = jax.local_devices()[0]
  return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), device),
                      tree)


def gather(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Global (e.g. batch-sharded) arrays -> numpy, the whole array on every
  process (an all-gather when the array spans processes)."""
  return jax.tree.map(np.asarray, replicate(tree, mesh))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`gather` without the wait: replicated jax arrays, dispatched
  asynchronously (np.asarray on them waits)."""
  return _replicate(mesh)(tree)


@functools.lru_cache(maxsize=None)
def _replicate(mesh):
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))
