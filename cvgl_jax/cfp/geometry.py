"""Ground panorama -> bird's-eye view (BEV): the geometric half of CFP.

A virtual pinhole camera at the panorama centre looks straight down; every
BEV pixel's ray is turned into an (azimuth, elevation) and so into a sample
point on the panorama, which is read bilinearly. The sampling grid depends
only on shapes and angles, so it is computed once (`bev_grid`, cached) and
applied to any number of panoramas by the jitted, batched samplers:

  grid = bev_grid((224, 1232), (750, 750), 175.0, cvusa_crop_top((224, 1232)))
  bevs = sample_bev(panos_uint8_nhwc, grid)      # [B, 750, 750, 3] float32

For bulk projection the grid's bilinear neighbours and weights are
precomputed once as well (`bev_plan`), which makes sampling about 2.5x
faster on CPU:

  plan = bev_plan((224, 1232), (750, 750), 175.0, 176.0)
  bevs = project_uint8(panos_uint8_nhwc, plan)   # [B, 750, 750, 3] uint8

Panorama convention
-------------------
This is the one statement of the convention for the whole project; every
other module (the synthetic world, the paired rotate/roll augmentation, the
readers) refers here.

- Equirectangular; a full panorama is W x H with W = 2H.
- The centre column (x = W/2) looks NORTH. Azimuth increases CLOCKWISE seen
  from above with x: east at 3W/4, south at the left/right edges, west at
  W/4.
- Row r (0 at the top) looks at elevation pi/2 - pi * (r + 0.5) / H: the
  top row is the zenith, the bottom row the nadir.
- Satellite tiles are north-up: row 0 = north, column 0 = west.
- A CVUSA-style crop (1232 x 224: a band around the horizon, 360 deg wide)
  is a full panorama's rows placed at a vertical offset: it sits on a
  W x W/2 canvas with its top row at `crop_top` (`cvusa_crop_top` gives the
  authors' value `(W/2 - H)/2 - 20`); the rest of the canvas is black.
- The BEV is a north-up map like a satellite tile: the north column lands at
  the top centre, east at the right, west at the left and the nadir at the
  BEV centre.

The authors' CFP projection (reproduced here by default) follows this
convention up to half a pixel: it maps the full 360 deg onto corner-aligned
column coordinates 0 .. W-1 (both the first and the last column at +-180
deg, so it never interpolates across the seam) and the zenith..nadir onto
rows 0 .. W/2-1 of the canvas. `wrap=True` instead uses the periodic
column mapping of the convention above (north exactly at x = W/2, +-180 deg
halfway between the last and the first column, read bilinearly across the
seam); rows keep the authors' mapping, which coincides with the convention
at the horizon and is half a pixel off at the nadir.

Shapes: `pano_hw` / `out_hw` are (height, width) in pixels; grids are
[Ho, Wo, 2] float32 pixel coordinates (x = column, y = row) in the frame of
the image actually sampled (the crop), with pixel centres at integers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# The official CFP settings: (FoV in degrees, BEV size).
CVUSA_FOV_DEG = 175.0
CVUSA_OUT_SIZE = 750
CVACT_FOV_DEG = 170.0
CVACT_OUT_SIZE = 1200


def cvusa_crop_top(pano_hw: Sequence[int]) -> float:
  """Row of the W x W/2 canvas where the authors put the top of a CVUSA crop.

  Args:
    pano_hw: (H, W) of the crop, e.g. (224, 1232).

  Returns:
    `(W/2 - H)/2 - 20 * W/1232`: 176.0 for 1232 x 224, i.e. rows 176..399
    of the 616-row canvas, elevations from about +38.5 to -26.9 deg (the
    band's centre sits 20 rows above the horizon). The authors' 20 px is a
    length at CVUSA's native width, so it scales with W: crops resized to
    another width keep the same elevation band (616 x 112 -> 88.0).
  """
  h, w = _hw(pano_hw, "pano_hw")
  return (w / 2 - h) / 2 - 20 * w / 1232


def bev_grid(pano_hw: Sequence[int], out_hw: Sequence[int] | int,
             fov_deg: float, crop_top: float = 0.0,
             wrap: bool = False) -> np.ndarray:
  """Where each BEV pixel samples the panorama (the authors' formulas).

  For BEV pixel (r, c) of an Ho x Wo output the ray is x = Ho/2 - r
  (north), y = Wo/2 - c, z = -f with f = Wo / 2 / tan(FoV/2); its polar
  angle theta = atan2(z, hypot(x, y)) + pi/2 and azimuth
  phi = atan2(y, x) + pi give the canvas point
  u = (1 - phi/2pi) (W - 1), v = (1 - theta/pi) (W/2 - 1). The returned row
  is v - crop_top, so the crop is sampled directly and the padded canvas is
  never built. The authors only support square outputs; here the FoV spans
  the width and pixels stay square, so a non-square output shows a wider
  or narrower north-south extent at the same scale (identical to the
  authors' grid when Ho == Wo).

  Args:
    pano_hw: (H, W) of the panorama or crop to be sampled.
    out_hw: (Ho, Wo) of the BEV, or one int for a square BEV.
    fov_deg: horizontal field of view of the virtual camera, in (0, 180).
    crop_top: row of the W x W/2 canvas where the crop's top row sits
      (0 for a full 2:1 panorama; `cvusa_crop_top(pano_hw)` for CVUSA).
    wrap: use the periodic column mapping (see the module docstring); pair
      with `sample_bev(..., wrap=True)` (`bev_plan` does both).

  Returns:
    [Ho, Wo, 2] float32, read-only (cached per arguments): (x, y) pixel
    coordinates in the crop, pixel centres at integers.
  """
  h, w = _hw(pano_hw, "pano_hw")
  out = (out_hw, out_hw) if isinstance(out_hw, (int, np.integer)) else out_hw
  ho, wo = _hw(out, "out_hw")
  if not 0.0 < float(fov_deg) < 180.0:
    raise ValueError(f"fov_deg must lie in (0, 180), got {fov_deg}.")
  if crop_top < 0 or crop_top + h > w / 2 + 1e-9:
    raise ValueError(
        f"A {h}x{w} crop placed at row crop_top={crop_top} does not fit on "
        f"the {w}x{w / 2:g} canvas (need 0 <= crop_top <= {w / 2 - h:g}).")
  return _bev_grid(h, w, ho, wo, float(fov_deg), float(crop_top), bool(wrap))


@functools.lru_cache(maxsize=32)
def _bev_grid(h, w, ho, wo, fov_deg, crop_top, wrap):
  f = wo / 2 / np.tan(np.deg2rad(fov_deg) / 2)
  x = ho / 2 - np.arange(ho, dtype=np.float64)[:, None]
  y = wo / 2 - np.arange(wo, dtype=np.float64)[None, :]
  x, y = np.broadcast_arrays(x, y)
  theta = np.arctan2(-f, np.hypot(x, y)) + np.pi / 2
  phi = np.arctan2(y, x) + np.pi
  if wrap:
    # Azimuth clockwise from north is pi - phi; column W/2 is north.
    u = np.mod(w / 2 + (np.pi - phi) * w / (2 * np.pi), w)
  else:
    u = (1 - phi / (2 * np.pi)) * (w - 1)
  v = (1 - theta / np.pi) * (w / 2 - 1) - crop_top
  grid = np.stack([u, v], axis=-1).astype(np.float32)
  grid.setflags(write=False)
  return grid


def to_canvas_normalized(grid: np.ndarray, pano_hw: Sequence[int],
                         crop_top: float = 0.0) -> np.ndarray:
  """Crop pixel grid -> the authors' form: [-1, 1] on the W x W/2 canvas.

  That is what `torch.nn.functional.grid_sample(align_corners=True)` takes
  (x = column, y = row); useful to compare with their outputs.

  Args:
    grid: [..., 2] pixel coordinates from `bev_grid`.
    pano_hw: (H, W) of the crop.
    crop_top: as given to `bev_grid`.

  Returns:
    [..., 2] float64.
  """
  _, w = _hw(pano_hw, "pano_hw")
  g = np.asarray(grid, np.float64)
  return np.stack([g[..., 0] / (w - 1) * 2 - 1,
                   (g[..., 1] + crop_top) / (w / 2 - 1) * 2 - 1], axis=-1)


def pad_to_canvas(pano: np.ndarray, crop_top: int) -> np.ndarray:
  """[H, W, C] crop -> [W/2, W, C] canvas, black outside, as the authors do.

  Only for checks: `sample_bev` on the crop with `bev_grid(..., crop_top)`
  equals sampling this canvas with `bev_grid(..., crop_top=0)`.
  """
  h, w = pano.shape[:2]
  if int(crop_top) != crop_top or w % 2:
    raise ValueError(f"pad_to_canvas needs an integer crop_top and even W, "
                     f"got crop_top={crop_top}, W={w}.")
  canvas = np.zeros((w // 2, w) + pano.shape[2:], pano.dtype)
  canvas[int(crop_top):int(crop_top) + h] = pano
  return canvas


class BilinearPlan(NamedTuple):
  """A grid turned into the four neighbours and weights of every sample.

  Attributes:
    index: [4, Ho, Wo] int32 flat pixel index `row * W + col` of the
      top-left, top-right, bottom-left, bottom-right neighbour (clamped into
      the image; an outside neighbour has weight 0).
    weight: [4, Ho, Wo] float32 bilinear weights, 0 for outside neighbours.
  """
  index: np.ndarray
  weight: np.ndarray


def bilinear_plan(grid, pano_hw: Sequence[int],
                  wrap: bool = False) -> BilinearPlan:
  """Precomputes the bilinear neighbours of a grid (numpy or jax arrays).

  Corner-aligned (pixel centres at integer coordinates, as `grid_sample`
  with `align_corners=True` and `cv2.remap`); a neighbour outside the image
  gets weight 0 (the black canvas around a crop), except that with `wrap`
  columns are periodic, so x in (W-1, W) blends the last and the first
  column.

  Args:
    grid: [Ho, Wo, 2] float32 (x, y) pixel coordinates, e.g. `bev_grid`.
    pano_hw: (H, W) of the images the plan will sample.
    wrap: periodic columns (the seam at +-180 deg).

  Returns:
    A `BilinearPlan` of numpy arrays for a numpy grid (jax arrays inside a
    jit). Reuse it for every batch: it is the expensive part of sampling.
  """
  h, w = _hw(pano_hw, "pano_hw")
  xp = np if isinstance(grid, np.ndarray) else jnp
  grid = xp.asarray(grid, xp.float32)
  x, y = grid[..., 0], grid[..., 1]
  x0, y0 = xp.floor(x), xp.floor(y)
  fx, fy = x - x0, y - y0
  x0, y0 = x0.astype(xp.int32), y0.astype(xp.int32)
  index, weight = [], []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    yi = y0 + dy
    ok_y = (yi >= 0) & (yi < h)
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi = x0 + dx
      if wrap:
        xi = xp.mod(xi, w)
        ok = ok_y
      else:
        ok = ok_y & (xi >= 0) & (xi < w)
      weight.append(xp.where(ok, wy * wx, xp.float32(0)))
      index.append(xp.clip(yi, 0, h - 1) * w + xp.clip(xi, 0, w - 1))
  return BilinearPlan(xp.stack(index).astype(xp.int32),
                      xp.stack(weight).astype(xp.float32))


def _apply_plan(panos, plan: BilinearPlan, to_uint8: bool):
  b, h, w, c = panos.shape
  _, ho, wo = plan.index.shape
  # Batch and channels last: each gathered row is B*C contiguous values,
  # which XLA's CPU gather handles several times faster than [B, N, C].
  flat = jnp.transpose(panos, (1, 2, 0, 3)).reshape(h * w, b * c)
  index = plan.index.reshape(4, -1)
  weight = jnp.asarray(plan.weight, jnp.float32).reshape(4, -1)
  out = jnp.zeros((ho * wo, b * c), jnp.float32)
  for k in range(4):
    out = out + jnp.take(flat, index[k], axis=0, mode="clip").astype(
        jnp.float32) * weight[k][:, None]
  if to_uint8:
    out = jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
  return jnp.transpose(out.reshape(ho, wo, b, c), (2, 0, 1, 3))


@functools.partial(jax.jit, static_argnames=("wrap",))
def sample_bev(panos: jax.Array, grid: jax.Array,
               wrap: bool = False) -> jax.Array:
  """Bilinear sampling of a batch of panoramas at one grid (see
  `bilinear_plan` for the boundary rules); the plan is rebuilt per call, so
  for many batches prefer `project_uint8` with a precomputed plan.

  Args:
    panos: [B, H, W, C] any real dtype (uint8 is cheapest to move).
    grid: [Ho, Wo, 2] float32 (x, y) pixel coordinates, e.g. `bev_grid`.
    wrap: periodic columns (the seam at +-180 deg).

  Returns:
    [B, Ho, Wo, C] float32, in the input's value range.
  """
  plan = bilinear_plan(jnp.asarray(grid), panos.shape[1:3], wrap)
  return _apply_plan(panos, plan, to_uint8=False)


@jax.jit
def project_uint8(panos: jax.Array, plan: BilinearPlan) -> jax.Array:
  """The fast path: [B, H, W, C] uint8 -> [B, Ho, Wo, C] uint8 BEVs.

  Equal to `round(sample_bev(panos, grid))` for the grid the plan was made
  from (values in [0, 255]).
  """
  return _apply_plan(panos, plan, to_uint8=True)


def bev_plan(pano_hw: Sequence[int], out_hw: Sequence[int] | int,
             fov_deg: float, crop_top: float = 0.0,
             wrap: bool = False) -> BilinearPlan:
  """`bilinear_plan(bev_grid(...))`, cached per arguments; read-only numpy.

  Put it on the device once (`jax.device_put(plan)`) when it is reused for
  many batches on an accelerator.
  """
  out = (out_hw, out_hw) if isinstance(out_hw, (int, np.integer)) else out_hw
  return _bev_plan(_hw(pano_hw, "pano_hw"), _hw(out, "out_hw"),
                   float(fov_deg), float(crop_top), bool(wrap))


@functools.lru_cache(maxsize=8)
def _bev_plan(pano_hw, out_hw, fov_deg, crop_top, wrap):
  grid = bev_grid(pano_hw, out_hw, fov_deg, crop_top, wrap)
  plan = bilinear_plan(grid, pano_hw, wrap)
  for a in plan:
    a.setflags(write=False)
  return plan


def _hw(hw, name) -> Tuple[int, int]:
  if len(hw) != 2 or any(int(v) != v or v < 2 for v in hw):
    raise ValueError(f"{name} must be (height, width) in pixels, >= 2 each; "
                     f"got {tuple(hw)}.")
  return int(hw[0]), int(hw[1])
