"""Procedural worlds: a height field with material, colour and tree maps.

A world is a square map of `map_cells`^2 cells at `cell_m` metres each:
streets on a random grid with T-junctions (whole street segments dropped),
a land use per block (houses with yards, commercial blocks with parking,
parks with ponds, dirt lots, parking lots), buildings with roof and wall
colours, cars, and trees. The layout is drawn axis-aligned in a larger
"street frame" and rotated into the map by a random angle so that streets
are not north-aligned. Everything is numpy, drawn from one Generator.

Map coordinates: continuous (row, col) in cells, pixel centres at integers;
row 0 is the north edge, columns grow to the east (a north-up image, like
the satellite tiles of cfp/geometry.py's panorama convention).

Trees are not in the height field: they are kept as a list of ellipsoid
crowns on cylinder trunks, so that the panorama renderer can see under
crowns and keep thin trunks visible; the satellite view draws their crowns
into its own height and colour maps.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from cvgl_jax.data.synthetic import config as config_lib

# Materials of the `kind` map.
GRASS, ROAD, MARK, SIDEWALK, DIRT, WATER, PARKING, BUILDING, CAR = range(9)

_GROUND_RGB = np.array([
    (80, 125, 55),     # grass (mixed with _GRASS_2 by low-frequency noise)
    (74, 74, 78),      # road
    (235, 235, 228),   # mark (the object colour map overrides it)
    (186, 180, 168),   # sidewalk
    (150, 122, 88),    # dirt
    (42, 74, 96),      # water
    (112, 112, 114),   # parking
    (0, 0, 0),         # building: roof colour from the object map
    (0, 0, 0),         # car: body colour from the object map
], np.float32)
_GRASS_2 = np.array((118, 142, 64), np.float32)
_DRY = np.array((160, 148, 100), np.float32)
# Per-material amplitude of (fine, medium) texture noise.
_TEXTURE = np.array([(0.10, 0.12), (0.06, 0.05), (0.03, 0.0), (0.05, 0.03),
                     (0.08, 0.10), (0.03, 0.06), (0.05, 0.05), (0.04, 0.03),
                     (0.02, 0.0)], np.float32)

_ROOFS = np.array([(122, 122, 128), (152, 82, 62), (88, 88, 94),
                   (200, 194, 184), (112, 72, 52), (168, 168, 158),
                   (96, 110, 120)], np.float32)
_WALLS = np.array([(214, 202, 180), (190, 190, 196), (172, 118, 88),
                   (232, 226, 214), (150, 150, 156), (200, 178, 140)],
                  np.float32)
_CARS = np.array([(232, 232, 232), (182, 184, 188), (30, 30, 34),
                  (72, 72, 78), (165, 30, 30), (38, 62, 142), (40, 82, 52),
                  (205, 182, 60)], np.float32)
_LEAVES = np.array([(58, 96, 40), (72, 110, 44), (48, 84, 42),
                    (86, 116, 50)], np.float32)


@dataclasses.dataclass
class Trees:
  """Trees of a world, T of them; positions in map cells, sizes in metres.

  Attributes:
    pos: [T, 2] float64 (row, col) of the trunk.
    radius: [T] horizontal crown radius.
    radius_z: [T] vertical crown radius.
    centre_z: [T] height of the crown's centre above the ground.
    trunk: [T] trunk radius.
    colour: [T, 3] float32 leaf colour in [0, 255].
  """

  pos: np.ndarray
  radius: np.ndarray
  radius_z: np.ndarray
  centre_z: np.ndarray
  trunk: np.ndarray
  colour: np.ndarray


@dataclasses.dataclass
class World:
  """One rendered-ready world (N = map_cells).

  Attributes:
    index: the world's number within its dataset.
    cell_m: metres per cell.
    height: [N, N] float32 metres of solid things (buildings, cars).
    kind: [N, N] uint8 material (GRASS ... CAR).
    albedo_mips: unlit top-down colour of the solid world, a mip pyramid of
      uint8 [n, n, 3] arrays (level 0 is N x N).
    side: [N, N, 3] uint8 wall / car body colour seen from the side.
    sat_mips: the lit, styled satellite view of the world (with tree
      crowns and shadows of the satellite sun), a uint8 mip pyramid.
    trees: the world's trees.
    axis_angle: direction of the street grid, radians, as atan2(col, row)
      of one street axis; walls face this angle + k pi/2.
    sat_sun: (azimuth clockwise from north, elevation), radians.
    camera_cells: [P] int64 flat indices of cells a camera may stand on:
      road away from cars, crowns and the map border.
    leaf_texture: [64, 64] float32 tileable noise in about [-1, 1].
    occluder: [N, N] float16 metres: `height` with the tree crowns' tops,
      what casts shadows in both views.
  """

  index: int
  cell_m: float
  height: np.ndarray
  kind: np.ndarray
  albedo_mips: list
  side: np.ndarray
  sat_mips: list
  trees: Trees
  axis_angle: float
  sat_sun: tuple
  camera_cells: np.ndarray
  leaf_texture: np.ndarray
  occluder: np.ndarray

  @property
  def size(self) -> int:
    return self.height.shape[0]


def value_noise(rng: np.random.Generator, shape, scale: float,
                octaves: int = 3) -> np.ndarray:
  """Multi-octave value noise, zero mean and unit std.

  Args:
    rng: source of the random lattices.
    shape: (H, W) of the output.
    scale: lattice spacing of the coarsest octave, in cells; each further
      octave halves it (and its weight).
    octaves: how many octaves; octaves finer than 1 cell are skipped.

  Returns:
    [H, W] float32.
  """
  h, w = shape
  out = np.zeros((h, w), np.float32)
  for o in range(octaves):
    s = scale / 2 ** o
    if s < 1:
      break
    gh, gw = int(math.ceil(h / s)) + 3, int(math.ceil(w / s)) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = cv2.resize(grid, (int(round(gw * s)), int(round(gh * s))),
                    interpolation=cv2.INTER_CUBIC)
    oy, ox = int(s), int(s)
    out += up[oy:oy + h, ox:ox + w] * 0.5 ** o
  return out / (out.std() + 1e-6)


def smooth_field(rng: np.random.Generator, shape, cells: int,
                 channels: int = 1) -> np.ndarray:
  """Low-frequency noise: a (cells + 1)^2 random lattice spanning `shape`,
  cubic-upsampled. Returns [H, W, channels] float32, about unit std."""
  grid = rng.standard_normal((cells + 1, cells + 1, channels)).astype(
      np.float32)
  out = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
  return out.reshape(shape[0], shape[1], channels)


def _lines(rng, length, block):
  """Street positions (metres) along one axis, and their half widths."""
  pos = [rng.uniform(-block[1], 0.0)]
  while pos[-1] < length + block[1]:
    pos.append(pos[-1] + rng.uniform(*block))
  pos = np.array(pos)
  return pos, rng.uniform(3.5, 6.5, len(pos)), rng.uniform(1.5, 3.0, len(pos))


def _nearest(lines, coord):
  """Index of the nearest line to each coordinate, and the signed offset."""
  k = np.clip(np.searchsorted(lines, coord), 1, len(lines) - 1)
  left = coord - lines[k - 1] < lines[k] - coord
  k = np.where(left, k - 1, k)
  return k, coord - lines[k]


class _Canvas:
  """The street-frame maps being drawn, with helpers that clip to them."""

  def __init__(self, size, cell_m):
    self.size, self.cell = size, cell_m
    self.kind = np.full((size, size), GRASS, np.uint8)
    self.height = np.zeros((size, size), np.float32)
    self.top = np.zeros((size, size, 3), np.uint8)
    self.side = np.zeros((size, size, 3), np.uint8)
    self.trees = []   # (row, col) street-frame cells, radius, rz, cz, trunk

  def cells(self, y0, y1, x0, x1):
    """Metres -> clipped cell slices, or None when empty."""
    r0, r1 = int(round(y0 / self.cell)), int(round(y1 / self.cell))
    c0, c1 = int(round(x0 / self.cell)), int(round(x1 / self.cell))
    r0, c0 = max(r0, 0), max(c0, 0)
    r1, c1 = min(r1, self.size), min(c1, self.size)
    if r1 <= r0 or c1 <= c0:
      return None
    return slice(r0, r1), slice(c0, c1)

  def box(self, y0, y1, x0, x1, kind, height=None, top=None, side=None):
    """Paints a rectangle (metres); returns its cell slices or None."""
    s = self.cells(y0, y1, x0, x1)
    if s is None:
      return None
    self.kind[s] = kind
    if height is not None:
      self.height[s] = height
    if top is not None:
      self.top[s] = top
    if side is not None:
      self.side[s] = side
    return s

  def kind_at(self, y, x):
    r, c = int(y / self.cell), int(x / self.cell)
    if 0 <= r < self.size and 0 <= c < self.size:
      return int(self.kind[r, c])
    return -1

  def car(self, rng, yc, xc, along_x, need=(ROAD, PARKING, SIDEWALK)):
    """A car centred at (yc, xc) metres if the ground there allows it."""
    length, width = rng.uniform(4.2, 5.0), rng.uniform(1.75, 2.0)
    hl, hw = (length / 2, width / 2) if along_x else (width / 2, length / 2)
    corners = [(yc + a * hw, xc + b * hl) for a in (-1, 1) for b in (-1, 1)]
    if any(self.kind_at(y, x) not in need for y, x in corners):
      return
    colour = _CARS[rng.integers(len(_CARS))]
    h = rng.uniform(1.4, 1.7) if rng.random() > 0.1 else rng.uniform(1.9, 2.3)
    s = self.box(yc - hw, yc + hw, xc - hl, xc + hl, CAR, h, colour, colour)
    if s is None:
      return
    # Dark windscreen and rear window across the roof.
    glass = (28, 32, 40)
    if along_x:
      n = s[1].stop - s[1].start
      for a, b in ((0.18, 0.32), (0.72, 0.82)):
        self.top[s[0], s[1].start + int(a * n):s[1].start + int(b * n)] = glass
    else:
      n = s[0].stop - s[0].start
      for a, b in ((0.18, 0.32), (0.72, 0.82)):
        self.top[s[0].start + int(a * n):s[0].start + int(b * n), s[1]] = glass

  def tree(self, rng, y, x, scale=1.0):
    """A tree at (y, x) metres if it stands on open ground."""
    if self.kind_at(y, x) not in (GRASS, DIRT, SIDEWALK):
      return
    radius = rng.uniform(1.6, 4.2) * scale
    rz = radius * rng.uniform(0.85, 1.3)
    trunk_h = rng.uniform(1.2, 4.5)
    # Cell coordinates with pixel centres at integers, as cv2's warps.
    self.trees.append((y / self.cell - 0.5, x / self.cell - 0.5, radius, rz,
                       trunk_h + rz, rng.uniform(0.12, 0.28) * scale))


def _parking(canvas, rng, y0, y1, x0, x1, fill):
  """Parking surface with stall lines and cars in a fraction of the stalls."""
  s = canvas.box(y0, y1, x0, x1, PARKING)
  if s is None:
    return
  cell = canvas.cell
  yy = (np.arange(s[0].start, s[0].stop) + 0.5) * cell - y0
  xx = (np.arange(s[1].start, s[1].stop) + 0.5) * cell - x0
  band = np.mod(yy, 17.0) < 11.0
  line = np.mod(xx, 2.6) < 0.2
  mark = band[:, None] & line[None, :]
  sub = canvas.kind[s]
  sub[mark & (sub == PARKING)] = MARK
  canvas.top[s][mark] = (228, 228, 222)
  for row0 in np.arange(0.0, y1 - y0 - 5.5, 17.0):
    for col in np.arange(1.3, x1 - x0 - 1.3, 2.6):
      for half in (0.0, 5.5):
        if rng.random() < fill:
          canvas.car(rng, y0 + row0 + half + 2.75, x0 + col, False,
                     need=(PARKING, MARK))


def _block(canvas, rng, y0, y1, x0, x1):
  """Fills one block's interior (metres, street frame) by its land use."""
  if y1 - y0 < 10 or x1 - x0 < 10:
    return
  use = rng.choice(5, p=[0.4, 0.22, 0.16, 0.1, 0.12])
  if use == 0:      # Houses on lots facing the two long sides.
    depth = (y1 - y0) / 2
    for top_side in (True, False):
      x = x0
      while x < x1 - 10:
        lot = min(rng.uniform(14, 22), x1 - x)
        w = rng.uniform(7, max(7.5, min(14, lot - 3)))
        d = rng.uniform(7, max(7.5, min(13, depth - 5)))
        setback = rng.uniform(3, 6)
        cx = x + lot / 2 + rng.uniform(-1, 1)
        ya = y0 + setback if top_side else y1 - setback - d
        roof = _ROOFS[rng.integers(len(_ROOFS))]
        wall = 0.35 * roof + 0.65 * _WALLS[rng.integers(len(_WALLS))]
        if rng.random() < 0.5:   # driveway with maybe a car
          dx = cx + w / 2 + 0.5
          if dx + 3 < x + lot:
            ya2, yb2 = (y0, ya + d) if top_side else (ya, y1)
            canvas.box(ya2, yb2, dx, dx + 3, SIDEWALK)
            if rng.random() < 0.6:
              canvas.car(rng, (y0 + setback / 2) if top_side else
                         (y1 - setback / 2), dx + 1.5, False)
        s = canvas.box(ya, ya + d, cx - w / 2, cx + w / 2, BUILDING,
                       rng.uniform(4, 9), roof, wall)
        if s is not None:   # a pitched roof: one half darker from above
          half = s[0].start + (s[0].stop - s[0].start) // 2
          canvas.top[half:s[0].stop, s[1]] = (roof * 0.82).astype(np.uint8)
        for _ in range(rng.integers(0, 4)):
          canvas.tree(rng, rng.uniform(y0 + 1, y1 - 1),
                      rng.uniform(x, x + lot))
        x += lot
  elif use == 1:    # Commercial: large buildings on a parking lot.
    _parking(canvas, rng, y0, y1, x0, x1, 0.45)
    for _ in range(rng.integers(1, 3)):
      h, w = (y1 - y0) * rng.uniform(0.3, 0.6), (x1 - x0) * rng.uniform(
          0.25, 0.55)
      by, bx = rng.uniform(y0 + 2, y1 - h - 2), rng.uniform(x0 + 2,
                                                            x1 - w - 2)
      roof = _ROOFS[rng.integers(len(_ROOFS))]
      wall = 0.3 * roof + 0.7 * _WALLS[rng.integers(len(_WALLS))]
      canvas.box(by, by + h, bx, bx + w, BUILDING, rng.uniform(8, 24), roof,
                 wall)
  elif use == 2:    # Park: many trees, maybe a pond.
    if rng.random() < 0.45:
      cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
      ry = rng.uniform(3, max(3.5, (y1 - y0) / 3))
      rx = rng.uniform(3, max(3.5, (x1 - x0) / 3))
      s = canvas.cells(cy - ry, cy + ry, cx - rx, cx + rx)
      if s is not None:
        yy = (np.arange(s[0].start, s[0].stop) + 0.5) * canvas.cell - cy
        xx = (np.arange(s[1].start, s[1].stop) + 0.5) * canvas.cell - cx
        pond = (yy[:, None] / ry) ** 2 + (xx[None, :] / rx) ** 2 < 1
        canvas.kind[s][pond] = WATER
    for _ in range(int((y1 - y0) * (x1 - x0) / 90)):
      canvas.tree(rng, rng.uniform(y0, y1), rng.uniform(x0, x1))
  elif use == 3:    # Dirt lot with a few trees and cars.
    canvas.box(y0, y1, x0, x1, DIRT)
    for _ in range(int((y1 - y0) * (x1 - x0) / 500)):
      canvas.tree(rng, rng.uniform(y0, y1), rng.uniform(x0, x1), 0.8)
    for _ in range(rng.integers(0, 4)):
      canvas.car(rng, rng.uniform(y0 + 3, y1 - 3), rng.uniform(x0 + 3, x1 - 3),
                 bool(rng.random() < 0.5), need=(DIRT,))
  else:             # Parking lot.
    _parking(canvas, rng, y0, y1, x0, x1, 0.6)


def _streets(canvas, rng, block):
  """Draws the street grid; returns per-axis street lines for later use."""
  n, cell = canvas.size, canvas.cell
  coord = (np.arange(n) + 0.5) * cell
  # Axis 0: streets along x at fixed y; axis 1: along y at fixed x.
  drawn = [_lines(rng, n * cell, block) for _ in (0, 1)]
  lines = []
  masks = []
  for axis in (0, 1):
    pos, hw, walk = drawn[axis]
    # keep[k, b]: street k runs through block b of the other axis; dropped
    # segments make T-junctions and dead ends.
    keep = rng.random((len(pos), len(drawn[1 - axis][0]) + 1)) > 0.22
    lines.append((pos, hw, walk, keep))
  for axis in (0, 1):
    pos, hw, walk, keep = lines[axis]
    other = lines[1 - axis][0]
    k, off = _nearest(pos, coord)
    blk = np.searchsorted(other, coord)
    kept = keep[k][:, blk]       # [along this axis, along the other]
    road = (np.abs(off) < hw[k])[:, None] & kept
    side = (np.abs(off) < hw[k] + walk[k])[:, None] & kept
    wide = hw[k] > 5.2    # wide streets: a solid double yellow line
    centre = np.where(wide, np.abs(np.abs(off) - 0.3) < 0.13,
                      np.abs(off) < 0.13)
    dashed = (np.mod(coord, 6.0) < 3.0)[None, :] | wide[:, None]
    mark = centre[:, None] & dashed & kept
    yellow = np.broadcast_to(wide[:, None], mark.shape)
    if axis == 1:
      road, side, mark, yellow = road.T, side.T, mark.T, yellow.T
    masks.append((road, side, mark, yellow))
  road_any = masks[0][0] | masks[1][0]
  side_any = masks[0][1] | masks[1][1]
  canvas.kind[side_any] = SIDEWALK
  canvas.kind[road_any] = ROAD
  for axis in (0, 1):
    road, _, mark, yellow = masks[axis]
    other_road = masks[1 - axis][0]
    m = mark & road & ~other_road
    canvas.kind[m] = MARK
    canvas.top[m & yellow] = (232, 198, 72)
    canvas.top[m & ~yellow] = (238, 238, 232)
  # Street trees on the sidewalks, and cars in the lanes.
  for axis in (0, 1):
    pos, hw, walk, _ = lines[axis]
    for p, h, w in zip(pos, hw, walk):
      for sign in (-1, 1):
        along = rng.uniform(0, 12)
        spacing = rng.uniform(8, 14) if rng.random() < 0.5 else 1e9
        while along < n * cell:
          yx = (p + sign * (h + w * 0.5), along)
          canvas.tree(rng, *(yx if axis == 0 else yx[::-1]), 0.9)
          along += spacing
        along = rng.exponential(20)
        while along < n * cell:
          yx = (p + sign * h * 0.5, along)
          y, x = yx if axis == 0 else yx[::-1]
          canvas.car(rng, y, x, axis == 0, need=(ROAD, MARK))
          along += 6.0 + rng.exponential(22)
  return lines


def _shadows(height, cell_m, sun_az, sun_el, max_height=30.0):
  """[N, N] float32 in [0, 1]: 1 where a cell is shadowed from the sun.

  S(p) = max_t h(p + t u) - t tan(el) over steps toward the sun u, by
  doubling: after k rounds the max covers 2^k cells.
  """
  u_row, u_col = -math.cos(sun_az), math.sin(sun_az)
  drop = cell_m * math.tan(sun_el)
  reach = max_height / max(drop, 1e-3)
  s = height.copy()
  step = 1
  while step < 2 * reach:
    m = np.float32([[1, 0, step * u_col], [0, 1, step * u_row]])
    shifted = cv2.warpAffine(s, m, s.shape[::-1], flags=cv2.INTER_LINEAR |
                             cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    np.maximum(s, shifted - step * drop, out=s)
    step *= 2
  shadow = (s > height + 0.2).astype(np.float32)
  return cv2.GaussianBlur(shadow, (0, 0), 0.8)


def _mips(image, levels):
  out = [image]
  while len(out) < levels and min(out[-1].shape[:2]) > 8:
    out.append(cv2.pyrDown(out[-1]))
  return out


def make_world(cfg: config_lib.SyntheticConfig, rng: np.random.Generator,
               index: int = 0) -> World:
  """Draws one world.

  Args:
    cfg: sizes (map_cells, cell_m, block_m, tile_m, ...).
    rng: the world's own generator; the world is a pure function of it.
    index: the world's number, recorded in the result.

  Returns:
    A World.
  """
  n, cell = cfg.map_cells, cfg.cell_m
  big = int(math.ceil(n * math.sqrt(2))) + 8
  canvas = _Canvas(big, cell)
  lines = _streets(canvas, rng, cfg.block_m)
  (ypos, yhw, ywalk, _), (xpos, xhw, xwalk, _) = lines
  for i in range(1, len(ypos)):
    for j in range(1, len(xpos)):
      _block(canvas, rng,
             ypos[i - 1] + yhw[i - 1] + ywalk[i - 1],
             ypos[i] - yhw[i] - ywalk[i],
             xpos[j - 1] + xhw[j - 1] + xwalk[j - 1],
             xpos[j] - xhw[j] - xwalk[j])

  # Rotate the street frame into the map about the centres.
  angle = rng.uniform(0, math.pi / 2)
  ca, sa = math.cos(angle), math.sin(angle)
  cb, cn = (big - 1) / 2, (n - 1) / 2
  # dst (x=col, y=row) -> src: src = R (dst - cn) + cb.
  rot = np.array([[ca, -sa], [sa, ca]])
  m = np.hstack([rot, (cb - rot @ np.array([cn, cn]))[:, None]])
  warp = lambda a: cv2.warpAffine(a, m.astype(np.float32), (n, n),
                                  flags=cv2.INTER_NEAREST |
                                  cv2.WARP_INVERSE_MAP)
  kind, height = warp(canvas.kind), warp(canvas.height)
  top, side = warp(canvas.top), warp(canvas.side)
  # The street frame's column axis, seen in the map as atan2(col, row).
  axis_angle = math.atan2(rot[0, 0], rot[0, 1])
  del canvas.kind, canvas.height, canvas.top, canvas.side

  # Unlit albedo: material colours with texture noise.
  fine = value_noise(rng, (n, n), 2.0, 2)
  mid = value_noise(rng, (n, n), 12.0, 3)
  low = value_noise(rng, (n, n), 160.0, 3)
  dry = value_noise(rng, (n, n), 60.0, 2)
  albedo = _GROUND_RGB[kind]
  objects = (kind == MARK) | (kind == BUILDING) | (kind == CAR)
  albedo[objects] = top[objects]
  grass = kind == GRASS
  t = (1 / (1 + np.exp(-1.5 * low[grass])))[:, None]
  g = (1 - t) * _GROUND_RGB[GRASS] + t * _GRASS_2
  d = np.clip(dry[grass] - 1.0, 0, 1)[:, None]
  albedo[grass] = (1 - d) * g + d * _DRY
  amp = _TEXTURE[kind]
  albedo *= (1 + amp[..., :1] * fine[..., None] +
             amp[..., 1:] * mid[..., None])
  albedo *= (1 + 0.06 * low)[..., None]
  albedo_u8 = np.clip(albedo, 0, 255).astype(np.uint8)

  # Trees, rotated into the map.
  tr = np.array(canvas.trees, np.float64).reshape(-1, 6)
  src = tr[:, [1, 0]] - cb            # (x, y) street frame, centred
  dst = src @ rot + cn                 # R^T applied to row vectors
  pos = dst[:, [1, 0]]
  inside = np.all((pos > -10) & (pos < n + 10), axis=1)
  tr, pos = tr[inside], pos[inside]
  trees = Trees(pos=pos, radius=tr[:, 2], radius_z=tr[:, 3],
                centre_z=tr[:, 4], trunk=tr[:, 5],
                colour=(_LEAVES[rng.integers(len(_LEAVES), size=len(tr))] *
                        rng.uniform(0.85, 1.15, (len(tr), 1))).astype(
                            np.float32))

  # Satellite view: crowns on top, Lambert light, shadows, styling.
  sun_az, sun_el = rng.uniform(0, 2 * math.pi), math.radians(
      rng.uniform(35, 70))
  sun = np.array([-math.cos(sun_az) * math.cos(sun_el),
                  math.sin(sun_az) * math.cos(sun_el), math.sin(sun_el)])
  sat_h = height.copy()
  sat_rgb = albedo.copy()
  lambert = np.full((n, n), sun[2], np.float32)
  crown = np.zeros((n, n), bool)
  for (r, c), rad, rz, cz, col in zip(trees.pos, trees.radius,
                                      trees.radius_z, trees.centre_z,
                                      trees.colour):
    rc = rad / cell
    r0, r1 = max(int(r - rc), 0), min(int(r + rc) + 2, n)
    c0, c1 = max(int(c - rc), 0), min(int(c + rc) + 2, n)
    if r1 <= r0 or c1 <= c0:
      continue
    dy = (np.arange(r0, r1) - r)[:, None] * cell / rad
    dx = (np.arange(c0, c1) - c)[None, :] * cell / rad
    rho2 = dy * dy + dx * dx
    z = cz + rz * np.sqrt(np.clip(1 - rho2, 0, 1))
    on = (rho2 < 1) & (z > sat_h[r0:r1, c0:c1])
    nz = np.sqrt(np.clip(1 - rho2, 0.02, 1)) * rad / rz
    norm = np.sqrt(rho2 + nz * nz)
    lam = (dy * sun[0] + dx * sun[1] + nz * sun[2]) / norm
    leaf = col * (1 + 0.28 * fine[r0:r1, c0:c1, None] +
                  0.12 * mid[r0:r1, c0:c1, None])
    sat_h[r0:r1, c0:c1][on] = z[on]
    sat_rgb[r0:r1, c0:c1][on] = leaf[on]
    lambert[r0:r1, c0:c1][on] = lam[on]
    crown[r0:r1, c0:c1] |= rho2 < 1
  shadow = _shadows(sat_h, cell, sun_az, sun_el)
  light = 0.42 + 0.78 * np.clip(lambert, 0, 1) * (1 - shadow)
  lit = sat_rgb * light[..., None]
  lit *= (1 - 0.12 * shadow[..., None] * np.float32((1, 0.5, -0.6)))
  cast = rng.uniform(0.92, 1.08, 3).astype(np.float32)
  gray = lit.mean(-1, keepdims=True)
  desat = rng.uniform(0.1, 0.35)
  lit = (1 - desat) * lit + desat * gray
  haze = rng.uniform(0.03, 0.12)
  lit = (1 - haze) * lit * cast + haze * np.float32((205, 208, 214))
  sat = np.clip(cv2.GaussianBlur(lit, (0, 0), 0.6), 0, 255).astype(np.uint8)

  # Where cameras may stand: road, 2 m from cars, 1 m from crowns, inside.
  def grow(mask, metres):
    k = 2 * int(math.ceil(metres / cell)) + 1
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.dilate(mask.astype(np.uint8), ker) > 0
  ok = ((kind == ROAD) | (kind == MARK)) & ~grow(kind == CAR, 2.0)
  ok &= ~grow(crown, 1.0)
  margin = int(math.ceil(cfg.pano_margin_m / cell))
  ok[:margin], ok[-margin:], ok[:, :margin], ok[:, -margin:] = (
      False, False, False, False)
  levels = int(math.log2(max(n // 8, 1)))
  leaf_texture = value_noise(rng, (64, 64), 4.0, 2)
  return World(index=index, cell_m=cell, height=height, kind=kind,
               albedo_mips=_mips(albedo_u8, levels), side=side,
               sat_mips=_mips(sat, levels), trees=trees,
               axis_angle=axis_angle, sat_sun=(sun_az, sun_el),
               camera_cells=np.flatnonzero(ok), leaf_texture=leaf_texture,
               occluder=sat_h.astype(np.float16))
