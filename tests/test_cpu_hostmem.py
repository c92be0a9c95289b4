"""Tests of cvgl_jax.cpu.hostmem: when to re-execute, and that it takes effect."""

import os
import subprocess
import sys
import textwrap

import pytest

from cvgl_jax.cpu import hostmem

GLIBC = (2, 36)


def test_adds_the_tunable():
  env = hostmem.huge_page_environ({"PATH": "/bin"}, "madvise", GLIBC)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_keeps_other_tunables():
  env = hostmem.huge_page_environ(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "always", GLIBC)
  assert env["GLIBC_TUNABLES"] == (
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("environ,mode,glibc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),
    ({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=2"}, "madvise", GLIBC),
    ({}, "never", GLIBC),
    ({}, None, GLIBC),
    ({}, "madvise", (2, 31)),
    ({}, "madvise", None),
])
def test_nothing_to_do(environ, mode, glibc):
  assert hostmem.huge_page_environ(environ, mode, glibc) is None


def test_main_environ_keeps_an_explicit_setting_in_a_copy():
  given = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "A": "1"}
  env = hostmem.main_environ(given)
  assert env == given and env is not given


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hostmem.thp_mode(str(path)) == "madvise"
  assert hostmem.thp_mode(str(tmp_path / "missing")) is None


_CHILD = textwrap.dedent("""
    import ctypes, os
    print("pid", os.getpid(), flush=True)
    from cvgl_jax.cpu import hostmem
    hostmem.reexec_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 1 << 27  # far above glibc's mmap threshold
    ctypes.memset(libc.malloc(size), 1, size)
    with open("/proc/self/smaps_rollup") as f:
      kb = [int(line.split()[1]) for line in f
            if line.startswith("AnonHugePages:")][0]
    print("huge_kb", kb, os.environ.get("GLIBC_TUNABLES"))
""")


def _run_child(environ):
  out = subprocess.run([sys.executable, "-c", _CHILD], env=environ,
                       capture_output=True, text=True, check=True).stdout
  pids = [line.split()[1] for line in out.splitlines()
          if line.startswith("pid")]
  _, kb, tunables = [line for line in out.splitlines()
                     if line.startswith("huge_kb")][0].split()
  return pids, int(kb), tunables


@pytest.mark.skipif(
    hostmem.thp_mode() != "madvise"
    or (hostmem.glibc_version() or (0,)) < hostmem.MIN_GLIBC,
    reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise' (in "
    "'always' every mapping gets huge pages with or without the tunable)")
def test_reexec_gives_glibc_mappings_huge_pages():
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  pids, kb, tunables = _run_child(environ)
  # Re-executed exactly once, as the same process, with the tunable.
  assert len(pids) == 2 and pids[0] == pids[1]
  assert tunables == "glibc.malloc.hugetlb=1"
  assert kb >= 64 * 1024
  # An explicit setting is kept, and then glibc's mapping stays in 4 KiB
  # pages: what the re-exec changes.
  environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0"
  pids, kb, tunables = _run_child(environ)
  assert len(pids) == 1 and tunables == "glibc.malloc.hugetlb=0"
  assert kb < 64 * 1024


def test_no_restart_where_jax_runs_on_an_accelerator(tmp_path):
  glibc, thp = (2, 39), "madvise"
  assert hostmem.huge_page_environ({}, thp, glibc, cpu=False) is None
  assert hostmem.cpu_backend({"JAX_PLATFORMS": "cpu"}, ())
  assert hostmem.cpu_backend({"JAX_PLATFORMS": "CPU,cuda"}, ())
  assert not hostmem.cpu_backend({"JAX_PLATFORMS": "cuda,cpu"}, ())
  assert not hostmem.cpu_backend({"JAX_PLATFORMS": "tpu"}, ())
  gpu = tmp_path / "nvidia0"
  pattern = str(tmp_path / "nvidia[0-9]*")
  assert hostmem.cpu_backend({}, (pattern,))
  gpu.write_text("")
  assert not hostmem.cpu_backend({}, (pattern,))
  # An explicit JAX_PLATFORMS wins over the device files.
  assert hostmem.cpu_backend({"JAX_PLATFORMS": "cpu"}, (pattern,))
