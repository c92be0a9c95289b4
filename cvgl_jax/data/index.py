"""PairIndex: what every dataset reader returns, real or synthetic.

A dataset split is two piles of images -- ground panoramas (queries) and
satellite tiles (references) -- plus, where the format has it, which tile
each panorama was taken in. Training in the unsupervised paradigm never
reads `positive`; evaluation and pseudo-label statistics do.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairIndex:
  """One split of a cross-view dataset.

  Attributes:
    name: e.g. "cvusa/train", "vigor/same_area/Chicago+NewYork/test".
    root: the dataset root; paths below are absolute.
    ground_paths: [Q] str, panorama files.
    ground_ids: [Q] str, the dataset's id of each panorama.
    satellite_paths: [R] str, satellite tile files (each listed once).
    satellite_ids: [R] str.
    positive: [Q] int64, index into the satellite arrays of the tile each
      panorama belongs to; -1 where unknown.
    semi_positives: [Q, S] int64 or None: VIGOR's other tiles that also
      contain the panorama's location (-1 padded).
    offsets: [Q, 1 + S, 2] float32 or None: VIGOR's (dy, dx) pixel offset of
      the panorama inside the positive, then inside each semi-positive.
    ground_coords: [Q, 2] float64 or None: (lat, lon) in degrees, or UTM
      (northing, easting) in metres -- `coord_kind` says which.
    satellite_coords: [R, 2] float64 or None, as `ground_coords`.
    coord_kind: "latlon", "utm" or "" when there are no coordinates.
  """

  name: str
  root: str
  ground_paths: np.ndarray
  ground_ids: np.ndarray
  satellite_paths: np.ndarray
  satellite_ids: np.ndarray
  positive: np.ndarray
  semi_positives: Optional[np.ndarray] = None
  offsets: Optional[np.ndarray] = None
  ground_coords: Optional[np.ndarray] = None
  satellite_coords: Optional[np.ndarray] = None
  coord_kind: str = ""

  def __post_init__(self):
    q, r = len(self.ground_paths), len(self.satellite_paths)
    checks = [
        ("ground_ids", self.ground_ids, (q,)),
        ("satellite_ids", self.satellite_ids, (r,)),
        ("positive", self.positive, (q,)),
    ]
    if self.ground_coords is not None:
      checks.append(("ground_coords", self.ground_coords, (q, 2)))
    if self.satellite_coords is not None:
      checks.append(("satellite_coords", self.satellite_coords, (r, 2)))
    if self.semi_positives is not None:
      checks.append(("semi_positives", self.semi_positives,
                     (q, self.semi_positives.shape[-1])))
    for field, value, shape in checks:
      if np.shape(value) != shape:
        raise ValueError(f"PairIndex {self.name!r}: {field} has shape "
                         f"{np.shape(value)}, expected {shape}.")
    pos = np.asarray(self.positive)
    if pos.size and (pos.min() < -1 or pos.max() >= r):
      raise ValueError(f"PairIndex {self.name!r}: positive indices must lie "
                       f"in [-1, {r}), got [{pos.min()}, {pos.max()}].")
    if self.coord_kind not in ("", "latlon", "utm"):
      raise ValueError(f"PairIndex {self.name!r}: coord_kind "
                       f"{self.coord_kind!r} is not '', 'latlon' or 'utm'.")

  @property
  def num_ground(self) -> int:
    return len(self.ground_paths)

  @property
  def num_satellite(self) -> int:
    return len(self.satellite_paths)

  @property
  def has_labels(self) -> bool:
    return bool(np.all(np.asarray(self.positive) >= 0))

  def without(self, ground: np.ndarray, satellite: np.ndarray) -> PairIndex:
    """This split without the panoramas where `ground` [Q] bool is set and
    the tiles where `satellite` [R] bool is; a panorama whose true tile goes
    goes too, and dropped semi-positives become -1."""
    ground = np.asarray(ground, bool)
    satellite = np.asarray(satellite, bool)
    new_tile = np.cumsum(~satellite) - 1
    new_tile[satellite] = -1
    positive = np.asarray(self.positive, np.int64)
    moved = np.where(positive >= 0, new_tile[np.maximum(positive, 0)], -1)
    keep = ~ground & ((positive < 0) | (moved >= 0))
    semi = self.semi_positives
    if semi is not None:
      semi = np.where(semi >= 0, new_tile[np.maximum(semi, 0)], -1)[keep]
    pick = lambda a, m: None if a is None else np.asarray(a)[m]
    return dataclasses.replace(
        self,
        ground_paths=pick(self.ground_paths, keep),
        ground_ids=pick(self.ground_ids, keep),
        satellite_paths=pick(self.satellite_paths, ~satellite),
        satellite_ids=pick(self.satellite_ids, ~satellite),
        positive=moved[keep], semi_positives=semi,
        offsets=pick(self.offsets, keep),
        ground_coords=pick(self.ground_coords, keep),
        satellite_coords=pick(self.satellite_coords, ~satellite))

  def derived_paths(self, folder: str, suffix: str = ".png") -> np.ndarray:
    """[Q] paths `root/folder/<ground id><suffix>`: where CFP writes the BEV
    (`g2a`) and fake-satellite (`g2a_sat`) image of each panorama."""
    return np.array([os.path.join(self.root, folder, f"{i}{suffix}")
                     for i in self.ground_ids])
