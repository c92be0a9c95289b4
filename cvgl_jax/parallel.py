"""The device mesh and moving per-host numpy data onto it.

Data parallelism over every device of every process: a 1-D mesh with one
axis, `data`. Parameters and optimizer state are replicated
(`replicated(mesh)`); batches are sharded on their leading axis
(`batch_sharding(mesh)`). Each process loads its own share of a global
batch as numpy (grain pipelines, `cvgl_jax.data.pipeline`) and `to_global`
turns the shares into one global `jax.Array`, so the same code runs on one
CPU, one GPU, eight simulated CPU devices or a multi-host pod.

The mesh axis is Auto (XLA propagates shardings through the model), not
Explicit (`jax.make_mesh`'s default since JAX 0.9): the augmentations vmap
gathers, switches and per-example random numbers over the batch, whose
sharding rules Explicit mode would make us spell out op by op. The loss
puts its collectives in `jax.shard_map`, which works with either
(`cvgl_jax.train.losses`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """A 1-D mesh, axis `data`, over `devices` (default: all of them)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices given.")
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


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


def gather(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Global (e.g. batch-sharded) arrays -> numpy, the whole array on every
  process (an all-gather when the array spans processes)."""
  return jax.tree.map(np.asarray, _replicate(mesh)(tree))


@functools.lru_cache(maxsize=None)
def _replicate(mesh):
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))
