"""What every command-line entry point shares: joining a multi-process job
and reporting a user's mistake.

`define_job_flags` defines the flags by which a process joins a job
(`--distributed`, `--coordinator_address`, `--num_processes`,
`--process_id`, `--local_device_ids`); `join_job` reads them and calls
`parallel.initialize` before anything touches a device. `cvgl_jax.main`,
`cvgl_jax.export` and `cvgl_jax.report` take them alike, so a bundle or
report can be made on the workers of a pod (where one process alone
cannot start the accelerators of a multi-host slice) with the command
that trained there.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags
from absl import logging
import jax

from cvgl_jax import parallel


def define_job_flags() -> None:
  """Defines the multi-process flags (once per program)."""
  flags.DEFINE_string(
      "coordinator_address", None,
      "Multi-process runs without a detected cluster: host:port of process "
      "0's coordinator (with --num_processes and --process_id).")
  flags.DEFINE_integer("num_processes", None,
                       "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None,
                       "This process's index in [0, num_processes).")
  flags.DEFINE_list(
      "local_device_ids", None,
      "Accelerators this process uses, e.g. 0,1,2,3 for one SLURM task per "
      "node owning four GPUs (JAX's SLURM detection alone gives one per "
      "task).")
  flags.DEFINE_enum(
      "distributed", "auto", ["auto", "on", "off"],
      "auto: join a multi-process run when the flags above are given or the "
      "environment is a SLURM step / Open MPI job with several tasks; on: "
      "always call jax.distributed.initialize() (Cloud TPU VM pods); off: "
      "one process.")


def user_error(error) -> NoReturn:
  """A user's mistake: one line `error: ...`, no traceback, exit status 2."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(2)


def join_job() -> None:
  """Joins the job the flags of `define_job_flags` describe (a no-op for a
  single process); a contradiction among them is a user error."""
  f = flags.FLAGS
  mode = f.distributed
  if mode == "off" and (f.coordinator_address or f.num_processes is not None
                        or f.process_id is not None):
    user_error("--distributed=off contradicts --coordinator_address / "
               "--num_processes / --process_id.")
  try:
    parallel.initialize(
        f.coordinator_address, f.num_processes, f.process_id,
        f.local_device_ids,
        auto={"auto": None, "on": True, "off": False}[mode])
  except ValueError as e:
    user_error(e)
  logging.info("JAX process %d of %d, devices %s", jax.process_index(),
               jax.process_count(), jax.devices())
