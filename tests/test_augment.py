"""Tests of cvgl_jax.data.augment: each augmentation does what it says."""

import colorsys
import dataclasses
import math

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax.cfp import geometry
from cvgl_jax.data import augment
from cvgl_jax.data import image_io
from cvgl_jax.data.synthetic import config
from cvgl_jax.data.synthetic import layouts
from cvgl_jax.data.synthetic import render
from cvgl_jax.data.synthetic import world as world_lib

ONLY = dict(dropout_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _images(b=8, h=32, w=64, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), np.uint8)


def test_probability_zero_leaves_images_unchanged():
  x = _images()
  y = augment.augment_batch(jax.random.key(0), x,
                            augment.no_view_augmentation())
  np.testing.assert_allclose(np.asarray(y), x / 255.0, atol=1e-6)
  s = _images(w=32, seed=1)
  g2, s2 = augment.augment_pairs(
      jax.random.key(1), x, s, augment.no_view_augmentation(),
      augment.no_view_augmentation(), augment.PairedConfig(0.0, 0.0))
  np.testing.assert_allclose(np.asarray(g2), x / 255.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s2), s / 255.0, atol=1e-6)


def test_same_key_same_result_different_keys_differ():
  x = _images()
  cfg = augment.satellite_view()
  a = np.asarray(augment.augment_batch(jax.random.key(3), x, cfg))
  b = np.asarray(augment.augment_batch(jax.random.key(3), x, cfg))
  c = np.asarray(augment.augment_batch(jax.random.key(4), x, cfg))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # One key per example: identical inputs are augmented differently.
  same = np.repeat(x[:1], 8, axis=0)
  d = np.asarray(augment.augment_batch(jax.random.key(5), same, cfg))
  assert len({v.tobytes() for v in d}) == 8
  assert d.min() >= 0.0 and d.max() <= 1.0


def test_grayscale_gives_equal_channels_of_the_luma():
  x = _images()
  y = np.asarray(augment.augment_batch(
      jax.random.key(0), x, augment.ViewConfig(**{**ONLY,
                                                  "grayscale_p": 1.0})))
  np.testing.assert_allclose(y[..., 0], y[..., 1], atol=1e-6)
  np.testing.assert_allclose(y[..., 0], y[..., 2], atol=1e-6)
  luma = (x / 255.0) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(y[..., 0], luma, atol=1e-5)


def test_colour_jitter_changes_value_and_hue_within_range():
  cfg = augment.ViewConfig(**{**ONLY, "jitter_p": 1.0, "contrast": 0.0,
                              "saturation": 0.0})
  rgb = (0.6, 0.3, 0.1)
  x = np.broadcast_to(np.array(rgb, np.float32), (64, 4, 4, 3))
  y = np.asarray(augment.augment_batch(jax.random.key(1), x, cfg))
  np.testing.assert_allclose(y.std(axis=(1, 2)), 0.0, atol=1e-6)
  h0, s0, v0 = colorsys.rgb_to_hsv(*rgb)
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in y[:, 0, 0]])
  dh = (hsv[:, 0] - h0 + 0.5) % 1.0 - 0.5
  assert np.abs(dh).max() <= 0.1 + 1e-5 and dh.std() > 0.02
  np.testing.assert_allclose(hsv[:, 1], s0, atol=1e-5)
  factor = hsv[:, 2] / v0  # Brightness, unclipped as 0.6 * 1.4 < 1.
  assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
  assert factor.min() < 0.8 and factor.max() > 1.2  # Both ways, spread.


def test_hue_shift_matches_opencv_hsv():
  x = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
  hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
  hsv[..., 0] = (hsv[..., 0] + 0.07 * 360) % 360
  want = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  got = np.asarray(jax.jit(augment._adjust_hue)(x, 0.07))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_coarse_dropout_holes_have_the_stated_count_and_size():
  cfg = augment.ViewConfig()
  h, w = 50, 80
  u = jax.random.uniform(jax.random.key(0), (20, 1 + 4 * 25))
  all_boxes, all_active = jax.jit(jax.vmap(
      lambda v: augment.coarse_dropout_boxes(v, h, w, cfg)))(u)
  for boxes, active in zip(np.asarray(all_boxes), np.asarray(all_active)):
    assert 10 <= active.sum() <= 25
    assert active[:active.sum()].all()  # The first n are the holes.
    hh, ww = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert hh.min() >= 5 and hh.max() <= 10   # 10-20 % of 50.
    assert ww.min() >= 8 and ww.max() <= 16   # 10-20 % of 80.
    assert boxes[:, :2].min() >= 0
    assert (boxes[:, 2] <= h).all() and (boxes[:, 3] <= w).all()
    want = np.zeros((h, w), bool)
    for (y0, x0, y1, x1), on in zip(boxes, active):
      want[y0:y1, x0:x1] |= on
    np.testing.assert_array_equal(
        np.asarray(augment.boxes_to_mask(boxes, active, h, w)), want)


def test_grid_dropout_holes_tile_the_image():
  cfg = augment.ViewConfig(grid_ratio=0.5)
  grid = jax.jit(augment.grid_dropout_mask, static_argnums=(1, 2, 3))
  mask = np.asarray(grid(jnp.array([0.0, 0.99]), 40, 60, cfg))
  # Units 4 x 6 pixels, holes 2 x 3; offset (0, 3) from the uniforms.
  assert mask[:2, 3:6].all() and not mask[2:4].any()
  assert not mask[:, :3].any()
  assert mask.sum() == 10 * 10 * 2 * 3  # 10 x 10 holes of 2 x 3.


def test_dropout_makes_holes_only_when_drawn():
  x = np.ones((32, 32, 32, 3), np.uint8) * 255
  cfg = augment.ViewConfig(**{**ONLY, "dropout_p": 0.5})
  y = np.asarray(augment.augment_batch(jax.random.key(1), x, cfg))
  assert set(np.unique(y)) == {0.0, 1.0}  # Holes are black, rest intact.
  dropped = (y == 0).any(axis=(1, 2, 3))
  assert 5 < dropped.sum() < 27  # About half of 32.
  holes = (y[dropped] == 0).all(-1).mean(axis=(1, 2))
  assert holes.min() > 0.01


def test_blur_matches_opencv_3x3():
  x = _images(2)
  y = np.asarray(augment.augment_batch(
      jax.random.key(0), x, augment.ViewConfig(**{**ONLY, "blur_p": 1.0})))
  for xi, yi in zip(x, y):
    want = cv2.GaussianBlur(xi.astype(np.float32) / 255, (3, 3), 0)
    np.testing.assert_allclose(yi, want, atol=1e-5)


def test_warp_matches_opencv_and_shift_scale_stay_in_range():
  x = np.random.default_rng(0).random((24, 40, 3)).astype(np.float32)
  m = np.array([[1.05, 0.1, 2.0], [-0.1, 1.05, -1.5], [0, 0, 1]], np.float32)
  want = cv2.warpAffine(x, m[:2], (40, 24), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  got = np.asarray(jax.jit(augment._warp)(x, m))
  np.testing.assert_allclose(got[1:-1, 1:-1], want[1:-1, 1:-1], atol=1e-4)
  # A dot at the centre moves by the shift only (scale is about the centre).
  img = np.zeros((32, 65, 65, 3), np.float32)
  img[:, 31:34, 31:34] = 1.0
  cfg = augment.ViewConfig(**{**ONLY, "affines": (augment.Affine(p=1.0),)})
  y = np.asarray(augment.augment_batch(jax.random.key(0), img, cfg))[..., 0]
  ys, xs = np.mgrid[:65, :65]
  cy = (y * ys).sum((1, 2)) / y.sum((1, 2)) - 32
  cx = (y * xs).sum((1, 2)) / y.sum((1, 2)) - 32
  assert np.abs(cy).max() <= 0.0625 * 65 + 0.5
  assert np.abs(cx).max() <= 0.0625 * 65 + 0.5
  assert np.abs(cx).max() > 1.0  # It does move.
  mass = y.sum((1, 2)) / 9.0  # The dot's area scales by s^2.
  assert mass.min() >= 0.9**2 - 0.05 and mass.max() <= 1.1**2 + 0.05


# --------------------------------------------------- paired geometry -----
# A panorama (H=32, W=64) and a north-up tile (32 x 32) of the same scene:
# red in the north, blue in the east. Convention (cfp/geometry.py): the
# panorama looks north at x = W/2, east at 3W/4, south at 0, west at W/4.
_DIRS = {"N": 0, "E": 1, "S": 2, "W": 3}


def _scene():
  pano = np.zeros((32, 64, 3), np.uint8)
  pano[:, 30:34, 0] = 255   # north: red
  pano[:, 46:50, 2] = 255   # east: blue
  tile = np.zeros((32, 32, 3), np.uint8)
  tile[:4, 12:20, 0] = 255   # north edge: red
  tile[12:20, -4:, 2] = 255  # east edge: blue
  return pano, tile


def _pano_dir(pano, ch):
  """Quarter (N=0, E=1, S=2, W=3) of the circular mean of the coloured
  columns' azimuths."""
  x = np.nonzero(pano[0, :, ch] > 0.5)[0]
  az = 2 * np.pi * ((x + 0.5) / pano.shape[1] - 0.5)
  mean = np.arctan2(np.sin(az).mean(), np.cos(az).mean())
  return int(np.round(mean / (np.pi / 2))) % 4


def _tile_dir(tile, ch):
  ys, xs = np.nonzero(tile[..., ch] > 0.5)
  dy, dx = ys.mean() - 15.5, xs.mean() - 15.5
  if abs(dy) > abs(dx):
    return _DIRS["N"] if dy < 0 else _DIRS["S"]
  return _DIRS["E"] if dx > 0 else _DIRS["W"]


def test_scene_convention_of_the_test_itself():
  pano, tile = _scene()
  assert _pano_dir(pano / 255, 0) == _tile_dir(tile / 255, 0) == _DIRS["N"]
  assert _pano_dir(pano / 255, 2) == _tile_dir(tile / 255, 2) == _DIRS["E"]


def test_paired_flip_and_rotate_roll_keep_the_pair_consistent():
  pano, tile = _scene()
  g, s = augment.augment_pairs(
      jax.random.key(0), np.repeat(pano[None], 32, 0),
      np.repeat(tile[None], 32, 0), augment.no_view_augmentation(),
      augment.no_view_augmentation(), augment.PairedConfig(0.5, 1.0))
  seen = set()
  for gi, si in zip(np.asarray(g), np.asarray(s)):
    north, east = _tile_dir(si, 0), _tile_dir(si, 2)
    assert _pano_dir(gi, 0) == north
    assert _pano_dir(gi, 2) == east
    seen.add((north, (east - north) % 4))
  # Every k in {1, 2, 3} was drawn, never k = 0 (rotate_p = 1), with and
  # without the flip (blue 90 deg clockwise of red, or counter-clockwise).
  assert {n for n, _ in seen} == {_DIRS["E"], _DIRS["S"], _DIRS["W"]}
  assert {c for _, c in seen} == {1, 3}
  # Direction made explicit: np.rot90 (counter-clockwise) by k = 1 puts
  # the tile's north edge on the left (west) and the panorama's north
  # column at W/4 after rolling by -W/4.
  s1 = np.rot90(tile, 1)
  g1 = np.roll(pano, -16, axis=1)
  assert _tile_dir(s1 / 255, 0) == _pano_dir(g1 / 255, 0) == _DIRS["W"]
  # The flip alone mirrors east to west in both.
  assert _pano_dir(pano[:, ::-1] / 255, 2) == _DIRS["W"]
  assert _tile_dir(tile[:, ::-1] / 255, 2) == _DIRS["W"]


def test_paired_geometry_rejects_bad_shapes():
  with pytest.raises(ValueError, match="square"):
    augment.paired_geometry(jax.random.key(0), jnp.zeros((8, 16, 3)),
                            jnp.zeros((8, 12, 3)), augment.PairedConfig())
  with pytest.raises(ValueError, match="multiple of 4"):
    augment.paired_geometry(jax.random.key(0), jnp.zeros((8, 18, 3)),
                            jnp.zeros((8, 8, 3)), augment.PairedConfig())


def test_normalize_imagenet_in_the_requested_dtype():
  x = _images(2)
  y = augment.normalize(x, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  want = (x / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(
      augment.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(augment.normalize(x)), want,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05)


def test_resize_uses_area_to_shrink_and_linear_to_grow():
  x = _images(1, 40, 80)[0]
  np.testing.assert_array_equal(
      image_io.resize(x, (20, 40)),
      cv2.resize(x, (40, 20), interpolation=cv2.INTER_AREA))
  np.testing.assert_array_equal(
      image_io.resize(x, (50, 60)),
      cv2.resize(x, (60, 50), interpolation=cv2.INTER_LINEAR))
  with pytest.raises(ValueError, match="positive"):
    image_io.resize(x, (0, 10))


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="jitter_p"):
    augment.ViewConfig(jitter_p=1.5)
  with pytest.raises(ValueError, match="coarse_holes"):
    augment.ViewConfig(coarse_holes=(30, 10))
  with pytest.raises(ValueError, match="rotate_p"):
    augment.PairedConfig(rotate_p=-0.1)
  with pytest.raises(TypeError):
    augment.ViewConfig(jiter_p=0.5)  # Typo in a key.


def _ncc(a, b):
  a = a - a.mean(axis=(0, 1))
  b = b - b.mean(axis=(0, 1))
  return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _rendered_pairs(height=2.0, fov=168.0):
  """4 panoramas [4, 256, 512, 3] and their tiles [4, 64, 64, 3] (uint8)
  of a synthetic world without nuisances."""
  cfg = dataclasses.replace(
      config.SyntheticConfig(), map_cells=768, block_m=(30.0, 50.0),
      tile_m=2 * height * math.tan(math.radians(fov / 2)), sat_px=64,
      pano_width=512, cvusa_width=512, min_separation_m=8.0,
  ).without_nuisances(height)
  w = world_lib.make_world(cfg, np.random.default_rng(21))
  rng = np.random.default_rng(0)
  shots = layouts.draw_shots(w, cfg, layouts.place_cameras(w, cfg, 4, rng),
                             rng)
  panos = np.stack([render.render_panorama(
      w, s.pose, 512, 0, 256, cfg.max_ray_m, np.random.default_rng(1))
                    for s in shots])
  tiles = np.stack([render.render_satellite(
      w, s.pose.tile_row, s.pose.tile_col, cfg.tile_m, 64, 0.0,
      np.random.default_rng(1)) for s in shots])
  return panos, tiles


def _bev_wins(panos, tiles, fov=168.0):
  """How many panoramas' BEVs match their tile best unrotated."""
  grid = geometry.bev_grid(panos.shape[1:3], tiles.shape[1], fov, wrap=True)
  bevs = np.asarray(geometry.sample_bev(panos, grid, wrap=True))
  tiles = np.asarray(tiles)
  return sum(int(np.argmax([_ncc(bev, np.rot90(tile, k)) for k in range(4)])
                 == 0) for bev, tile in zip(bevs, tiles))


def test_paired_geometry_keeps_a_rendered_pair_matching_its_bev():
  """On the synthetic world, the BEV (cfp.geometry) of the augmented
  panorama still matches the augmented tile, and not its other rotations."""
  panos, tiles = _rendered_pairs()
  g, s = augment.augment_pairs(
      jax.random.key(0), np.tile(panos, (4, 1, 1, 1)),
      np.tile(tiles, (4, 1, 1, 1)), augment.no_view_augmentation(),
      augment.no_view_augmentation(), augment.PairedConfig(0.5, 1.0))
  wins = _bev_wins(g, s)
  s = np.asarray(s)
  moves = set()
  for i, tile in enumerate(s):
    orig = tiles[i % 4] / 255.0
    moves |= {(k, f) for k in range(4) for f in (0, 1)
              if np.allclose(np.rot90(orig[:, ::-1] if f else orig, k),
                             tile, atol=1e-6)}
  assert wins >= 15, wins
  # The pairs were really rotated (k = 1, 2, 3) and some also flipped.
  assert {k for k, _ in moves} == {1, 2, 3}
  assert {f for _, f in moves} == {0, 1}


def test_each_fixed_paired_view_keeps_a_rendered_pair_matching_its_bev():
  """The deterministic views the pseudo-label rounds embed (flip x quarter
  turns) keep a pair a pair, as `paired_geometry` does; turning the tile
  alone would not."""
  panos, tiles = _rendered_pairs()
  wins = unpaired = 0
  for flip in (False, True):
    for k in range(4):
      g = augment.view_panoramas(jnp.asarray(panos) / 255.0, flip, k)
      s = augment.view_tiles(jnp.asarray(tiles) / 255.0, flip, k)
      wins += _bev_wins(g, s)
      if k:
        unpaired += _bev_wins(jnp.asarray(panos) / 255.0, s)
  assert wins >= 30, wins
  assert unpaired <= 3, unpaired
  with pytest.raises(ValueError, match="multiple of 4"):
    augment.view_panoramas(jnp.zeros((1, 8, 18, 3)), False, 1)


def test_config_defaults_are_the_paper_presets_and_knobs_reach_the_views():
  from cvgl_jax import config_lib
  cfg = config_lib.default_config().augment
  intra, cross = augment.from_config(cfg, True), augment.from_config(cfg,
                                                                      False)
  assert intra["ground_aug"] == augment.ground_view()
  assert intra["satellite_aug"] == augment.satellite_view()
  assert intra["satellite_aug2"] == augment.satellite_second_view()
  assert cross["paired_aug"] == augment.PairedConfig()
  assert set(cross) == {"ground_aug", "satellite_aug", "paired_aug"}

  cfg.dropout_p = cfg.jitter_p = cfg.grayscale_p = cfg.blur_p = 0.0
  cfg.warp_p = cfg.paired_flip_p = cfg.paired_rotate_p = 0.0
  off = augment.from_config(cfg, False)
  images = _images(w=32)
  for view in ("ground_aug", "satellite_aug"):
    out = augment.augment_batch(jax.random.key(1), images, off[view])
    np.testing.assert_allclose(np.asarray(out), images / 255.0, atol=1e-6)
  cfg.jitter = 0.5
  assert augment.from_config(cfg, True)["satellite_aug2"].brightness == 0.2
