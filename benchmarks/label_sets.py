r"""What costs the 0 % row its last points: wrong pairs or missing ones?

  python benchmarks/label_sets.py runs/bench17/ours_0 --out=runs/label_sets

The final model of a finished 0 % run (its `pseudo_label` stage) labels the
train split by the last round's rule (mutual nearest pairs, threshold 0;
`views`: the same over 8 paired views and the fake view). Then, for each
label set, a copy of the run without stage 3 trains stage 3 again from the
cold start with the set FIXED: the set is handed to the stage as its
labelled fraction and every epoch but the last is a warm-up (the last is a
round, whose own pairs the set overrides) -- the same rate, carried
moments, smoothing and 40 epochs as the run's stage 3. Sets:

  plain         the final model's labels (what a retrain stage learns)
  views         the final model's labels under the 8 paired views + fake
  correct       the correct pairs of `plain` (reads the truth)
  random_same   as many true pairs as `plain`, drawn at random
  all           every true pair (the supervised row's labels)

Precision and the sets that read the truth are telemetry: they say what
the labels cost, they never train the paradigm. Each set is one run of
about 6 minutes on a 2-core CPU; finished sets are skipped, so the table
can be built across sittings. The table is printed at the end.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
SETS = ("plain", "views", "correct", "random_same", "all")


def teacher_labels(src: str, views: bool) -> tuple[np.ndarray, np.ndarray]:
  """([M, 2] pairs, [Q] true tiles) of the final model of `src`."""
  from cvgl_jax import trained as trained_lib
  from cvgl_jax.data import splits
  from cvgl_jax.pseudo import refine as refine_lib
  from cvgl_jax.pseudo import views as views_lib
  t = trained_lib.load_trained(src, stage="pseudo_label")
  c = t.config
  train = splits.read_splits(c, src)[0]
  rule = views_lib.PairingViews(
      paired_views=8 if views else 1,
      fake_folder=c.cross_fake.fake_folder if views else None)
  ground, satellite = views_lib.pairing_embeddings(
      views_lib.make_embedders(t.model, t.mesh, rule), t.params, train, rule,
      ground_size=c.data.ground_size, satellite_size=c.data.satellite_size,
      batch_size=c.train.eval_batch_size, mesh=t.mesh,
      num_threads=c.data.num_threads)
  settings = refine_lib.RefineSettings(tau=0.0, epochs=1, curriculum=False,
                                       backend="exact")
  result = refine_lib.refine(ground, satellite, 0, settings)
  return result.pairs.astype(np.int64), np.asarray(train.positive)


def label_set(name: str, out: str, src: str
              ) -> tuple[np.ndarray, np.ndarray]:
  """([M, 2] pairs of set `name`, [Q] true tiles); the final model's
  labels are cached in `out/labels_*.npz`."""
  source = "views" if name == "views" else "plain"
  cache = os.path.join(out, f"labels_{source}.npz")
  if not os.path.exists(cache):
    pairs, positive = teacher_labels(src, views=source == "views")
    np.savez(cache, pairs=pairs, positive=positive)
  data = np.load(cache)
  pairs, positive = data["pairs"], data["positive"]
  known = np.flatnonzero(positive >= 0)
  truth = np.stack([known, positive[known]], 1)
  rng = np.random.default_rng(0)
  if name == "correct":
    pairs = pairs[positive[pairs[:, 0]] == pairs[:, 1]]
  elif name == "random_same":
    pairs = truth[np.sort(rng.choice(len(truth), len(pairs), replace=False))]
  elif name == "all":
    pairs = truth
  return pairs, positive


def train_on(pairs_file: str, workdir: str, row: str) -> None:
  """Runs stage 3 in `workdir` with the pairs of `pairs_file` fixed (this
  script re-entered as the child process)."""
  from cvgl_jax import main as main_lib
  from cvgl_jax.pseudo import pairing
  fixed = np.load(pairs_file)["pairs"]
  pairing.gt_subset = lambda positive, ratio, seed: fixed
  sys.argv = ["main", f"--config=configs/synthetic_benchmark.py:{row}",
              f"--workdir={workdir}", "--force_config_change",
              "--config.pseudo_label.warmup_epochs=39"]
  main_lib.app.run(main_lib.main)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("src", help="a finished 0 %% run of the benchmark")
  parser.add_argument("--out", required=True)
  parser.add_argument("--sets", default=",".join(SETS))
  parser.add_argument("--row", default="ours_0",
                      help="the row of configs/synthetic_benchmark.py that "
                      "ran src (ours_0#S for seed S)")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    os.chdir(ROOT)
    return train_on(args.child[0], args.child[1], args.row)
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name in args.sets.split(","):
    pairs, positive = label_set(name, args.out, args.src)
    correct = int((positive[pairs[:, 0]] == pairs[:, 1]).sum())
    workdir = os.path.join(args.out, name)
    results = os.path.join(workdir, "results.json")
    if not os.path.exists(results):
      shutil.rmtree(workdir, ignore_errors=True)
      shutil.copytree(args.src, workdir, ignore=shutil.ignore_patterns(
          "pseudo_label", "retrain", "report", "results.json", "log.txt"))
      pairs_file = os.path.join(args.out, f"pairs_{name}.npz")
      np.savez(pairs_file, pairs=pairs)
      with open(os.path.join(workdir, "log.txt"), "a") as log:
        subprocess.run([sys.executable, "-u", os.path.abspath(__file__),
                        args.src, f"--out={args.out}", f"--row={args.row}",
                        "--child", pairs_file, workdir],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(results) as f:
      final = json.load(f)["pseudo_label"]["eval"]["R@1"]
    rows.append((name, len(pairs), correct, final))
  print(f"\nLabel sets of {args.src}'s final model, stage 3 retrained on "
        "each from the cold start:")
  print("| set | pairs | correct | precision % | final R@1 |")
  print("| --- | --- | --- | --- | --- |")
  for name, n, correct, final in rows:
    print(f"| {name} | {n} | {correct} | {100 * correct / n:.1f} | "
          f"{final:.1f} |")


if __name__ == "__main__":
  main()
