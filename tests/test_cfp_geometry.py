"""CFP geometric projection: the authors' golden outputs, the panorama
convention (north up, east right, nadir at the centre), the seam option,
batching, and the `g2a/` writer's resume and error behaviour."""

import os

import cv2
import numpy as np
import pytest

from cvgl_jax.cfp import geometry
from cvgl_jax.cfp import project
from cvgl_jax.data import derived
from cvgl_jax.data.index import PairIndex

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden",
                      "cfp_golden.npz")
CVUSA_HW = (224, 1232)


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as data:
    return dict(data)


def test_cvusa_placement_matches_the_authors(golden):
  assert geometry.cvusa_crop_top(CVUSA_HW) == golden["cvusa_ty"]
  # A crop resized to half width keeps the band: the synthetic world's
  # 616 x 112 CVUSA crops start at canvas row 88.
  assert geometry.cvusa_crop_top((112, 616)) == 88.0
  np.testing.assert_array_equal(
      geometry.pad_to_canvas(golden["cvusa_input"], 176),
      golden["cvusa_padded"])


@pytest.mark.parametrize("key,pano_hw,out,fov,cvusa,step", [
    ("cvusa_grid150", CVUSA_HW, 150, 175, True, 1),
    ("cvusa_grid750_every15", CVUSA_HW, 750, 175, True, 15),
    ("cvact_grid120", (208, 416), 120, 170, False, 1),
    ("cvact_grid1200_every24", (208, 416), 1200, 170, False, 24),
])
def test_grid_matches_golden(golden, key, pano_hw, out, fov, cvusa, step):
  top = geometry.cvusa_crop_top(pano_hw) if cvusa else 0.0
  grid = geometry.bev_grid(pano_hw, out, fov, top)
  assert grid.shape == (out, out, 2) and grid.dtype == np.float32
  ours = geometry.to_canvas_normalized(grid[::step, ::step], pano_hw, top)
  np.testing.assert_allclose(ours, golden[key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,out,fov", [("cvusa", 150, 175),
                                          ("cvact", 120, 170)])
def test_bev_matches_golden(golden, name, out, fov):
  pano = golden[f"{name}_input"]
  top = geometry.cvusa_crop_top(pano.shape[:2]) if name == "cvusa" else 0.0
  grid = geometry.bev_grid(pano.shape[:2], out, fov, top)
  bev = np.asarray(geometry.sample_bev(pano[None], grid))[0]
  err = np.abs(bev - golden[f"{name}_bev{out}"])
  assert err.mean() < 0.5 / 255 and err.max() < 0.01
  # The uint8 fast path is the same numbers, rounded.
  fast = np.asarray(geometry.project_uint8(
      pano[None], geometry.bev_plan(pano.shape[:2], out, fov, top)))[0]
  np.testing.assert_array_equal(fast, np.round(bev).astype(np.uint8))


def test_sampling_the_crop_equals_sampling_the_padded_canvas(golden):
  crop, canvas = golden["cvusa_input"], golden["cvusa_padded"]
  on_crop = geometry.sample_bev(
      crop[None], geometry.bev_grid(CVUSA_HW, 150, 175, 176.0))
  on_canvas = geometry.sample_bev(
      canvas[None], geometry.bev_grid(canvas.shape[:2], 150, 175, 0.0))
  np.testing.assert_allclose(np.asarray(on_crop), np.asarray(on_canvas),
                             atol=1e-3)


def test_batched_equals_per_image():
  rng = np.random.default_rng(0)
  panos = rng.integers(0, 256, (3, 40, 80, 3), dtype=np.uint8)
  grid = geometry.bev_grid((40, 80), (24, 24), 160, 0.0)
  plan = geometry.bev_plan((40, 80), 24, 160, 0.0)
  batched = np.asarray(geometry.sample_bev(panos, grid))
  fast = np.asarray(geometry.project_uint8(panos, plan))
  for i in range(3):
    single = np.asarray(geometry.sample_bev(panos[i:i + 1], grid))[0]
    np.testing.assert_allclose(batched[i], single, atol=1e-4)
    np.testing.assert_array_equal(
        fast[i], np.asarray(geometry.project_uint8(panos[i:i + 1], plan))[0])
  assert batched.std() > 10  # sampled real content, not zeros


def _compass_panorama(h=64, w=128):
  """Columns coloured by compass quadrant in the project convention:
  north (around W/2) red, east (3W/4) green, south (edges) blue, west (W/4)
  yellow."""
  x = np.arange(w)
  pano = np.zeros((h, w, 3), np.uint8)
  pano[:, :] = (0, 0, 255)
  pano[:, np.abs(x - w / 2) < w / 8] = (255, 0, 0)
  pano[:, np.abs(x - 3 * w / 4) < w / 8] = (0, 255, 0)
  pano[:, np.abs(x - w / 4) < w / 8] = (255, 255, 0)
  return pano


@pytest.mark.parametrize("wrap", [False, True])
def test_bev_is_north_up_with_east_right(wrap):
  pano = _compass_panorama()
  grid = geometry.bev_grid(pano.shape[:2], 32, 150, 0.0, wrap=wrap)
  bev = np.asarray(geometry.sample_bev(pano[None], grid, wrap=wrap))[0]
  expected = {(2, 16): (255, 0, 0), (16, 29): (0, 255, 0),
              (29, 16): (0, 0, 255), (16, 2): (255, 255, 0),
              # 27 deg and 63 deg clockwise from north.
              (4, 22): (255, 0, 0), (10, 28): (0, 255, 0)}
  for (r, c), colour in expected.items():
    np.testing.assert_allclose(bev[r, c], colour, atol=1)


def test_nadir_lands_at_bev_centre():
  h, w = 64, 128
  pano = np.zeros((h, w, 3), np.uint8)
  pano[53:] = 255  # elevation below about -60 deg
  bev = np.asarray(geometry.sample_bev(
      pano[None], geometry.bev_grid((h, w), 32, 90, 0.0)))[0, ..., 0]
  rows, cols = np.nonzero(bev > 127)
  assert 100 < len(rows) < 400  # a disc of radius ~ 16 tan(30 deg) = 9.2
  # The authors' optical axis passes through pixel (Ho/2, Wo/2).
  assert abs(rows.mean() - 16) < 0.6 and abs(cols.mean() - 16) < 0.6
  assert bev[0, 0] == 0 and bev[31, 31] == 0


def test_non_square_output_is_a_crop_of_the_square_one():
  square = geometry.bev_grid((40, 80), (60, 60), 160, 0.0)
  wide = geometry.bev_grid((40, 80), (40, 60), 160, 0.0)
  np.testing.assert_allclose(wide, square[10:50], atol=1e-3)


def test_seam_wrap_option():
  h, w = 32, 64
  pano = np.zeros((1, h, w, 1), np.float32)
  pano[0, :, -1] = 100.0
  pano[0, :, 0] = 200.0
  between = np.array([[[w - 0.5, 10.0]]], np.float32)  # 1x1 grid
  off = geometry.sample_bev(pano, between)[0, 0, 0, 0]
  on = geometry.sample_bev(pano, between, wrap=True)[0, 0, 0, 0]
  assert off == pytest.approx(50.0)   # the authors: zeros beyond column W-1
  assert on == pytest.approx(150.0)   # wrapped: last and first column

  # The wrapped grid follows the convention exactly: north at x = W/2,
  # east at 3W/4; rows are the authors'. The authors' is within a pixel.
  authors = geometry.bev_grid((h, w), 32, 120, 0.0)
  wrapped = geometry.bev_grid((h, w), 32, 120, 0.0, wrap=True)
  assert wrapped[0, 16, 0] == pytest.approx(w / 2)
  assert wrapped[16, 31, 0] == pytest.approx(3 * w / 4, abs=0.05)
  assert authors[0, 16, 0] == pytest.approx((w - 1) / 2)
  np.testing.assert_array_equal(wrapped[..., 1], authors[..., 1])
  assert np.abs(wrapped[..., 0] - authors[..., 0]).max() <= 1.0 + 1e-4
  # Some BEV pixels south of the camera fall between the last and the
  # first column: the wrap option closes that gap, a non-wrapping sampler
  # leaves a dark seam there.
  flat = np.full((1, h, w, 1), 100.0, np.float32)
  closed = np.asarray(geometry.sample_bev(flat, wrapped, wrap=True))
  seam = np.asarray(geometry.sample_bev(flat, wrapped, wrap=False))
  ground = authors[..., 1] >= h / 2  # below the horizon: inside the image
  np.testing.assert_allclose(closed[0, ground, 0], 100.0, atol=1e-3)
  assert seam[0, ground, 0].min() < 90.0
  # The authors' mapping never leaves [0, W-1] horizontally: no seam.
  assert authors[..., 0].min() >= 0 and authors[..., 0].max() <= w - 1


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="fov_deg"):
    geometry.bev_grid((32, 64), 16, 180.0)
  with pytest.raises(ValueError, match="crop_top"):
    geometry.bev_grid((32, 64), 16, 120.0, crop_top=5.0)
  with pytest.raises(ValueError, match="out_hw"):
    geometry.bev_grid((32, 64), (16, 16, 3), 120.0)


def _tiny_split(root, n=5, hw=(32, 64)):
  rng = np.random.default_rng(1)
  os.makedirs(os.path.join(root, "panos"))
  paths, ids = [], []
  for i in range(n):
    path = os.path.join(root, "panos", f"{i:07d}.png")
    cv2.imwrite(path, rng.integers(0, 256, hw + (3,), dtype=np.uint8))
    paths.append(path)
    ids.append(f"{i:07d}")
  return PairIndex(name="tiny/train", root=str(root),
                   ground_paths=np.array(paths), ground_ids=np.array(ids),
                   satellite_paths=np.array([], str),
                   satellite_ids=np.array([], str),
                   positive=np.full(n, -1, np.int64))


def test_project_split_writes_then_resumes(tmp_path):
  index = _tiny_split(tmp_path)
  kw = dict(out_size=24, fov_deg=160, placement="full", batch_size=2,
            progress=False)
  stats = project.project_split(index, **kw)
  outs = index.derived_paths("g2a")
  assert stats["written"] == 5 and stats["skipped"] == 0
  assert stats["images_per_s"] > 0
  assert sorted(os.listdir(tmp_path / "g2a")) == sorted(
      os.path.basename(p) for p in outs)  # no temporary files left
  plan = geometry.bev_plan((32, 64), 24, 160, 0.0)
  for src, out in zip(index.ground_paths, outs):
    expected = np.asarray(geometry.project_uint8(
        project.decode_panorama(src)[None], plan))[0]
    np.testing.assert_array_equal(project.decode_panorama(out), expected)

  # A rerun touches nothing; after losing one output it redoes only that.
  mtimes = {p: os.stat(p).st_mtime_ns for p in outs}
  stats = project.project_split(index, **kw)
  assert stats["written"] == 0 and stats["skipped"] == 5
  os.remove(outs[3])
  stats = project.project_split(index, **kw)
  assert stats["written"] == 1 and stats["skipped"] == 4
  for p in outs[:3].tolist() + outs[4:].tolist():
    assert os.stat(p).st_mtime_ns == mtimes[p]
  assert os.path.exists(outs[3])


def test_decode_keeps_rgb_order(tmp_path):
  path = str(tmp_path / "red.png")
  red_bgr = np.zeros((8, 16, 3), np.uint8)
  red_bgr[..., 2] = 255
  cv2.imwrite(path, red_bgr)
  np.testing.assert_array_equal(project.decode_panorama(path)[0, 0],
                                (255, 0, 0))


def test_missing_panorama_fails_before_any_work(tmp_path):
  index = _tiny_split(tmp_path)
  os.remove(index.ground_paths[2])
  with pytest.raises(FileNotFoundError, match="0000002.png"):
    project.project_split(index, 24, 160, progress=False)
  assert not os.path.exists(tmp_path / "g2a")


def test_corrupt_panorama_is_named(tmp_path):
  index = _tiny_split(tmp_path)
  with open(index.ground_paths[4], "wb") as f:
    f.write(b"not a png at all")
  with pytest.raises(ValueError, match="0000004.png"):
    project.project_split(index, 24, 160, batch_size=2, progress=False)


def test_shares_do_not_shift_when_another_process_wrote_first(tmp_path):
  # Process 0 finishes before process 1 lists the folder (a shared file
  # system): process 1 must still write its own share, all of it.
  index = _tiny_split(tmp_path)
  kw = dict(out_size=24, fov_deg=160, placement="full", batch_size=2,
            progress=False, process_count=2)
  first = project.project_split(index, process_index=0, **kw)
  second = project.project_split(index, process_index=1, **kw)
  assert (first["written"], second["written"]) == (3, 2)
  assert all(os.path.exists(p) for p in index.derived_paths("g2a"))


def test_bevs_of_other_settings_are_replaced_not_reused(tmp_path):
  index = _tiny_split(tmp_path)
  folder = str(tmp_path / "g2a")
  settings = {"made_by": "cfp", "fov_deg": 160}
  assert not derived.claim(folder, settings)
  project.project_split(index, 24, 160, placement="full", progress=False)
  assert derived.claim(folder, settings)  # Same settings: a resume.
  assert len(os.listdir(folder)) == 6     # 5 BEVs and the stamp.
  assert not derived.claim(folder, dict(settings, fov_deg=150))
  assert os.listdir(folder) == [derived.STAMP]
  assert derived.read_stamp(folder)["fov_deg"] == 150
  # A folder without a stamp (an older version's) is emptied too.
  os.remove(os.path.join(folder, derived.STAMP))
  open(os.path.join(folder, "0000000.png"), "wb").close()
  assert not derived.claim(folder, settings)
  assert os.listdir(folder) == [derived.STAMP]
