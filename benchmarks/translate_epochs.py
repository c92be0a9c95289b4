r"""How many CycleGAN epochs the cold start needs: one row per epoch count.

For each `--epochs` value E and seed, runs the config's stages up to the
cold start (pretrain, cfp, translate, intra, cross_fake) in
`--out/E<E>_s<seed>` with the translation trained E epochs (the official
schedule: ceil(E / 2) at a constant lr, the rest decaying linearly), then
prints per row:

  translate min   the stage's wall time (training + writing the fakes);
  cycle loss      the CycleGAN's last logged cycle loss (A + B, label-free);
  fake->tile R@1  telemetry: grey fake vs grey true tile by NCC over the
                  training split (reads the pairs; how satellite-like and
                  aligned the fakes are before any encoder sees them);
  cold start R@1  the cross_fake stage's handed-on R@1 (val split).

Rows already done are read back, not rerun (the project's own DONE files),
so the table builds across sittings:

  python benchmarks/translate_epochs.py --epochs=1,2,4,8 --seeds=0
"""

import math
import os
import subprocess
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cvgl_jax import baseline  # pylint: disable=wrong-import-position
from cvgl_jax import cli  # pylint: disable=wrong-import-position
from cvgl_jax import metrics as metrics_lib  # pylint: disable=wrong-import-position
from cvgl_jax import run_dir  # pylint: disable=wrong-import-position
from cvgl_jax.data import image_io  # pylint: disable=wrong-import-position
from cvgl_jax.data import splits  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic_unsup.py", "Run config (a synthetic one).")
flags.DEFINE_string("out", "runs/translate_epochs", "Folder of the rows.")
flags.DEFINE_list("epochs", ["1", "2", "4", "8"], "CycleGAN epoch counts.")
flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed and translate.seed).")
flags.DEFINE_bool("table_only", False, "Print the finished rows only.")
FLAGS = flags.FLAGS

STAGES = ("pretrain", "cfp", "translate", "intra", "cross_fake")


def row_config(epochs: int, seed: int):
  config = _CONFIG.value.copy_and_resolve_references()
  config.stages = STAGES
  config.seed = seed
  t = config.translate
  t.seed = seed
  t.n_epochs = math.ceil(epochs / 2)
  t.n_epochs_decay = epochs - t.n_epochs
  return config


def last_cycle_loss(workdir: str) -> float:
  last = [r for r in run_dir.read_records(workdir, "translate")
          if "cycle_a" in r][-1]
  return last["cycle_a"] + last["cycle_b"]


def fake_tile_recall(config, workdir: str) -> float:
  """R@1 (%) of NCC between grey fakes and grey tiles, training split."""
  train, _ = splits.read_splits(config, workdir)
  positive = np.asarray(train.positive)
  known = np.flatnonzero(positive >= 0)
  fakes = baseline.grey_unit(np.stack(
      [image_io.read_rgb(p) for p in
       np.asarray(list(train.derived_paths("g2a_sat")))[known]]), 32)
  tiles = baseline.grey_unit(np.stack(
      [image_io.read_rgb(p) for p in train.satellite_paths]), 32)
  return metrics_lib.recall_at_k(fakes, tiles,
                                 positive[known]).metrics["R@1"]


def main(argv):
  del argv
  cli.setup_console()
  rows = []
  for seed in map(int, FLAGS.seeds):
    for epochs in map(int, FLAGS.epochs):
      workdir = os.path.abspath(os.path.join(FLAGS.out, f"E{epochs}_s{seed}"))
      config = row_config(epochs, seed)
      done = run_dir.read_done(workdir, "cross_fake")
      if done is None and FLAGS.table_only:
        continue
      if done is None:
        t = config.translate
        command = [
            sys.executable, "-m", "cvgl_jax.main",
            f"--config={config_flags.get_config_filename(FLAGS['config'])}", f"--workdir={workdir}",
            f"--config.stages={STAGES!r}", f"--config.seed={seed}",
            f"--config.translate.seed={seed}",
            f"--config.translate.n_epochs={t.n_epochs}",
            f"--config.translate.n_epochs_decay={t.n_epochs_decay}"]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        done = run_dir.read_done(workdir, "cross_fake")
      rows.append(dict(
          epochs=epochs, seed=seed,
          minutes=run_dir.read_done(workdir, "translate")["seconds"] / 60,
          cycle=last_cycle_loss(workdir),
          fake_r1=fake_tile_recall(config, workdir),
          cold=done["selected"]["eval"]["R@1"],
          best=done["best"]["R@1"]))
      print("| {epochs} | {seed} | {minutes:.1f} | {cycle:.3f} | "
            "{fake_r1:.1f} | {cold:.1f} | {best:.1f} |".format(**rows[-1]),
            flush=True)
  print("\n| CycleGAN epochs | seed | translate min | cycle loss | "
        "fake->tile R@1 (NCC, train) | cold start R@1 | best R@1 "
        "(telemetry) |\n| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print("| {epochs} | {seed} | {minutes:.1f} | {cycle:.3f} | "
          "{fake_r1:.1f} | {cold:.1f} | {best:.1f} |".format(**r))


if __name__ == "__main__":
  app.run(main)
