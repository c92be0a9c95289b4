"""Descriptor heads on a backbone feature map [B, h, w, C].

`SAFA` is the spatial-aware feature aggregation of Shi et al. (NeurIPS 2019)
that the paper puts on both towers; `GlobalAveragePool` is timm's
`forward_head(pre_logits=True)` (average pool, then LayerNorm), the head of
Sample4Geo's shared-encoder baseline.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp



class SAFA(nn.Module):
  """Spatial-aware feature aggregation. [B, h, w, C] -> [B, num_heads * C].

  The max over channels gives one value per position (hw of them); each of
  `num_heads` two-layer linear maps (hw -> hw/2 -> hw, no activation, as the
  original) turns it into a spatial weighting; the features [C, hw] times the
  weightings [hw, num_heads] give the descriptor, flattened channel-major
  (index c * num_heads + k) as the authors' `einsum('bci,bid->bcd')`.

  The MLP's width is hw, so params fit one feature-map size only: calling
  with another size raises a ValueError naming both.

  Attributes:
    num_heads: number of spatial weightings (8 in the paper).
    stride: backbone stride, used only to name image sizes in errors.
    dtype: computation dtype.
  """
  num_heads: int = 8
  stride: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               image_hw: Optional[tuple[int, int]] = None) -> jax.Array:
    b, h, w, c = x.shape
    hw = h * w
    if self.has_variable("params", "w1"):
      built = self.get_variable("params", "w1").shape[0]
      if built != hw:
        got = f"{h}x{w} = {hw} positions"
        if image_hw is not None:
          got += f" from {image_hw[0]}x{image_hw[1]} images"
        raise ValueError(
            f"SAFA head {'/'.join(self.scope.path)} was built for feature maps of "
            f"{built} positions (e.g. {_example_size(built, self.stride)}), "
            f"but got {got}. Use the image size the params were built for, "
            "or re-initialise the head for the new size.")
    init_w = nn.initializers.normal(stddev=0.005)
    init_b = nn.initializers.constant(0.1)
    w1 = self.param("w1", init_w, (hw, hw // 2, self.num_heads))
    b1 = self.param("b1", init_b, (hw // 2, self.num_heads))
    w2 = self.param("w2", init_w, (hw // 2, hw, self.num_heads))
    b2 = self.param("b2", init_b, (hw, self.num_heads))
    x = x.astype(self.dtype).reshape(b, hw, c)
    saliency = jnp.max(x, axis=-1)  # [B, hw]
    t = jnp.einsum("bi,ijd->bjd", saliency, w1.astype(self.dtype))
    t = t + b1.astype(self.dtype)
    weights = jnp.einsum("bjd,jid->bid", t, w2.astype(self.dtype))
    weights = weights + b2.astype(self.dtype)  # [B, hw, num_heads]
    desc = jnp.einsum("bic,bid->bcd", x, weights)
    return desc.reshape(b, c * self.num_heads)


def _example_size(positions: int, stride: int) -> str:
  side = int(round(positions ** 0.5))
  if side * side == positions:
    return f"{side}x{side} from {side * stride}x{side * stride} images"
  for h in range(int(positions ** 0.5), 0, -1):
    if positions % h == 0:
      w = positions // h
      return f"{h}x{w} from {h * stride}x{w * stride} images"
  return f"{positions} positions"


class GlobalAveragePool(nn.Module):
  """Average over positions then LayerNorm: [B, h, w, C] -> [B, C].

  Equal to timm's ConvNeXt `forward_head(x, pre_logits=True)`; the norm's
  params load from the checkpoint's `head.norm`.
  """
  epsilon: float  # the norm's, ConvNeXt's (`convnext.LN_EPS`)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               image_hw: Optional[tuple[int, int]] = None) -> jax.Array:
    del image_hw  # Any size works.
    x = jnp.mean(x.astype(self.dtype), axis=(1, 2))
    return nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype,
                        name="norm")(x)
