r"""A training-free baseline: grey BEV against grey satellite tile, by NCC.

  python -m cvgl_jax.baseline --config=configs/synthetic_benchmark.py:ours_0 \
      --workdir=runs/bench/ncc

Every panorama of the evaluation split is projected to a bird's-eye view
with the run's CFP settings (`config.cfp`: FoV, placement, output size),
both the BEV and every satellite tile are turned grey and resized to
`--size` x `--size`, each is made zero-mean and unit-norm, and the tiles
are ranked by the inner product: normalised cross-correlation. No model,
no label. It measures how much of the task the geometry alone solves, the
floor a trained unsupervised model must clear. The result goes to
`workdir/baseline_ncc.json` and is printed as one line.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app
from absl import flags
import cv2
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from cvgl_jax import cli
from cvgl_jax import config_lib
from cvgl_jax import metrics as metrics_lib
from cvgl_jax.cfp import geometry
from cvgl_jax.cfp import project
from cvgl_jax.data import image_io
from cvgl_jax.data import splits

RESULT_FILE = "baseline_ncc.json"


def grey_unit(images: np.ndarray, size: int) -> np.ndarray:
  """[N, H, W, 3] uint8 RGB -> [N, size * size] float32: grey, resized
  (area), zero mean and unit L2 norm per image (a flat image stays 0)."""
  out = np.empty((len(images), size * size), np.float32)
  for i, image in enumerate(images):
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)
    out[i] = grey.reshape(-1) - grey.mean()
  norm = np.linalg.norm(out, axis=1, keepdims=True)
  return out / np.maximum(norm, 1e-6)


def bev_images(paths: Sequence[str], cfp: ml_collections.ConfigDict,
               batch_size: int = 32) -> np.ndarray:
  """[N, S, S, 3] uint8 BEVs of the panoramas at `paths` (CFP settings)."""
  first = project.decode_panorama(paths[0])
  hw = first.shape[:2]
  plan = jax.device_put(geometry.bev_plan(
      hw, cfp.out_size, cfp.fov_deg,
      project.resolve_crop_top(cfp.placement, hw), cfp.wrap))
  out = []
  for start in range(0, len(paths), batch_size):
    batch = np.stack([project.decode_panorama(p, hw)
                      for p in paths[start:start + batch_size]])
    out.append(np.asarray(geometry.project_uint8(batch, plan)))
  return np.concatenate(out)


def ncc_recall(config: ml_collections.ConfigDict, workdir: str,
               size: int = 32) -> dict[str, float]:
  """R@1/5/10/1 % (in %) of NCC on the config's evaluation split."""
  _, index = splits.read_splits(config, workdir)
  positive = np.asarray(index.positive)
  known = np.flatnonzero(positive >= 0)
  bevs = grey_unit(bev_images([index.ground_paths[i] for i in known],
                              config.cfp), size)
  tiles = grey_unit(np.stack([image_io.read_rgb(p)
                              for p in index.satellite_paths]), size)
  result = metrics_lib.recall_at_k(bevs, tiles, positive[known])
  return dict(result.metrics, num_queries=float(len(known)),
              num_references=float(index.num_satellite), size=float(size))


def define_flags() -> None:
  """The CLI's flags (only when run as a program: `main` defines its own
  --config and --workdir)."""
  config_flags.DEFINE_config_file("config", None, "Run config.")
  flags.DEFINE_string("workdir", None, "Folder of the run (holds a "
                      "synthetic world, if the config makes one).")
  flags.DEFINE_integer("size", 32, "Side of the grey images compared.",
                       lower_bound=4)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.setup_console()
  config, workdir, size = cli.config_value(), f.workdir, f.size
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    cli.user_error(e)
  os.makedirs(workdir, exist_ok=True)
  result = ncc_recall(config, workdir, size)
  path = os.path.join(workdir, RESULT_FILE)
  with open(path, "w") as out:
    json.dump(result, out, indent=2, sort_keys=True)
  print(f"NCC baseline ({size}x{size} grey BEV vs tile, "
        f"{result['num_queries']:.0f} queries, "
        f"{result['num_references']:.0f} tiles): R@1 {result['R@1']:.1f} "
        f"R@5 {result['R@5']:.1f} R@10 {result['R@10']:.1f} "
        f"R@1% {result['R@1%']:.1f}  -> {path}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
