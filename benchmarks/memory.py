r"""Device memory of one training step, from the compiled step itself.

  python benchmarks/memory.py --dataset=cvusa --batches=8,16 \
      --modes=float32,bfloat16,bfloat16+remat [--stage=cross] [--variant=base]

For each per-device batch and mode, builds the step the stages run
(`steps.make_cross_step`, or `make_intra_step`: four tower passes per
row) for the paper's model (ConvNeXt --variant towers + SAFA, drop path
0.2, AdamW) at the dataset's image sizes on ONE device, compiles it
without running it (`jit(...).lower(...).compile()`) and prints XLA's
`memory_analysis()`: the arguments (params, optimizer state, batch), the
temporaries (activations kept for the backward pass and workspace) and
their sum, the peak a device must hold. A global batch of G on D devices
is a per-device batch of G / D. Compiled here for the host's backend
(XLA:CPU without an accelerator): an accelerator's fusion decisions
differ, so read the figures as the size of what the step keeps, to a few
tens of percent, not as an allocator's exact peak.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax.data import augment
from cvgl_jax.models import encoder
from cvgl_jax.train import state as state_lib
from cvgl_jax.train import steps

_DATASET = flags.DEFINE_enum("dataset", "cvusa", ["cvusa", "cvact", "vigor"],
                             "whose image sizes")
_BATCHES = flags.DEFINE_list("batches", ["8", "16", "32"],
                             "per-device batch sizes")
_MODES = flags.DEFINE_list("modes", ["float32", "bfloat16",
                                     "bfloat16+remat"],
                           "dtype, +remat to recompute each block")
_STAGE = flags.DEFINE_enum("stage", "cross", ["cross", "intra"],
                           "cross: stages 2-3 and supervised; intra: stage 1")
_VARIANT = flags.DEFINE_string("variant", "base", "ConvNeXt variant")

GIB = 1 << 30


def step_memory(dataset: str, batch: int, mode: str, stage: str,
                variant: str) -> dict:
  config = config_lib.for_dataset(dataset)
  config.model.variant = variant
  config.model.dtype, _, remat = mode.partition("+")
  config.model.remat = bool(remat)
  model = encoder.from_config(config.model)
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = state_lib.create_optimizer(1e-4, 0.01, 100, 10)
  g_size, s_size = config.data.ground_size, config.data.satellite_size
  state = state_lib.create_state(model, tx, ground_size=g_size,
                                 satellite_size=s_size, seed=0, mesh=mesh)
  make = steps.make_intra_step if stage == "intra" else steps.make_cross_step
  step = make(model, tx, mesh, label_smoothing=0.1,
              **augment.from_config(config.augment, stage == "intra"))
  sharding = parallel.batch_sharding(mesh)
  batch_shapes = {
      "ground": jax.ShapeDtypeStruct((batch, *g_size, 3), jnp.uint8,
                                     sharding=sharding),
      "satellite": jax.ShapeDtypeStruct((batch, *s_size, 3), jnp.uint8,
                                        sharding=sharding)}
  start = time.perf_counter()
  compiled = step.jitted.lower(state, batch_shapes).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  args, temp, out = (m.argument_size_in_bytes, m.temp_size_in_bytes,
                     m.output_size_in_bytes)
  alias = getattr(m, "alias_size_in_bytes", 0)
  return {"args": args / GIB, "temp": temp / GIB,
          "peak": (args + temp + out - alias) / GIB, "compile_s": seconds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(f"benchmarks/memory.py: {_DATASET.value}, stage {_STAGE.value}, "
        f"ConvNeXt-{_VARIANT.value} + SAFA, backend "
        f"{jax.default_backend()}")
  print("| per-device batch | mode | arguments GiB | temporaries GiB | "
        "peak GiB | compile s |")
  print("| --- | --- | --- | --- | --- | --- |")
  for batch in (int(b) for b in _BATCHES.value):
    for mode in _MODES.value:
      r = step_memory(_DATASET.value, batch, mode, _STAGE.value,
                      _VARIANT.value)
      print(f"| {batch} | {mode} | {r['args']:.2f} | {r['temp']:.2f} | "
            f"{r['peak']:.2f} | {r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
