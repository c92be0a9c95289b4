r"""Our on-device augmentations against dm-pix's, op by op (issue #21).

dm-pix is not a dependency; install it beside the project's venv without
touching it, then run:

  .venv/bin/pip install -q --target /tmp/dmpix_lib dm-pix chex
  .venv/bin/python benchmarks/dm_pix_compare.py --lib=/tmp/dmpix_lib

Prints the largest absolute difference of each op on a random [32, 48, 3]
image in [0, 1] (BUILD_NOTES.md: which ops we keep by hand and why).
"""

import sys

from absl import app
from absl import flags

flags.DEFINE_string("lib", "/tmp/dmpix_lib", "Folder where dm-pix is installed "
                    "(appended to sys.path, after the venv's jax).")
FLAGS = flags.FLAGS


def main(_):
  sys.path.append(FLAGS.lib)
  import dm_pix as pix  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cvgl_jax.data import augment  # pylint: disable=g-import-not-at-top

  x = jax.random.uniform(jax.random.key(0), (32, 48, 3))
  hue = max(float(jnp.abs(augment._adjust_hue(x, d)  # pylint: disable=protected-access
                          - pix.adjust_hue(x, d)).max())
            for d in (-0.3, -0.1, 0.05, 0.2, 0.45))
  print(f"hue shift (5 deltas): max |ours - dm-pix| = {hue:.1e}")

  # cv2's 3x3 Gaussian with sigma 0 is the fixed (1/4, 1/2, 1/4) kernel with
  # a reflect-101 border; dm-pix derives the kernel from sigma (0.8 is what
  # cv2's formula gives for a 3-tap kernel) and pads with zeros.
  blur = jnp.abs(augment._blur3(x)  # pylint: disable=protected-access
                 - pix.gaussian_blur(x, sigma=0.8, kernel_size=3))
  print(f"3x3 blur: interior {float(blur[1:-1, 1:-1].max()):.3f}, "
        f"border {float(blur.max()):.3f}")

  # The shift/scale/rotate warp: bilinear, zero outside. dm-pix maps output
  # (row, col) to input coordinates, ours (x, y) forward.
  m = augment._affine_matrix(  # pylint: disable=protected-access
      jnp.array([0.7, 0.2, 0.9, 0.3, 0.0]),
      augment.Affine(p=1.0, shift=0.1, scale=0.1, rotate=20.0), 32, 48)
  swap = jnp.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])
  inv = swap @ jnp.linalg.inv(m) @ swap
  mat = (jnp.eye(4).at[:2, :2].set(inv[:2, :2]).at[:2, 3].set(inv[:2, 2]))
  warp = jnp.abs(augment._warp(x, m)  # pylint: disable=protected-access
                 - pix.affine_transform(x, mat, order=1, mode="constant",
                                        cval=0.0)).max(-1)
  print(f"affine warp: interior {float(warp[8:-8, 8:-8].max()):.1e}, "
        f"{int((warp > 1e-5).sum())} of {warp.size} pixels differ by > 1e-5 "
        f"(max {float(warp.max()):.2f})")


if __name__ == "__main__":
  app.run(main)
