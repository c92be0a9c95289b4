"""ConvNeXt (Liu et al., 2022) in Flax Linen, numerically equal to timm's.

Images are NHWC. A block is: 7x7 depthwise conv -> LayerNorm (eps 1e-6) ->
Dense 4C -> exact (erf) GELU -> Dense C -> layer scale (gamma) -> stochastic
depth -> residual add (computed with the norm's affine map folded into the
first Dense and gamma into the second: same function, fewer passes). timm's conv-MLP variants (atto ... nano) store the
two pointwise layers as 1x1 convolutions; in NHWC those are the same Dense
layers, so one module serves every variant and only `weights.py` needs to
know the difference.

Parameter names follow timm's structure so the converter is a renaming:
`stem_conv`, `stem_norm`, `stage{i}_downsample_norm`, `stage{i}_downsample_conv`
(stages 1-3; stage 0 has no downsample), `stage{i}_block{j}/{conv_dw, norm,
fc1, fc2, gamma}`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-6

# A depthwise convolution: (x [B, H, W, C], kernel [k, k, C]) -> [B, H, W, C],
# stride 1, 'SAME' zero padding, no bias.
DepthwiseFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Variant:
  """A ConvNeXt size as timm registers it.

  Attributes:
    depths: blocks per stage.
    dims: channels per stage.
    conv_mlp: whether timm stores the block MLP as 1x1 convolutions (only
      relevant when loading checkpoints).
  """
  depths: tuple[int, ...]
  dims: tuple[int, ...]
  conv_mlp: bool


VARIANTS = {
    "atto": Variant((2, 2, 6, 2), (40, 80, 160, 320), True),
    "femto": Variant((2, 2, 6, 2), (48, 96, 192, 384), True),
    "pico": Variant((2, 2, 6, 2), (64, 128, 256, 512), True),
    "nano": Variant((2, 2, 8, 2), (80, 160, 320, 640), True),
    "tiny": Variant((3, 3, 9, 3), (96, 192, 384, 768), False),
    "small": Variant((3, 3, 27, 3), (96, 192, 384, 768), False),
    "base": Variant((3, 3, 27, 3), (128, 256, 512, 1024), False),
    "large": Variant((3, 3, 27, 3), (192, 384, 768, 1536), False),
}


def get_variant(name: str | Variant) -> Variant:
  """Looks up `VARIANTS[name]`, accepting timm's `convnext_` prefix.

  A `Variant` is returned as is: custom (e.g. tiny test) sizes pass through.
  """
  if isinstance(name, Variant):
    return name
  key = name.removeprefix("convnext_")
  if key not in VARIANTS:
    raise ValueError(f"Unknown ConvNeXt variant {name!r}; choose one of "
                     f"{sorted(VARIANTS)}.")
  return VARIANTS[key]


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * (1 + erf(x / sqrt(2))) / 2, as torch's `nn.GELU()`.

  jax's `nn.gelu` defaults to the tanh approximation, and its exact form goes
  through erfc, whose XLA:CPU expansion (exp and a branch select) made the
  forward GELU ~2x slower than this erf polynomial.
  """
  # A Python float is weakly typed: bf16 stays bf16 (np.float32 promoted it).
  return 0.5 * x * (1.0 + jax.lax.erf(x * float(1 / np.sqrt(2))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize(x: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last axis (LayerNorm, no affine).

  Args:
    x: [..., C]; statistics in x's dtype (callers pass float32).
    eps: added to the biased variance, as torch.

  The gradient is written by hand, as torch's fused LayerNorm:
  dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps), two
  reductions and one elementwise pass. Autodiff of the same expression left
  XLA:CPU several more passes over [..., C] and broadcasts of per-row
  statistics materialised at full size.
  """
  return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x, eps):
  # One pass for both statistics (as nn.LayerNorm's default): XLA:CPU split
  # the preceding depthwise sum into ~50 passes when the variance was taken
  # of the centred input instead.
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean)
  rstd = jax.lax.rsqrt(jnp.maximum(var, 0.0) + eps)
  xhat = (x - mean) * rstd
  return xhat, (xhat, rstd)


def _normalize_bwd(eps, res, g):
  del eps
  xhat, rstd = res
  g_mean = jnp.mean(g, axis=-1, keepdims=True)
  gx_mean = jnp.mean(g * xhat, axis=-1, keepdims=True)
  return (rstd * (g - g_mean - xhat * gx_mean),)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNormParams(nn.Module):
  """`nn.LayerNorm`'s params (scale [C] ones, bias [C] zeros), returned
  instead of applied, for callers that fold them into the next layer."""

  @nn.compact
  def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
    return (self.param("scale", nn.initializers.ones, (features,)),
            self.param("bias", nn.initializers.zeros, (features,)))


class DenseParams(nn.Module):
  """`nn.Dense`'s params (kernel [Cin, Cout] lecun-normal, bias [Cout]
  zeros), returned instead of applied."""
  features: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    return (self.param("kernel", nn.initializers.lecun_normal(),
                       (in_features, self.features)),
            self.param("bias", nn.initializers.zeros, (self.features,)))


class LayerNorm(nn.Module):
  """LayerNorm over the last axis: `normalize`, then scale and bias.

  Params are `nn.LayerNorm`'s, so checkpoints and the timm converter are
  unchanged. Statistics are computed in float32 whatever `dtype` (as
  `nn.LayerNorm`); the output is cast to `dtype`.
  """
  epsilon: float = LN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    y = normalize(x.astype(jnp.float32), self.epsilon) * scale + bias
    return y.astype(self.dtype)


class PatchConv(nn.Module):
  """p x p convolution with stride p, no padding, as one matrix product.

  Non-overlapping patches make the convolution a reshape (space to depth)
  and a [B*H/p*W/p, p*p*Cin] x [p*p*Cin, Cout] matmul. Params are those of
  `nn.Conv(features, (p, p), strides=p, padding="VALID")`: kernel
  [p, p, Cin, Cout] (flattened in the same (row, column, channel) order as
  the patches), bias [Cout]. On CPU this is several times faster than XLA's
  strided convolution, whose backward pass is a dilated convolution.

  Input [B, H, W, Cin] with H, W multiples of p; output [B, H/p, W/p, Cout].
  """
  features: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f"{self.name}: image side {h}x{w} is not a multiple "
                       f"of the patch size {p}.")
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, p * p * c) @ kernel.reshape(p * p * c, self.features)
    return (x + bias).reshape(b, h // p, w // p, self.features)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example.

  Kept branches are scaled by 1 / (1 - rate), as timm's `scale_by_keep`.
  Active only when `deterministic` is False (training); uses the 'dropout'
  RNG stream.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution, stride 1, 'SAME' zero padding, with bias.

  Params are those of `nn.Conv(feature_group_count=C)`: kernel [k, k, 1, C],
  bias [C]. `conv` computes the convolution: None is XLA's grouped
  convolution (the choice on GPU and TPU); a function computes the same
  thing another way (the CPU's faster forms, `cvgl_jax.cpu.depthwise`,
  which `encoder.Tower` passes in on the CPU). The model itself knows no
  backend.
  """
  features: int
  kernel_size: int = 7
  dtype: Any = jnp.float32
  conv: Optional[DepthwiseFn] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, self.features
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    if self.conv is not None:
      return self.conv(x, kernel[:, :, 0, :]) + bias
    pad = k // 2
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    return y + bias


class Block(nn.Module):
  """One ConvNeXt block. [B, H, W, C] -> [B, H, W, C]."""
  dim: int
  drop_path: float = 0.0
  ls_init_value: float = 1e-6
  dtype: Any = jnp.float32
  depthwise: Optional[DepthwiseFn] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    shortcut = x
    c = self.dim
    x = DepthwiseConv(c, 7, self.dtype, self.depthwise, name="conv_dw")(x)
    scale, shift = LayerNormParams(name="norm")(c)
    w1, b1 = DenseParams(4 * c, name="fc1")(c)
    w2, b2 = DenseParams(c, name="fc2")(4 * c)
    gamma = self.param("gamma", nn.initializers.constant(self.ls_init_value),
                       (c,))
    # The norm's affine map is folded into fc1 and the layer scale into fc2
    # ((xhat * s + t) W1 + b1 = xhat (s W1) + (t W1 + b1), likewise gamma):
    # the same function, two fewer passes over the activations each way.
    w1, b1 = scale[:, None] * w1, shift @ w1 + b1
    w2, b2 = w2 * gamma, b2 * gamma
    x = normalize(x.astype(jnp.float32), LN_EPS)
    x, w1, b1, w2, b2 = nn.dtypes.promote_dtype(x, w1, b1, w2, b2,
                                                dtype=self.dtype)
    # On [N, C] rows, not [B, H, W, C]: the weight gradients are then plain
    # 2-D products over N, where XLA:CPU otherwise wrote one operand
    # transposed for them and Eigen packed the other slowly (tower
    # fwd+bwd 2.49 -> 2.11 s, BUILD_NOTES.md).
    shape = x.shape
    x = gelu(x.reshape(-1, c) @ w1 + b1)
    x = (x @ w2 + b2).reshape(shape)
    x = DropPath(self.drop_path)(x, deterministic=not train)
    # The residual stream keeps its own dtype (float32, see ConvNeXt).
    return shortcut + x.astype(shortcut.dtype)


class ConvNeXt(nn.Module):
  """ConvNeXt backbone without classifier: timm's `forward_features`.

  Attributes:
    depths: blocks per stage.
    dims: channels per stage.
    drop_path_rate: stochastic-depth rate of the last block; rates rise
      linearly from 0 over all blocks, as timm.
    ls_init_value: initial layer-scale gamma.
    dtype: computation dtype (e.g. jnp.bfloat16); params stay float32.
    remat: recompute each block's activations in the backward pass to save
      memory.
    depthwise: how the blocks' depthwise convolutions are computed (see
      `DepthwiseConv`; None: XLA's grouped convolution).

  Input [B, H, W, 3] (normalised images); output [B, H/32, W/32, dims[-1]].
  """
  depths: Sequence[int]
  dims: Sequence[int]
  drop_path_rate: float = 0.0
  ls_init_value: float = 1e-6
  dtype: Any = jnp.float32
  remat: bool = False
  depthwise: Optional[DepthwiseFn] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    x = PatchConv(self.dims[0], 4, self.dtype, name="stem_conv")(x)
    x = LayerNorm(LN_EPS, self.dtype, name="stem_norm")(x)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    block_cls = Block
    if self.remat:
      block_cls = nn.remat(Block, static_argnums=(2,))
    k = 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if i > 0:
        x = LayerNorm(LN_EPS, self.dtype,
                         name=f"stage{i}_downsample_norm")(x)
        x = PatchConv(dim, 2, self.dtype,
                      name=f"stage{i}_downsample_conv")(x)
      # The residual stream is accumulated in float32 whatever `dtype`, as
      # PyTorch AMP does: a bf16 sum over a stage's blocks rounds every
      # branch's contribution to 8 bits of the stream's magnitude. The
      # branches compute in `dtype` (each casts its input).
      x = x.astype(jnp.float32)
      for j in range(depth):
        x = block_cls(dim, float(rates[k]), self.ls_init_value, self.dtype,
                      self.depthwise, name=f"stage{i}_block{j}")(x, train)
        k += 1
    return x.astype(self.dtype)


def convnext(variant: str | Variant, **kwargs) -> ConvNeXt:
  """`ConvNeXt` of a named timm size, e.g. `convnext("tiny", dtype=...)`."""
  v = get_variant(variant)
  return ConvNeXt(depths=v.depths, dims=v.dims, **kwargs)


@functools.lru_cache(maxsize=None)
def num_params(variant: str) -> int:
  """Parameter count of a backbone, from shapes only (no compute)."""
  model = convnext(variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3), jnp.float32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
