r"""The accelerator benchmark: one command, one table, under 8 minutes.

  python benchmarks/accelerator.py           # the paper's sizes, on a GPU/TPU
  python benchmarks/accelerator.py --tiny    # tiny sizes: the CPU path (CI)

Each row times ours against a baseline in the same run, round-robin
(`timing.round_robin`, medians), and prints the ratio:

  train step   the two-tower cross-view step the stages run
               (`steps.make_cross_step`: paired augmentation on the device,
               ConvNeXt-B + SAFA at CVUSA's 384 x 384, bf16, drop path 0.2,
               AdamW) at --batch rows per device, against the same step
               with the gradient cache (`train.grad_cache_chunk`) at
               --cache_batch rows per device in chunks of --batch: pairs/s,
               and MFU -- the model FLOPs of a plain step per pair (XLA's
               `cost_analysis()` of the compiled plain step, so the cache's
               second forward counts as overhead, not as work) times
               pairs/s over the devices' peak dense bf16 FLOP/s
               (`PEAK_TFLOPS`; "-" for a device not in the table), and the
               peak bytes of each compiled step (`memory_analysis()`).
  CFP          `geometry.project_uint8` on the device, batches of --cfp_batch
               CVUSA panoramas (1232 x 224 crop -> 750 x 750): host arrays
               in and out (what the stage does), and device-resident;
               against `cv2.remap` per image on the host.
  refine       `refine(backend="exact")` (jitted chunked matmul + top-k on
               the device) at N = --refine_n pairs x --refine_dim, against
               the authors' chunked NumPy matching on the host
               (`benchmarks/refine.py`'s `authors_chunk`), with their
               agreement.

--tiny swaps in a 2-stage ConvNeXt of 8-16 channels at 32 x 64 / 32 x 32
in float32 with the augmentation probabilities at 0 (compiling the warps
would dominate), small panoramas and N = 1,024 x 64, so that CI runs every
path on its CPU in well under a minute. Every figure is for the first device's kind, named
in the table's title.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import cv2
import jax
import numpy as np

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax.cfp import geometry
from cvgl_jax.data import augment
from cvgl_jax.models import encoder
from cvgl_jax.pseudo import refine as refine_lib
from cvgl_jax.train import state as state_lib
from cvgl_jax.train import steps

import refine as refine_benchmark
import timing

_TINY = flags.DEFINE_bool("tiny", False, "tiny sizes (the CPU path, CI)")
_BATCH = flags.DEFINE_integer("batch", 32, "rows per device of the plain "
                              "step, and the gradient cache's chunk")
_CACHE_BATCH = flags.DEFINE_integer("cache_batch", 128, "rows per device of "
                                    "the gradient-cached step")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "timing rounds")
_CFP_BATCH = flags.DEFINE_integer("cfp_batch", 32, "panoramas per CFP batch")
_REFINE_N = flags.DEFINE_integer("refine_n", 35_532, "refine: pairs (CVUSA "
                                 "train)")
_REFINE_DIM = flags.DEFINE_integer("refine_dim", 1024, "refine: dimensions")

# Peak dense bf16 FLOP/s (10^12) by device kind (the vendors' data sheets,
# without sparsity). Matched by substring of `device_kind`, first match.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L4", 121.0),
    ("L40S", 362.0), ("A10G", 70.0), ("RTX 4090", 165.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)
MIB = 1 << 20


def peak_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # One entry per program on old jax.
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def _peak_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes
          + m.output_size_in_bytes - getattr(m, "alias_size_in_bytes", 0))


def train_config(tiny: bool):
  config = config_lib.paradigm("cvusa")
  config.model.variant = "base"
  config.model.dtype = "bfloat16"
  if tiny:
    config.model.variant = "custom"
    config.model.depths, config.model.dims = (1, 1), (8, 16)
    config.model.head = "gap"
    config.data.ground_size, config.data.satellite_size = (32, 64), (32, 32)
    config.model.dtype = "float32"
    # What the towers see does not matter here: skip compiling the warps.
    for key in ("dropout_p", "jitter_p", "grayscale_p", "blur_p", "warp_p",
                "paired_flip_p", "paired_rotate_p"):
      config.augment[key] = 0.0
  return config


def train_rows(tiny: bool, batch: int, cache_batch: int, rounds: int):
  """The plain and the gradient-cached step: [(name, value, baseline,
  ratio)] rows."""
  config = train_config(tiny)
  mesh = parallel.make_mesh()
  n_dev = mesh.devices.size
  model = encoder.from_config(config.model)
  tx = state_lib.create_optimizer(1e-4, 0.01, 100, 10)
  g_size, s_size = config.data.ground_size, config.data.satellite_size
  rng = np.random.default_rng(0)
  variants = {"plain": (batch * n_dev, 0),
              "cached": (cache_batch * n_dev, batch * n_dev)}
  built = {}
  for name, (rows, chunk) in variants.items():
    state = state_lib.create_state(model, tx, ground_size=g_size,
                                   satellite_size=s_size, seed=0, mesh=mesh)
    step = steps.make_cross_step(model, tx, mesh, label_smoothing=0.1,
                                 grad_cache_chunk=chunk,
                                 **augment.from_config(config.augment, False))
    batch_arrays = parallel.to_global(
        {"ground": rng.integers(0, 256, (rows, *g_size, 3), np.uint8),
         "satellite": rng.integers(0, 256, (rows, *s_size, 3), np.uint8)},
        mesh)
    start = time.perf_counter()
    compiled = step.jitted.lower(state, batch_arrays).compile()
    built[name] = dict(step=step, state=state, batch=batch_arrays, rows=rows,
                       flops=_flops(compiled), peak=_peak_bytes(compiled),
                       compile_s=time.perf_counter() - start)

  def run(name):
    b = built[name]
    def once():
      b["state"], metrics = b["step"](b["state"], b["batch"])
      jax.block_until_ready(metrics["loss"])
    return once
  times = timing.medians(timing.round_robin(
      {name: run(name) for name in built}, rounds, calls=2, warmup=1))
  plain, cached = built["plain"], built["cached"]
  model_flops_per_pair = plain["flops"] / plain["rows"]
  peak = peak_tflops(jax.devices()[0].device_kind)
  rate = {name: built[name]["rows"] / times[name] for name in built}
  mfu = {name: (f"{100 * model_flops_per_pair * rate[name] / (peak * 1e12 * n_dev):.1f} %"
                if peak and model_flops_per_pair else "-") for name in built}
  variant = ("custom 8-16" if tiny else "ConvNeXt-B + SAFA")
  what = (f"{variant} {g_size[0]}x{g_size[1]} / {s_size[0]}x{s_size[1]}, "
          f"{config.model.dtype}")
  return [
      (f"train step, {what}: pairs/s, gradient cache {cache_batch}/{batch} "
       f"per device vs plain {batch}",
       f"{rate['cached']:.1f}", f"{rate['plain']:.1f}",
       f"{rate['cached'] / rate['plain']:.2f}x"),
      ("train step: MFU (model FLOPs of the plain step; cached, plain)",
       mfu["cached"], mfu["plain"], "-"),
      ("train step: peak MiB per device (cached, plain)",
       f"{cached['peak'] / MIB / n_dev:,.0f}",
       f"{plain['peak'] / MIB / n_dev:,.0f}",
       f"{cached['peak'] / plain['peak']:.2f}x"),
      ("train step: compile s (cached, plain)", f"{cached['compile_s']:.0f}",
       f"{plain['compile_s']:.0f}", "-"),
  ]


def cfp_rows(tiny: bool, batch: int, rounds: int):
  """Batched projection on the device vs cv2.remap on the host."""
  pano_hw, out_size = ((56, 308), 64) if tiny else ((224, 1232), 750)
  crop_top = geometry.cvusa_crop_top(pano_hw)
  rng = np.random.default_rng(0)
  panos = rng.integers(0, 256, (batch, *pano_hw, 3), np.uint8)
  plan = jax.device_put(geometry.bev_plan(pano_hw, out_size,
                                          geometry.CVUSA_FOV_DEG, crop_top))
  on_device = jax.device_put(panos)
  grid = geometry.bev_grid(pano_hw, out_size, geometry.CVUSA_FOV_DEG,
                           crop_top)
  map1, map2 = cv2.convertMaps(np.ascontiguousarray(grid[..., 0]),
                               np.ascontiguousarray(grid[..., 1]),
                               cv2.CV_16SC2)
  variants = {
      "host": lambda: np.asarray(geometry.project_uint8(panos, plan)),
      "device": lambda: jax.block_until_ready(
          geometry.project_uint8(on_device, plan)),
      "remap": lambda: [cv2.remap(p, map1, map2, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT)
                        for p in panos],
  }
  ours, theirs = np.asarray(variants["host"]()), np.stack(variants["remap"]())
  # cv2's fixed-point weights (1/32) against our float ones: a grey level.
  mean_diff = float(np.abs(ours.astype(np.float32) - theirs).mean())
  times = timing.medians(timing.round_robin(variants, rounds, calls=2,
                                            warmup=1))
  rate = {k: batch / t for k, t in times.items()}
  size = f"{pano_hw[1]}x{pano_hw[0]} -> {out_size}x{out_size}"
  return [
      (f"CFP {size}: images/s, ours (host arrays in/out) vs cv2.remap",
       f"{rate['host']:.0f}", f"{rate['remap']:.0f}",
       f"{rate['host'] / rate['remap']:.2f}x"),
      (f"CFP: images/s, ours device-resident vs cv2.remap (mean abs. "
       f"difference {mean_diff:.2f} grey levels)", f"{rate['device']:.0f}",
       f"{rate['remap']:.0f}", f"{rate['device'] / rate['remap']:.2f}x"),
  ]


def refine_rows(n: int, dim: int):
  """Exact refinement on the device vs the authors' chunked NumPy."""
  g, s = refine_benchmark.embeddings(n, dim, seed=0)
  settings = refine_lib.RefineSettings(tau=refine_benchmark.TAU, epochs=40,
                                       backend="exact")
  refine_lib.refine(g[:256], s[:256], 0, settings)  # Compile the kernels.
  start = time.perf_counter()
  ours = refine_lib.refine(g, s, 0, settings).pairs
  ours_s = time.perf_counter() - start
  start = time.perf_counter()
  theirs = refine_benchmark.authors_chunk(g, s, refine_benchmark.TAU)
  theirs_s = time.perf_counter() - start
  key = lambda pairs: {tuple(p) for p in np.asarray(pairs).tolist()}
  agree = len(key(ours) & key(theirs)) / max(1, len(key(theirs)))
  return [(f"refine {n:,} x {dim}: seconds, exact on the device vs the "
           f"authors' chunked NumPy ({100 * agree:.1f} % of their "
           f"{len(theirs):,} pairs)",
           f"{ours_s:.2f}", f"{theirs_s:.2f}", f"{theirs_s / ours_s:.1f}x")]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  tiny = _TINY.value
  start = time.perf_counter()
  batch, cache_batch = (4, 8) if tiny else (_BATCH.value, _CACHE_BATCH.value)
  rows = train_rows(tiny, batch, cache_batch, _ROUNDS.value)
  rows += cfp_rows(tiny, 4 if tiny else _CFP_BATCH.value, _ROUNDS.value)
  rows += refine_rows(*((1024, 64) if tiny else (_REFINE_N.value,
                                                   _REFINE_DIM.value)))
  device = jax.devices()[0]
  peak = peak_tflops(device.device_kind)
  print(f"\nbenchmarks/accelerator.py{' --tiny' if tiny else ''}: "
        f"{jax.device_count()} x {device.device_kind} ({device.platform}; "
        f"peak bf16 {f'{peak:g} TFLOP/s' if peak else 'unknown'}), jax "
        f"{jax.__version__}, {time.perf_counter() - start:.0f} s")
  print("| measure | ours | baseline | ours vs baseline |")
  print("| --- | --- | --- | --- |")
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
