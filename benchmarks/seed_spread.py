r"""R@1 of the same config over several seeds: each run's and mean +- sd.

  python -m cvgl_jax.main --config=configs/synthetic_unsup.py \
      --config.seed=1 --workdir=workdir/demo_s1      # likewise seed 2
  python benchmarks/seed_spread.py workdir/demo workdir/demo_s1 \
      workdir/demo_s2

Reads each workdir's `results.json` (written when `cvgl_jax.main`
finishes) and prints, per evaluated stage, the final R@1 of every run and
their mean and sample standard deviation: the spread a reader should
expect of the same command on another machine (XLA:CPU's digits change
with the core count and instruction set; `benchmarks/cpu_determinism.py`).
"""

import argparse
import json
import os
import statistics


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="finished runs")
  args = parser.parse_args()
  runs = {}
  for workdir in args.workdirs:
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
      parser.error(f"{path} does not exist: run that workdir to its end.")
    with open(path) as f:
      runs[workdir] = json.load(f)
  stages = [s for s, r in next(iter(runs.values())).items()
            if isinstance(r, dict) and "R@1" in r.get("eval", {})]
  print("| stage | " + " | ".join(os.path.basename(os.path.normpath(w))
                                   for w in runs) + " | mean +- sd |")
  print("| --- |" + " --- |" * (len(runs) + 1))
  for stage in stages:
    values = [r[stage]["eval"]["R@1"] for r in runs.values()]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    print(f"| {stage} | " + " | ".join(f"{v:.1f}" for v in values)
          + f" | {statistics.mean(values):.1f} +- {sd:.1f} |")


if __name__ == "__main__":
  main()
