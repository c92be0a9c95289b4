r"""A large contrastive batch in the memory of a small one: the gradient cache.

  python benchmarks/grad_cache.py [--batch=128 --chunk=16] [--rounds=5] \
      [--model=benchmark|base384] [--time=true]

Builds the cross-view step the stages run (`steps.make_cross_step`, with
the config's augmentation and drop path) on ONE device three ways:

  plain B      the one-pass step at the large batch (--batch)
  cached B/K   the same batch, gradient in chunks of K rows (--chunk):
               `train.grad_cache_chunk`
  plain K      the one-pass step at the small batch, what a user without
               the cache falls back to

and prints, for each, XLA's `memory_analysis()` of the compiled step
(arguments, temporaries, peak) and -- with --time -- the median seconds
per sample over --rounds round-robin rounds (one step per variant and
round, after a warm-up step), and the ratios cached / plain at the same
batch. Models:

  benchmark  the synthetic benchmark's (`config_lib.synthetic_demo`: a
             4-stage ConvNeXt of 32-128 channels + SAFA, 32x128 / 64x64)
  base384    the paper's ConvNeXt-B + SAFA at CVUSA's 384 sizes (compile
             only on a CPU: one step of batch 128 takes minutes)

Compiled for this host's backend: an accelerator fuses differently, so
read the bytes as what the step keeps, to some tens of percent.
"""

from __future__ import annotations

import statistics

from absl import app
from absl import flags
import jax
import numpy as np

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax.data import augment
from cvgl_jax.models import encoder
from cvgl_jax.train import state as state_lib
from cvgl_jax.train import steps

import timing

_BATCH = flags.DEFINE_integer("batch", 128, "the large global batch")
_CHUNK = flags.DEFINE_integer("chunk", 16, "rows per chunk (the small batch)")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "timing rounds")
_MODEL = flags.DEFINE_enum("model", "benchmark", ["benchmark", "base384"],
                           "which model and image sizes")
_TIME = flags.DEFINE_bool("time", True, "time the steps (else memory only)")

MIB = 1 << 20


def model_config(name: str):
  if name == "benchmark":
    return config_lib.synthetic_demo()
  config = config_lib.paradigm("cvusa")
  config.model.variant = "base"
  return config


def build(config, batch: int, chunk: int):
  """(step, state, batch arrays, memory analysis) of one variant."""
  model = encoder.from_config(config.model)
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = state_lib.create_optimizer(1e-4, 0.01, 100, 10)
  g_size, s_size = config.data.ground_size, config.data.satellite_size
  state = state_lib.create_state(model, tx, ground_size=g_size,
                                 satellite_size=s_size, seed=0, mesh=mesh)
  step = steps.make_cross_step(model, tx, mesh, label_smoothing=0.1,
                               grad_cache_chunk=chunk,
                               **augment.from_config(config.augment, False))
  rng = np.random.default_rng(0)
  host = {"ground": rng.integers(0, 256, (batch, *g_size, 3), np.uint8),
          "satellite": rng.integers(0, 256, (batch, *s_size, 3), np.uint8)}
  arrays = parallel.to_global(host, mesh)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
            for k, v in arrays.items()}
  memory = step.jitted.lower(state, shapes).compile().memory_analysis()
  return step, state, arrays, memory


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  big, chunk = _BATCH.value, _CHUNK.value
  config = model_config(_MODEL.value)
  variants = {f"plain {big}": (big, 0), f"cached {big}/{chunk}": (big, chunk),
              f"plain {chunk}": (chunk, 0)}
  built = {name: build(config, *args) for name, args in variants.items()}
  print(f"benchmarks/grad_cache.py: model {_MODEL.value} "
        f"({config.model.variant}, {tuple(config.data.ground_size)} / "
        f"{tuple(config.data.satellite_size)}, drop path "
        f"{config.model.drop_path_rate}), one {jax.devices()[0].platform} "
        f"device")
  rows = {}
  for name, (_, _, _, m) in built.items():
    alias = getattr(m, "alias_size_in_bytes", 0)
    rows[name] = {
        "args": m.argument_size_in_bytes / MIB,
        "temp": m.temp_size_in_bytes / MIB,
        "peak": (m.argument_size_in_bytes + m.temp_size_in_bytes
                 + m.output_size_in_bytes - alias) / MIB}
  if _TIME.value:
    states = {name: b[1] for name, b in built.items()}

    def run(name):
      step, _, arrays, _ = built[name]
      def once():
        states[name], metrics = step(states[name], arrays)
        jax.block_until_ready(metrics)
      return once
    times = timing.round_robin({n: run(n) for n in built}, _ROUNDS.value,
                               warmup=1)
    for name, ts in times.items():
      per_sample = [t / variants[name][0] for t in ts]
      rows[name]["ms_per_sample"] = 1e3 * statistics.median(per_sample)
  print("| step | arguments MiB | temporaries MiB | peak MiB |"
        + (" ms / sample |" if _TIME.value else ""))
  print("| --- | --- | --- | --- |" + (" --- |" if _TIME.value else ""))
  for name, r in rows.items():
    print(f"| {name} | {r['args']:,.1f} | {r['temp']:,.1f} | {r['peak']:,.1f} |"
          + (f" {r['ms_per_sample']:.2f} |" if _TIME.value else ""))
  plain, cached, small = (rows[n] for n in variants)
  print(f"cached {big}/{chunk}: temporaries {cached['temp'] / plain['temp']:.2f}x "
        f"plain {big}'s, {cached['temp'] / small['temp']:.2f}x plain "
        f"{chunk}'s; peak {cached['peak'] / small['peak']:.2f}x plain "
        f"{chunk}'s")
  if _TIME.value:
    print(f"time per sample: cached {big}/{chunk} "
          f"{cached['ms_per_sample'] / plain['ms_per_sample']:.2f}x plain "
          f"{big}, {cached['ms_per_sample'] / small['ms_per_sample']:.2f}x "
          f"plain {chunk}")


if __name__ == "__main__":
  app.run(main)
