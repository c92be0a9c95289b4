"""The two towers: query (ground panorama) and reference (satellite tile).

Each tower is a ConvNeXt backbone plus a head (SAFA in the paper, global
average pooling in Sample4Geo) whose descriptor is L2-normalised. The paper
gives the towers separate weights; Sample4Geo shares one encoder
(`share_weights=True`). A learnable scalar `logit_scale` t (InfoNCE uses
exp(t)) is initialised to log(1 / 0.07).

Param tree: {"query": {"backbone", "head"}, "reference": {...} (absent when
shared), "logit_scale": []}.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cvgl_jax.cpu import depthwise
from cvgl_jax.models import convnext
from cvgl_jax.models import heads

LOGIT_SCALE_INIT = math.log(1 / 0.07)
HEADS = ("safa", "gap")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis, as torch's F.normalize."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


class Tower(nn.Module):
  """Backbone + head: images [B, H, W, 3] -> unit descriptors [B, D] (f32)."""
  variant: str | convnext.Variant
  head: str = "safa"
  num_safa_heads: int = 8
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  depthwise_impl: str = "auto"

  def setup(self):
    if self.head not in HEADS:
      raise ValueError(f"model.head must be one of {HEADS}, got "
                       f"{self.head!r}.")
    self.backbone = convnext.convnext(
        self.variant, drop_path_rate=self.drop_path_rate, dtype=self.dtype,
        remat=self.remat, depthwise=depthwise.for_impl(self.depthwise_impl))
    if self.head == "safa":
      self.pool = heads.SAFA(self.num_safa_heads, dtype=self.dtype,
                             name="head")
    else:
      self.pool = heads.GlobalAveragePool(convnext.LN_EPS, dtype=self.dtype,
                                          name="head")

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    features = self.backbone(images, train)
    desc = self.pool(features, image_hw=images.shape[1:3])
    return l2_normalize(desc.astype(jnp.float32))


class TwoTower(nn.Module):
  """The cross-view model.

  Attributes:
    variant: ConvNeXt size ("atto" ... "large") or a custom
      `convnext.Variant`.
    head: "safa" or "gap".
    share_weights: one encoder for both views (Sample4Geo) or two (paper).
    num_safa_heads: SAFA spatial weightings.
    drop_path_rate: stochastic depth of the backbones (the paper's 0.2,
      as `config_lib`'s default; 0 turns it off).
    dtype: computation dtype; params are float32 and embeddings float32.
    remat: rematerialise backbone blocks in the backward pass.
    depthwise_impl: one of `cvgl_jax.cpu.DEPTHWISE_IMPLS`: how the depthwise
      convolutions are computed (`cvgl_jax.cpu.depthwise.for_impl`).
  """
  variant: str | convnext.Variant = "base"
  head: str = "safa"
  share_weights: bool = False
  num_safa_heads: int = 8
  drop_path_rate: float = 0.2
  dtype: Any = jnp.float32
  remat: bool = False
  depthwise_impl: str = "auto"

  def setup(self):
    def tower(name):
      return Tower(self.variant, self.head, self.num_safa_heads,
                   self.drop_path_rate, self.dtype, self.remat,
                   self.depthwise_impl, name=name)
    self.query = tower("query")
    self.reference = self.query if self.share_weights else tower("reference")
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), ())

  def embed_ground(self, images: jax.Array, train: bool = False) -> jax.Array:
    """[B, Hg, Wg, 3] normalised panoramas -> [B, D] unit descriptors."""
    return self.query(images, train)

  def embed_satellite(self, images: jax.Array,
                      train: bool = False) -> jax.Array:
    """[B, Hs, Ws, 3] normalised tiles -> [B, D] unit descriptors."""
    return self.reference(images, train)

  def __call__(self, ground: jax.Array, satellite: jax.Array,
               train: bool = False):
    """Returns (ground descriptors, satellite descriptors, logit scale t)."""
    return (self.embed_ground(ground, train),
            self.embed_satellite(satellite, train), self.logit_scale)


def from_config(cfg: ml_collections.ConfigDict) -> TwoTower:
  """Builds a TwoTower from `config.model` (keys as the attributes).

  `variant="custom"` takes `depths` and `dims` from the config (tiny models
  for tests and demos). A key the config lacks keeps TwoTower's default,
  which is `config_lib`'s: there is no third set of defaults here.
  """
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  given = {k: cfg[k] for k in ("head", "share_weights", "num_safa_heads",
                               "drop_path_rate", "remat", "depthwise_impl")
           if k in cfg}
  if "dtype" in cfg:
    if cfg.dtype not in dtypes:
      raise ValueError(f"config.model.dtype must be one of {sorted(dtypes)}, "
                       f"got {cfg.dtype!r}.")
    given["dtype"] = dtypes[cfg.dtype]
  variant = cfg.variant
  if variant == "custom":
    variant = convnext.Variant(tuple(cfg.depths), tuple(cfg.dims),
                               conv_mlp=False)
  convnext.get_variant(variant)
  return TwoTower(variant=variant, **given)


# The keys of `config.model` that rebuild a TwoTower (`model_spec`).
MODEL_KEYS = ("variant", "depths", "dims", "head", "share_weights",
              "num_safa_heads", "dtype", "depthwise_impl")


def model_spec(config: ml_collections.ConfigDict) -> dict:
  """What rebuilds a run's TwoTower (a bundle records it): `config.model`'s
  architecture keys and the (H, W) image sizes (SAFA's params depend on
  them)."""
  m = config.model
  spec = {k: m[k] for k in MODEL_KEYS}
  spec.update(depths=[int(v) for v in m.depths],
              dims=[int(v) for v in m.dims],
              share_weights=bool(m.share_weights),
              num_safa_heads=int(m.num_safa_heads),
              ground_size=[int(v) for v in config.data.ground_size],
              satellite_size=[int(v) for v in config.data.satellite_size])
  return spec


def build_model(spec: dict) -> TwoTower:
  """The TwoTower of a `model_spec`."""
  missing = [k for k in MODEL_KEYS + ("ground_size", "satellite_size")
             if k not in spec]
  if missing:
    raise ValueError(f"Model spec lacks {missing}; it has {sorted(spec)}.")
  return from_config(
      ml_collections.ConfigDict({k: spec[k] for k in MODEL_KEYS}))


def abstract_params(model: TwoTower, spec: dict) -> Any:
  """The param tree of `model` as ShapeDtypeStructs (nothing computed)."""
  ground = jnp.zeros((1, *spec["ground_size"], 3), jnp.float32)
  satellite = jnp.zeros((1, *spec["satellite_size"], 3), jnp.float32)
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), ground, satellite))["params"]
