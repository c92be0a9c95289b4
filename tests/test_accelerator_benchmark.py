"""`benchmarks/accelerator.py --tiny`: the accelerator benchmark's every
path (plain and gradient-cached steps on a 2-device mesh, CFP, refine) runs
on the CPU and prints its one table."""

import os
import re
import sys

import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_prints_the_table(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=processes.xla_flags(devices=2))
  [(code, out)] = processes.run_all(
      [[sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"),
        "--tiny", "--rounds=1"]], [env], str(tmp_path), timeout=300)
  assert code == 0, out[-3000:]
  assert "2 x cpu" in out
  rows = [line.split(" | ") for line in out.splitlines()
          if line.startswith("| ") and not line.startswith("| ---")]
  header, rows = rows[0], rows[1:]
  assert header[0] == "| measure", header
  names = [row[0] for row in rows]
  for prefix in ("| train step, custom", "| train step: MFU",
                 "| train step: peak MiB", "| CFP 308x56", "| CFP: images/s",
                 "| refine 1,024 x 64"):
    assert sum(n.startswith(prefix) for n in names) == 1, (prefix, names)
  rates = {row[0]: row for row in rows}
  pairs = next(r for n, r in rates.items() if n.startswith("| train step,"))
  assert float(pairs[1]) > 0 and float(pairs[2]) > 0
  # The cached step holds 8 rows per device in chunks of the plain 4: its
  # peak is the plain step's plus the larger batch's inputs, far from 2x.
  peak = next(r for n, r in rates.items() if "peak MiB" in n)
  assert 1.0 <= float(peak[3].rstrip("x |")) < 1.6, peak
  refine = next(r for n, r in rates.items() if n.startswith("| refine"))
  assert "(100.0 % of their" in refine[0], refine
  cfp = next(r for n, r in rates.items() if "device-resident" in n)
  assert float(re.search(r"difference ([\d.]+) grey", cfp[0])[1]) < 1.0
