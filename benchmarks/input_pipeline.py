r"""Can one host's decode threads feed its devices? Images/s per thread.

  python benchmarks/input_pipeline.py --dataset=cvusa --threads=1,2 \
      [--device_pairs_per_s=120] [--rounds=3] [--images=64]

Renders --images panoramas and satellite tiles at the dataset's stored
sizes and formats (CVUSA: 1232 x 224 JPEG panoramas, 750 x 750 JPEG tiles;
CVACT: 1664 x 832 / 1200 x 1200 JPEG; VIGOR: 2048 x 1024 JPEG, 640 x 640
PNG), then times the training input path (`pipeline.evaluation`: grain
reader threads, `image_io.read_rgb` + resize to the config's sizes) with
each --threads count, round-robin, medians. Prints images/s of each side,
pairs/s, pairs/s per thread, the threads `pipeline.decode_threads` picks
here, and, given --device_pairs_per_s (a device's training rate in pairs/s,
e.g. from benchmarks/train_step.py on that accelerator), how many devices
those threads keep busy. The files stay in the page cache: this is the CPU
cost of decoding, not the file system's.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import round_robin  # pylint: disable=g-import-not-at-top,wrong-import-position

from cvgl_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cvgl_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

# (panorama (W, H), tile side, tile format) as the datasets store them.
STORED = {"cvusa": ((1232, 224), 750, ".jpg"),
          "cvact": ((1664, 832), 1200, ".jpg"),
          "vigor": ((2048, 1024), 640, ".png")}

_DATASET = flags.DEFINE_enum("dataset", "cvusa", sorted(STORED),
                             "whose stored and training sizes to use")
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "reader thread counts")
_IMAGES = flags.DEFINE_integer("images", 64, "images of each side per round")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "round-robin rounds")
_BATCH = flags.DEFINE_integer("batch", 16, "batch size of the pipeline")
_DEVICE_RATE = flags.DEFINE_float(
    "device_pairs_per_s", 0.0,
    "a device's training rate (pairs/s): prints how many devices the "
    "threads feed")


def _write(folder: str, count: int, pano_wh, tile_px: int, tile_ext: str):
  """Smooth random scenes (photo-like JPEG sizes, not noise) on disk."""
  rng = np.random.default_rng(0)
  panos, tiles = [], []
  for i in range(count):
    for size, ext, out in ((pano_wh, ".jpg", panos),
                           ((tile_px, tile_px), tile_ext, tiles)):
      small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3),
                           np.uint8)
      image = cv2.resize(small, size, interpolation=cv2.INTER_CUBIC)
      image = cv2.add(image, rng.integers(0, 24, image.shape, np.uint8))
      path = os.path.join(folder, f"{len(out):03d}_{i}{ext}")
      if not cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"Could not write {path}.")
      out.append(path)
  return panos, tiles


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  threads = [int(t) for t in _THREADS.value]
  dataset = _DATASET.value
  settings = config_lib.DATASET_SETTINGS[dataset]
  pano_wh, tile_px, tile_ext = STORED[dataset]
  print(f"benchmarks/input_pipeline.py: {dataset}, {os.cpu_count()} CPUs, "
        f"{len(os.sched_getaffinity(0))} usable, decode_threads() = "
        f"{pipeline.decode_threads(0)}; load {os.getloadavg()}")
  with tempfile.TemporaryDirectory(prefix="bench_input_") as folder:
    panos, tiles = _write(folder, _IMAGES.value, pano_wh, tile_px, tile_ext)
    sides = {"ground": (panos, settings["ground_size"]),
             "satellite": (tiles, settings["satellite_size"])}
    variants = {}
    for side, (paths, size) in sides.items():
      for n in threads:
        def run(paths=paths, size=size, n=n):
          for _ in pipeline.evaluation(paths, size=size,
                                       batch_size=_BATCH.value,
                                       num_threads=n):
            pass
        variants[(side, n)] = run
    for fn in variants.values():  # Warm the page cache and grain.
      fn()
    start = time.perf_counter()
    times = round_robin(variants, _ROUNDS.value)
    print(f"timed in {time.perf_counter() - start:.0f} s; load "
          f"{os.getloadavg()}")
  rate = {k: _IMAGES.value / statistics.median(v) for k, v in times.items()}
  print("| threads | ground img/s | satellite img/s | pairs/s | pairs/s per "
        "thread | devices fed |")
  print("| --- | --- | --- | --- | --- | --- |")
  for n in threads:
    pairs = 1 / (1 / rate[("ground", n)] + 1 / rate[("satellite", n)])
    fed = (f"{pairs / _DEVICE_RATE.value:.2f}" if _DEVICE_RATE.value
           else "-")
    print(f"| {n} | {rate[('ground', n)]:.1f} | {rate[('satellite', n)]:.1f}"
          f" | {pairs:.1f} | {pairs / n:.1f} | {fed} |")


if __name__ == "__main__":
  app.run(main)
