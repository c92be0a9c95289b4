"""Reader of VIGOR (docs/FORMATS.md).

Same-area: all four cities, `same_area_balanced_{train,test}.txt`.
Cross-area: train on NewYork + Seattle, test on Chicago + SanFrancisco, both
from `pano_label_balanced.txt`. As in the public loaders (Sample4Geo), the
reference set of a split is every tile in `satellite_list.txt` of the cities
used, each once, whether or not a panorama of the split falls in it; many
panoramas can share one tile.

A label line is `pano sat dy dx semi1 dy dx semi2 dy dx semi3 dy dx`: the
positive tile with the panorama's pixel offset inside it, then three
semi-positive tiles that also contain the panorama. Coordinates (degrees)
come from the file names `{panoid},{lat},{lon},.jpg` and
`satellite_{lat}_{lon}.png`; the panorama id is the part before the first
comma, which is safe as a file stem.

Missing files (the public loaders do not check and would fail at decode
time): a missing panorama drops that query; a missing tile leaves the
reference set, drops the panoramas whose positive it is (they have no
ground truth left) and turns into -1 where it is a semi-positive (offsets
are kept as written; -1 marks them unused).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from cvgl_jax.data import index
from cvgl_jax.data import readers

CITIES = ("Chicago", "NewYork", "SanFrancisco", "Seattle")
MODE_CITIES = {
    "same_area": {"train": CITIES, "test": CITIES},
    "cross_area": {"train": ("NewYork", "Seattle"),
                   "test": ("Chicago", "SanFrancisco")},
}
NUM_SEMI = 3

LAYOUT = """ROOT/
  {City}/panorama/{panoid},{lat},{lon},.jpg
  {City}/satellite/satellite_{lat}_{lon}.png
  splits/{City}/satellite_list.txt               one tile file name a line
  splits/{City}/same_area_balanced_train.txt     label lines (same-area)
  splits/{City}/same_area_balanced_test.txt
  splits/{City}/pano_label_balanced.txt          label lines (cross-area)
  with City in Chicago, NewYork, SanFrancisco, Seattle and label lines
  'pano sat dy dx semi1 dy dx semi2 dy dx semi3 dy dx'"""


def label_file(mode: str, split: str) -> str:
  """The label file name of a mode and split."""
  if mode == "same_area":
    return f"same_area_balanced_{split}.txt"
  return "pano_label_balanced.txt"


def read(root: str, split: str, mode: str, *,
         cities: Optional[Sequence[str]] = None,
         max_missing_fraction: float = readers.DEFAULT_MAX_MISSING_FRACTION
         ) -> index.PairIndex:
  """Reads one VIGOR split.

  Args:
    root: the VIGOR folder.
    split: "train" or "test".
    mode: "same_area" or "cross_area".
    cities: overrides the mode's cities (any of CITIES).
    max_missing_fraction: the largest tolerated fraction of the split's
      image files (its panoramas + its cities' tiles) absent on disk.

  Returns:
    PairIndex with Q panoramas and R tiles: `positive` [Q], `semi_positives`
    [Q, 3] (-1 where the tile is missing), `offsets` [Q, 4, 2] float32 (dy,
    dx) pixels in the positive then the semi-positives, (lat, lon) degrees
    of both sides (coord_kind "latlon").
  """
  if mode not in MODE_CITIES:
    raise ValueError(f"VIGOR mode must be one of {sorted(MODE_CITIES)}, got "
                     f"{mode!r}.")
  if split not in ("train", "test"):
    raise ValueError(f"VIGOR split must be 'train' or 'test', got "
                     f"{split!r}.")
  cities = tuple(MODE_CITIES[mode][split] if cities is None else cities)
  unknown = [c for c in cities if c not in CITIES]
  if not cities or unknown or len(set(cities)) != len(cities):
    raise ValueError(f"VIGOR cities must be distinct names from {CITIES}, "
                     f"got {cities}.")
  readers.check_fraction(max_missing_fraction)
  root = os.path.abspath(root)
  readers.require_dir(root, "VIGOR root", LAYOUT)
  labels = label_file(mode, split)
  for city in cities:
    for f in ("satellite_list.txt", labels):
      readers.require_file(os.path.join(root, "splits", city, f),
                           f"VIGOR {city} split file", LAYOUT)
  name = f"vigor/{mode}/{'+'.join(cities)}/{split}"

  sat_paths, sat_ids, sat_coords, tile = [], [], [], {}
  for city in cities:
    list_path = os.path.join(root, "splits", city, "satellite_list.txt")
    for number, line in readers.read_lines(list_path):
      if (city, line) in tile:
        continue
      sat_coords.append(_tile_latlon(line, f"{list_path}:{number}"))
      tile[city, line] = len(sat_paths)
      sat_paths.append(os.path.join(root, city, "satellite", line))
      sat_ids.append(os.path.splitext(line)[0])

  ground_paths, ground_ids, ground_coords, tiles, offsets = [], [], [], [], []
  for city in cities:
    label_path = os.path.join(root, "splits", city, labels)
    for number, line in readers.read_lines(label_path):
      where = f"{label_path}:{number}"
      fields = line.split()
      if len(fields) != 1 + 3 * (1 + NUM_SEMI):
        raise ValueError(f"{where}: expected 13 fields 'pano sat dy dx semi1 "
                         f"dy dx semi2 dy dx semi3 dy dx', got {len(fields)}.")
      pano_id, lat, lon = _pano_latlon(fields[0], where)
      row_tiles, row_offsets = [], []
      for k in range(1 + NUM_SEMI):
        sat, dy, dx = fields[1 + 3 * k: 4 + 3 * k]
        if (city, sat) not in tile:
          raise ValueError(f"{where}: tile {sat!r} is not in "
                           f"splits/{city}/satellite_list.txt.")
        try:
          row_offsets.append((float(dy), float(dx)))
        except ValueError:
          raise ValueError(f"{where}: expected numeric offsets 'dy dx' after "
                           f"{sat!r}, got {dy!r} {dx!r}.") from None
        row_tiles.append(tile[city, sat])
      ground_paths.append(os.path.join(root, city, "panorama", fields[0]))
      ground_ids.append(pano_id)
      ground_coords.append((lat, lon))
      tiles.append(row_tiles)
      offsets.append(row_offsets)
  if not ground_paths or not sat_paths:
    raise ValueError(f"{name}: the split files list no panoramas or no "
                     f"tiles. Expected layout:\n{LAYOUT}")
  readers.check_ids(name, ground_ids, ground_paths)

  sat_missing = readers.missing_mask(sat_paths, LAYOUT)
  ground_missing = readers.missing_mask(ground_paths, LAYOUT)
  readers.report_missing(
      name,
      [p for p, m in zip(ground_paths, ground_missing) if m] +
      [p for p, m in zip(sat_paths, sat_missing) if m],
      len(ground_paths) + len(sat_paths), max_missing_fraction)

  tiles = np.array(tiles, dtype=np.int64)
  return index.PairIndex(
      name=name,
      root=root,
      ground_paths=np.array(ground_paths),
      ground_ids=np.array(ground_ids),
      satellite_paths=np.array(sat_paths),
      satellite_ids=np.array(sat_ids),
      positive=tiles[:, 0],
      semi_positives=tiles[:, 1:],
      offsets=np.array(offsets, dtype=np.float32),
      ground_coords=np.array(ground_coords, dtype=np.float64),
      satellite_coords=np.array(sat_coords, dtype=np.float64),
      coord_kind="latlon",
  ).without(ground_missing, sat_missing)


def _tile_latlon(file_name: str, where: str) -> tuple[float, float]:
  """(lat, lon) of `satellite_{lat}_{lon}.png`."""
  stem, ext = os.path.splitext(file_name)
  parts = stem.split("_")
  try:
    if len(parts) != 3 or parts[0] != "satellite" or not ext:
      raise ValueError
    return float(parts[1]), float(parts[2])
  except ValueError:
    raise ValueError(f"{where}: expected a tile file name "
                     f"'satellite_<lat>_<lon>.png', got {file_name!r}."
                     ) from None


def _pano_latlon(file_name: str, where: str) -> tuple[str, float, float]:
  """(id, lat, lon) of `{panoid},{lat},{lon},.jpg`."""
  parts = file_name.split(",")
  try:
    if len(parts) != 4 or not parts[0] or "/" in file_name:
      raise ValueError
    return parts[0], float(parts[1]), float(parts[2])
  except ValueError:
    raise ValueError(f"{where}: expected a panorama file name "
                     f"'<panoid>,<lat>,<lon>,.jpg', got {file_name!r}."
                     ) from None
