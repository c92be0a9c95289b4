r"""The synthetic benchmark's results table: every row of
`configs/synthetic_benchmark.py`, run and tabulated beside the paper.

  python benchmarks/synthetic_table.py --out=runs/bench            # all rows
  python benchmarks/synthetic_table.py --out=runs/bench --rows=ours_0,no_mutual

Each row is `python -m cvgl_jax.main
--config=configs/synthetic_benchmark.py:<row> --workdir=<out>/<row>`, run
here in a subprocess. To save time, a row whose first stages are those of
an already finished row (same config for those stages, same world) starts
from a copy of that row's finished stage folders and world: `main` skips
stages that have a DONE file. Training is deterministic on a given machine,
so the copy is what the row's own command would compute (run the command
in an empty workdir to check). Rows already finished in `--out` are not
rerun. The table goes to stdout and `<out>/table.md`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "configs", "synthetic_benchmark.py")
WORLD = "synthetic_world"

# Row -> (row it reuses, stage folders copied, world folders left out).
# The world's derived folders (g2a, g2a_sat) belong to the stages that
# wrote them: a row that runs those stages itself gets the world without.
SHARES = {
    "ours_10": ("ours_0", ("cfp", "translate", "intra", "cross_fake"), ()),
    "no_mutual": ("ours_0", ("cfp", "translate", "intra", "cross_fake"), ()),
    "no_threshold": ("ours_0", ("cfp", "translate", "intra", "cross_fake"),
                     ()),
    "no_curriculum": ("ours_0", ("cfp", "translate", "intra", "cross_fake"),
                      ()),
    "no_intra": ("ours_0", ("cfp", "translate"), ()),
    "no_translation": ("ours_0", ("cfp",), ("g2a_sat",)),
    "no_bev": ("ours_0", (), ("g2a", "g2a_sat")),
    "supervised": ("ours_0", (), ("g2a", "g2a_sat")),
}
ORDER = ("ours_0", "supervised", "ours_10", "no_bev", "no_translation",
         "no_intra", "no_mutual", "no_threshold", "no_curriculum",
         "no_mutual@10", "no_threshold@10", "no_curriculum@10")
for _row in ("no_mutual", "no_threshold", "no_curriculum"):
  SHARES[f"{_row}@10"] = SHARES[_row]

# METHOD.md: R@1 on CVUSA. Cold-start ablations are R@1 after the cold
# start; the others after the whole paradigm (ConvNeXt-S for the 0 % row
# and the pseudo-label ablations, ConvNeXt-B for 10 %).
PAPER = {
    "supervised": ("93.53 (ConvNeXt-S, 100 % GT)", None),
    "ours_0": ("87.90", "17.96"),
    "ours_10": ("94.88 (ConvNeXt-B)", None),
    "no_bev": (None, "0.02"),
    "no_translation": (None, "9.18"),
    "no_intra": (None, "15.58"),
    "no_mutual": ("14.40", None),
    "no_threshold": ("36.52", None),
    "no_curriculum": ("32.56", None),
}


def _paper(row: str):
  return PAPER[row.partition("@")[0]]


def _done(workdir: str, stage: str):
  path = os.path.join(workdir, stage, "DONE")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _stages(row: str) -> list[str]:
  spec = importlib.util.spec_from_file_location("synthetic_benchmark", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.get_config(row).stages)


def _seed(out: str, row: str) -> None:
  """Copies the shared prefix of `row` from the row it reuses, if done."""
  workdir = os.path.join(out, row)
  if os.path.exists(workdir) or row not in SHARES:
    return
  source, stages, leave_out = SHARES[row]
  src = os.path.join(out, source)
  if not all(_done(src, s) for s in stages) or not os.path.isdir(
      os.path.join(src, WORLD)):
    return
  partial = workdir + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  shutil.copytree(os.path.join(src, WORLD), os.path.join(partial, WORLD),
                  ignore=lambda d, names: [n for n in names
                                           if d == os.path.join(src, WORLD)
                                           and n in leave_out])
  for stage in stages:
    shutil.copytree(os.path.join(src, stage), os.path.join(partial, stage))
  os.replace(partial, workdir)
  print(f"[{row}] reuses {', '.join(stages) or 'the world'} of {source}",
        flush=True)


def run_row(out: str, row: str) -> float:
  """Runs one row (skipping finished stages); returns its wall seconds."""
  _seed(out, row)
  workdir = os.path.join(out, row)
  command = [sys.executable, "-m", "cvgl_jax.main",
             f"--config={CONFIG}:{row}", f"--workdir={workdir}"]
  print(f"[{row}] {' '.join(command[1:])}", flush=True)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  with open(os.path.join(workdir, "log.txt"), "a") as log:
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                   cwd=ROOT)
  return time.time() - start


def _fmt(x, digits=1):
  return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else (
      f"{x:.{digits}f}")


def row_result(out: str, row: str) -> dict:
  """The numbers of a finished row from its DONE files."""
  workdir = os.path.join(out, row)
  stages = _stages(row)
  final = _done(workdir, stages[-1])
  result = {"row": row, "final": final["eval"] if final else None,
            "cold": None, "labels": None, "precision": None,
            "minutes": None}
  if final:
    result["minutes"] = sum(
        (_done(workdir, s) or {}).get("seconds", 0.0) for s in stages) / 60
  cold = _done(workdir, "cross_fake")
  if cold:
    result["cold"] = cold["eval"]["R@1"]
  if final and "last_round" in final:
    last = final["last_round"]
    result["labels"] = last.get("num_labels")
    result["precision"] = last.get("margin/precision")
    if result["precision"] is not None:
      result["precision"] *= 100
  return result


def table(out: str, rows) -> str:
  lines = [
      "| row | R@1 | R@5 | R@10 | R@1 % | cold-start R@1 | labels trained "
      "on, last round (pseudo + true) | pseudo-label precision % | paper R@1 "
      "(CVUSA) | paper cold-start R@1 | minutes | command |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
      "| --- |"]
  for row in rows:
    r = row_result(out, row)
    e = r["final"] or {}
    paper, paper_cold = _paper(row)
    lines.append(
        f"| {row} | {_fmt(e.get('R@1'))} | {_fmt(e.get('R@5'))} | "
        f"{_fmt(e.get('R@10'))} | {_fmt(e.get('R@1%'))} | {_fmt(r['cold'])} |"
        f" {_fmt(r['labels'], 0)} | {_fmt(r['precision'])} | "
        f"{paper or '-'} | {paper_cold or '-'} | {_fmt(r['minutes'])} | "
        f"`python -m cvgl_jax.main --config=configs/synthetic_benchmark.py:"
        f"{row} --workdir=runs/bench/{row}` |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder of the rows")
  parser.add_argument("--rows", default=",".join(ORDER),
                      help="comma-separated rows (default: all)")
  parser.add_argument("--table_only", action="store_true",
                      help="tabulate the finished rows, run nothing")
  args = parser.parse_args()
  rows = [r for r in args.rows.split(",") if r]
  unknown = sorted(set(rows) - set(ORDER))
  if unknown:
    parser.error(f"unknown rows {unknown}; rows are {ORDER}")
  os.makedirs(args.out, exist_ok=True)
  if not args.table_only:
    # A reused row needs its source first.
    for row in sorted(rows, key=lambda r: r != "ours_0"):
      seconds = run_row(args.out, row)
      print(f"[{row}] done in {seconds / 60:.1f} min", flush=True)
  text = table(args.out, [r for r in ORDER if r in rows])
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
