r"""One training step of the two-tower ConvNeXt + SAFA: ours vs PyTorch/timm.

A step is forward + backward + AdamW on a batch of (ground, satellite)
pairs: two separate ConvNeXt towers with SAFA heads (the paper's model),
symmetric InfoNCE with label smoothing, drop path 0.2, float32. The PyTorch
baseline is timm's ConvNeXt with the authors' SAFA module, timed in the same
process, round-robin with ours; medians are reported.

  python benchmarks/encoder_step.py --variant=tiny --size=128 --batch=8

torch and timm are needed only for the baseline (`torch_reference.py`, the
model shared with `train_step.py`); without them only our step is timed.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvgl_jax.models import convnext
from cvgl_jax.models import encoder
from cvgl_jax.train import losses
import timing
import torch_reference

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "tiny", "ConvNeXt size.")
flags.DEFINE_integer("size", 128, "Image side (ground and satellite).")
flags.DEFINE_integer("batch", 8, "Pairs per step.")
flags.DEFINE_integer("rounds", 5, "Round-robin rounds.")
flags.DEFINE_integer("steps", 2, "Timed steps per variant per round.")

LABEL_SMOOTHING = 0.1
DROP_PATH = 0.2


def jax_step_fn(variant, size, batch):
  """Returns (step(), description) running our jitted step on fixed data."""
  model = encoder.TwoTower(variant=variant, head="safa",
                           drop_path_rate=DROP_PATH)
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  s = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  params = model.init(jax.random.key(0), g, s)["params"]
  tx = optax.adamw(1e-4, weight_decay=0.01)
  state = {"params": params, "opt": tx.init(params), "step": jnp.int32(0)}

  @jax.jit
  def step(state, g, s):
    key = jax.random.fold_in(jax.random.key(1), state["step"])

    def loss_fn(p):
      zq, zr, t = model.apply({"params": p}, g, s, train=True,
                              rngs={"dropout": key})
      return losses.info_nce(zq, zr, t, LABEL_SMOOTHING)[0]

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt": opt, "step": state["step"] + 1}, loss

  holder = [state]

  def run():
    holder[0], loss = step(holder[0], g, s)
    loss.block_until_ready()
  return run


def torch_step_fn(variant, size, batch):
  """Returns step() for the same model in PyTorch/timm, or None."""
  if not torch_reference.available():
    return None
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  towers, logit_scale = torch_reference.two_tower(variant, (size, size),
                                                  (size, size), DROP_PATH)
  opt = torch_reference.adamw(towers, logit_scale)
  g = torch.randn(batch, 3, size, size)
  s = torch.randn(batch, 3, size, size)

  def run():
    torch_reference.train_step(towers, logit_scale, opt, g, s,
                               LABEL_SMOOTHING)
  return run


def main(argv):
  del argv
  convnext.get_variant(FLAGS.variant)
  variants = {"jax": jax_step_fn(FLAGS.variant, FLAGS.size, FLAGS.batch)}
  torch_run = torch_step_fn(FLAGS.variant, FLAGS.size, FLAGS.batch)
  if torch_run is None:
    print("torch/timm not importable: timing ours only.")
  else:
    import torch  # pylint: disable=g-import-not-at-top
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    variants["torch"] = torch_run
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"ConvNeXt-{FLAGS.variant} x2 + SAFA, {FLAGS.size}px, "
        f"batch {FLAGS.batch} pairs")
  for run in variants.values():  # Compile / warm up.
    run()
    run()
  times = timing.round_robin(variants, FLAGS.rounds, FLAGS.steps)
  med = timing.medians(times)
  for name, t in med.items():
    print(f"{name:6s} {t * 1e3:9.1f} ms/step  {FLAGS.batch / t:7.2f} pairs/s "
          f" (min {min(times[name]) * 1e3:.1f}, max "
          f"{max(times[name]) * 1e3:.1f} ms)")
  if "torch" in med:
    print(f"speed-up of ours over torch/timm: {med['torch'] / med['jax']:.2f}x")


if __name__ == "__main__":
  app.run(main)
