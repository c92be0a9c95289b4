"""The `cfp` stage's geometric half: every ground panorama -> `g2a/<id>.png`.

Panoramas are decoded on the host by a thread pool (cv2 releases the GIL),
batched, projected on the device with one precomputed bilinear plan
(`geometry.bev_plan`) and written as PNGs by the same pool. Each file is
written to a temporary name in the target folder and then renamed, so a
crash never leaves a half-written PNG under the final name, and a rerun
skips the files already there and finishes the rest. In a multi-process
run every process projects its own share of the missing files on its own
devices (`process_index`, `process_count`). The panorama convention is the
one stated in `cvgl_jax/cfp/geometry.py`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time
from typing import Dict, Optional, Sequence, Union

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax.cfp import geometry
from cvgl_jax.data import derived
from cvgl_jax.data import image_io
from cvgl_jax.data.index import PairIndex


def resolve_crop_top(placement: Union[str, float],
                     pano_hw: Sequence[int]) -> float:
  """Row of the W x W/2 canvas where the panorama's top row sits.

  Args:
    placement: "full" (a 2:1 panorama, row 0), "cvusa" (the authors' CVUSA
      offset, `geometry.cvusa_crop_top`) or a row number.
    pano_hw: (H, W) of the panoramas.
  """
  if isinstance(placement, str):
    if placement == "full":
      return 0.0
    if placement == "cvusa":
      return geometry.cvusa_crop_top(pano_hw)
    raise ValueError(f"placement must be 'full', 'cvusa' or a row number, "
                     f"got {placement!r}.")
  return float(placement)


def decode_panorama(path: str,
                    expected_hw: Optional[Sequence[int]] = None) -> np.ndarray:
  """Reads one panorama as [H, W, 3] uint8 RGB; errors name the file."""
  image = image_io.read_rgb(path)
  if expected_hw is not None and image.shape[:2] != tuple(expected_hw):
    raise ValueError(
        f"Panorama {path!r} is {image.shape[1]}x{image.shape[0]} (WxH), but "
        f"the split's panoramas are {expected_hw[1]}x{expected_hw[0]}; one "
        "projection grid serves a whole split.")
  return image


def project_split(index: PairIndex,
                  out_size: Union[int, Sequence[int]],
                  fov_deg: float,
                  placement: Union[str, float] = "full",
                  batch_size: int = 16,
                  wrap: bool = False,
                  folder: str = "g2a",
                  num_threads: Optional[int] = None,
                  overwrite: bool = False,
                  progress: bool = True,
                  process_index: int = 0,
                  process_count: int = 1) -> Dict[str, float]:
  """Projects every ground panorama of `index` to `root/<folder>/<id>.png`.

  Args:
    index: the split; its `derived_paths(folder)` are the outputs.
    out_size: BEV size, int (square) or (Ho, Wo); 750 CVUSA, 1200 CVACT.
    fov_deg: virtual camera FoV; 175 CVUSA, 170 CVACT.
    placement: where the panorama sits on the 2:1 canvas, see
      `resolve_crop_top` ("cvusa" for CVUSA crops, "full" otherwise).
    batch_size: panoramas per device call (the last batch is padded so the
      function compiles once).
    wrap: interpolate across the +-180 deg seam (off = the authors').
    folder: output folder under `index.root`.
    num_threads: host threads for decoding and PNG encoding.
    overwrite: project again even where an output exists.
    progress: show a tqdm bar.
    process_index, process_count: this process projects files number
      process_index, process_index + process_count, ... that are missing
      (e.g. `jax.process_index()`, `jax.process_count()`).

  Returns:
    {"written", "skipped" (already there): of this process's share;
    "seconds", "images_per_s"}.

  Raises:
    FileNotFoundError: before any work, if panoramas are missing (named).
    ValueError: at decode, naming a corrupt panorama or one whose size
      differs from the first one's.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must lie in "
                     f"[0, process_count={process_count}).")
  inputs = [str(p) for p in index.ground_paths]
  outputs = [str(p) for p in index.derived_paths(folder)]
  missing = [p for p in inputs if not os.path.isfile(p)]
  if missing:
    shown = ", ".join(repr(p) for p in missing[:5])
    raise FileNotFoundError(
        f"{len(missing)} of {len(inputs)} panoramas of {index.name!r} are "
        f"missing, e.g. {shown}.")
  # Shares are fixed before looking at the disk: a process that lists
  # after another one wrote files must get the same share, or some files
  # are nobody's (a shared file system).
  mine = range(process_index, len(inputs), process_count)
  todo = [i for i in mine if overwrite or not os.path.exists(outputs[i])]
  skipped = len(mine) - len(todo)
  stats = {"written": 0, "skipped": skipped, "seconds": 0.0,
           "images_per_s": 0.0}
  if not todo:
    logging.info("cfp %s: this process's %d BEV images already in %s/.",
                 index.name, skipped, folder)
    return stats
  os.makedirs(os.path.join(index.root, folder), exist_ok=True)

  start = time.perf_counter()
  first = decode_panorama(inputs[todo[0]])
  pano_hw = first.shape[:2]
  crop_top = resolve_crop_top(placement, pano_hw)
  plan = jax.device_put(
      geometry.bev_plan(pano_hw, out_size, fov_deg, crop_top, wrap))
  batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  num_threads = num_threads or min(8, os.cpu_count() or 1)

  def load(batch):
    images = [decode_panorama(inputs[i], pano_hw) for i in batch]
    images += images[-1:] * (batch_size - len(images))
    return np.stack(images)

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending_loads = collections.deque(
        pool.submit(load, b) for b in batches[:2])
    writes = collections.deque()
    bar = tqdm.tqdm(total=len(todo), unit="img", desc=f"cfp {index.name}",
                    disable=not progress)
    for k, batch in enumerate(batches):
      panos = pending_loads.popleft().result()
      if k + 2 < len(batches):
        pending_loads.append(pool.submit(load, batches[k + 2]))
      bevs = np.asarray(geometry.project_uint8(panos, plan))
      for j, i in enumerate(batch):
        writes.append(pool.submit(image_io.write_png_atomic, outputs[i], bevs[j]))
      # Bound the queue of images waiting to be written.
      while len(writes) > 2 * batch_size:
        writes.popleft().result()
        bar.update(1)
    while writes:
      writes.popleft().result()
      bar.update(1)
    bar.close()
  seconds = time.perf_counter() - start
  stats.update(written=len(todo), seconds=seconds,
               images_per_s=len(todo) / max(seconds, 1e-9))
  logging.info("cfp %s: wrote %d BEV images (%d already there) in %.1f s, "
               "%.1f images/s.", index.name, len(todo), skipped, seconds,
               stats["images_per_s"])
  return stats


def run_stage(index: PairIndex, c: ml_collections.ConfigDict
              ) -> Dict[str, float]:
  """The `cfp` stage on every process of a job: `index`'s BEV images for
  the settings `c` (`config.cfp`), each process its share; returns
  `project_split`'s counts summed over the processes.

  BEVs of other projection settings (another run on this dataset) are
  replaced, not reused (`derived.claim`); process 0 checks that every file
  exists before the stage can be marked done.
  """
  folder = os.path.join(index.root, "g2a")
  if parallel.is_main_process():
    derived.claim(folder, {"made_by": "cfp", "out_size": c.out_size,
                           "fov_deg": c.fov_deg, "placement": c.placement,
                           "wrap": c.wrap})
  parallel.sync("cfp:claimed")
  if run_dir.fault_requested("list_late"):
    time.sleep(run_dir.LIST_LATE_S)
  stats = project_split(
      index, out_size=c.out_size, fov_deg=c.fov_deg, placement=c.placement,
      batch_size=c.batch_size, wrap=c.wrap,
      progress=parallel.is_main_process(),
      process_index=jax.process_index(), process_count=jax.process_count())
  for key in ("written", "skipped"):
    stats[key] = parallel.sum_over_processes(stats[key])
  derived.check_all_written(list(index.derived_paths("g2a")), "BEV images")
  return stats
