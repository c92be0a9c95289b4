r"""Host data throughput: synthetic renderer, decode + resize, augmentation.

  python benchmarks/data.py [--sections=render,decode,augment,world]
      [--rounds=7] [--world_pairs=300] [--grain_threads=2,4,8] ...
  python benchmarks/data.py --sections=world --world_pairs=5000

Each section times its variants round-robin in this one process (one
warm-up call each, then --rounds rounds), prints per-variant medians and
the ratios between them, and prints the load average (1/5/15 min) before
and after: the machine may be shared, and every number depends on it.

  render   the synthetic world (`cvgl_jax.data.synthetic`), in memory, at
           the library defaults (`SyntheticConfig()`, what the CLI writes)
           and at the demo's sizes (--demo_config, built from its
           `config.synthetic` as `cvgl_jax.stages` builds it):
             world_*  `make_world`, a new seed each round;
             pair_*   `render_panorama` (the CVUSA band crop) +
                      `render_satellite` for --render_pairs poses of one
                      world; pairs/s, with the panorama / tile split.
  decode   host decode + resize as the pipelines do it (`pipeline.decode`
           = `image_io.read_rgb` + `image_io.resize`), of rendered images
           written as the datasets store them: JPEG panoramas (--pano_hw,
           CVUSA's 224 x 1232 crop) and PNG tiles (--tile_px, 750) resized
           to --out_hw; --decode_images images per round, cycling over
           --decode_files distinct files of each kind (in the page cache):
             single    one image after another in this thread;
             grain_tN  `pipeline.evaluation` (grain, N reader threads,
                       batches of --decode_batch), a new iterator each
                       round, so its start-up is counted as in every epoch.
           The grain batches are checked equal to the single-thread output.
           cv2 keeps its own thread setting in both (`cv2.getNumThreads()`
           is printed).
  augment  the official satellite augmentation of docs/METHOD.md (grid or
           coarse dropout p=0.5, shift/scale p=0.5, colour jitter p=0.8,
           grayscale p=0.2, 3x3 Gaussian blur p=0.5) and the ImageNet
           normalisation to float32, on a batch of uint8 [--augment_batch,
           --augment_size, --augment_size, 3] images:
             device   `augment.augment_batch` + `augment.normalize`, one
                      jitted call per batch (timed to block_until_ready;
                      the warm-up call compiles);
             host     what albumentations does, reimplemented with numpy /
                      cv2 (it is not installed here): one image at a time,
                      uint8 lookup tables and cv2 ops as albumentations
                      uses them, one thread;
             host_x2  the same with 2 threads (cv2 releases the GIL).
           On a CPU-only machine "device" is the CPU itself, sharing the
           same cores.
  world    one `write_dataset("cvusa", ...)` of --world_pairs pairs at the
           library defaults into a temporary folder (deleted afterwards):
           total seconds and pairs/s, split into world generation, panorama
           and tile rendering, and the rest (camera placement, JPEG
           encoding and writing, the truth file). Below 5,000 pairs it also
           prints an EXTRAPOLATED time for 5,000 pairs: that many worlds at
           this run's mean world time plus 5,000 x this run's per-pair time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import itertools
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable

from absl import app
from absl import flags
import cv2
import jax
import numpy as np

from cvgl_jax.data import augment
from cvgl_jax.data import pipeline
from cvgl_jax.data import synthetic
from cvgl_jax.data.synthetic import config as synthetic_config
from cvgl_jax.data.synthetic import layouts
from cvgl_jax.data.synthetic import render as render_lib
from cvgl_jax.data.synthetic import world as world_lib

SECTIONS = ("render", "decode", "augment", "world")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pair count whose generation time BUILD_NOTES.md records.
_RECORD_PAIRS = 5000

_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS),
                              f"Sections to run, any of {SECTIONS}.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed rounds per variant.",
                               lower_bound=1)
_DEMO_CONFIG = flags.DEFINE_string(
    "demo_config", os.path.join(_REPO, "configs", "synthetic_unsup.py"),
    "Config file whose config.synthetic gives the demo's world sizes.")
_RENDER_PAIRS = flags.DEFINE_integer("render_pairs", 4, "render: pairs "
                                     "rendered per round.", lower_bound=1)
_PANO_HW = flags.DEFINE_list("pano_hw", ["224", "1232"], "decode: panorama "
                             "JPEG (height, width); height <= width / 2.")
_TILE_PX = flags.DEFINE_integer("tile_px", 750, "decode: PNG tile side.",
                                lower_bound=8)
_OUT_HW = flags.DEFINE_list("out_hw", ["384", "384"], "decode: (height, "
                            "width) both kinds are resized to.")
_DECODE_FILES = flags.DEFINE_integer("decode_files", 16, "decode: distinct "
                                     "files of each kind.", lower_bound=1)
_DECODE_IMAGES = flags.DEFINE_integer("decode_images", 64, "decode: images "
                                      "per round and variant.", lower_bound=1)
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 32, "decode: grain "
                                     "batch size.", lower_bound=1)
_GRAIN_THREADS = flags.DEFINE_list("grain_threads", ["2", "4", "8"],
                                   "decode: grain reader thread counts.")
_AUGMENT_SIZE = flags.DEFINE_integer("augment_size", 384, "augment: image "
                                     "side in pixels.", lower_bound=8)
_AUGMENT_BATCH = flags.DEFINE_integer("augment_batch", 32, "augment: images "
                                      "per batch.", lower_bound=1)
_WORLD_PAIRS = flags.DEFINE_integer("world_pairs", 300, "world: pairs of "
                                    "the CVUSA-layout dataset written.",
                                    lower_bound=1)
_WORLD_SEED = flags.DEFINE_integer("world_seed", 0, "world: dataset seed.")


def _load() -> str:
  return "load avg {:.2f} {:.2f} {:.2f} (1/5/15 min)".format(
      *os.getloadavg())


def _ints(flag, count: int) -> tuple:
  """A list flag as `count` positive ints, or a UsageError naming it."""
  try:
    values = tuple(int(v) for v in flag.value)
  except ValueError:
    values = ()
  if len(values) != count or min(values) <= 0:
    raise app.UsageError(f"--{flag.name}={','.join(flag.value)}: expected "
                         f"{count} positive integers.")
  return values


def round_robin(variants: dict[str, Callable[[], object]],
                rounds: int) -> tuple[dict[str, list], float]:
  """Times each variant once per round, interleaved.

  Returns ({name: [seconds per round]}, seconds of the warm-up calls).
  """
  start = time.perf_counter()
  for fn in variants.values():
    fn()
  warm_up = time.perf_counter() - start
  times = {k: [] for k in variants}
  for _ in range(rounds):
    for k, fn in variants.items():
      start = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - start)
  return times, warm_up


def _print_rates(times: dict, items: int, unit: str, what: str) -> dict:
  """Prints median ms per call and items/s; returns {name: items/s}."""
  rate = {}
  for k, v in times.items():
    t = statistics.median(v)
    rate[k] = items / t
    print(f"  {k:16s} median {t * 1e3:9.1f} ms / {items} {what}: "
          f"{rate[k]:8.2f} {unit}/s")
  return rate


# render


def demo_synthetic_config(path: str) -> synthetic.SyntheticConfig:
  """The demo's SyntheticConfig, from the config file's `config.synthetic`
  (the fields `cvgl_jax.stages.synthetic_world` passes on)."""
  if not os.path.isfile(path):
    raise app.UsageError(f"--demo_config={path}: no such file.")
  spec = importlib.util.spec_from_file_location("_demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  s = module.get_config().synthetic
  return synthetic.SyntheticConfig(
      map_cells=s.map_cells, pairs_per_world=s.pairs_per_world,
      sat_px=s.sat_px, pano_width=s.pano_width,
      cvusa_width=s.cvusa_width).validate()


def _shots(world, cfg, count: int, seed: int) -> list:
  rng = np.random.default_rng(seed)
  return layouts.draw_shots(world, cfg, layouts.place_cameras(
      world, cfg, count, rng), rng)


def _render_pair(world, cfg, shot, split: list) -> tuple:
  """Renders one CVUSA pair; appends (panorama s, tile s) to `split`."""
  p = shot.pose
  ph, pw = cfg.cvusa_hw
  start = time.perf_counter()
  pano = synthetic.render_panorama(world, p, pw, cfg.cvusa_top, ph,
                                   cfg.max_ray_m,
                                   np.random.default_rng(shot.pano_seed))
  mid = time.perf_counter()
  sat = synthetic.render_satellite(world, p.tile_row, p.tile_col, cfg.tile_m,
                                   cfg.sat_px, cfg.sat_appearance,
                                   np.random.default_rng(shot.sat_seed))
  split.append((mid - start, time.perf_counter() - mid))
  return pano, sat


def bench_render(demo_cfg: synthetic.SyntheticConfig, rounds: int,
                 pairs: int) -> None:
  configs = {"default": synthetic.SyntheticConfig().validate(),
             "demo": demo_cfg}
  variants, splits = {}, {}
  for name, cfg in configs.items():
    world = synthetic.make_world(cfg, np.random.default_rng(0), 0)
    shots = itertools.cycle(_shots(world, cfg, 8 * pairs, 1))
    seeds = itertools.count(1)
    splits[name] = []

    def make(cfg=cfg, seeds=seeds):
      synthetic.make_world(cfg, np.random.default_rng(next(seeds)), 0)

    def pairs_fn(cfg=cfg, world=world, shots=shots, split=splits[name]):
      for _ in range(pairs):
        _render_pair(world, cfg, next(shots), split)

    variants[f"world_{name}"] = make
    variants[f"pair_{name}"] = pairs_fn
  print("\n[render] synthetic world, in memory; " + _load())
  for name, cfg in configs.items():
    ph, pw = cfg.cvusa_hw
    print(f"  {name:8s} map_cells {cfg.map_cells} ({cfg.map_m:g} m), "
          f"panorama {pw}x{ph} (CVUSA band), tile {cfg.sat_px}px")
  times, warm_up = round_robin(variants, rounds)
  print(f"  {rounds} rounds after a warm-up of {warm_up:.1f} s")
  for name in configs:
    world_s = statistics.median(times[f"world_{name}"])
    pair_s = statistics.median(times[f"pair_{name}"]) / pairs
    split = np.median(np.array(splits[name][pairs:]), axis=0)  # no warm-up
    print(f"  {name:8s} make_world median {world_s:6.2f} s;  pair median "
          f"{pair_s * 1e3:6.1f} ms = {1 / pair_s:6.1f} pairs/s (panorama "
          f"{split[0] * 1e3:.1f} ms + tile {split[1] * 1e3:.1f} ms)")
  for kind in ("world", "pair"):
    ratio = (statistics.median(times[f"{kind}_default"]) /
             statistics.median(times[f"{kind}_demo"]))
    print(f"  {kind} time default / demo = {ratio:.2f}")
  print("  " + _load())


# decode


def _write_decode_files(folder: str, count: int, pano_hw: tuple,
                        tile_px: int) -> tuple[list, list]:
  """Renders `count` panoramas (JPEG) and tiles (PNG) into `folder`."""
  cfg = synthetic.SyntheticConfig(map_cells=1024)
  world = synthetic.make_world(cfg, np.random.default_rng(0), 0)
  ph, pw = pano_hw
  # The CVUSA band's place on the canvas, scaled; a full 2:1 panorama at 0.
  row0 = min(pw * synthetic_config.CVUSA_TOP / synthetic_config.CVUSA_WIDTH,
             pw / 2 - ph)
  panos, tiles = [], []
  for i, shot in enumerate(_shots(world, cfg, count, 2)):
    p = shot.pose
    pano = synthetic.render_panorama(world, p, pw, row0, ph, cfg.max_ray_m,
                                     np.random.default_rng(shot.pano_seed))
    tile = synthetic.render_satellite(world, p.tile_row, p.tile_col,
                                      cfg.tile_m, tile_px, cfg.sat_appearance,
                                      np.random.default_rng(shot.sat_seed))
    panos.append(os.path.join(folder, f"pano_{i:03d}.jpg"))
    tiles.append(os.path.join(folder, f"tile_{i:03d}.png"))
    for path, image in ((panos[-1], pano), (tiles[-1], tile)):
      params = ([cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]
                if path.endswith(".jpg") else [])
      if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                         params):
        raise OSError(f"Could not write {path}.")
  return panos, tiles


def bench_decode(rounds: int, pano_hw: tuple, tile_px: int, out_hw: tuple,
                 files: int, images: int, batch: int, threads: tuple) -> None:
  print("\n[decode] pipeline.decode = image_io.read_rgb + image_io.resize; "
        f"cv2 {cv2.__version__} with {cv2.getNumThreads()} threads; "
        + _load())
  with tempfile.TemporaryDirectory(prefix="bench_decode_") as folder:
    panos, tiles = _write_decode_files(folder, files, pano_hw, tile_px)
    kinds = {f"pano_jpeg {pano_hw[1]}x{pano_hw[0]}": panos,
             f"tile_png {tile_px}x{tile_px}": tiles}
    for kind, paths in kinds.items():
      paths = [paths[i % len(paths)] for i in range(images)]
      size_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024

      def single(paths=paths):
        return np.stack([pipeline.decode(p, out_hw) for p in paths])

      def through_grain(n, paths=paths):
        batches = [b["image"] for b in pipeline.evaluation(
            paths, size=out_hw, batch_size=batch, num_threads=n)]
        return np.concatenate(batches)[:len(paths)]

      reference = single()
      variants = {"single": single}
      for n in threads:
        out = through_grain(n)
        if not np.array_equal(out, reference):
          raise AssertionError(f"grain with {n} threads decoded different "
                               f"pixels than the single-thread loop.")
        variants[f"grain_t{n}"] = lambda n=n: through_grain(n)
      times, _ = round_robin(variants, rounds)
      print(f"  {kind} ({size_kb:.0f} KiB on disk) -> {out_hw[1]}x"
            f"{out_hw[0]}, {rounds} rounds, " + _load())
      rate = _print_rates(times, images, "images", "images")
      for n in threads:
        print(f"  grain_t{n} / single = "
              f"{rate[f'grain_t{n}'] / rate['single']:.2f}")
  print("  " + _load())


# augment


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


def bench_augment(rounds: int, size: int, batch: int) -> None:
  cfg = augment.satellite_view()
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3),
                                             np.uint8)
  rng = np.random.default_rng(1)

  @jax.jit
  def device_step(key, x):
    return augment.normalize(augment.augment_batch(key, x, cfg))

  x_dev = jax.device_put(images)
  keys = iter(jax.random.split(jax.random.key(0), rounds + 1))

  def run_device():
    device_step(next(keys), x_dev).block_until_ready()

  def run_host():
    for img in images:
      _host_augment(img, rng, cfg)

  print("\n[augment] satellite view + normalize, device (jit) vs host "
        "(numpy/cv2); " + _load())
  with concurrent.futures.ThreadPoolExecutor(2) as pool:

    def run_host_x2():
      seeds = rng.integers(0, 2**31, batch)
      list(pool.map(lambda i: _host_augment(
          images[i], np.random.default_rng(seeds[i]), cfg), range(batch)))

    variants = {"device": run_device, "host": run_host,
                "host_x2": run_host_x2}
    times, warm_up = round_robin(variants, rounds)
  print(f"  warm-up incl. compile: {warm_up:.1f} s; backend "
        f"{jax.default_backend()}, {jax.device_count()} device(s); "
        f"{rounds} rounds")
  rate = _print_rates(times, batch, "images", f"images {size}x{size}")
  print(f"  device / host    = {rate['device'] / rate['host']:.2f}")
  print(f"  device / host_x2 = {rate['device'] / rate['host_x2']:.2f}")
  print("  " + _load())


# world


@contextlib.contextmanager
def _timing(module, name: str, record: list):
  """Appends the seconds of every call of module.name to `record`."""
  original = getattr(module, name)

  def timed(*args, **kwargs):
    start = time.perf_counter()
    out = original(*args, **kwargs)
    record.append(time.perf_counter() - start)
    return out

  setattr(module, name, timed)
  try:
    yield
  finally:
    setattr(module, name, original)


def bench_world(num_pairs: int, seed: int) -> None:
  cfg = synthetic.SyntheticConfig().validate()
  worlds = cfg.worlds_for(num_pairs)
  print(f"\n[world] write_dataset('cvusa', {num_pairs} pairs, seed {seed}) at "
        f"the library defaults ({worlds} worlds of map_cells "
        f"{cfg.map_cells}, panorama {cfg.cvusa_hw[1]}x{cfg.cvusa_hw[0]}, "
        f"tile {cfg.sat_px}px); " + _load())
  folder = tempfile.mkdtemp(prefix="bench_world_")
  parts = {"world": [], "panorama": [], "tile": []}
  try:
    with _timing(world_lib, "make_world", parts["world"]), \
        _timing(render_lib, "render_panorama", parts["panorama"]), \
        _timing(render_lib, "render_satellite", parts["tile"]):
      start = time.perf_counter()
      synthetic.write_dataset("cvusa", os.path.join(folder, "cvusa"), cfg,
                              num_pairs, seed, progress=False)
      total = time.perf_counter() - start
    size_mb = sum(os.path.getsize(os.path.join(d, f))
                  for d, _, names in os.walk(folder) for f in names) / 2**20
  finally:
    shutil.rmtree(folder)
  if len(parts["world"]) != worlds or len(parts["panorama"]) != num_pairs:
    raise AssertionError(
        f"Timed {len(parts['world'])} worlds and {len(parts['panorama'])} "
        f"panoramas, expected {worlds} and {num_pairs}: write_dataset no "
        f"longer calls make_world / render_panorama through their modules.")
  spent = {k: sum(v) for k, v in parts.items()}
  rest = total - sum(spent.values())
  print(f"  total {total:.1f} s = {num_pairs / total:.2f} pairs/s "
        f"({size_mb:.0f} MiB on disk)")
  print(f"  worlds {spent['world']:.1f} s ({spent['world'] / worlds:.2f} s "
        f"each), panoramas {spent['panorama']:.1f} s, tiles "
        f"{spent['tile']:.1f} s, rest (placement, JPEG encode + write, "
        f"truth file) {rest:.1f} s")
  if num_pairs < _RECORD_PAIRS:
    per_pair = (total - spent["world"]) / num_pairs
    guess = (cfg.worlds_for(_RECORD_PAIRS) * spent["world"] / worlds +
             _RECORD_PAIRS * per_pair)
    print(f"  EXTRAPOLATED, not measured: {_RECORD_PAIRS} pairs "
          f"({cfg.worlds_for(_RECORD_PAIRS)} worlds) ~ {guess:.0f} s "
          f"= {guess / 60:.1f} min")
  print("  " + _load())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sections = [s.strip() for s in _SECTIONS.value]
  bad = [s for s in sections if s not in SECTIONS]
  if bad or not sections:
    raise app.UsageError(f"--sections={','.join(_SECTIONS.value)}: expected "
                         f"some of {SECTIONS}.")
  pano_hw = _ints(_PANO_HW, 2)
  if pano_hw[0] > pano_hw[1] // 2:
    raise app.UsageError(f"--pano_hw={pano_hw}: height must be <= width / 2 "
                         "(an equirectangular band).")
  out_hw = _ints(_OUT_HW, 2)
  threads = _ints(_GRAIN_THREADS, len(_GRAIN_THREADS.value))
  demo_cfg = (demo_synthetic_config(_DEMO_CONFIG.value)
              if "render" in sections else None)
  rounds = _ROUNDS.value
  print(f"benchmarks/data.py: sections {sections}, {rounds} rounds; "
        f"{os.cpu_count()} CPUs; " + _load())
  start = time.perf_counter()
  if "render" in sections:
    bench_render(demo_cfg, rounds, _RENDER_PAIRS.value)
  if "decode" in sections:
    bench_decode(rounds, pano_hw, _TILE_PX.value, out_hw,
                 _DECODE_FILES.value, _DECODE_IMAGES.value,
                 _DECODE_BATCH.value, threads)
  if "augment" in sections:
    bench_augment(rounds, _AUGMENT_SIZE.value, _AUGMENT_BATCH.value)
  if "world" in sections:
    bench_world(_WORLD_PAIRS.value, _WORLD_SEED.value)
  print(f"\ndone in {time.perf_counter() - start:.0f} s; " + _load())


if __name__ == "__main__":
  app.run(main)
