"""Images/s of the training augmentation: jitted on device vs per image on host.

  python benchmarks/augment.py [--size=384] [--batch=32] [--rounds=10]

Both variants do the official satellite augmentation of METHOD.md (grid or
coarse dropout p=0.5, shift/scale p=0.5, colour jitter p=0.8, grayscale
p=0.2, 3x3 Gaussian blur p=0.5) and the ImageNet normalisation to float32,
on a batch of uint8 [B, size, size, 3] images:

  device     `augment.augment_batch` + `augment.normalize`, one jitted call
             per batch (timed to block_until_ready, after a warm-up call
             that compiles);
  host       what albumentations does, reimplemented with numpy / cv2 (it is
             not installed here): one image at a time, uint8 lookup tables
             and cv2 ops as albumentations uses them, one thread;
  host_x2    the same with 2 threads (cv2 releases the GIL).

Variants run round-robin in one process; each prints the median over
rounds and the device/host ratio. On a CPU-only machine "device" is the
CPU itself, sharing the same cores.
"""

import concurrent.futures
import time

from absl import app
from absl import flags
import cv2
import jax
import numpy as np

from cvgl_jax.data import augment

_SIZE = flags.DEFINE_integer("size", 384, "Image side in pixels.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per batch.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds per variant.")


def _host_augment(img: np.ndarray, rng: np.random.Generator,
                  cfg: augment.ViewConfig) -> np.ndarray:
  """albumentations-style augmentation of one uint8 [H, W, 3] image."""
  h, w = img.shape[:2]
  img = img.copy()
  if rng.random() < cfg.dropout_p:
    if rng.random() < 0.5:  # GridDropout, random offset.
      uh, uw = max(2, h // cfg.grid_units), max(2, w // cfg.grid_units)
      hh = min(max(int(uh * cfg.grid_ratio), 1), uh - 1)
      hw = min(max(int(uw * cfg.grid_ratio), 1), uw - 1)
      oy, ox = rng.integers(0, uh - hh + 1), rng.integers(0, uw - hw + 1)
      for y in range(oy, h, uh):
        for x in range(ox, w, uw):
          img[y:y + hh, x:x + hw] = 0
    else:  # CoarseDropout.
      for _ in range(rng.integers(cfg.coarse_holes[0],
                                  cfg.coarse_holes[1] + 1)):
        hh = rng.integers(int(0.1 * h), int(0.2 * h) + 1)
        hw = rng.integers(int(0.1 * w), int(0.2 * w) + 1)
        y, x = rng.integers(0, h - hh + 1), rng.integers(0, w - hw + 1)
        img[y:y + hh, x:x + hw] = 0
  for a in cfg.affines:
    if rng.random() < a.p:
      m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2),
                                  rng.uniform(-a.rotate, a.rotate),
                                  rng.uniform(1 - a.scale, 1 + a.scale))
      m[:, 2] += rng.uniform(-a.shift, a.shift, 2) * (w, h)
      img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  if rng.random() < cfg.jitter_p:
    b, c, s = (rng.uniform(max(0, 1 - v), 1 + v)
               for v in (cfg.brightness, cfg.contrast, cfg.saturation))
    lut = np.clip(np.arange(256) * b, 0, 255).astype(np.uint8)
    img = cv2.LUT(img, lut)
    mean = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean()
    lut = np.clip((np.arange(256) - mean) * c + mean, 0, 255).astype(np.uint8)
    img = cv2.LUT(img, lut)
    gray = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY),
                        cv2.COLOR_GRAY2RGB)
    img = cv2.addWeighted(img, s, gray, 1 - s, 0)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    shift = int(rng.uniform(-cfg.hue, cfg.hue) * 180)
    hsv[..., 0] = cv2.LUT(hsv[..., 0],
                          ((np.arange(256) + shift) % 180).astype(np.uint8))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.random() < cfg.grayscale_p:
    img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY),
                       cv2.COLOR_GRAY2RGB)
  if rng.random() < cfg.blur_p:
    img = cv2.GaussianBlur(img, (3, 3), 0)
  x = img.astype(np.float32) / 255.0
  return (x - np.float32(augment.IMAGENET_MEAN)) / np.float32(
      augment.IMAGENET_STD)


def main(argv):
  del argv
  cfg = augment.satellite_view()
  b, s = _BATCH.value, _SIZE.value
  images = np.random.default_rng(0).integers(0, 256, (b, s, s, 3), np.uint8)
  rng = np.random.default_rng(1)
  pool = concurrent.futures.ThreadPoolExecutor(2)

  @jax.jit
  def device_step(key, x):
    return augment.normalize(augment.augment_batch(key, x, cfg))

  x_dev = jax.device_put(images)
  keys = iter(jax.random.split(jax.random.key(0), 10 * _ROUNDS.value + 10))

  def run_device():
    device_step(next(keys), x_dev).block_until_ready()

  def run_host():
    for img in images:
      _host_augment(img, rng, cfg)

  def run_host_x2():
    seeds = rng.integers(0, 2**31, b)
    list(pool.map(lambda i: _host_augment(
        images[i], np.random.default_rng(seeds[i]), cfg), range(b)))

  variants = {"device": run_device, "host": run_host, "host_x2": run_host_x2}
  t0 = time.perf_counter()
  for fn in variants.values():  # Warm-up; the device one compiles.
    fn()
  print(f"warm-up incl. compile: {time.perf_counter() - t0:.1f} s; "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
  times = {k: [] for k in variants}
  for _ in range(_ROUNDS.value):
    for k, fn in variants.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  rate = {k: b / np.median(v) for k, v in times.items()}
  for k, v in times.items():
    print(f"{k:8s} median {np.median(v) * 1e3:8.1f} ms/batch of {b} "
          f"{s}x{s}: {rate[k]:7.1f} images/s")
  print(f"device / host    = {rate['device'] / rate['host']:.2f}")
  print(f"device / host_x2 = {rate['device'] / rate['host_x2']:.2f}")
  pool.shutdown()


if __name__ == "__main__":
  app.run(main)
