"""Image augmentations of the method (docs/METHOD.md), jitted on device.

Hosts only decode and `resize`; everything random runs on the accelerator,
vmapped over the batch with one jax key per example:

  per view (`augment_batch`, in this order, as the official albumentations
  pipeline): grid or coarse dropout (p=0.5), shift/scale(/rotate) warp,
  colour jitter (p=0.8), grayscale (p=0.2), 3x3 Gaussian blur (p=0.5),
  optional horizontal flip;
  per ground/satellite pair (`paired_geometry`): the paired horizontal flip
  and the paired rotate-satellite / roll-panorama;
  then `normalize` (ImageNet mean/std) to float32 or bfloat16.

Images are NHWC RGB, uint8 in [0, 255] or float in [0, 1]; every random op
works on float32 in [0, 1] and clips after each colour op.

Paired geometry follows the panorama convention of `cvgl_jax/cfp/geometry.py`
(centre column looks north, azimuth increases clockwise with x, so east is
at 3W/4; tiles are north-up, column 0 = west):
  * Flip: mirroring the panorama left-right swaps east and west around the
    north column and mirroring a north-up tile left-right swaps its east and
    west halves, so both are flipped. (CFP samples north at x = (W - 1) / 2,
    so the plain column reversal is the exact mirror for both.)
  * Rotate: the tile is rotated by k * 90 deg COUNTER-clockwise (np.rot90
    semantics), so what was east now sits at the top. For the panorama's
    north column to look at that scene direction (azimuth k * 90 deg), the
    panorama is rolled by -k * W / 4 columns: new[x] = old[x + k W / 4].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma, what cv2 / albumentations use for RGB -> gray.
_LUMA = (0.299, 0.587, 0.114)
# cv2.GaussianBlur with ksize 3 and sigma 0 uses this fixed kernel.
_BLUR_3 = (0.25, 0.5, 0.25)


def _check_p(owner: str, **probs: float):
  for name, p in probs.items():
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{owner}.{name} must be a probability in [0, 1], "
                       f"got {p!r}.")


@dataclasses.dataclass(frozen=True)
class Affine:
  """A random shift/scale/rotate warp, like albumentations' ShiftScaleRotate.

  Attributes:
    p: probability to apply it.
    shift: max shift, fraction of the image size, uniform per axis.
    scale: scale factor uniform in [1 - scale, 1 + scale].
    rotate: max rotation in degrees, uniform in [-rotate, rotate].
  """
  p: float = 0.5
  shift: float = 0.0625
  scale: float = 0.1
  rotate: float = 0.0

  def __post_init__(self):
    _check_p("Affine", p=self.p)
    if self.shift < 0 or not 0 <= self.scale < 1 or self.rotate < 0:
      raise ValueError(f"Affine needs shift >= 0, 0 <= scale < 1 and "
                       f"rotate >= 0, got {self}.")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Augmentation of one view. Each probability can be set to 0.

  Defaults are docs/METHOD.md's ground-view settings; see `satellite_view`.

  Attributes:
    dropout_p: probability of one dropout, then grid or coarse with equal
      chance (albumentations OneOf).
    grid_ratio: GridDropout hole size as a fraction of its unit cell.
    grid_units: number of unit cells along each side (unit = size // this).
    coarse_holes: (min, max) number of CoarseDropout holes, inclusive.
    coarse_size: (min, max) hole side, fraction of the image side.
    affines: shift/scale/rotate warps, composed and sampled once (bilinear,
      zero outside).
    jitter_p: probability of colour jitter.
    brightness, contrast, saturation: factor uniform in [1 - v, 1 + v].
    hue: hue shift uniform in [-hue, hue], fraction of the colour circle.
    grayscale_p: probability to replace RGB by its luma.
    blur_p: probability of a 3x3 Gaussian blur (albumentations' default
      p=0.5 for GaussianBlur, which the official code leaves unset).
    flip_p: probability of a horizontal flip of this view alone.
  """
  dropout_p: float = 0.5
  grid_ratio: float = 0.5
  grid_units: int = 10
  coarse_holes: tuple[int, int] = (10, 25)
  coarse_size: tuple[float, float] = (0.1, 0.2)
  affines: tuple[Affine, ...] = ()
  jitter_p: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  grayscale_p: float = 0.2
  blur_p: float = 0.5
  flip_p: float = 0.0

  def __post_init__(self):
    _check_p("ViewConfig", dropout_p=self.dropout_p, jitter_p=self.jitter_p,
             grayscale_p=self.grayscale_p, blur_p=self.blur_p,
             flip_p=self.flip_p)
    lo, hi = self.coarse_holes
    if not 0 <= lo <= hi:
      raise ValueError(f"ViewConfig.coarse_holes must be (min, max) with "
                       f"0 <= min <= max, got {self.coarse_holes}.")
    lo, hi = self.coarse_size
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"ViewConfig.coarse_size must be (min, max) with "
                       f"0 < min <= max <= 1, got {self.coarse_size}.")
    if not 0 < self.grid_ratio < 1 or self.grid_units < 1:
      raise ValueError(f"ViewConfig needs 0 < grid_ratio < 1 and "
                       f"grid_units >= 1, got {self.grid_ratio}, "
                       f"{self.grid_units}.")
    for name in ("brightness", "contrast", "saturation"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"ViewConfig.{name} must lie in [0, 1], got "
                         f"{getattr(self, name)!r}.")
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f"ViewConfig.hue must lie in [0, 0.5], got "
                       f"{self.hue!r}.")
    if not all(isinstance(a, Affine) for a in self.affines):
      raise ValueError(f"ViewConfig.affines must hold Affine, got "
                       f"{self.affines!r}.")


@dataclasses.dataclass(frozen=True)
class PairedConfig:
  """The paired ground/satellite geometry of docs/METHOD.md stage 2 and 3.

  Attributes:
    flip_p: probability to flip panorama and tile left-right together.
    rotate_p: probability to rotate the tile by k * 90 deg, k uniform in
      {1, 2, 3}, and roll the panorama by k quarter widths.
  """
  flip_p: float = 0.5
  rotate_p: float = 0.5

  def __post_init__(self):
    _check_p("PairedConfig", flip_p=self.flip_p, rotate_p=self.rotate_p)


def ground_view(**overrides) -> ViewConfig:
  """The official ground-panorama augmentation (grid dropout ratio 0.5)."""
  return ViewConfig(**overrides)


def satellite_view(**overrides) -> ViewConfig:
  """The official satellite augmentation: grid ratio 0.4 and a shift/scale
  warp (p=0.5, shift 0.0625, scale 0.1, no rotation)."""
  return ViewConfig(**{"grid_ratio": 0.4, "affines": (Affine(),),
                       **overrides})


def satellite_second_view(**overrides) -> ViewConfig:
  """Intra-view stage, second satellite view: first a stronger warp (p=0.5,
  shift 0.2, scale 0.2, rotation 15 deg), then the usual one. Both are
  composed into one warp after the dropout (the official code warps before
  dropping out, so its holes stay axis-aligned; one resampling is cheaper
  and blurs less)."""
  return satellite_view(**{
      "affines": (Affine(p=0.5, shift=0.2, scale=0.2, rotate=15.0),
                  Affine()), **overrides})


def from_config(cfg, intra: bool) -> dict[str, Any]:
  """The step factories' augmentation arguments from `config.augment`.

  Args:
    cfg: the `augment` section of a run config (`cvgl_jax.config_lib`).
    intra: True for the intra-view step (two satellite views), False for
      the cross-view steps (paired geometry).

  Returns:
    {"ground_aug", "satellite_aug"} plus "satellite_aug2" (intra) or
    "paired_aug" (cross-view), keyword arguments of `cvgl_jax.train.steps`.
  """
  common = dict(dropout_p=cfg.dropout_p, jitter_p=cfg.jitter_p,
                brightness=0.4 * cfg.jitter, contrast=0.4 * cfg.jitter,
                saturation=0.4 * cfg.jitter, hue=0.1 * cfg.jitter,
                grayscale_p=cfg.grayscale_p, blur_p=cfg.blur_p)
  out = {"ground_aug": ground_view(**common),
         "satellite_aug": satellite_view(
             **common, affines=(Affine(p=cfg.warp_p),))}
  if intra:
    out["satellite_aug2"] = satellite_second_view(
        **common, affines=(Affine(p=cfg.warp_p, shift=0.2, scale=0.2,
                                  rotate=15.0), Affine(p=cfg.warp_p)))
  else:
    out["paired_aug"] = PairedConfig(flip_p=cfg.paired_flip_p,
                                     rotate_p=cfg.paired_rotate_p)
  return out


def no_view_augmentation() -> ViewConfig:
  """Every probability 0: `augment_batch` only converts to float."""
  return ViewConfig(dropout_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


# ---------------------------------------------------------------- host ----


# ---------------------------------------------------------- one example ----


def _gray(x: jax.Array) -> jax.Array:
  """[..., 3] -> [...] luma."""
  return x @ jnp.asarray(_LUMA, x.dtype)


def _randint(u: jax.Array, lo, hi) -> jax.Array:
  """Uniform integers in [lo, hi] (inclusive) from uniforms u in [0, 1)."""
  return jnp.minimum(lo + jnp.floor(u * (hi - lo + 1)), hi).astype(jnp.int32)


def grid_dropout_mask(u: jax.Array, height: int, width: int,
                      cfg: ViewConfig) -> jax.Array:
  """[H, W] bool, True in the holes of albumentations' GridDropout.

  Unit cells of size // grid_units pixels; each holds one hole of
  grid_ratio * unit at a random offset shared by all cells (random_offset).
  u: [2] uniforms in [0, 1) that pick the offset.
  """
  uh, uw = max(2, height // cfg.grid_units), max(2, width // cfg.grid_units)
  hh = min(max(int(uh * cfg.grid_ratio), 1), uh - 1)
  hw = min(max(int(uw * cfg.grid_ratio), 1), uw - 1)
  oy, ox = _randint(u[0], 0, uh - hh), _randint(u[1], 0, uw - hw)
  ys, xs = jnp.arange(height) - oy, jnp.arange(width) - ox
  in_y = (ys >= 0) & (ys % uh < hh)
  in_x = (xs >= 0) & (xs % uw < hw)
  return in_y[:, None] & in_x[None, :]


def coarse_dropout_boxes(u: jax.Array, height: int, width: int,
                         cfg: ViewConfig) -> tuple[jax.Array, jax.Array]:
  """The holes of albumentations' CoarseDropout.

  Args:
    u: [1 + 4 K] uniforms in [0, 1), K = coarse_holes[1].

  Returns:
    boxes: [K, 4] int32 (y0, x0, y1, x1), half-open; side lengths uniform
      integers in coarse_size * side (inclusive).
    active: [K] bool, the first n are True, n uniform in coarse_holes.
  """
  k = cfg.coarse_holes[1]
  n = _randint(u[0], cfg.coarse_holes[0], k)
  uh, uw, uy, ux = u[1:].reshape(4, k)
  lo_h, hi_h = (max(1, int(f * height)) for f in cfg.coarse_size)
  lo_w, hi_w = (max(1, int(f * width)) for f in cfg.coarse_size)
  h, w = _randint(uh, lo_h, hi_h), _randint(uw, lo_w, hi_w)
  y0, x0 = _randint(uy, 0, height - h), _randint(ux, 0, width - w)
  boxes = jnp.stack([y0, x0, y0 + h, x0 + w], axis=-1)
  return boxes, jnp.arange(k) < n


def boxes_to_mask(boxes: jax.Array, active: jax.Array, height: int,
                  width: int) -> jax.Array:
  """[K, 4] boxes, [K] active -> [H, W] bool union of the active boxes."""
  ys, xs = jnp.arange(height), jnp.arange(width)
  in_y = (ys >= boxes[:, :1]) & (ys < boxes[:, 2:3]) & active[:, None]
  in_x = (xs >= boxes[:, 1:2]) & (xs < boxes[:, 3:4])
  # Union over holes as one small matmul: [H, K] @ [K, W].
  return (in_y.T.astype(jnp.float32) @ in_x.astype(jnp.float32)) > 0


def dropout_mask(key: jax.Array, height: int, width: int,
                 cfg: ViewConfig) -> jax.Array:
  """[H, W] bool: with dropout_p, grid or coarse holes (equal chance)."""
  u = jax.random.uniform(key, (4 + 1 + 4 * cfg.coarse_holes[1],))
  grid = grid_dropout_mask(u[2:4], height, width, cfg)
  coarse = boxes_to_mask(*coarse_dropout_boxes(u[4:], height, width, cfg),
                         height, width)
  mask = jnp.where(u[1] < 0.5, grid, coarse)
  return mask & (u[0] < cfg.dropout_p)


def _affine_matrix(u, a: Affine, height, width):
  """Forward 3x3 pixel map (x, y, 1) of one random warp about the image
  centre, cv2.getRotationMatrix2D's convention; u: [5] uniforms."""
  dy, dx = (2 * u[:2] - 1) * a.shift
  s = 1 + (2 * u[2] - 1) * a.scale
  ang = jnp.deg2rad((2 * u[3] - 1) * a.rotate)
  cy, cx = (height - 1) / 2, (width - 1) / 2
  c, sn = s * jnp.cos(ang), s * jnp.sin(ang)
  m = jnp.array([[c, sn, (1 - c) * cx - sn * cy + dx * width],
                 [-sn, c, sn * cx + (1 - c) * cy + dy * height],
                 [0.0, 0.0, 1.0]])
  return jnp.where(u[4] < a.p, m, jnp.eye(3))


def _warp(x, m):
  """Samples x at m^-1 (x, y) with bilinear weights, zero outside."""
  h, w, ch = x.shape
  # Closed-form inverse of the affine [[A, t], [0, 1]].
  a, b, c, d = m[0, 0], m[0, 1], m[1, 0], m[1, 1]
  ia = jnp.array([[d, -b], [-c, a]]) / (a * d - b * c)
  inv = jnp.concatenate([ia, -(ia @ m[:2, 2:])], axis=1)
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing="ij")
  sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
  sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
  x0, y0 = jnp.floor(sx), jnp.floor(sy)
  flat = x.reshape(h * w, ch)
  out = jnp.zeros_like(x)
  for dy in (0, 1):
    for dx in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      wgt = (1 - jnp.abs(sx - xi)) * (1 - jnp.abs(sy - yi))
      ok = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1))
      vals = flat[idx.astype(jnp.int32)]
      out += jnp.where(ok, wgt, 0.0)[..., None] * vals
  return out


def _adjust_hue(x, delta):
  """Shifts hue by delta (fraction of the circle) through HSV, like
  tf.image.adjust_hue; gray pixels are unchanged."""
  maxc, minc = x.max(-1), x.min(-1)
  chroma = maxc - minc
  safe = jnp.where(chroma > 0, chroma, 1.0)
  r, g, b = (x[..., i] for i in range(3))
  h = jnp.where(maxc == r, (g - b) / safe,
                jnp.where(maxc == g, 2.0 + (b - r) / safe,
                          4.0 + (r - g) / safe))
  h = jnp.mod(h / 6.0 + delta, 1.0)
  s = jnp.where(maxc > 0, chroma / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  # Branch-free HSV -> RGB: channel n in (5, 3, 1) for (r, g, b).
  n = jnp.asarray([5.0, 3.0, 1.0])
  k = jnp.mod(n + h[..., None] * 6.0, 6.0)
  ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return maxc[..., None] * (1.0 - s[..., None] * ramp)


def _jitter(key, x, cfg):
  """Colour jitter in the fixed order brightness, contrast, saturation, hue
  (torchvision shuffles the order; a fixed one keeps it a single fused
  elementwise program)."""
  u = jax.random.uniform(key, (5,))
  def factor(ui, v):
    return max(0.0, 1 - v) + ui * (1 + v - max(0.0, 1 - v))
  y = jnp.clip(x * factor(u[1], cfg.brightness), 0, 1)
  mean = _gray(y).mean()
  y = jnp.clip((y - mean) * factor(u[2], cfg.contrast) + mean, 0, 1)
  g = _gray(y)[..., None]
  y = jnp.clip((y - g) * factor(u[3], cfg.saturation) + g, 0, 1)
  y = _adjust_hue(y, (2 * u[4] - 1) * cfg.hue)
  return jnp.where(u[0] < cfg.jitter_p, y, x)


def _blur3(x):
  """3x3 Gaussian blur, cv2's sigma-0 kernel, border reflect-101."""
  k0, k1, k2 = _BLUR_3
  p = jnp.pad(x, ((1, 1), (0, 0), (0, 0)), mode="reflect")
  x = k0 * p[:-2] + k1 * p[1:-1] + k2 * p[2:]
  p = jnp.pad(x, ((0, 0), (1, 1), (0, 0)), mode="reflect")
  return k0 * p[:, :-2] + k1 * p[:, 1:-1] + k2 * p[:, 2:]


def augment_view(key: jax.Array, image: jax.Array,
                 cfg: ViewConfig) -> jax.Array:
  """Augments one [H, W, 3] float image in [0, 1]; returns the same shape."""
  k_drop, k_aff, k_jit, k_misc = jax.random.split(key, 4)
  h, w = image.shape[:2]
  x = image.astype(jnp.float32)
  if cfg.dropout_p > 0:
    x = jnp.where(dropout_mask(k_drop, h, w, cfg)[..., None], 0.0, x)
  if any(a.p > 0 for a in cfg.affines):
    u = jax.random.uniform(k_aff, (len(cfg.affines), 5))
    m = jnp.eye(3)
    for ui, a in zip(u, cfg.affines):
      m = _affine_matrix(ui, a, h, w) @ m
    x = jnp.where(jnp.all(m == jnp.eye(3)), x, _warp(x, m))
  if cfg.jitter_p > 0:
    x = _jitter(k_jit, x, cfg)
  u = jax.random.uniform(k_misc, (3,))
  if cfg.grayscale_p > 0:
    gray = jnp.repeat(_gray(x)[..., None], 3, axis=-1)
    x = jnp.where(u[0] < cfg.grayscale_p, gray, x)
  if cfg.blur_p > 0:
    x = jnp.where(u[1] < cfg.blur_p, _blur3(x), x)
  if cfg.flip_p > 0:
    x = jnp.where(u[2] < cfg.flip_p, x[:, ::-1], x)
  return x


def paired_geometry(key: jax.Array, ground: jax.Array, satellite: jax.Array,
                    cfg: PairedConfig) -> tuple[jax.Array, jax.Array]:
  """The paired flip and rotate/roll of one [H, W, C] panorama and its
  [S, S, C] north-up tile (see the module docstring for the direction).

  Returns (ground, satellite) with unchanged shapes.
  """
  w = ground.shape[1]
  if satellite.shape[0] != satellite.shape[1] and cfg.rotate_p > 0:
    raise ValueError(f"paired_geometry: rotating needs square satellite "
                     f"tiles, got {satellite.shape[:2]}.")
  if w % 4 and cfg.rotate_p > 0:
    raise ValueError(f"paired_geometry: the panorama width {w} must be a "
                     f"multiple of 4 to roll it by quarter widths.")
  u = jax.random.uniform(key, (3,))
  if cfg.flip_p > 0:
    flip = u[0] < cfg.flip_p
    ground = jnp.where(flip, ground[:, ::-1], ground)
    satellite = jnp.where(flip, satellite[:, ::-1], satellite)
  if cfg.rotate_p > 0:
    k = _randint(u[2], 1, 3) * (u[1] < cfg.rotate_p)
    satellite = jax.lax.switch(
        k, [functools.partial(jnp.rot90, k=i, axes=(0, 1))
            for i in range(4)], satellite)
    ground = jnp.roll(ground, -k * (w // 4), axis=1)
  return ground, satellite


def view_panoramas(images: jax.Array, flip: bool, k: int) -> jax.Array:
  """[B, H, W, C] panoramas as `paired_geometry` shows them for a flip and
  k quarter turns (the partner of `view_tiles` with the same arguments)."""
  w = images.shape[2]
  if k % 4 and w % 4:
    raise ValueError(f"view_panoramas: the panorama width {w} must be a "
                     "multiple of 4 to roll it by quarter widths.")
  images = images[:, :, ::-1] if flip else images
  return jnp.roll(images, -k * (w // 4), axis=2) if k % 4 else images


def view_tiles(images: jax.Array, flip: bool, k: int) -> jax.Array:
  """[B, S, S, C] north-up tiles flipped left-right, then rotated k * 90
  deg counter-clockwise, as `paired_geometry` does."""
  images = images[:, :, ::-1] if flip else images
  return jnp.rot90(images, k=k, axes=(1, 2)) if k % 4 else images


# --------------------------------------------------------------- batches ---


def _to_unit_float(images: jax.Array) -> jax.Array:
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _check_batch(name, images):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name} must be [B, H, W, 3], got {images.shape}.")


@functools.partial(jax.jit, static_argnames=("cfg",))
def augment_batch(key: jax.Array, images: jax.Array,
                  cfg: ViewConfig) -> jax.Array:
  """[B, H, W, 3] uint8 or float in [0, 1] -> float32 in [0, 1], each
  example augmented with its own key (split from `key`)."""
  _check_batch("augment_batch images", images)
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(augment_view, in_axes=(0, 0, None))(
      keys, _to_unit_float(images), cfg)


@functools.partial(jax.jit, static_argnames=("ground_cfg", "satellite_cfg",
                                             "paired_cfg"))
def augment_pairs(key: jax.Array, ground: jax.Array, satellite: jax.Array,
                  ground_cfg: ViewConfig, satellite_cfg: ViewConfig,
                  paired_cfg: PairedConfig) -> tuple[jax.Array, jax.Array]:
  """Augments paired batches: each view on its own, then the paired
  geometry. ground [B, H, W, 3], satellite [B, S, S, 3] (uint8 or float in
  [0, 1]) -> float32 in [0, 1], same shapes."""
  _check_batch("augment_pairs ground", ground)
  _check_batch("augment_pairs satellite", satellite)
  if ground.shape[0] != satellite.shape[0]:
    raise ValueError(f"augment_pairs: batch sizes differ, ground "
                     f"{ground.shape[0]} vs satellite {satellite.shape[0]}.")
  def one(k, g, s):
    kg, ks, kp = jax.random.split(k, 3)
    g = augment_view(kg, g, ground_cfg)
    s = augment_view(ks, s, satellite_cfg)
    return paired_geometry(kp, g, s, paired_cfg)
  keys = jax.random.split(key, ground.shape[0])
  return jax.vmap(one)(keys, _to_unit_float(ground), _to_unit_float(satellite))


@functools.partial(jax.jit, static_argnames=("dtype",))
def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
  """ImageNet mean/std normalisation of [..., 3] images (uint8, or float in
  [0, 1]) to `dtype` (float32 or bfloat16)."""
  x = _to_unit_float(images)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return ((x - mean) / std).astype(dtype)
