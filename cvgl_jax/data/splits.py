"""The two splits a run reads: what `config.data` (or `config.synthetic`)
names, without the image files no stage could use.

`read_splits` serves the run itself (`stages.setup`, after it generated a
synthetic world) and everything that reads a finished run again: the
report, the export, the baseline and the benchmarks. A synthetic world
lives under the workdir (`world_root`); generating it is the stages' job
(`stages.synthetic_world`), not a reader's.
"""

from __future__ import annotations

import os
from typing import Optional

from absl import logging
import ml_collections
import numpy as np

from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax.data import image_check
from cvgl_jax.data import readers
from cvgl_jax.data.index import PairIndex


def world_root(workdir: str) -> str:
  """The folder of a run's synthetic world."""
  return os.path.join(workdir, run_dir.SYNTHETIC_WORLD)


def _usable_images(split: PairIndex, d: ml_collections.ConfigDict,
                   dropped: list[str]) -> PairIndex:
  """`split` without the image files no stage could use (`image_check`):
  process 0 probes them, every process drops the same ones, and `dropped`
  gets what was left out and why."""
  ground = np.zeros(split.num_ground, bool)
  satellite = np.zeros(split.num_satellite, bool)
  problems = []
  if parallel.is_main_process():
    ground, satellite, problems = image_check.bad_masks(
        split, odd_size=d.odd_image_size, num_threads=d.num_threads)
  ground, satellite = parallel.from_main_process((ground, satellite))
  kept, problems = image_check.drop_bad(split, ground, satellite, problems,
                                        on_bad=d.on_bad_image)
  dropped += problems
  return kept


def read_splits(config: ml_collections.ConfigDict, workdir: str, *,
                dropped: Optional[list[str]] = None
                ) -> tuple[PairIndex, PairIndex]:
  """(train split, evaluation split) named by `config.data` (or the
  synthetic world under `workdir`), without the image files that cannot be
  used (`config.data.on_bad_image`); `dropped`, when given, receives what
  was left out and why.

  Raises:
    readers.DatasetError: a missing or broken dataset (or synthetic world),
      naming the file.
  """
  dropped = [] if dropped is None else dropped
  d = config.data
  if config.synthetic.enabled:
    dataset, root = config.synthetic.layout, world_root(workdir)
  else:
    dataset, root = d.dataset, d.root
  options = {"max_missing_fraction": d.max_missing_fraction}
  if dataset == "vigor":
    options["mode"] = d.vigor_mode
  train, evaluation = (
      _usable_images(readers.read_split(dataset, root, split, **options), d,
                     dropped)
      for split in (d.train_split, d.eval_split))
  logging.info("Data: %s train %d ground / %d satellite, %s eval %d / %d",
               train.name, train.num_ground, train.num_satellite,
               evaluation.name, evaluation.num_ground,
               evaluation.num_satellite)
  return train, evaluation
