"""Writes synthetic datasets in the on-disk layouts of CVUSA, CVACT, VIGOR.

The layouts are those of docs/FORMATS.md, so the real readers
(`cvgl_jax.data.cvusa`, `cvact`, `vigor`) load them unchanged. Each dataset
root also gets `synthetic_truth.json` -- the true pairing and camera poses
(position, GPS error, heading error, height, world) -- for experiments that
measure pseudo-label precision; no reader needs it.

Randomness: every draw comes from generators seeded with (seed, stream,
world): worlds, camera placement and nuisances, and the id / split
assignment are separate streams, and every nuisance is drawn whether or not
its knob is on (then scaled), so turning one knob changes only what it
names.

Positions in the truth file are metres in the world's frame: east =
col * cell_m, north = (map_cells - 1 - row) * cell_m.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import string
from typing import Optional

import cv2
import numpy as np
import scipy.io
import tqdm

from cvgl_jax.data.synthetic import config as config_lib
from cvgl_jax.data.synthetic import render
from cvgl_jax.data.synthetic import world as world_lib

LAYOUTS = ("cvusa", "cvact", "vigor")
TRUTH_FILE = "synthetic_truth.json"

_WORLD, _POSES, _IDS = 0, 1, 2          # seed streams
_ID_CHARS = np.array(list(string.ascii_letters + string.digits))
# Where CVACT's synthetic worlds lie (UTM), 5 km apart.
_UTM_ORIGIN = (6_090_000.0, 690_000.0)   # (northing, easting), Canberra
_METRES_PER_DEG = 111_320.0


@dataclasses.dataclass(frozen=True)
class Shot:
  """One rendered panorama: its world, pose, and private random seeds."""

  world: int
  pose: render.Pose
  pano_seed: int
  sat_seed: int


def _rng(seed, stream, index=0):
  return np.random.default_rng([seed, stream, index])


def place_cameras(world: world_lib.World, cfg: config_lib.SyntheticConfig,
                  count: int, rng: np.random.Generator,
                  box: Optional[tuple] = None) -> np.ndarray:
  """Camera positions on the world's road cells, min_separation_m apart.

  Args:
    world: the world (its `camera_cells`).
    cfg: min_separation_m.
    count: how many.
    rng: the placement generator.
    box: optional (row0, row1, col0, col1) cells the cameras must lie in.

  Returns:
    [count, 2] float64 (row, col) cells.

  Raises:
    ValueError: the world has room for fewer cameras.
  """
  cells = world.camera_cells
  rows, cols = np.divmod(cells, world.size)
  if box is not None:
    ok = ((rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) &
          (cols < box[3]))
    rows, cols = rows[ok], cols[ok]
  if count == 0:
    return np.zeros((0, 2))
  sep = cfg.min_separation_m / cfg.cell_m
  bucket = max(sep, 1.0)
  taken: dict = {}
  out = []
  for i in rng.permutation(len(rows)):
    r = rows[i] + rng.uniform(-0.5, 0.5)
    c = cols[i] + rng.uniform(-0.5, 0.5)
    br, bc = int(r // bucket), int(c // bucket)
    clash = False
    for dr in (-1, 0, 1):
      for dc in (-1, 0, 1):
        for (r2, c2) in taken.get((br + dr, bc + dc), ()):
          if (r - r2) ** 2 + (c - c2) ** 2 < sep * sep:
            clash = True
    if clash:
      continue
    taken.setdefault((br, bc), []).append((r, c))
    out.append((r, c))
    if len(out) == count:
      return np.array(out)
  raise ValueError(
      f"World {world.index} has room for only {len(out)} cameras "
      f"min_separation_m={cfg.min_separation_m} apart (asked for {count}); "
      f"raise map_cells or num_worlds, or lower min_separation_m.")


def draw_shots(world: world_lib.World, cfg: config_lib.SyntheticConfig,
               positions: np.ndarray, rng: np.random.Generator) -> list:
  """Nuisances for cameras at `positions` ([P, 2] cells): one Shot each.

  Every random number is drawn whatever the knobs say, then scaled, so a
  knob at zero leaves every other draw unchanged.
  """
  shots = []
  cell = cfg.cell_m
  for r, c in positions:
    gps = rng.standard_normal(2) * cfg.gps_sigma_m        # (north, east) m
    heading = rng.standard_normal() * math.radians(cfg.heading_sigma_deg)
    height = cfg.cam_height_min_m + rng.random() * (
        cfg.cam_height_max_m - cfg.cam_height_min_m)
    sun = (rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(20, 65)))
    if not cfg.separate_sun:
      sun = world.sat_sun
    seeds = rng.integers(0, 2 ** 63, 2)
    pose = render.Pose(row=float(r), col=float(c), height_m=float(height),
                       heading_rad=float(heading), sun_az=float(sun[0]),
                       sun_el=float(sun[1]),
                       tile_row=float(r - gps[0] / cell),
                       tile_col=float(c + gps[1] / cell))
    shots.append(Shot(world.index, pose, int(seeds[0]), int(seeds[1])))
  return shots


def _en(cfg, row, col):
  """Map cells -> (east, north) metres in the world's frame."""
  return [round(col * cfg.cell_m, 4),
          round((cfg.map_cells - 1 - row) * cfg.cell_m, 4)]


def _pose_truth(cfg, shot):
  p = shot.pose
  return {
      "world": shot.world,
      "position_en_m": _en(cfg, p.row, p.col),
      "recorded_en_m": _en(cfg, p.tile_row, p.tile_col),
      "gps_error_en_m": [round((p.tile_col - p.col) * cfg.cell_m, 4),
                         round((p.row - p.tile_row) * cfg.cell_m, 4)],
      "heading_error_deg": round(math.degrees(p.heading_rad), 4),
      "camera_height_m": round(p.height_m, 4),
      "pano_sun_deg": [round(math.degrees(p.sun_az), 3),
                       round(math.degrees(p.sun_el), 3)],
  }


def _write_image(path, rgb, quality):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  params = ([cv2.IMWRITE_JPEG_QUALITY, quality]
            if path.endswith(".jpg") else [])
  if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
    raise OSError(f"Could not write {path}.")


def _random_ids(rng, count, length=22):
  ids = set()
  out = []
  while len(out) < count:
    i = "".join(rng.choice(_ID_CHARS, length))
    if i not in ids:
      ids.add(i)
      out.append(i)
  return out


def _world_truth(world):
  return {"index": world.index,
          "sat_sun_deg": [round(math.degrees(a), 3) for a in world.sat_sun],
          "street_axis_deg": round(math.degrees(world.axis_angle), 3)}


def _check_out(out):
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"Output {out} exists and is not an empty "
                          f"directory; choose a new --out.")
  os.makedirs(out, exist_ok=True)


def _pair_shots(cfg, num_pairs, seed, on_world):
  """Worlds for a one-tile-per-panorama layout (CVUSA, CVACT).

  Yields (world, shots of that world) in world order; `on_world` is called
  with each new world (for the truth file).
  """
  num_worlds = cfg.worlds_for(num_pairs)
  per = [num_pairs // num_worlds + (w < num_pairs % num_worlds)
         for w in range(num_worlds)]
  for w, count in enumerate(per):
    world = world_lib.make_world(cfg, _rng(seed, _WORLD, w), w)
    on_world(world)
    rng = _rng(seed, _POSES, w)
    positions = place_cameras(world, cfg, count, rng)
    yield world, draw_shots(world, cfg, positions, rng)


def _progress(total, enabled, desc, unit="pair"):
  return tqdm.tqdm(total=total, disable=not enabled, desc=desc, unit=unit)


def write_cvusa(out: str, cfg: config_lib.SyntheticConfig, num_pairs: int,
                seed: int, progress: bool = True) -> dict:
  """CVUSA layout: splits/{train,val}-19zl.csv, bingmap/19, streetview/panos.

  Panoramas are the CVUSA band crop (`cfg.cvusa_hw`, top at canvas row
  `cfg.cvusa_top`); pair ids are 7-digit numbers in random order across
  worlds. Returns the truth dict also written to TRUTH_FILE.
  """
  _check_inputs(cfg, num_pairs)
  _check_out(out)
  ids_rng = _rng(seed, _IDS)
  number = ids_rng.permutation(num_pairs) + 1
  n_val = int(round(num_pairs * cfg.val_fraction))
  is_val = np.zeros(num_pairs, bool)
  is_val[ids_rng.choice(num_pairs, n_val, replace=False)] = True
  ph, pw = cfg.cvusa_hw
  truth = _truth_header("cvusa", cfg, seed, {
      "kind": "cvusa_band", "width": pw, "height": ph,
      "canvas_row0": cfg.cvusa_top, "canvas_height": pw / 2})
  lines = {"train": [], "val": []}
  j = 0
  with _progress(num_pairs, progress, "cvusa") as bar:
    for world, shots in _pair_shots(cfg, num_pairs, seed,
                                    lambda w: truth["worlds"].append(
                                        _world_truth(w))):
      for shot in shots:
        pid = f"{number[j]:07d}"
        split = "val" if is_val[j] else "train"
        sat_rel = f"bingmap/19/{pid}.jpg"
        pano_rel = f"streetview/panos/{pid}.jpg"
        _render_pair(out, cfg, world, shot, sat_rel, pano_rel,
                     (pw, cfg.cvusa_top, ph))
        lines[split].append((pid, f"{sat_rel},{pano_rel},"
                             f"streetview/annotations/{pid}.png"))
        truth["pairs"].append(dict(
            ground_id=pid, ground=pano_rel, satellite_id=pid,
            satellite=sat_rel, split=split, **_pose_truth(cfg, shot)))
        j += 1
        bar.update(1)
  os.makedirs(os.path.join(out, "splits"), exist_ok=True)
  for split, name in (("train", "train-19zl.csv"), ("val", "val-19zl.csv")):
    with open(os.path.join(out, "splits", name), "w") as f:
      f.writelines(line + "\n" for _, line in sorted(lines[split]))
  truth["pairs"].sort(key=lambda p: p["ground_id"])
  return _finish(out, truth)


def write_cvact(out: str, cfg: config_lib.SyntheticConfig, num_pairs: int,
                seed: int, progress: bool = True) -> dict:
  """CVACT layout: ACT_data.mat, ANU_data_small/{streetview,satview_polish}
  for train + val, ANU_data_test/... for test.

  `ACT_data.mat` holds `panoIds` (all pairs, test included), `utm` ([N, 2]
  recorded (northing, easting) metres), and structs `trainSet` (trainNum,
  trainInd), `valSet` (valNum, valInd), `valSetAll` (valNum, valInd: the
  test pairs) whose second field is an [n, 1] array of 1-based indices into
  `panoIds`, as in the real file. Returns the truth dict.
  """
  _check_inputs(cfg, num_pairs)
  _check_out(out)
  ids_rng = _rng(seed, _IDS)
  ids = _random_ids(ids_rng, num_pairs)
  split_of = np.array(["train"] * num_pairs, dtype=object)
  order = ids_rng.permutation(num_pairs)
  n_test = int(round(num_pairs * cfg.test_fraction))
  n_val = int(round(num_pairs * cfg.val_fraction))
  split_of[order[:n_test]] = "test"
  split_of[order[n_test:n_test + n_val]] = "val"
  w_full = cfg.pano_width
  truth = _truth_header("cvact", cfg, seed, {
      "kind": "full", "width": w_full, "height": w_full // 2,
      "canvas_row0": 0, "canvas_height": w_full / 2})
  utm = np.zeros((num_pairs, 2))
  j = 0
  with _progress(num_pairs, progress, "cvact") as bar:
    for world, shots in _pair_shots(cfg, num_pairs, seed,
                                    lambda w: truth["worlds"].append(
                                        _world_truth(w))):
      for shot in shots:
        pid, split = ids[j], split_of[j]
        folder = "ANU_data_test" if split == "test" else "ANU_data_small"
        pano_rel = f"{folder}/streetview/{pid}_grdView.jpg"
        sat_rel = f"{folder}/satview_polish/{pid}_satView_polish.jpg"
        _render_pair(out, cfg, world, shot, sat_rel, pano_rel,
                     (w_full, 0, w_full // 2))
        east, north = _en(cfg, shot.pose.tile_row, shot.pose.tile_col)
        utm[j] = (_UTM_ORIGIN[0] + north,
                  _UTM_ORIGIN[1] + east + 5000.0 * shot.world)
        truth["pairs"].append(dict(
            ground_id=pid, ground=pano_rel, satellite_id=pid,
            satellite=sat_rel, split=split, utm=[float(u) for u in utm[j]],
            **_pose_truth(cfg, shot)))
        j += 1
        bar.update(1)
  # Integer indices: the public loaders index panoIds with them directly.
  index = lambda s: (np.flatnonzero(split_of == s) + 1).astype(
      np.int32)[:, None]
  train, val, test = index("train"), index("val"), index("test")
  scipy.io.savemat(os.path.join(out, "ACT_data.mat"), {
      "panoIds": np.array(ids),
      "utm": utm,
      "trainSet": {"trainNum": np.int32(len(train)), "trainInd": train},
      "valSet": {"valNum": np.int32(len(val)), "valInd": val},
      "valSetAll": {"valNum": np.int32(len(test)), "valInd": test},
  })
  return _finish(out, truth)


def _latlon(city, cfg, row, col):
  lat0, lon0 = config_lib.VIGOR_CITY_LATLON[city]
  east, north = _en(cfg, row, col)
  lat = lat0 + north / _METRES_PER_DEG
  lon = lon0 + east / (_METRES_PER_DEG * math.cos(math.radians(lat0)))
  return lat, lon


def write_vigor(out: str, cfg: config_lib.SyntheticConfig, num_pairs: int,
                seed: int, progress: bool = True) -> dict:
  """VIGOR layout: one world per city, overlapping tiles on a half-tile grid.

  Per city: `panorama/{panoid},{lat},{lon},.jpg` (full 2:1 panoramas, the
  recorded position in the name), `satellite/satellite_{lat}_{lon}.png`
  (tile centre), and under `splits/{City}/`: satellite_list.txt (every
  tile), same_area_balanced_{train,test}.txt and pano_label_balanced.txt
  (every panorama). A label line is `pano sat dy dx` for the positive (the
  tile whose central quarter holds the recorded position) then the three
  semi-positives (the other tiles around it), where (dy, dx) is VIGOR's
  "delta": the tile centre minus the recorded position in (latitude,
  longitude), in pixels, so the panorama sits at pixel (row, col) =
  (H/2 + dy, W/2 - dx) of the tile (as the VIGOR authors' own
  evaluate_from_npy.py plots it). `num_pairs` counts panoramas. Returns
  the truth dict.
  """
  _check_inputs(cfg, num_pairs)
  cities = config_lib.VIGOR_CITIES
  if num_pairs < 2 * len(cities):
    raise ValueError(f"VIGOR needs num_pairs >= {2 * len(cities)} (a train "
                     f"and a test panorama in each city), got {num_pairs}.")
  per = [num_pairs // len(cities) + (c < num_pairs % len(cities))
         for c in range(len(cities))]
  stride = cfg.tile_m / 2 / cfg.cell_m              # cells
  spans = [max(1, math.ceil(math.sqrt(n / cfg.vigor_panos_per_tile)))
           for n in per]
  need = max(spans) * stride * cfg.cell_m + 2 * cfg.pano_margin_m
  if need > cfg.map_m:
    raise ValueError(
        f"VIGOR with {num_pairs} panoramas needs {need:.0f} m wide city maps "
        f"but map_cells * cell_m = {cfg.map_m:g} m; raise map_cells, lower "
        f"num_pairs, or raise vigor_panos_per_tile.")
  _check_out(out)
  w_full = cfg.pano_width
  truth = _truth_header("vigor", cfg, seed, {
      "kind": "full", "width": w_full, "height": w_full // 2,
      "canvas_row0": 0, "canvas_height": w_full / 2})
  truth["satellites"] = []
  px_per_cell = cfg.sat_px / (cfg.tile_m / cfg.cell_m)
  total = num_pairs + sum((s + 1) ** 2 for s in spans)
  with _progress(total, progress, "vigor", "image") as bar:
    for ci, city in enumerate(cities):
      world = world_lib.make_world(cfg, _rng(seed, _WORLD, ci), ci)
      truth["worlds"].append(dict(_world_truth(world), city=city))
      span = spans[ci]
      # Tile centres: (span + 1)^2 on a half-tile grid, placed where the
      # world has the most road to stand on.
      g0 = _densest_region(world, cfg, span * stride)
      centres_r = g0[0] + stride * np.arange(span + 1)
      centres_c = g0[1] + stride * np.arange(span + 1)
      sat_names = {}
      sat_rng = _rng(seed, _IDS, 1000 + ci)
      for a, tr in enumerate(centres_r):
        for b, tc in enumerate(centres_c):
          lat, lon = _latlon(city, cfg, tr, tc)
          name = f"satellite_{lat:.10f}_{lon:.10f}.png"
          sat_names[a, b] = name
          tile = render.render_satellite(
              world, tr, tc, cfg.tile_m, cfg.sat_px, cfg.sat_appearance,
              np.random.default_rng(sat_rng.integers(0, 2 ** 63)))
          _write_image(os.path.join(out, city, "satellite", name), tile,
                       cfg.jpeg_quality)
          truth["satellites"].append({
              "city": city, "satellite": f"{city}/satellite/{name}",
              "satellite_id": os.path.splitext(name)[0],
              "centre_en_m": _en(cfg, tr, tc)})
          bar.update(1)
      # Cameras whose recorded position stays inside the grid of centres.
      pad = 4 * cfg.gps_sigma_m / cfg.cell_m + 1
      rng = _rng(seed, _POSES, ci)
      box = (int(math.ceil(centres_r[0] + pad)), int(centres_r[-1] - pad),
             int(math.ceil(centres_c[0] + pad)), int(centres_c[-1] - pad))
      positions = place_cameras(world, cfg, per[ci], rng, box)
      shots = draw_shots(world, cfg, positions, rng)
      ids = _random_ids(_rng(seed, _IDS, 2000 + ci), len(shots))
      labels = []
      for shot, pid in zip(shots, ids):
        p = shot.pose
        lat, lon = _latlon(city, cfg, p.tile_row, p.tile_col)
        name = f"{pid},{lat:.7f},{lon:.7f},.jpg"
        pano = render.render_panorama(
            world, p, w_full, 0, w_full // 2, cfg.max_ray_m,
            np.random.default_rng(shot.pano_seed))
        _write_image(os.path.join(out, city, "panorama", name), pano,
                     cfg.jpeg_quality)
        # The four tiles around the recorded position, positive first.
        fa = (p.tile_row - g0[0]) / stride
        fb = (p.tile_col - g0[1]) / stride
        a0, b0 = int(min(math.floor(fa), span - 1)), int(min(math.floor(fb),
                                                             span - 1))
        around = [(a0 + i, b0 + k) for i in (0, 1) for k in (0, 1)]
        around.sort(key=lambda ab: (ab[0] - fa) ** 2 + (ab[1] - fb) ** 2)
        fields, tiles = [name], []
        for a, b in around:
          dy = (p.tile_row - centres_r[a]) * px_per_cell   # south
          dx = (centres_c[b] - p.tile_col) * px_per_cell   # west
          fields += [sat_names[a, b], f"{dy:.4f}", f"{dx:.4f}"]
          tiles.append(f"{city}/satellite/{sat_names[a, b]}")
        labels.append(" ".join(fields))
        truth["pairs"].append(dict(
            city=city, ground_id=pid, ground=f"{city}/panorama/{name}",
            satellite=tiles[0],
            satellite_id=os.path.splitext(os.path.basename(tiles[0]))[0],
            semi_positives=tiles[1:], **_pose_truth(cfg, shot)))
        bar.update(1)
      test = np.zeros(len(labels), bool)
      test[_rng(seed, _IDS, 3000 + ci).choice(
          len(labels), int(round(len(labels) * cfg.vigor_test_fraction)),
          replace=False)] = True
      for pair, t in zip(truth["pairs"][-len(labels):], test):
        pair["split"] = "test" if t else "train"
      split_dir = os.path.join(out, "splits", city)
      os.makedirs(split_dir, exist_ok=True)
      _write_lines(os.path.join(split_dir, "satellite_list.txt"),
                   [sat_names[k] for k in sorted(sat_names)])
      _write_lines(os.path.join(split_dir, "pano_label_balanced.txt"), labels)
      _write_lines(os.path.join(split_dir, "same_area_balanced_train.txt"),
                   [l for l, t in zip(labels, test) if not t])
      _write_lines(os.path.join(split_dir, "same_area_balanced_test.txt"),
                   [l for l, t in zip(labels, test) if t])
  return _finish(out, truth)


def _densest_region(world, cfg, side):
  """(row, col) of the first tile centre of a `side`-cell square region
  that keeps its tiles inside the map and holds the most camera cells."""
  n = world.size
  mask = np.zeros(n * n, np.int64)
  mask[world.camera_cells] = 1
  integral = np.pad(mask.reshape(n, n).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  lo = cfg.tile_m / 2 / cfg.cell_m + 1
  hi = n - 1 - lo - side
  best, best_count = None, -1
  for r in np.linspace(lo, hi, 7):
    for c in np.linspace(lo, hi, 7):
      r0, c0, r1, c1 = int(r), int(c), int(r + side), int(c + side)
      count = (integral[r1, c1] - integral[r0, c1] - integral[r1, c0] +
               integral[r0, c0])
      if count > best_count:
        best, best_count = (float(r), float(c)), count
  return best


def _write_lines(path, lines):
  with open(path, "w") as f:
    f.writelines(line + "\n" for line in lines)


def _render_pair(out, cfg, world, shot, sat_rel, pano_rel, pano_spec):
  width, row0, rows = pano_spec
  p = shot.pose
  pano = render.render_panorama(world, p, width, row0, rows, cfg.max_ray_m,
                                np.random.default_rng(shot.pano_seed))
  sat = render.render_satellite(world, p.tile_row, p.tile_col, cfg.tile_m,
                                cfg.sat_px, cfg.sat_appearance,
                                np.random.default_rng(shot.sat_seed))
  _write_image(os.path.join(out, pano_rel), pano, cfg.jpeg_quality)
  _write_image(os.path.join(out, sat_rel), sat, cfg.jpeg_quality)


def _check_inputs(cfg, num_pairs):
  cfg.validate()
  if int(num_pairs) != num_pairs or num_pairs < 1:
    raise ValueError(f"num_pairs must be a positive integer, got "
                     f"{num_pairs!r}.")


def _truth_header(layout, cfg, seed, pano):
  return {"layout": layout, "seed": int(seed),
          "config": dataclasses.asdict(cfg), "panorama": pano,
          "cell_m": cfg.cell_m, "worlds": [], "pairs": []}


def _finish(out, truth):
  with open(os.path.join(out, TRUTH_FILE), "w") as f:
    json.dump(truth, f, indent=1)
  return truth


WRITERS: dict = {"cvusa": write_cvusa, "cvact": write_cvact,
                 "vigor": write_vigor}


def write_dataset(layout: str, out: str, cfg: config_lib.SyntheticConfig,
                  num_pairs: int, seed: int, progress: bool = True) -> dict:
  """Writes one synthetic dataset; returns its truth dict.

  Args:
    layout: "cvusa", "cvact" or "vigor".
    out: the dataset root to create (must not exist or be empty).
    cfg: sizes and nuisances.
    num_pairs: panoramas to render.
    seed: the dataset is a pure function of (layout, cfg, num_pairs, seed).
    progress: show a tqdm bar.
  """
  if layout not in WRITERS:
    raise ValueError(f"Unknown layout {layout!r}; expected one of "
                     f"{list(WRITERS)}.")
  return WRITERS[layout](out, cfg, num_pairs, seed, progress)
