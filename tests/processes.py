"""Running a job's processes from a test: processes 0..N-1 side by side.

The outputs go to files, not pipes: a process blocked writing a full pipe
that nobody reads stalls its peers in their next collective, and the test
then hangs instead of failing.
"""

import os
import socket
import subprocess

# Compiling dominates the suite (tiny models, a few steps each), and LLVM's
# optimisations most of a compile: without them the tests' demo run
# compiles 1.7x faster (benchmarks/compile_time.py). Every process of a test uses
# the same flags, so the numbers they compare come from the same code.
FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a test process with `devices` CPU devices."""
  count = (f"--xla_force_host_platform_device_count={devices} "
           if devices > 1 else "")
  return count + FAST_COMPILE


def free_port() -> int:
  """A TCP port free on this host now (for a coordinator address)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_all(commands, envs, log_dir, timeout=420):
  """Starts every command at once and waits for all of them.

  Args:
    commands: one argv per process.
    envs: one environment per process.
    log_dir: where process_<i>.log goes.
    timeout: seconds per process; past it every process is killed and
      subprocess.TimeoutExpired raised.

  Returns:
    [(exit status, output)] per process.
  """
  os.makedirs(log_dir, exist_ok=True)
  files = [open(os.path.join(log_dir, f"process_{i}.log"), "w+")
           for i in range(len(commands))]
  procs = [subprocess.Popen(c, env=e, text=True, stdout=f,
                            stderr=subprocess.STDOUT)
           for c, e, f in zip(commands, envs, files)]
  for p in procs:
    try:
      p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  out = []
  for f in files:
    f.seek(0)
    out.append(f.read())
    f.close()
  return [(p.returncode, text) for p, text in zip(procs, out)]
