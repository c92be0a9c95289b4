r"""The synthetic benchmark's results table: the rows of
`configs/synthetic_benchmark.py`, run and tabulated beside the paper.

  python benchmarks/synthetic_table.py --out=runs/bench            # all rows
  python benchmarks/synthetic_table.py --out=runs/bench --rows=ours_0,ncc
  python benchmarks/synthetic_table.py --out=runs/bench --table_only
  python benchmarks/synthetic_table.py --out=runs/bench_dense --world=dense

Each row is `python -m cvgl_jax.main
--config=configs/synthetic_benchmark.py:<row> --workdir=<out>/<row>`, run
here in a subprocess; `ROW#S` is the row with training seed S. The `ncc`
row is `python -m cvgl_jax.baseline` on ours_0's world. `--world=W` runs
the rows on the config's second world W (`ROW+W`); give it its own --out. Rows already
finished in `--out` are not rerun, and an interrupted row resumes (the
project's own resume), so the table can be built over several sittings.

To save time, a row whose first stages are those of an already finished
row (same config for those stages, same world) starts from a copy of that
row's finished stage folders and world: `main` skips stages that have a
DONE file. Training is deterministic on a given machine, so the copy is
what the row's own command would compute there.

The table goes to stdout and `<out>/table.md`: per row (mean and sample
standard deviation over its seeds) the final R@1, the best R@1 seen (it
reads labels: telemetry), the R@1 of the checkpoint the row hands on
(chosen without labels), the cold start's R@1, the first round's admitted
and correct pseudo labels, the last round's precision, the ratio to the
supervised row, and the paper's numbers.
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

from cvgl_jax import run_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "configs", "synthetic_benchmark.py")
WORLD = "synthetic_world"
SEEDS = (0, 1, 2)
# Rows with 3 seeds (supervised, 0 %, 10 % and the paper's 100 % GT
# reference, the denominators and numerators of the ratios); others one.
SEEDED = ("ours_0", "supervised", "ours_10", "ours_100", "ours_0_views",
          "ours_0_ema", "ours_0_retrain", "ours_10_retrain")

_COLD = ("pretrain", "cfp", "translate", "intra", "cross_fake")
# Row -> (row it reuses, stage folders copied, world folders left out).
# The world's derived folders (g2a, g2a_sat) belong to the stages that
# wrote them: a row that runs those stages itself gets the world without.
SHARES = {
    "ours_10": ("ours_0", _COLD, ()),
    "ours_0_views": ("ours_0", _COLD, ()),
    "ours_10_views": ("ours_0", _COLD, ()),
    "ours_0_ema": ("ours_0", _COLD, ()),
    "ours_10_ema": ("ours_0", _COLD, ()),
    # The retrain rows continue their row's run after stage 3.
    "ours_0_retrain": ("ours_0", _COLD + ("pseudo_label",), ()),
    "ours_10_retrain": ("ours_10", _COLD + ("pseudo_label",), ()),
    "ours_100": ("ours_0", _COLD, ()),
    "authors_switch": ("ours_0", _COLD, ()),
    "no_mutual": ("ours_0", _COLD, ()),
    "no_threshold": ("ours_0", _COLD, ()),
    "no_curriculum": ("ours_0", _COLD, ()),
    "no_intra": ("ours_0", ("pretrain", "cfp", "translate"), ()),
    "no_translation": ("ours_0", ("pretrain", "cfp"), ("g2a_sat",)),
    "no_bev": ("ours_0", ("pretrain",), ("g2a", "g2a_sat")),
    "supervised": ("ours_0", ("pretrain",), ("g2a", "g2a_sat")),
    "from_scratch": ("ours_0", ("cfp", "translate"), ()),
    "source_pairs": ("ours_0", ("cfp", "translate"), ()),
}
BASE_ROWS = ("ours_0", "supervised", "ours_10", "ours_100", "ours_0_views",
             "ours_10_views", "ours_0_ema", "ours_10_ema", "ours_0_retrain",
             "ours_10_retrain", "from_scratch",
             "source_pairs", "authors_switch", "no_bev", "no_translation",
             "no_intra", "no_mutual", "no_threshold", "no_curriculum")
NCC = "ncc"
ORDER = tuple(
    [f"{r}#{s}" if s else r for r in SEEDED for s in SEEDS]
    + [r for r in BASE_ROWS if r not in SEEDED] + [NCC])

# docs/METHOD.md: R@1 on CVUSA. Cold-start ablations are R@1 after the cold
# start; the others after the whole paradigm (ConvNeXt-S for the 0 % row
# and the pseudo-label ablations, ConvNeXt-B for 10 %). The paper's
# reference for its ratios is the paradigm at 100 % GT (ours_100); a plain
# supervised run is Sample4Geo's.
PAPER = {
    "supervised": ("97.83 (Sample4Geo)", None),
    "ours_100": ("93.53 (ConvNeXt-S)", None),
    "ours_0": ("87.90", "17.96"),
    "ours_10": ("94.88 (ConvNeXt-B)", None),
    "no_bev": (None, "0.02"),
    "no_translation": (None, "9.18"),
    "no_intra": (None, "15.58"),
    "no_mutual": ("14.40", None),
    "no_threshold": ("36.52", None),
    "no_curriculum": ("32.56", None),
}


def base_row(row: str) -> str:
  return row.partition("#")[0]


def _seed_suffix(row: str) -> str:
  _, sep, seed = row.partition("#")
  return sep + seed


# The config's second world the rows run on ("" for the benchmark's own):
# set once by main from --world.
_world = ""


def _config_arg(row: str) -> str:
  """The config argument of `row`: `ROW[#S][+WORLD]`."""
  return f"{row}+{_world}" if _world else row


def _benchmark_config():
  """The module `configs/synthetic_benchmark.py`."""
  spec = importlib.util.spec_from_file_location("synthetic_benchmark", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _stages(row: str) -> list[str]:
  return list(_benchmark_config().get_config(_config_arg(row)).stages)


def _source(row: str):
  """(source row, stages copied, world folders left out) for `row`."""
  base, suffix = base_row(row), _seed_suffix(row)
  if base == "ours_0":
    # Another seed of the paradigm: same stand-in, BEVs and fakes.
    return ("ours_0", ("pretrain", "cfp", "translate"), ()) if suffix else None
  if base not in SHARES:
    return None
  source, stages, leave_out = SHARES[base]
  trained = set(stages) & {"intra", "cross_fake"}
  # A seeded row reuses trained stages only from the same seed.
  return (source + suffix if trained else source), stages, leave_out


def _copy_prefix(out: str, row: str) -> None:
  """Copies the shared prefix of `row` from the row it reuses, if done."""
  workdir = os.path.join(out, row)
  share = _source(row)
  if os.path.exists(workdir) or share is None:
    return
  source, stages, leave_out = share
  src = os.path.join(out, source)
  if not all(run_dir.read_done(src, s) for s in stages) or not os.path.isdir(
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


def _command(out: str, row: str) -> list[str]:
  if row == NCC:
    return [sys.executable, "-m", "cvgl_jax.baseline",
            f"--config={CONFIG}:{_config_arg('ours_0')}",
            f"--workdir={os.path.join(out, 'ours_0')}"]
  return [sys.executable, "-m", "cvgl_jax.main",
          f"--config={CONFIG}:{_config_arg(row)}",
          f"--workdir={os.path.join(out, row)}"]


def is_finished(out: str, row: str) -> bool:
  if row == NCC:
    return os.path.exists(os.path.join(out, "ours_0", "baseline_ncc.json"))
  workdir = os.path.join(out, row)
  return all(run_dir.read_done(workdir, s) for s in _stages(row))


def run_row(out: str, row: str) -> float:
  """Runs one row (resuming it); returns its wall seconds."""
  _copy_prefix(out, row)
  workdir = os.path.join(out, "ours_0" if row == NCC else row)
  command = _command(out, row)
  print(f"[{row}] {' '.join(command[1:])}", flush=True)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  log_name = "baseline_log.txt" if row == NCC else "log.txt"
  with open(os.path.join(workdir, log_name), "a") as log:
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                   cwd=ROOT)
  return time.time() - start


def row_result(out: str, row: str) -> dict:
  """The numbers of a finished row (or {} when it has not finished)."""
  if not is_finished(out, row):
    return {}
  if row == NCC:
    with open(os.path.join(out, "ours_0", "baseline_ncc.json")) as f:
      e = json.load(f)
    return {"final": e["R@1"]}
  workdir = os.path.join(out, row)
  stages = _stages(row)
  final = run_dir.read_done(workdir, stages[-1])
  result = {"final": final["eval"]["R@1"],
            "best": (final.get("best") or {}).get("R@1"),
            "handed_on": ((final.get("selected") or {}).get("eval") or {}
                          ).get("R@1"),
            "minutes": sum(run_dir.read_done(workdir, s).get("seconds", 0.0)
                           for s in stages) / 60}
  cold = run_dir.read_done(workdir, "cross_fake")
  if cold:
    result["cold"] = cold["eval"]["R@1"]
  # Round 0 is stage 3's (a retrain stage after it has no rounds).
  rounds_stage = (run_dir.read_done(workdir, "pseudo_label")
                  if "pseudo_label" in stages else final)
  rounds = [r for r in rounds_stage.get("rounds", [])
            if r.get("warmup") == 0.0]
  if rounds:
    result["admitted0"] = rounds[0].get("margin/pairs")
    result["correct0"] = rounds[0].get("margin/correct")
    result["precision"] = 100 * final["last_round"]["margin/precision"]
  return result


def _stat(values, digits=1):
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return (f"{np.mean(values):.{digits}f} +- "
          f"{np.std(values, ddof=1):.{digits}f}")


def table(out: str, rows) -> str:
  groups: dict[str, list[dict]] = {}
  for row in rows:
    result = row_result(out, row)
    if result:
      groups.setdefault(base_row(row), []).append(result)
  supervised = [r["final"] for r in groups.get("supervised", [])]
  all_labels = [r["final"] for r in groups.get("ours_100", [])]
  lines = [
      "| row | seeds | final R@1 | best R@1 (telemetry) | handed-on R@1 "
      "| x supervised | x 100 % GT | cold-start R@1 | round 0: admitted / "
      "correct | last-round precision % | paper R@1 (CVUSA) | paper "
      "cold-start R@1 | minutes | command |",
      "|" + " --- |" * 14]
  for base in dict.fromkeys(base_row(r) for r in rows):
    results = groups.get(base)
    if not results:
      continue
    get = lambda key: [r.get(key) for r in results]
    ratio = lambda ref, own: (  # pylint: disable=g-long-lambda
        f"{np.mean(get('final')) / np.mean(ref):.2f}"
        if ref and base not in own else "-")
    first = (f"{_stat(get('admitted0'), 0)} / {_stat(get('correct0'), 0)}"
             if results[0].get("admitted0") is not None else "-")
    paper, paper_cold = PAPER.get(base, (None, None))
    folder = f"runs/bench_{_world}" if _world else "runs/bench"
    command = (f"python -m cvgl_jax.baseline --config=configs/"
               f"synthetic_benchmark.py:{_config_arg('ours_0')} "
               f"--workdir={folder}/ours_0"
               if base == NCC else
               f"python -m cvgl_jax.main --config=configs/synthetic_benchmark"
               f".py:{_config_arg(base)} --workdir={folder}/{base}")
    lines.append(
        f"| {base} | {len(results)} | {_stat(get('final'))} | "
        f"{_stat(get('best'))} | {_stat(get('handed_on'))} | "
        f"{ratio(supervised, ('supervised',))} | "
        f"{ratio(all_labels, ('supervised', 'ours_100'))} | "
        f"{_stat(get('cold'))} | {first} | {_stat(get('precision'))} | "
        f"{paper or '-'} | {paper_cold or '-'} | {_stat(get('minutes'))} | "
        f"`{command}` |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder of the rows")
  parser.add_argument("--rows", default=",".join(ORDER),
                      help="comma-separated rows (default: all)")
  parser.add_argument("--table_only", action="store_true",
                      help="tabulate the finished rows, run nothing")
  parser.add_argument("--world", default="",
                      help="run the rows on this second world of the config "
                      "(its WORLDS), e.g. dense; default: the benchmark's")
  args = parser.parse_args()
  global _world
  _world = args.world
  if _world and _world not in _benchmark_config().WORLDS:
    parser.error(f"unknown --world {_world!r}; worlds are "
                 f"{tuple(_benchmark_config().WORLDS)}")
  rows = [r for r in args.rows.split(",") if r]
  unknown = sorted(r for r in rows if base_row(r) not in BASE_ROWS + (NCC,))
  if unknown:
    parser.error(f"unknown rows {unknown}; rows are {ORDER}")
  os.makedirs(args.out, exist_ok=True)
  if not args.table_only:
    # A reused row needs its source first: ours_0 (whose world the NCC row
    # reads), then the rows in order.
    for row in sorted(rows, key=lambda r: r != "ours_0"):
      if is_finished(args.out, row):
        print(f"[{row}] finished already", flush=True)
        continue
      seconds = run_row(args.out, row)
      print(f"[{row}] done in {seconds / 60:.1f} min", flush=True)
  text = table(args.out, [r for r in ORDER if r in rows]
               + [r for r in rows if r not in ORDER])
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
