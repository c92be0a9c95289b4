r"""Depthwise 7x7 convolution, forward + backward, at ConvNeXt's stage shapes.

Times, round robin in one process, at each stage's [B, H, W, C]:
  native     ours on CPU (`depthwise.depthwise_native`: the C++ kernel
             compiled on first use, called through XLA's FFI);
  shifts     the pure-XLA path (`depthwise.depthwise_shifts`: shifted-sum
             forward, hand-written VJP whose kernel gradient is one variadic
             reduction per example), what "auto" falls back to without a
             compiler;
  tap_sums   the same VJP with the kernel gradient as k*k separate sums
             per example (what `shifts` replaced);
  conv       XLA's grouped convolution and its autodiff gradient;
  torch      `F.conv2d(groups=C)` forward + backward, channels-last, when
             PyTorch is importable.
Checks that all give the same gradients; prints medians in ms and each
variant's time relative to `native` (> 1: slower than ours).

  python benchmarks/depthwise.py                 # ConvNeXt-T, 16 x 128x512
  python benchmarks/depthwise.py --batch=8 --torch=false
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# pylint: disable=g-import-not-at-top,wrong-import-position,protected-access
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cvgl_jax.cpu import depthwise
import timing
import torch_reference

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 16, "Examples.")
flags.DEFINE_list("image", ["128", "512"], "Input image H,W (stem stride 4).")
flags.DEFINE_list("dims", ["96", "192", "384", "768"],
                  "Channels of stages 0-3 (ConvNeXt-T).")
flags.DEFINE_integer("rounds", 5, "Round-robin rounds.")
flags.DEFINE_bool("torch", True, "Time PyTorch's grouped conv too.")

K = 7


def _tap_sums_bwd(res, dy):
  """The VJP of `depthwise_shifts` with the kernel gradient as k*k sums."""
  x, kernel = res
  pad = K // 2
  h, w = x.shape[1:3]
  dx = depthwise._shifted_sum(dy, kernel[::-1, ::-1])
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def add_example(acc, example):
    xe, dye = example
    taps = [jnp.sum(xe[i:i + h, j:j + w] * dye, axis=(0, 1))
            for i in range(K) for j in range(K)]
    return acc + jnp.stack(taps), None

  dk, _ = jax.lax.scan(add_example, jnp.zeros((K * K, x.shape[-1])),
                       (xp, dy))
  return dx, dk.reshape(kernel.shape)


tap_sums = jax.custom_vjp(depthwise._shifted_sum)
tap_sums.defvjp(lambda x, k: (depthwise._shifted_sum(x, k), (x, k)),
                _tap_sums_bwd)


def grouped_conv(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], (1, 1), [(K // 2, K // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


def jax_fn(conv, x, kernel, dy):
  """run() of conv's forward + VJP, and its (y, dx, dkernel)."""
  @jax.jit
  def fwd_bwd(x, kernel, dy):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y,) + vjp(dy)
  out = jax.block_until_ready(fwd_bwd(x, kernel, dy))
  return (lambda: jax.block_until_ready(fwd_bwd(x, kernel, dy))), out


def torch_fn(x, kernel, dy):
  """run() of torch's channels-last grouped conv forward + backward."""
  import torch
  import torch.nn.functional as F
  c = x.shape[-1]
  xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
  xt = xt.contiguous(memory_format=torch.channels_last).requires_grad_()
  kt = torch.from_numpy(np.asarray(kernel)).permute(2, 0, 1)[:, None]
  kt = kt.contiguous().requires_grad_()
  dyt = torch.from_numpy(np.asarray(dy)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)

  def run():
    xt.grad = kt.grad = None
    F.conv2d(xt, kt, padding=K // 2, groups=c).backward(dyt)
  run()
  return run, (np.asarray(xt.grad.permute(0, 2, 3, 1)),
               np.asarray(kt.grad[:, 0].permute(1, 2, 0)))


def main(argv):
  del argv
  h, w = (int(v) // 4 for v in FLAGS.image)
  rng = np.random.default_rng(0)
  if not depthwise.available():
    raise SystemExit("The native kernel did not build (see the warning).")
  convs = {"native": depthwise.depthwise_native,
           "shifts": depthwise.depthwise_shifts, "tap_sums": tap_sums,
           "conv": grouped_conv}
  names = list(convs)
  use_torch = FLAGS.torch and torch_reference.available()
  if use_torch:
    names.append("torch")
  print(f"depthwise {K}x{K} fwd+bwd, batch {FLAGS.batch}; jax "
        f"{jax.__version__} on {jax.default_backend()}, {os.cpu_count()} "
        "CPUs, load %.2f %.2f %.2f" % os.getloadavg())
  for stage, c in enumerate(int(d) for d in FLAGS.dims):
    shape = (FLAGS.batch, h >> stage, w >> stage, c)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    dy = jnp.asarray(rng.standard_normal(shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal((K, K, c), np.float32) * 0.1)
    runs, outs = {}, {}
    for name, conv in convs.items():
      runs[name], outs[name] = jax_fn(conv, x, kernel, dy)
    if use_torch:
      runs["torch"], (dx, dk) = torch_fn(x, kernel, dy)
      outs["torch"] = (None, dx, dk)
    for name in names[1:]:  # Every variant computes the same gradients.
      for got, want in zip(outs[name][1:], outs["native"][1:]):
        np.testing.assert_allclose(got, want, rtol=2e-3,
                                   atol=2e-3 * float(jnp.abs(want).max()))
    times = timing.round_robin(runs, FLAGS.rounds)
    ms = {n: 1e3 * t for n, t in timing.medians(times).items()}
    print(f"stage {stage} {'x'.join(map(str, shape))}: " + ", ".join(
        f"{n} {ms[n]:.1f} ms ({ms[n] / ms['native']:.2f}x)"
        for n in names))


if __name__ == "__main__":
  app.run(main)
