r"""Does a run's first pseudo-label round decide what the rounds add?

  python benchmarks/bootstrap_gain.py runs/bench2/ours_0 runs/bench_dense/ours_0 \
      workdir/demo ...

For each finished run (0 % labels, a cold start, then `pseudo_label`):
the first round's admitted pairs and their precision (telemetry: it reads
the truth), the cold start's R@1, the final R@1 and the gain, one row per
run sorted by that precision.
"""

import argparse
import json
import os

from cvgl_jax import records
from cvgl_jax import run_dir


def row(workdir: str) -> dict:
  with open(os.path.join(workdir, run_dir.RESULTS)) as f:
    results = json.load(f)
  first = records.round_table(run_dir.read_records(workdir,
                                                   "pseudo_label"))[0]
  cold = results["cross_fake"]["eval"]["R@1"]
  final = results["pseudo_label"]["eval"]["R@1"]
  return {"run": workdir, "admitted": first["margin/pairs"],
          "precision": 100 * first["margin/precision"], "cold": cold,
          "final": final, "gain": final - cold}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+")
  rows = sorted((row(w) for w in parser.parse_args().workdirs),
                key=lambda r: r["precision"])
  print("| run | round 0: admitted | precision % | cold start R@1 | final "
        "R@1 | gain |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['run']} | {r['admitted']:.0f} | {r['precision']:.1f} | "
          f"{r['cold']:.1f} | {r['final']:.1f} | {r['gain']:+.1f} |")


if __name__ == "__main__":
  main()
