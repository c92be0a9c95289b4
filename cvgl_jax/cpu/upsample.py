"""The CycleGAN's stride-2 transposed convolution as a sub-pixel convolution.

PyTorch's `ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`
(the official generator's two upsampling layers) is, in XLA, a convolution
over the input dilated with zeros: three quarters of its multiply-adds,
and of its kernel gradient's, are on zeros, and XLA:CPU does not skip them
(`benchmarks/translate.py`; BUILD_NOTES.md: 14.5x slower forward and
backward at the authors' 256 -> 128 channels, 40 x 40). The same map is one
2 x 2 convolution on the undilated input with 4 x the output channels, one
per output phase (row parity, column parity), followed by depth-to-space:
output row 2i takes kernel row 1 at input row i; row 2i + 1 takes kernel
rows 0 and 2 at input rows i and i + 1 (likewise for columns). The kernel
layout is unchanged, so checkpoints and `translate.from_official` are
shared by both forms; results agree to float rounding
(tests/test_translate.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

# For output phase p (0: even rows, 1: odd rows), the kernel row used at
# input offset 0 and at offset +1 (None: no tap).
_TAPS = {0: (1, None), 1: (0, 2)}


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """[3, 3, in, out] transposed-conv kernel -> [2, 2, in, 4 * out] kernel of
  the equivalent convolution, output channels ordered (row phase, column
  phase, out)."""
  zero = jnp.zeros_like(kernel[0, 0])
  rows = []
  for dy in range(2):
    cols = []
    for dx in range(2):
      phases = [zero if _TAPS[a][dy] is None or _TAPS[b][dx] is None
                else kernel[_TAPS[a][dy], _TAPS[b][dx]]
                for a in range(2) for b in range(2)]
      cols.append(jnp.concatenate(phases, axis=-1))
    rows.append(jnp.stack(cols))
  return jnp.stack(rows)


def conv_transpose_subpixel(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """[N, H, W, in] -> [N, 2H, 2W, out]: ConvTranspose2d(3, 2, 1, 1) of
  `kernel` ([3, 3, in, out], flax's unflipped layout), without bias."""
  n, h, w, _ = x.shape
  out = kernel.shape[-1]
  y = jax.lax.conv_general_dilated(
      jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))),
      subpixel_kernel(kernel).astype(x.dtype), (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y.reshape(n, h, w, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h, 2 * w, out)


def for_impl(impl: str) -> Optional[Callable[[jax.Array, jax.Array],
                                             jax.Array]]:
  """The upsampling convolution `impl` means on the default backend:
  `conv_transpose_subpixel`, or None for XLA's transposed convolution.

  Args:
    impl: one of `cvgl_jax.cpu.UPSAMPLE_IMPLS`: "auto" (sub-pixel on the
      CPU, where it was measured; XLA's transposed convolution elsewhere),
      "transpose" or "subpixel".
  """
  if impl == "auto":
    impl = "subpixel" if jax.default_backend() == "cpu" else "transpose"
  return conv_transpose_subpixel if impl == "subpixel" else None
