r"""How much of the test suite's demo run is compiling, with XLA's default
flags and with the tests' `processes.FAST_COMPILE`?

  python benchmarks/compile_time.py [--repeats=1]

Each variant runs, in a fresh process, the session's demo run of the tests
(`tests/conftest.py`'s `demo_run`: every stage on the tiny world, 8 paired
views + the fake view) on 8 CPU devices, and prints its wall time, the
seconds spent in XLA's compiler and on how many programs, and the three
most expensive program names. Variants alternate (round robin); medians
over the repeats. The compile time is read by wrapping JAX's private
`jax._src.compiler.backend_compile_and_load`: a diagnostic, not an API.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import processes  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = {"XLA defaults": "", "FAST_COMPILE": processes.FAST_COMPILE}

CHILD = r"""
import collections, json, sys, tempfile, time
sys.path.insert(0, "tests")
from jax._src import compiler
compile_and_load = compiler.backend_compile_and_load
seconds = collections.Counter()
count = collections.Counter()

def timed(backend, module, *args, **kwargs):
  start = time.perf_counter()
  out = compile_and_load(backend, module, *args, **kwargs)
  name = str(module.operation.attributes["sym_name"]).strip('"')
  seconds[name] += time.perf_counter() - start
  count[name] += 1
  return out

compiler.backend_compile_and_load = timed
from cvgl_jax import main as main_lib
from test_main import demo_run_config
config = demo_run_config()
start = time.perf_counter()
main_lib.run(config, tempfile.mkdtemp() + "/run")
print("RESULT " + json.dumps(dict(
    wall=time.perf_counter() - start, compile=sum(seconds.values()),
    programs=sum(count.values()),
    top=[(n, round(s, 1), count[n]) for n, s in seconds.most_common(3)])))
"""


def run_variant(flags: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {flags}")
  out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  results = {name: [] for name in VARIANTS}
  for _ in range(args.repeats):
    for name, flags in VARIANTS.items():
      results[name].append(run_variant(flags))
  print("| variant | wall s | compile s | programs | most expensive "
        "(name, s, count) |")
  print("| --- | --- | --- | --- | --- |")
  wall = {}
  for name, runs in results.items():
    wall[name] = statistics.median(r["wall"] for r in runs)
    compiled = statistics.median(r["compile"] for r in runs)
    print(f"| {name} | {wall[name]:.1f} | {compiled:.1f} | "
          f"{runs[0]['programs']} | {runs[0]['top']} |")
  print(f"\nXLA defaults / FAST_COMPILE wall: "
        f"{wall['XLA defaults'] / wall['FAST_COMPILE']:.2f}x")


if __name__ == "__main__":
  main()
