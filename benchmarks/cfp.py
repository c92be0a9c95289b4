"""CFP projection throughput: ours vs cv2.remap vs the authors' algorithm.

Three ways to turn a panorama into its BEV, timed in one run, round-robin,
at CVUSA size (1232x224 crop -> 750x750, FoV 175) and CVACT size
(1664x832 -> 1200x1200, FoV 170):

  ours     `geometry.project_uint8`: batched, jitted, with the bilinear plan
           (neighbours and weights) precomputed once; numpy in, numpy out.
  remap    `cv2.remap` per image with a precomputed fixed-point map.
  authors  the authors' per-image structure, in NumPy: pad the crop onto the
           2:1 canvas, recompute the sampling grid from the formulas
           (float32, as their torch code), then bilinear `grid_sample`
           (align_corners, zeros outside) in float32.
  torch    the same per-image algorithm in PyTorch, as the authors run it:
           the grid recomputed with torch ops for every image, then
           `torch.nn.functional.grid_sample(align_corners=True)` on the
           padded canvas (only when torch is importable; CPU threads as
           torch sets them, OMP_WAIT_POLICY=PASSIVE).

Prints the median milliseconds per image and the speed-up over `authors`,
and checks that the three outputs agree.

  python benchmarks/cfp.py [--reps 5] [--batch 8]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2
import jax
import numpy as np

from cvgl_jax.cfp import geometry


def authors_grid(canvas_hw, out_size, fov_deg):
  """Their `get_BEV_projection`: [Ho, Wo, 2] in [-1, 1], per call."""
  hp, wp = canvas_hw
  ho = wo = out_size
  fov = np.float32(fov_deg * np.pi / 180)
  f = np.float32(wo / 2 / np.tan(fov / 2))
  rows, cols = np.meshgrid(np.arange(ho, dtype=np.float32),
                           np.arange(wo, dtype=np.float32), indexing="ij")
  x = ho / 2 - rows
  y = wo / 2 - cols
  z = np.full_like(x, -f)
  theta = np.arctan2(z, np.sqrt(x ** 2 + y ** 2)) + np.float32(np.pi / 2)
  phi = np.arctan2(y, x) + np.float32(np.pi)
  u = 1 - phi / np.float32(2 * np.pi)
  v = 1 - theta / np.float32(np.pi)
  return np.stack([u * 2 - 1, v * 2 - 1], axis=-1)


def authors_grid_sample(image, grid):
  """torch `grid_sample(align_corners=True, padding_mode='zeros')`, HWC."""
  h, w = image.shape[:2]
  x = (grid[..., 0] + 1) / 2 * (w - 1)
  y = (grid[..., 1] + 1) / 2 * (h - 1)
  x0, y0 = np.floor(x), np.floor(y)
  out = np.zeros(grid.shape[:2] + image.shape[2:], np.float32)
  for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
    for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
      ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      xc = np.clip(xi, 0, w - 1).astype(np.int64)
      yc = np.clip(yi, 0, h - 1).astype(np.int64)
      out += image[yc, xc] * (wx * wy * ok)[..., None]
  return out


def authors_project(crop, out_size, fov_deg, crop_top):
  """One image, the authors' way: pad, recompute the grid, sample."""
  h, w = crop.shape[:2]
  canvas = np.zeros((w // 2, w, 3), np.float32)
  canvas[int(crop_top):int(crop_top) + h] = crop
  grid = authors_grid(canvas.shape[:2], out_size, fov_deg)
  return authors_grid_sample(canvas, grid)


def torch_project_fn():
  """The authors' per-image algorithm in PyTorch, or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None

  def project(crop, out_size, fov_deg, crop_top):
    img = torch.from_numpy(crop).permute(2, 0, 1).float()
    h, w = img.shape[1:]
    canvas = torch.zeros(3, w // 2, w)
    canvas[:, int(crop_top):int(crop_top) + h] = img
    fov = torch.tensor(fov_deg * torch.pi / 180)
    f = out_size / 2 / torch.tan(fov / 2)
    rows, cols = torch.meshgrid(torch.arange(out_size, dtype=torch.float32),
                                torch.arange(out_size, dtype=torch.float32),
                                indexing="ij")
    x, y = out_size / 2 - rows, out_size / 2 - cols
    theta = torch.atan2(-f * torch.ones_like(x),
                        torch.sqrt(x ** 2 + y ** 2)) + torch.pi / 2
    phi = torch.atan2(y, x) + torch.pi
    grid = torch.stack([(1 - phi / (2 * torch.pi)) * 2 - 1,
                        (1 - theta / torch.pi) * 2 - 1], dim=-1)
    out = F.grid_sample(canvas[None], grid[None], mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0).numpy()
  return project


def bench_size(name, pano_hw, out_size, fov_deg, crop_top, reps, batch,
               authors_per_rep, rng):
  panos = rng.integers(0, 256, (batch,) + pano_hw + (3,), dtype=np.uint8)
  panos = cv2.blur(panos.reshape(batch * pano_hw[0], pano_hw[1], 3),
                   (5, 5)).reshape(panos.shape)  # smooth, like photos
  plan = jax.device_put(geometry.bev_plan(pano_hw, out_size, fov_deg,
                                          crop_top))
  grid = geometry.bev_grid(pano_hw, out_size, fov_deg, crop_top)
  map1, map2 = cv2.convertMaps(np.ascontiguousarray(grid[..., 0]),
                               np.ascontiguousarray(grid[..., 1]),
                               cv2.CV_16SC2)

  def ours():
    return np.asarray(geometry.project_uint8(panos, plan))

  def remap():
    return np.stack([cv2.remap(p, map1, map2, cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT) for p in panos])

  def authors():
    return np.stack([authors_project(panos[i], out_size, fov_deg, crop_top)
                     for i in range(authors_per_rep)])

  variants = {"ours": (ours, batch), "remap": (remap, batch),
              "authors": (authors, authors_per_rep)}
  torch_project = torch_project_fn()
  if torch_project is not None:
    variants["torch"] = (lambda: np.stack([
        torch_project(p, out_size, fov_deg, crop_top) for p in panos]), batch)
  outputs = {k: fn() for k, (fn, _) in variants.items()}  # warm-up, compile
  times = {k: [] for k in variants}
  for _ in range(reps):
    for k, (fn, n) in variants.items():
      start = time.perf_counter()
      fn()
      times[k].append((time.perf_counter() - start) / n)

  ref = outputs["authors"].astype(np.float32)
  n = len(ref)
  agree = {k: float(np.abs(outputs[k][:n].astype(np.float32) - ref).mean())
           for k in variants if k != "authors"}
  base = statistics.median(times["authors"])
  print(f"\n{name}: {pano_hw[1]}x{pano_hw[0]} -> {out_size}x{out_size}, "
        f"FoV {fov_deg:g}, {reps} rounds (batch {batch} for ours/remap)")
  print(f"  {'variant':8s} {'ms/img':>9s} {'img/s':>8s} {'x authors':>10s}"
        f"  {'mean |diff| vs authors':>22s}")
  for k in variants:
    t = statistics.median(times[k])
    diff = f"{agree[k]:.3f}" if k in agree else "-"
    print(f"  {k:8s} {t * 1e3:9.2f} {1 / t:8.1f} {base / t:10.1f}  {diff:>22s}")
  ratio = statistics.median(times["ours"]) / statistics.median(times["remap"])
  print(f"  ours / remap time: {ratio:.2f}")
  if "torch" in times:
    speedup = statistics.median(times["torch"]) / statistics.median(
        times["ours"])
    print(f"  ours vs the authors' algorithm in torch: {speedup:.1f}x faster")
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--authors_per_rep", type=int, default=2)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"cv2 {cv2.__version__} with {cv2.getNumThreads()} threads")
  bench_size("CVUSA", (224, 1232), geometry.CVUSA_OUT_SIZE,
             geometry.CVUSA_FOV_DEG, geometry.cvusa_crop_top((224, 1232)),
             args.reps, args.batch, args.authors_per_rep, rng)
  bench_size("CVACT", (832, 1664), geometry.CVACT_OUT_SIZE,
             geometry.CVACT_FOV_DEG, 0.0, args.reps, args.batch,
             args.authors_per_rep, rng)


if __name__ == "__main__":
  main()
