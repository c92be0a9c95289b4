"""Tests of the synthetic world: determinism, the panorama convention (BEV
vs satellite), the nuisance knobs, the three layouts and their readers."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.io

from cvgl_jax.cfp import geometry
from cvgl_jax.data import cvact
from cvgl_jax.data import cvusa
from cvgl_jax.data import vigor
from cvgl_jax.data.synthetic import config as config_lib
from cvgl_jax.data.synthetic import layouts
from cvgl_jax.data.synthetic import render
from cvgl_jax.data.synthetic import world as world_lib

# Small worlds and images: a 160 m map, 32 m tiles.
SMALL = config_lib.SyntheticConfig(
    map_cells=640, block_m=(30.0, 50.0), sat_px=64, tile_m=32.0,
    pano_width=128, cvusa_width=256, min_separation_m=3.0,
    vigor_panos_per_tile=0.5)


def _read_rgb(path):
  image = cv2.imread(path, cv2.IMREAD_COLOR)
  assert image is not None, path
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _files(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  """One small dataset per layout, written once for the module."""
  root = tmp_path_factory.mktemp("synthetic")
  out = {}
  for layout, n in (("cvusa", 20), ("cvact", 20), ("vigor", 16)):
    path = str(root / layout)
    truth = layouts.write_dataset(layout, path, SMALL, n, seed=3,
                                  progress=False)
    out[layout] = (path, truth)
  return out


@pytest.fixture(scope="module")
def small_world():
  return world_lib.make_world(SMALL, np.random.default_rng(11), 0)


def test_world_is_a_function_of_its_seed():
  a = world_lib.make_world(SMALL, np.random.default_rng(5))
  b = world_lib.make_world(SMALL, np.random.default_rng(5))
  c = world_lib.make_world(SMALL, np.random.default_rng(6))
  for field in ("height", "kind", "side"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  np.testing.assert_array_equal(a.sat_mips[0], b.sat_mips[0])
  np.testing.assert_array_equal(a.trees.pos, b.trees.pos)
  assert not np.array_equal(a.kind, c.kind)
  # The world has the things it promises.
  kinds = set(np.unique(a.kind).tolist())
  assert {world_lib.ROAD, world_lib.BUILDING, world_lib.CAR,
          world_lib.GRASS} <= kinds
  assert a.height.max() > 3.0 and len(a.trees.pos) > 0
  assert len(a.camera_cells) > 0
  on = a.kind.ravel()[a.camera_cells]
  assert np.all((on == world_lib.ROAD) | (on == world_lib.MARK))


def test_dataset_bytes_are_a_function_of_the_seed(tmp_path, datasets):
  path, _ = datasets["cvusa"]
  again = str(tmp_path / "again")
  other = str(tmp_path / "other")
  layouts.write_dataset("cvusa", again, SMALL, 20, seed=3, progress=False)
  layouts.write_dataset("cvusa", other, SMALL, 20, seed=4, progress=False)
  first, second, third = _files(path), _files(again), _files(other)
  assert first == second
  differ = [k for k in first if k.endswith(".jpg") and first[k] != third[k]]
  assert len(differ) == sum(k.endswith(".jpg") for k in first)


def _ncc(a, b):
  a = a - a.mean(axis=(0, 1))
  b = b - b.mean(axis=(0, 1))
  return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("band", [False, True])
def test_bev_of_panorama_matches_tile_only_north_up(band):
  """North at the centre column, azimuth clockwise: the BEV of a rendered
  panorama (geometry.py, wrap=True) correlates with its north-up tile, and
  a tile rotated by 90, 180 or 270 deg does not."""
  height = 2.0
  fov = 168.0
  tile_m = 2 * height * math.tan(math.radians(fov / 2))   # BEV ground width
  cfg = dataclasses.replace(SMALL, map_cells=768, tile_m=tile_m, sat_px=64,
                            pano_width=512, cvusa_width=512,
                            min_separation_m=8.0).without_nuisances(height)
  w = world_lib.make_world(cfg, np.random.default_rng(21))
  rng = np.random.default_rng(0)
  shots = layouts.draw_shots(w, cfg, layouts.place_cameras(w, cfg, 8, rng),
                             rng)
  if band:
    ph, pw = cfg.cvusa_hw
    row0 = cfg.cvusa_top
  else:
    ph, pw, row0 = 256, 512, 0
  grid = geometry.bev_grid((ph, pw), 64, fov, crop_top=row0, wrap=True)
  wins, true_scores, rotated_scores = 0, [], []
  for shot in shots:
    p = shot.pose
    pano = render.render_panorama(w, p, pw, row0, ph, cfg.max_ray_m,
                                  np.random.default_rng(1))
    bev = np.asarray(geometry.sample_bev(pano[None], grid, wrap=True))[0]
    tile = render.render_satellite(w, p.tile_row, p.tile_col, cfg.tile_m,
                                   64, 0.0, np.random.default_rng(1))
    tile = tile.astype(np.float32)
    scores = [_ncc(bev, np.rot90(tile, k)) for k in range(4)]
    true_scores.append(scores[0])
    rotated_scores.append(max(scores[1:]))
    wins += scores[0] > max(scores[1:])
  assert wins >= 7, (true_scores, rotated_scores)
  assert np.mean(true_scores) > 0.35, true_scores
  assert np.mean(true_scores) - np.mean(rotated_scores) > 0.2


def test_cvusa_band_is_the_band_of_the_full_panorama(small_world):
  """The CVUSA crop holds rows cvusa_top .. cvusa_top + H of the full
  panorama: +38.6 to -26.9 deg elevation."""
  cfg = dataclasses.replace(SMALL, cvusa_width=616)
  (h, w), top = cfg.cvusa_hw, cfg.cvusa_top
  assert (h, w, top) == (112, 616, 88.0)
  elev = np.degrees(render.canvas_elevations(w, top - 0.5, h + 1))
  np.testing.assert_allclose([elev[0], elev[-1]], [38.57, -26.88], atol=0.01)
  rng = np.random.default_rng(4)
  shot = layouts.draw_shots(
      small_world, cfg, layouts.place_cameras(small_world, cfg, 1, rng),
      rng)[0]
  full = render.render_panorama(small_world, shot.pose, w, 0, w // 2,
                                cfg.max_ray_m, np.random.default_rng(0))
  band = render.render_panorama(small_world, shot.pose, w, top, h,
                                cfg.max_ray_m, np.random.default_rng(0))
  diff = lambda s: np.abs(full[88 + s:88 + s + h].astype(float) - band).mean()
  assert diff(0) < 4.0
  assert diff(0) < 0.5 * min(diff(-4), diff(4))


def test_nuisance_knobs_change_what_they_name(small_world):
  w = small_world
  base = SMALL
  positions = layouts.place_cameras(w, base, 40, np.random.default_rng(2))
  draw = lambda cfg: layouts.draw_shots(w, cfg, positions,
                                        np.random.default_rng(7))
  ref = draw(base)
  pose = lambda shots, f: np.array([getattr(s.pose, f) for s in shots])
  gps = np.stack([pose(ref, "tile_row") - pose(ref, "row"),
                  pose(ref, "tile_col") - pose(ref, "col")]) * base.cell_m
  assert 0.8 < np.std(gps) / base.gps_sigma_m < 1.25
  heading = np.degrees(pose(ref, "heading_rad"))
  assert 0.7 < np.std(heading) / base.heading_sigma_deg < 1.3
  heights = pose(ref, "height_m")
  assert heights.min() >= 1.8 and heights.max() <= 2.8 and heights.std() > .1

  cases = {
      "gps_sigma_m": (dict(gps_sigma_m=0.0), {"tile_row", "tile_col"}),
      "heading_sigma_deg": (dict(heading_sigma_deg=0.0), {"heading_rad"}),
      "cam_height": (dict(cam_height_min_m=2.0, cam_height_max_m=2.0),
                     {"height_m"}),
      "separate_sun": (dict(separate_sun=False), {"sun_az", "sun_el"}),
      "sat_appearance": (dict(sat_appearance=0.0), set()),
  }
  fields = [f.name for f in dataclasses.fields(render.Pose)]
  def views(cfg, shot):
    p = shot.pose
    pano = render.render_panorama(w, p, 128, 0, 64, cfg.max_ray_m,
                                  np.random.default_rng(shot.pano_seed))
    sat = render.render_satellite(w, p.tile_row, p.tile_col, cfg.tile_m, 64,
                                  cfg.sat_appearance,
                                  np.random.default_rng(shot.sat_seed))
    return pano, sat
  ref_pano, ref_sat = views(base, ref[0])
  for name, (change, named) in cases.items():
    cfg = dataclasses.replace(base, **change)
    shots = draw(cfg)
    changed = {f for f in fields if not np.array_equal(pose(shots, f),
                                                       pose(ref, f))}
    assert changed == named, name
    assert all(s.pano_seed == r.pano_seed for s, r in zip(shots, ref))
    pano, sat = views(cfg, shots[0])
    pano_changes = name in ("heading_sigma_deg", "cam_height", "separate_sun")
    sat_changes = name in ("gps_sigma_m", "sat_appearance")
    assert (not np.array_equal(pano, ref_pano)) == pano_changes, name
    assert (not np.array_equal(sat, ref_sat)) == sat_changes, name
  # Off means exact: the tile is centred on the camera, north is north.
  exact = draw(base.without_nuisances())
  assert all(s.pose.tile_row == s.pose.row and s.pose.heading_rad == 0
             for s in exact)


def test_cvusa_layout(datasets):
  path, truth = datasets["cvusa"]
  h, w = SMALL.cvusa_hw
  assert (h, w) == (round(256 * 224 / 1232), 256)
  lines = {}
  for split in ("train", "val"):
    with open(os.path.join(path, "splits", f"{split}-19zl.csv")) as f:
      lines[split] = f.read().splitlines()
  assert len(lines["val"]) == round(20 * SMALL.val_fraction)
  assert len(lines["train"]) + len(lines["val"]) == 20
  for line in lines["train"] + lines["val"]:
    sat, pano, ann = line.split(",")
    pid = os.path.basename(pano)[:-4]
    assert len(pid) == 7 and pid.isdigit()
    assert sat == f"bingmap/19/{pid}.jpg"
    assert pano == f"streetview/panos/{pid}.jpg"
    assert ann == f"streetview/annotations/{pid}.png"
    assert _read_rgb(os.path.join(path, pano)).shape == (h, w, 3)
    assert _read_rgb(os.path.join(path, sat)).shape == (64, 64, 3)
  assert len(truth["pairs"]) == 20
  assert len({p["world"] for p in truth["pairs"]}) >= 2


def test_cvact_layout(datasets):
  path, truth = datasets["cvact"]
  mat = scipy.io.loadmat(os.path.join(path, "ACT_data.mat"))
  ids = mat["panoIds"]
  train = mat["trainSet"][0][0][1] - 1
  val = mat["valSet"][0][0][1] - 1
  np.testing.assert_array_equal(train, mat["trainSet"]["trainInd"][0][0] - 1)
  assert train.shape[1] == val.shape[1] == 1
  assert mat["utm"].shape == (20, 2)
  by_id = {p["ground_id"]: p for p in truth["pairs"]}
  for split, inds in (("train", train), ("val", val)):
    for i in inds[:, 0]:
      pid = str(ids[i])
      assert by_id[pid]["split"] == split
      np.testing.assert_allclose(mat["utm"][i], by_id[pid]["utm"])
      g = os.path.join(path, "ANU_data_small", "streetview",
                       f"{pid}_grdView.jpg")
      s = os.path.join(path, "ANU_data_small", "satview_polish",
                       f"{pid}_satView_polish.jpg")
      assert _read_rgb(g).shape == (64, 128, 3)
      assert _read_rgb(s).shape == (64, 64, 3)
  test_ids = {p["ground_id"] for p in truth["pairs"] if p["split"] == "test"}
  assert len(test_ids) == round(20 * SMALL.test_fraction)
  listed = os.listdir(os.path.join(path, "ANU_data_test", "streetview"))
  assert {n[:-len("_grdView.jpg")] for n in listed} == test_ids


def test_vigor_layout(datasets):
  path, _ = datasets["vigor"]
  half = SMALL.sat_px / 2
  positives = []
  for city in config_lib.VIGOR_CITIES:
    split = os.path.join(path, "splits", city)
    with open(os.path.join(split, "satellite_list.txt")) as f:
      tiles = f.read().split()
    assert tiles and all(os.path.isfile(os.path.join(path, city, "satellite",
                                                     t)) for t in tiles)
    with open(os.path.join(split, "pano_label_balanced.txt")) as f:
      labels = f.read().splitlines()
    with open(os.path.join(split, "same_area_balanced_train.txt")) as f:
      train = f.read().splitlines()
    with open(os.path.join(split, "same_area_balanced_test.txt")) as f:
      test = f.read().splitlines()
    assert sorted(train + test) == sorted(labels) and train and test
    for line in labels:
      fields = line.split(" ")
      assert len(fields) == 13
      pano = fields[0]
      assert os.path.isfile(os.path.join(path, city, "panorama", pano))
      pid, lat, lon, tail = pano.split(",")
      assert len(pid) == 22 and pid.isalnum() and tail == ".jpg"
      assert float(lat) and float(lon)
      names = fields[1::3]
      offsets = np.array([fields[2::3], fields[3::3]], float).T
      assert len(set(names)) == 4 and set(names) <= set(tiles)
      # VIGOR's delta: (tile centre - panorama) in (lat, lon), in pixels.
      metres_per_px = SMALL.tile_m / SMALL.sat_px
      for k, name in enumerate(names):
        t_lat, t_lon = map(float, name[len("satellite_"):-4].split("_"))
        want = np.array([
            (t_lat - float(lat)) * 111_320.0,
            (t_lon - float(lon)) * 111_320.0 * math.cos(math.radians(
                config_lib.VIGOR_CITY_LATLON[city][0]))]) / metres_per_px
        np.testing.assert_allclose(offsets[k], want, atol=0.05)
      # Positive: the panorama lies in its central quarter; the others
      # still contain it.
      assert np.all(np.abs(offsets[0]) <= half / 2 + 1e-3)
      assert np.all(np.abs(offsets) <= half + 1e-3)
      positives.append((city, names[0]))
  # Many-to-one: some tile is the positive of several panoramas.
  _, counts = np.unique(np.array(positives), axis=0, return_counts=True)
  assert counts.max() >= 2


def test_readers_round_trip_the_truth(datasets):
  path, truth = datasets["cvusa"]
  for split in ("train", "val"):
    idx = cvusa.read(path, split)
    want = {p["ground_id"]: p["satellite"] for p in truth["pairs"]
            if p["split"] == split}
    got = {g: os.path.relpath(idx.satellite_paths[k], path)
           for g, k in zip(idx.ground_ids, idx.positive)}
    assert got == want

  path, truth = datasets["cvact"]
  for split in ("train", "val", "test"):
    idx = cvact.read(path, split)
    pairs = [p for p in truth["pairs"] if p["split"] == split]
    want = {p["ground_id"]: (p["ground"], p["satellite"]) for p in pairs}
    got = {g: (os.path.relpath(gp, path),
               os.path.relpath(idx.satellite_paths[k], path))
           for g, gp, k in zip(idx.ground_ids, idx.ground_paths,
                               idx.positive)}
    assert got == want
    if split != "test" or idx.ground_coords is not None:
      utm = {p["ground_id"]: p["utm"] for p in pairs}
      np.testing.assert_allclose(idx.ground_coords,
                                 [utm[g] for g in idx.ground_ids])

  path, truth = datasets["vigor"]
  for mode, split in (("same_area", "train"), ("same_area", "test"),
                      ("cross_area", "train"), ("cross_area", "test")):
    idx = vigor.read(path, split, mode)
    cities = vigor.MODE_CITIES[mode][split]
    pairs = [p for p in truth["pairs"] if p["city"] in cities and
             (mode == "cross_area" or p["split"] == split)]
    rel = lambda k: os.path.relpath(idx.satellite_paths[k], path)
    want = {p["ground_id"]: (p["satellite"], sorted(p["semi_positives"]))
            for p in pairs}
    got = {g: (rel(k), sorted(rel(s) for s in semi))
           for g, k, semi in zip(idx.ground_ids, idx.positive,
                                 idx.semi_positives)}
    assert got == want, (mode, split)
    truth_ids = {p["ground_id"]: p["satellite_id"] for p in pairs}
    assert {g: idx.satellite_ids[k] for g, k in zip(
        idx.ground_ids, idx.positive)} == truth_ids
    assert idx.num_satellite == sum(
        s["city"] in cities for s in truth["satellites"])


def test_truth_file_is_written_and_complete(datasets):
  for layout, (path, truth) in datasets.items():
    with open(os.path.join(path, layouts.TRUTH_FILE)) as f:
      on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(truth))
    for p in on_disk["pairs"]:
      assert {"world", "position_en_m", "gps_error_en_m",
              "heading_error_deg", "camera_height_m"} <= set(p), layout
      assert os.path.isfile(os.path.join(path, p["ground"]))


def test_bad_input_is_named_before_rendering(tmp_path):
  with pytest.raises(ValueError, match="gps_sigma_m"):
    dataclasses.replace(SMALL, gps_sigma_m=-1.0).validate()
  with pytest.raises(ValueError, match="map_cells"):
    dataclasses.replace(SMALL, map_cells=200, tile_m=64.0).validate()
  with pytest.raises(ValueError, match="layout"):
    layouts.write_dataset("kitti", str(tmp_path / "x"), SMALL, 4, 0)
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "file").write_text("x")
  with pytest.raises(FileExistsError, match="busy"):
    layouts.write_dataset("cvusa", str(busy), SMALL, 4, 0, progress=False)
  crowded = dataclasses.replace(SMALL, num_worlds=1, min_separation_m=40.0)
  with pytest.raises(ValueError, match="min_separation_m"):
    layouts.write_dataset("cvusa", str(tmp_path / "c"), crowded, 50, 0,
                          progress=False)
  with pytest.raises(ValueError, match="map_cells"):
    layouts.write_dataset("vigor", str(tmp_path / "v"), SMALL, 4000, 0,
                          progress=False)
  with pytest.raises(ValueError, match="num_pairs >= 8"):
    layouts.write_dataset("vigor", str(tmp_path / "v"), SMALL, 5, 0,
                          progress=False)


def test_cli_writes_a_dataset(tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
      [sys.executable, "-m", "cvgl_jax.data.synthetic", "--layout=cvusa",
       f"--out={out}", "--num_pairs=4", "--seed=1", "--map_cells=640",
       "--block_m=30,50", "--tile_m=32", "--sat_px=32", "--cvusa_width=128",
       "--no_nuisances"],
      capture_output=True, text=True, check=True)
  assert "pairs/s" in result.stdout
  with open(out / layouts.TRUTH_FILE) as f:
    truth = json.load(f)
  assert truth["config"]["gps_sigma_m"] == 0.0
  assert truth["config"]["block_m"] == [30.0, 50.0]
  assert len(os.listdir(out / "streetview" / "panos")) == 4
