"""The knobs of the synthetic world: sizes, nuisances, splits.

One frozen dataclass, `SyntheticConfig`, holds every setting; `validate`
names the offending field before any rendering starts. The nuisances that
make retrieval a real task (SYNTHETIC_WORLD.md) are on by default; each is
one field, and `without_nuisances()` turns them all off for geometry checks.
"""

from __future__ import annotations

import dataclasses
import math

# VIGOR's four cities, in the order the layout writes them, and the
# (lat, lon) where each synthetic city's map is placed.
VIGOR_CITY_LATLON = {"Chicago": (41.8781, -87.6298),
                     "NewYork": (40.7128, -74.0060),
                     "SanFrancisco": (37.7749, -122.4194),
                     "Seattle": (47.6062, -122.3321)}
VIGOR_CITIES = tuple(VIGOR_CITY_LATLON)

# The CVUSA panorama crop: 1232 x 224 pixels of a 1232 x 616 panorama, its
# top row at canvas row (616 - 224) / 2 - 20 = 176, i.e. the band from
# +38.57 to -26.88 deg elevation (cfp/geometry.py, `cvusa_crop_top`).
CVUSA_WIDTH, CVUSA_HEIGHT, CVUSA_TOP = 1232, 224, 176


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Everything that shapes a synthetic dataset (besides the seed).

  World:
    map_cells: side of a world's square map, in cells.
    cell_m: metres per cell (the map's ground resolution).
    num_worlds: worlds mixed into one CVUSA/CVACT dataset; 0 chooses
      ceil(num_pairs / pairs_per_world), at least 2 (and at most
      num_pairs). VIGOR uses one world per city.
    pairs_per_world: see num_worlds.
    min_separation_m: least distance between two cameras of a dataset.
    block_m: (min, max) side of a city block, metres.
  Images:
    sat_px: satellite tile side, pixels.
    tile_m: ground extent of a satellite tile's side, metres.
    pano_width: width of the full 2:1 panoramas (CVACT, VIGOR); height is
      pano_width / 2.
    cvusa_width: width of the CVUSA band crop; its height and vertical
      placement follow the 1232 x 224 crop scaled to this width.
    max_ray_m: how far the panorama sees; beyond it the horizon haze.
    jpeg_quality: quality of every JPEG written.
  Nuisances (each 0 / equal bounds / False turns it off):
    gps_sigma_m: std of the recorded position's error, per axis, metres;
      the satellite tile is centred on the recorded position.
    heading_sigma_deg: std of the panorama's north error, degrees
      (clockwise positive: the panorama's centre column looks at this
      azimuth instead of north).
    cam_height_min_m, cam_height_max_m: camera height above the road,
      uniform between the two.
    sat_appearance: strength of the satellite tile's own low-frequency
      colour field (an independent capture), 0 for none.
    separate_sun: the panorama gets its own sun; otherwise the satellite
      view's sun of its world.
  Splits:
    val_fraction: CVUSA/CVACT validation share; VIGOR same-area test share.
    test_fraction: CVACT share written to ANU_data_test.
    vigor_panos_per_tile: VIGOR panoramas per positive tile, on average;
      sets the area covered by each city.
    vigor_test_fraction: VIGOR same-area test share of each city.
  """

  map_cells: int = 2048
  cell_m: float = 0.25
  num_worlds: int = 0
  pairs_per_world: int = 300
  min_separation_m: float = 6.0
  block_m: tuple = (45.0, 95.0)

  sat_px: int = 256
  tile_m: float = 64.0
  pano_width: int = 512
  cvusa_width: int = 616
  max_ray_m: float = 150.0
  jpeg_quality: int = 90

  gps_sigma_m: float = 1.5
  heading_sigma_deg: float = 3.0
  cam_height_min_m: float = 1.8
  cam_height_max_m: float = 2.8
  sat_appearance: float = 0.3
  separate_sun: bool = True

  val_fraction: float = 0.2
  test_fraction: float = 0.2
  vigor_panos_per_tile: float = 1.5
  vigor_test_fraction: float = 0.5

  @classmethod
  def from_run_config(cls, s) -> SyntheticConfig:
    """The world of a run's `config.synthetic` (an ml_collections dict):
    its sizes and generator settings; the rest keeps the defaults."""
    return cls(map_cells=s.map_cells, pairs_per_world=s.pairs_per_world,
               sat_px=s.sat_px, pano_width=s.pano_width,
               cvusa_width=s.cvusa_width, block_m=tuple(s.block_m),
               sat_appearance=s.sat_appearance)

  def without_nuisances(self, cam_height_m: float = 2.0) -> SyntheticConfig:
    """The same world with exact poses and appearance: for geometry checks."""
    return dataclasses.replace(
        self, gps_sigma_m=0.0, heading_sigma_deg=0.0,
        cam_height_min_m=cam_height_m, cam_height_max_m=cam_height_m,
        sat_appearance=0.0, separate_sun=False)

  @property
  def map_m(self) -> float:
    return self.map_cells * self.cell_m

  @property
  def cvusa_hw(self) -> tuple:
    """(height, width) of the CVUSA band crop."""
    w = self.cvusa_width
    return int(round(w * CVUSA_HEIGHT / CVUSA_WIDTH)), w

  @property
  def cvusa_top(self) -> float:
    """Row of the W x W/2 canvas where the CVUSA crop's top row sits."""
    return self.cvusa_width * CVUSA_TOP / CVUSA_WIDTH

  @property
  def pano_margin_m(self) -> float:
    """How far from the map edge a camera must be: its tile fits inside."""
    return self.tile_m / 2 * math.sqrt(2) + 4 * self.gps_sigma_m + 2.0

  def worlds_for(self, num_pairs: int) -> int:
    if self.num_worlds:
      return self.num_worlds
    auto = max(2, math.ceil(num_pairs / self.pairs_per_world))
    return max(1, min(num_pairs, auto))

  def validate(self) -> SyntheticConfig:
    """Raises ValueError naming the first bad field; returns self."""
    def need(ok, field, what):
      if not ok:
        raise ValueError(f"SyntheticConfig.{field}={getattr(self, field)!r}: "
                         f"{what}.")
    need(self.map_cells >= 128, "map_cells", "must be >= 128")
    need(self.cell_m > 0, "cell_m", "must be > 0")
    need(self.num_worlds >= 0, "num_worlds", "must be >= 0 (0 = auto)")
    need(self.pairs_per_world >= 1, "pairs_per_world", "must be >= 1")
    need(self.min_separation_m >= 0, "min_separation_m", "must be >= 0")
    need(len(self.block_m) == 2 and 20 <= self.block_m[0] <= self.block_m[1],
         "block_m", "must be (min, max) with 20 <= min <= max")
    need(self.sat_px >= 8, "sat_px", "must be >= 8")
    need(self.tile_m > 0, "tile_m", "must be > 0")
    need(self.pano_width >= 16 and self.pano_width % 2 == 0, "pano_width",
         "must be even and >= 16")
    need(self.cvusa_width >= 32, "cvusa_width", "must be >= 32")
    need(self.max_ray_m > 10, "max_ray_m", "must be > 10")
    need(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in [1, 100]")
    need(self.gps_sigma_m >= 0, "gps_sigma_m", "must be >= 0")
    need(self.heading_sigma_deg >= 0, "heading_sigma_deg", "must be >= 0")
    need(0.5 <= self.cam_height_min_m <= self.cam_height_max_m <= 10,
         "cam_height_min_m", "need 0.5 <= cam_height_min_m <= "
         "cam_height_max_m <= 10")
    need(self.sat_appearance >= 0, "sat_appearance", "must be >= 0")
    need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
    need(0 <= self.test_fraction < 1 and
         self.val_fraction + self.test_fraction < 1, "test_fraction",
         "must be in [0, 1) with val_fraction + test_fraction < 1")
    need(0 < self.vigor_test_fraction < 1, "vigor_test_fraction",
         "must be in (0, 1)")
    need(self.vigor_panos_per_tile > 0, "vigor_panos_per_tile", "must be > 0")
    need(2 * self.pano_margin_m + 10 < self.map_m, "map_cells",
         f"the map ({self.map_m:g} m) is too small for {self.tile_m:g} m "
         f"tiles; raise map_cells or lower tile_m")
    return self
