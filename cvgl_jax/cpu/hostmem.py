"""Host memory: transparent huge pages for glibc's large allocations.

XLA:CPU allocates all temporaries of one execution as a single block (4.1 GB
for the reference ConvNeXt-T training step: batch 16, ground 128x512,
satellite 128x128). glibc maps a block that large fresh with `mmap` at every
step and unmaps it after, so the kernel faults it in again 4 KiB at a time:
about a million page faults and 3 s of system time per step on the dev CPU.
glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) marks such mappings
for transparent huge pages (`madvise(MADV_HUGEPAGE)`): 2 MiB pages, ~500x
fewer faults and TLB misses. Measured on the reference step, dev CPU, in one
round robin (`benchmarks/train_step.py --small_pages --torch=false`): 9.05 vs
10.27 s/step with 4 KiB pages; no gain when another process's step runs
in between (BUILD_NOTES.md).

glibc reads tunables only when a process starts, so `main` re-executes itself
once with the tunable set -- only when JAX will run on the CPU
(`cpu_backend`): on a GPU or TPU host XLA's temporaries live on the device
and the restart would only cost time. Setting
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` (or any value) yourself turns this
off: an explicit setting is never changed.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'),
  the bracketed word of `path`; None where the file is missing (not Linux,
  or a kernel without THP)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
  """glibc's (major, minor) version; None under another C library."""
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return None
  return tuple(int(v) for v in version.split(".")[:2] if v.isdigit())


# Device files of the accelerators JAX would pick before the CPU: NVIDIA
# GPUs, AMD GPUs (ROCm's kernel driver), TPU chips.
ACCELERATOR_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*")


def cpu_backend(environ: Mapping[str, str],
                accelerator_files: tuple[str, ...] = ACCELERATOR_FILES
                ) -> bool:
  """Whether JAX will run on the CPU, decided without importing it:
  `JAX_PLATFORMS` names `cpu` first, or is unset and no GPU or TPU device
  file exists (`accelerator_files`, glob patterns)."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in accelerator_files)


def huge_page_environ(
    environ: Mapping[str, str],
    mode: str | None,
    glibc: tuple[int, ...] | None,
    cpu: bool = True,
) -> dict[str, str] | None:
  """The environment to re-execute with, or None if there is nothing to do.

  Args:
    environ: the current environment.
    mode: `thp_mode()`.
    glibc: glibc's (major, minor) version; None for another C library.
    cpu: `cpu_backend(environ)`.

  Returns:
    A copy of `environ` with `glibc.malloc.hugetlb=1` appended to
    GLIBC_TUNABLES, or None when JAX will not run on the CPU, the tunable
    is already set (whatever its value), glibc is older than 2.35 or
    absent, or the kernel has no THP ('never' or unknown).
  """
  tunables = environ.get("GLIBC_TUNABLES", "")
  already = any(item.split("=", 1)[0] == TUNABLE
                for item in tunables.split(":") if item)
  if (not cpu or already or glibc is None or glibc < MIN_GLIBC
      or mode not in ("always", "madvise")):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(
      item for item in (tunables, f"{TUNABLE}=1") if item)
  return env


def main_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment `python -m cvgl_jax.main` runs under when started with
  `environ` (default: this process's): with the tunable where it applies."""
  environ = os.environ if environ is None else environ
  env = huge_page_environ(environ, thp_mode(), glibc_version(),
                          cpu_backend(environ))
  return dict(environ) if env is None else env


def reexec_with_huge_pages() -> None:
  """Replaces this process by itself with the tunable set, when it helps.

  Returns only when nothing is to be done (see `huge_page_environ`);
  otherwise `os.execve` runs the same interpreter with the same command line
  (`sys.orig_argv`) and the process id is kept, so launchers (SLURM, mpirun)
  see no difference. Call it first thing in a program's entry point.
  """
  env = huge_page_environ(os.environ, thp_mode(), glibc_version(),
                          cpu_backend(os.environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
