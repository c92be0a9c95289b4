r"""What the gradient cache buys on the synthetic benchmark: R@1 by batch.

  python benchmarks/grad_cache_recall.py --out=runs/grad_cache

A user whose memory holds a batch of 16 can train with that batch, or with
a batch of 128 through the gradient cache in chunks of 16
(`train.grad_cache_chunk`, the same memory). This runs the benchmark's
`supervised` row (configs/synthetic_benchmark.py: true pairs, 62 epochs)
both ways, each from the same pretraining stand-in -- the one the table's
paradigm rows start from, made once and cached (a run's stand-in otherwise
follows its batch size) -- and prints R@1 on the 500-pair val split:

  supervised_b16         plain batch 16
  supervised_b128gc      batch 128 via the cache, chunks of 16, the row's
                         lr (1e-3)
  supervised_b128gc_lr2  the same with lr 2e-3 (sqrt scaling from the
                         benchmark's batch 32 to 128)

Each variant is one `python -m cvgl_jax.main` run (~8-13 min on a 2-core
CPU); finished ones are skipped, an interrupted one resumes.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/synthetic_benchmark.py"

VARIANTS = {
    "supervised_b16": ["--config.train.batch_size=16"],
    "supervised_b128gc": ["--config.train.batch_size=128",
                          "--config.train.grad_cache_chunk=16"],
    "supervised_b128gc_lr2": ["--config.train.batch_size=128",
                              "--config.train.grad_cache_chunk=16",
                              "--config.train.lr=0.002"],
}


def stand_in(out: str) -> str:
  """The benchmark's stand-in file (made by its pretrain stage if absent)."""
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import synthetic_benchmark  # pylint: disable=g-import-not-at-top
  from cvgl_jax import pretrain  # pylint: disable=g-import-not-at-top
  path = pretrain.cached_file(synthetic_benchmark.get_config("ours_0"))
  if not path.exists():
    main([f"--config={CONFIG}:ours_0", "--config.stages=('pretrain',)",
          f"--workdir={os.path.join(out, 'stand_in')}"])
  return str(path)


def main(argv):
  subprocess.run([sys.executable, "-m", "cvgl_jax.main", *argv], cwd=ROOT,
                 check=True)


def read(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["supervised"]


def run():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="folder of the runs")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                      choices=list(VARIANTS))
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  weights = stand_in(out)
  for name in args.variants:
    workdir = os.path.join(out, name)
    if not os.path.exists(os.path.join(workdir, "results.json")):
      main([f"--config={CONFIG}:supervised", *VARIANTS[name],
            "--config.stages=('supervised',)",
            f"--config.model.pretrained={weights}", f"--workdir={workdir}"])
  print("| variant | batch | chunk | lr | steps | final R@1 | best R@1 "
        "(telemetry) | minutes |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name in args.variants:
    workdir = os.path.join(out, name)
    with open(os.path.join(workdir, "config.json")) as f:
      train = json.load(f)["train"]
    r = read(workdir)
    print(f"| {name} | {train['batch_size']} | "
          f"{train.get('grad_cache_chunk', 0) or '-'} | {train['lr']:g} | "
          f"{r['step']} | {r['eval']['R@1']:.1f} | {r['best']['R@1']:.1f} | "
          f"{r['seconds'] / 60:.1f} |")


if __name__ == "__main__":
  run()
