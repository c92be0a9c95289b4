"""Satellite tiles and equirectangular panoramas of a synthetic world.

Panoramas follow the project's panorama convention, stated once in
`cvgl_jax/cfp/geometry.py` (module docstring, "Panorama convention"): column
x looks at azimuth 2 pi (x - W/2) / W clockwise from north, canvas row r at
elevation pi/2 - pi (r + 0.5) / (W/2). A CVUSA crop is a band of canvas rows
starting at `row0`. Satellite tiles are north-up.

The panorama casts one horizontal ray per column against the height field
(K samples, finer near the camera), takes the running maximum of each
sample's elevation angle and finds every row's first hit by a batched
`np.searchsorted` (of each sample among the rows, then a cumulative count):
O(W K log H + W H) instead of marching every pixel. Hits from above read
the albedo's mip pyramid at the pixel's footprint; hits from the side are
walls (Lambert-lit, with windows) or car bodies; both cast a short ray
toward the panorama's own sun for shadows. Trees
are ellipsoids on trunks, intersected analytically per pixel of their
bounding boxes and z-tested against the height field, so crowns stay round
near the camera and trunks do not vanish with distance. Then sky, clouds,
distance haze and a street-camera colour style.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from cvgl_jax.data.synthetic import world as world_lib


@dataclasses.dataclass(frozen=True)
class Pose:
  """Where and how a panorama is taken, and where its tile is centred.

  Attributes:
    row, col: true camera position, map cells (float).
    height_m: camera height above the ground.
    heading_rad: north error: the panorama's centre column looks at this
      azimuth (clockwise from north) instead of north.
    sun_az, sun_el: the panorama's sun, radians.
    tile_row, tile_col: centre of the satellite tile, map cells (the
      recorded position: true position plus GPS error).
  """

  row: float
  col: float
  height_m: float
  heading_rad: float
  sun_az: float
  sun_el: float
  tile_row: float
  tile_col: float


def _reflect(i, n):
  i = np.abs(i)
  period = 2 * (n - 1)
  i = np.mod(i, period)
  return np.where(i >= n, period - i, i)


def _remap(image, rows, cols):
  """Bilinear samples of `image` at float (rows, cols): [P, C] float32."""
  p = len(rows)
  width = 1024
  pad = (-p) % width
  x = np.pad(cols.astype(np.float32), (0, pad)).reshape(-1, width)
  y = np.pad(rows.astype(np.float32), (0, pad)).reshape(-1, width)
  out = cv2.remap(image, x, y, cv2.INTER_LINEAR,
                  borderMode=cv2.BORDER_REFLECT_101)
  channels = image.shape[-1] if image.ndim == 3 else 1
  return out.reshape(-1, channels)[:p].astype(np.float32)


def sample_mips(mips, rows, cols, level):
  """Trilinear samples of a mip pyramid (pyrDown: level l pixel i is centred
  on level-0 pixel 2^l i).

  Args:
    mips: list of [n_l, n_l, C] uint8 arrays.
    rows, cols: [P] level-0 coordinates.
    level: [P] float mip level (0 = full resolution).

  Returns:
    [P, C] float32.
  """
  level = np.clip(level, 0, len(mips) - 1)
  l0 = np.minimum(np.floor(level).astype(np.int64), len(mips) - 1)
  frac = (level - l0)[:, None].astype(np.float32)
  out = np.empty((len(rows), mips[0].shape[-1]), np.float32)
  for lv in np.unique(l0):
    sel = np.flatnonzero(l0 == lv)
    s = 2.0 ** lv
    a = _remap(mips[lv], rows[sel] / s, cols[sel] / s)
    if lv + 1 < len(mips):
      b = _remap(mips[lv + 1], rows[sel] / (2 * s), cols[sel] / (2 * s))
      a += (b - a) * frac[sel]
    out[sel] = a
  return out


def ray_distances(max_ray_m: float, width: int) -> np.ndarray:
  """[K] horizontal sample distances (metres) of one panorama column ray:
  0.1 m apart near the camera, then about a column's angular width apart."""
  step = 2 * math.pi / width
  d, out = 0.15, []
  while d < max_ray_m:
    out.append(d)
    d += max(0.1, d * step * 0.9)
  return np.array(out)


def canvas_elevations(width: int, row0: float, rows: int) -> np.ndarray:
  """[rows] elevations (radians) of canvas rows row0 .. row0 + rows - 1 of
  a W x W/2 panorama canvas."""
  return math.pi / 2 - math.pi * (np.arange(rows) + row0 + 0.5) / (width / 2)


def _sun_vector(az, el):
  """Unit vector toward the sun in (row = south, col = east, up)."""
  return np.array([-math.cos(az) * math.cos(el),
                   math.sin(az) * math.cos(el), math.sin(el)])


# Distances (metres) at which a shadow ray samples the occluder map: fine
# near the surface (cars, trunks), coarse far away (buildings).
_SHADOW_STEPS = np.array([0.3, 0.7, 1.2, 1.9, 2.8, 4.0, 5.6, 7.7, 10.5,
                          14.2, 19.0, 25.0, 33.0], np.float32)


def _in_shadow(world, south, east, z, sun_az, sun_el):
  """[P] bool: whether points ((south, east) metres, z metres up) are cut
  off from the sun by the world's occluders (buildings, cars, crowns)."""
  n, cell = world.size, world.cell_m
  rise = math.tan(sun_el)
  steps = _SHADOW_STEPS[_SHADOW_STEPS * rise < 40.0]
  r = (south.astype(np.float32)[:, None] / cell -
       np.float32(math.cos(sun_az) / cell) * steps)
  c = (east.astype(np.float32)[:, None] / cell +
       np.float32(math.sin(sun_az) / cell) * steps)
  # Clipping (not reflecting) at the border is enough for short rays.
  idx = (np.clip(np.rint(r), 0, n - 1).astype(np.int32) * n +
         np.clip(np.rint(c), 0, n - 1).astype(np.int32))
  occ = world.occluder.ravel()[idx]
  ray = z.astype(np.float32)[:, None] + (steps * np.float32(rise) + 0.05)
  return np.any(occ > ray, axis=1)


def _wall_normals(world, ri, ci, dir_r, dir_c):
  """Outward wall normals (row, col) at wall cells, snapped to the street
  grid; facing the ray where the height field gives no direction."""
  n, h = world.size, world.height
  g_r = h[_reflect(ri + 2, n), ci] - h[_reflect(ri - 2, n), ci]
  g_c = h[ri, _reflect(ci + 2, n)] - h[ri, _reflect(ci - 2, n)]
  ang = np.arctan2(-g_c, -g_r)
  k = np.round((ang - world.axis_angle) / (math.pi / 2))
  ang = world.axis_angle + k * math.pi / 2
  flat = (np.abs(g_r) + np.abs(g_c)) < 1e-3
  n_r = np.where(flat, -dir_r, np.cos(ang))
  n_c = np.where(flat, -dir_c, np.sin(ang))
  return n_r, n_c


def _box_pixels(r_lo, r_hi, c_lo, c_hi, width):
  """Pixels of boxes [r_lo, r_hi) x [c_lo, c_hi] (columns wrap): (box of
  each pixel, row, column)."""
  nc = np.maximum(c_hi - c_lo + 1, 0)
  count = nc * np.maximum(r_hi - r_lo, 0)
  total = int(count.sum())
  box = np.repeat(np.arange(len(count)), count)
  local = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
  return (box, r_lo[box] + local // nc[box],
          np.mod(c_lo[box] + local % nc[box], width))


def _trees(world, pose, az_col, elev, row0, width, max_ray_m):
  """Crown and trunk pixels: (flat pixel index, ray length, RGB) arrays.

  Crowns: every pixel of a crown's bounding box casts its ray at the
  ellipsoid. Trunks: a box at least one column wide, so that they stay
  visible at any distance.
  """
  t = world.trees
  cell, h = world.cell_m, pose.height_m
  rel = (t.pos - np.array([pose.row, pose.col])) * cell   # (south, east) m
  dist = np.hypot(rel[:, 0], rel[:, 1])
  keep = (dist < max_ray_m) & (dist > t.radius + 0.3)
  if not np.any(keep):
    return None
  rel, dist = rel[keep], dist[keep]
  rad, rz, cz = t.radius[keep], t.radius_z[keep], t.centre_z[keep]
  trunk, colour = t.trunk[keep], t.colour[keep]
  rows_out = len(elev)
  per_rad = width / (2 * math.pi)
  to_row = lambda e: (math.pi / 2 - e) * (width / 2) / math.pi - 0.5 - row0
  rows_of = lambda e_hi, e_lo: (
      np.clip(np.floor(to_row(e_hi)), 0, rows_out).astype(np.int64),
      np.clip(np.ceil(to_row(e_lo)) + 1, 0, rows_out).astype(np.int64))
  az = np.arctan2(rel[:, 1], -rel[:, 0]) - pose.heading_rad
  col_c = width / 2 + az * per_rad
  sun = _sun_vector(pose.sun_az, pose.sun_el)
  flats, depths, rgbs = [], [], []

  # Crowns: ellipsoids, made spheres by scaling heights by radius / rz.
  half = np.arcsin(np.minimum(rad / dist, 1.0)) * per_rad + 1
  near, far = dist - rad, dist + rad
  bottom, top = cz - rz - h, cz + rz - h
  r_lo, r_hi = rows_of(
      np.maximum(np.arctan2(top, near), np.arctan2(top, far)),
      np.minimum(np.arctan2(bottom, near), np.arctan2(bottom, far)))
  tree, pr, pc = _box_pixels(r_lo, r_hi, np.floor(col_c - half).astype(
      np.int64), np.ceil(col_c + half).astype(np.int64), width)
  if len(tree):
    e = elev[pr]
    ce, se = np.cos(e), np.sin(e)
    a_col = az_col[pc]
    s = (rad / rz)[tree]
    v = np.stack([-np.cos(a_col) * ce, np.sin(a_col) * ce, se * s], -1)
    cen = np.stack([rel[tree, 0], rel[tree, 1], (cz[tree] - h) * s], -1)
    a = np.einsum("pi,pi->p", v, v)
    b = np.einsum("pi,pi->p", v, cen)
    c = np.einsum("pi,pi->p", cen, cen) - rad[tree] ** 2
    disc = b * b - a * c
    depth = (b - np.sqrt(np.maximum(disc, 0))) / a
    hit = (disc > 0) & (depth > 0)
    tree, pr, pc, depth, s = tree[hit], pr[hit], pc[hit], depth[hit], s[hit]
    pts = depth[:, None] * v[hit] - cen[hit]
    nrm = pts * np.stack([np.ones_like(s), np.ones_like(s), s], -1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True) + 1e-9
    tex_u = np.arctan2(pts[:, 1], pts[:, 0]) * rad[tree] * 8.0
    tex_v = pts[:, 2] / s * 8.0
    tex = world.leaf_texture[np.mod(tex_v.astype(np.int64), 64),
                             np.mod(tex_u.astype(np.int64), 64)]
    lam = np.clip(nrm @ sun, 0, 1)
    shade = (0.42 + 0.62 * lam) * (0.72 + 0.28 * (nrm[:, 2] + 1) / 2)
    flats.append(pr * width + pc)
    depths.append(depth)
    rgbs.append(colour[tree] * (shade * (1 + 0.3 * tex))[:, None])

  # Trunks: vertical cylinders up into the crown, at least a column wide.
  twid = np.maximum(np.arctan2(trunk, dist) * per_rad, 0.5)
  r_lo, r_hi = rows_of(np.arctan2(cz - 0.4 * rz - h, dist),
                       np.arctan2(-h, dist))
  tree, pr, pc = _box_pixels(r_lo, r_hi, np.floor(col_c - twid).astype(
      np.int64), np.ceil(col_c + twid).astype(np.int64), width)
  if len(tree):
    dcol = np.mod(pc - col_c[tree] + width / 2, width) - width / 2
    on = np.abs(dcol) <= twid[tree]
    tree, pr, pc = tree[on], pr[on], pc[on]
    side = np.clip(-np.cos(az_col[pc] - pose.sun_az), 0, 1)
    flats.append(pr * width + pc)
    depths.append(dist[tree] / np.maximum(np.cos(elev[pr]), 1e-6))
    rgbs.append(np.float32((92, 72, 54)) * (0.55 + 0.4 * side)[:, None])
  if not flats:
    return None
  return (np.concatenate(flats), np.concatenate(depths),
          np.concatenate(rgbs).astype(np.float32))


def render_panorama(world: world_lib.World, pose: Pose, width: int,
                    row0: float, rows: int, max_ray_m: float,
                    rng: np.random.Generator) -> np.ndarray:
  """Renders rows row0 .. row0 + rows - 1 of a W x W/2 panorama canvas.

  Args:
    world: the world.
    pose: camera position, height, heading error and sun.
    width: W, the panorama's width in pixels (360 deg).
    row0: canvas row of the first output row (0 for a full panorama,
      `SyntheticConfig.cvusa_top` for the CVUSA band).
    rows: output height (W/2 for a full panorama).
    max_ray_m: view distance; beyond it the horizon haze.
    rng: sky, clouds, haze and colour style of this view.

  Returns:
    [rows, W, 3] uint8 RGB.
  """
  n, cell, h = world.size, world.cell_m, pose.height_m
  az = 2 * math.pi * (np.arange(width) - width / 2) / width + pose.heading_rad
  dir_r, dir_c = -np.cos(az), np.sin(az)
  d = ray_distances(max_ray_m, width)
  k_n = len(d)
  ri = _reflect(np.rint(pose.row + dir_r[:, None] * (d / cell)).astype(
      np.int32), n)
  ci = _reflect(np.rint(pose.col + dir_c[:, None] * (d / cell)).astype(
      np.int32), n)
  hgt = world.height.ravel()[ri * n + ci]                       # [W, K]
  # Running max of each sample's elevation, as its tangent.
  run = np.maximum.accumulate(((hgt - h) / d).astype(np.float32), axis=1)
  elev = canvas_elevations(width, row0, rows)
  tau_rows = np.tan(elev)                                       # decreasing
  # Row r first hits sample k(r) = #{k : run_k < tan(elev_r)}. Inverted to
  # stay cheap: sample k lies below the rows r < s_k, s_k = #{r : tan(elev_r)
  # > run_k}, so k(r) = K - #{k : s_k <= r}: one search in the R rows per
  # sample and a cumulative histogram per column.
  below = np.searchsorted(-tau_rows, -run.ravel())
  owner = np.repeat(np.arange(width) * (rows + 1), k_n)
  hist = np.bincount(owner + below, minlength=width * (rows + 1))
  k = k_n - np.cumsum(hist.reshape(width, rows + 1), axis=1)[:, :rows]
  k = np.ascontiguousarray(k.T)                                 # [R, W]
  hit = k < k_n
  kk = np.minimum(k, k_n - 1)
  cols = np.broadcast_to(np.arange(width), k.shape)
  hk = hgt[cols, kk]
  dk = d[kk]
  dprev = np.where(kk > 0, d[np.maximum(kk - 1, 0)], 0.0)
  tau = tau_rows[:, None]
  top = hit & (tau < 0) & (h + dprev * tau >= hk)
  side = hit & ~top
  horiz = np.where(top, (hk - h) / np.where(tau < 0, tau, -1.0),
                   0.5 * (dprev + dk))
  cos_e = np.cos(elev)[:, None]
  depth = np.ascontiguousarray(np.where(hit, horiz / cos_e, np.inf))
  img = np.zeros((rows, width, 3), np.float32)
  sun = _sun_vector(pose.sun_az, pose.sun_el)

  # Tops: ground, roofs, car roofs from the albedo pyramid.
  tr, tc = np.nonzero(top)
  if len(tr):
    dist = horiz[tr, tc]
    pr = pose.row + dir_r[tc] * dist / cell
    pc = pose.col + dir_c[tc] * dist / cell
    foot_t = dist * 2 * math.pi / width
    foot_r = foot_t / np.maximum(np.abs(tau[tr, 0]), 1e-3)
    level = np.log2(np.maximum(np.sqrt(foot_t * foot_r) / cell, 1.0))
    rgb = sample_mips(world.albedo_mips, pr, pc, level)
    lit = ~_in_shadow(world, pr * cell, pc * cell, hk[tr, tc], pose.sun_az,
                      pose.sun_el)
    img[tr, tc] = rgb * (0.5 + 0.7 * sun[2] * lit)[:, None]

  # Sides: walls with windows, car bodies.
  sr, sc = np.nonzero(side)
  if len(sr):
    wri, wci = ri[sc, kk[sr, sc]], ci[sc, kk[sr, sc]]
    n_r, n_c = _wall_normals(world, wri, wci, dir_r[sc], dir_c[sc])
    lam = np.clip(n_r * sun[0] + n_c * sun[1], 0, 1)
    dist = horiz[sr, sc]
    y = h + tau[sr, 0] * dist
    top_h = hk[sr, sc]
    rgb = world.side[wri, wci].astype(np.float32)
    kind = world.kind[wri, wci]
    south = pose.row * cell + dir_r[sc] * dist
    east = pose.col * cell + dir_c[sc] * dist
    along = south * -n_c + east * n_r         # metres along the wall
    win = ((kind == world_lib.BUILDING) & (np.mod(y, 3.0) > 1.0) &
           (np.mod(y, 3.0) < 2.1) & (np.mod(along, 2.7) > 0.6) &
           (np.mod(along, 2.7) < 1.8) & (y > 0.9) & (y < top_h - 0.5))
    glass = np.float32((58, 70, 88)) + np.float32((30, 30, 34)) * (
        (np.mod(y, 3.0) - 1.0) / 1.1)[:, None]
    rgb = np.where(win[:, None], glass, rgb)
    car = kind == world_lib.CAR
    rgb = np.where((car & (y < 0.38))[:, None], np.float32((25, 25, 28)), rgb)
    rgb = np.where((car & (y > top_h - 0.55) & (y < top_h - 0.08))[:, None],
                   np.float32((35, 40, 50)), rgb)
    lam *= ~_in_shadow(world, south + 0.3 * n_r, east + 0.3 * n_c, y,
                       pose.sun_az, pose.sun_el)
    shade = (0.5 + 0.62 * lam) * (0.86 + 0.14 * np.clip(y / 3.0, 0, 1))
    img[sr, sc] = rgb * shade[:, None]

  # Trees, z-tested against the height field.
  found = _trees(world, pose, az, elev, row0, width, max_ray_m)
  if found is not None:
    flat, tdepth, trgb = found
    zbuf = depth.ravel()
    front = tdepth < zbuf[flat]
    flat, tdepth, trgb = flat[front], tdepth[front], trgb[front]
    # One float key sorts by pixel, then by depth within a pixel.
    order = np.argsort(flat + tdepth / (tdepth.max() * 1.01 + 1e-9))
    flat, tdepth, trgb = flat[order], tdepth[order], trgb[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    flat, tdepth, trgb = flat[first], tdepth[first], trgb[first]
    img.reshape(-1, 3)[flat] = trgb
    depth.reshape(-1)[flat] = tdepth
    hit.reshape(-1)[flat] = True

  # Sky with clouds; the horizon colour is also the haze colour.
  haze_rgb = (np.float32((196, 210, 224)) *
              rng.uniform(0.93, 1.05, 3)).astype(np.float32)
  zenith = (np.float32((62, 112, 198)) *
            rng.uniform(0.85, 1.1, 3)).astype(np.float32)
  scale, cover = rng.uniform(8, 20), rng.uniform(0.4, 1.8)
  fog_pow, fog_amount = rng.uniform(1.3, 2.0), rng.uniform(0.75, 1.0)
  exposure, saturation = rng.uniform(0.92, 1.1), rng.uniform(0.95, 1.2)
  cloud_tex = world_lib.value_noise(rng, (128, 128), 16.0, 3)
  mr, mc = np.nonzero(~hit)
  if len(mr):
    e = elev[mr]
    e0 = np.maximum(e, 0)
    col = haze_rgb + (zenith - haze_rgb) * (1 - np.exp(-4 * e0))[:, None]
    cot = 1 / np.tan(np.maximum(e, 0.02))
    cn = _remap(cloud_tex, cot * np.cos(az[mc]) * scale + 64,
                cot * np.sin(az[mc]) * scale + 64)[:, 0]
    alpha = np.clip((cn - cover) / 0.7, 0, 1) * (1 - np.exp(-10 * e0))
    cloud = np.float32((244, 245, 248)) * (
        0.82 + 0.18 * np.clip(cn - cover, 0, 1))[:, None]
    col += (cloud - col) * alpha[:, None]
    col[e < 0] = haze_rgb
    img[mr, mc] = col
  fog = np.clip(np.where(hit, depth, 0.0) / max_ray_m, 0, 1).astype(
      np.float32) ** np.float32(fog_pow) * np.float32(fog_amount)
  img += (haze_rgb - img) * fog[..., None]

  # Street-camera style: exposure, saturation, sensor noise.
  img *= np.float32(exposure)
  gray = (img @ np.full(3, 1 / 3, np.float32))[..., None]
  img = gray + (img - gray) * np.float32(saturation)
  img += rng.standard_normal((rows, width, 1), dtype=np.float32) * 1.8
  return np.clip(img, 0, 255).astype(np.uint8)


def render_satellite(world: world_lib.World, row: float, col: float,
                     tile_m: float, px: int, appearance: float,
                     rng: np.random.Generator) -> np.ndarray:
  """A north-up satellite tile centred on (row, col) map cells.

  Args:
    world: the world (its satellite view is lit by its own sun).
    row, col: tile centre, map cells.
    tile_m: ground side of the tile, metres.
    px: tile side, pixels.
    appearance: strength of the tile's own low-frequency colour field (an
      independent capture: other season, exposure, processing); 0 for none.
    rng: that field and the sensor noise.

  Returns:
    [px, px, 3] uint8 RGB; pixel (i, j) is centred on the ground point
    (row - T/2 + (i + 0.5) T/px, col - T/2 + (j + 0.5) T/px) in cells,
    T = tile_m / cell_m.
  """
  t_cells = tile_m / world.cell_m
  scale = t_cells / px
  level = int(np.clip(math.floor(math.log2(max(scale, 1.0))), 0,
                      len(world.sat_mips) - 1))
  s = 2.0 ** level
  m = np.float32([[scale / s, 0, (col - t_cells / 2 + 0.5 * scale) / s],
                  [0, scale / s, (row - t_cells / 2 + 0.5 * scale) / s]])
  tile = cv2.warpAffine(world.sat_mips[level], m, (px, px),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REFLECT_101).astype(np.float32)
  field = world_lib.smooth_field(rng, (px, px), 3, 4)
  tile *= np.exp(appearance * (0.25 * field[..., :3] + 0.35 * field[..., 3:]))
  tile += rng.normal(0, 2.0, tile.shape).astype(np.float32)
  return np.clip(tile, 0, 255).astype(np.uint8)
