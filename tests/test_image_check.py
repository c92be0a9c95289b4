"""The image files of a split, checked before any stage decodes them."""

import os

import cv2
import numpy as np
import pytest

from cvgl_jax.data import image_check
from cvgl_jax.data import image_io
from cvgl_jax.data import readers
from cvgl_jax.data.index import PairIndex


def _split(root, n=6):
  """n one-to-one pairs: 20x60 JPEG panoramas, 24x24 PNG tiles."""
  rng = np.random.default_rng(0)
  grounds, tiles = [], []
  for i in range(n):
    grounds.append(str(root / f"g{i}.jpg"))
    tiles.append(str(root / f"s{i}.png"))
    cv2.imwrite(grounds[-1], rng.integers(0, 255, (20, 60, 3), np.uint8))
    cv2.imwrite(tiles[-1], rng.integers(0, 255, (24, 24, 3), np.uint8))
  ids = np.array([f"p{i}" for i in range(n)])
  return PairIndex(name="tiny/train", root=str(root),
                   ground_paths=np.array(grounds), ground_ids=ids,
                   satellite_paths=np.array(tiles), satellite_ids=ids.copy(),
                   positive=np.arange(n),
                   ground_coords=np.arange(2 * n, dtype=float).reshape(n, 2))


def _damage(split):
  """Panorama 1 cut short, tile 2 of another size, tile 4 not an image."""
  g1 = split.ground_paths[1]
  data = open(g1, "rb").read()
  open(g1, "wb").write(data[:len(data) // 2])
  cv2.imwrite(split.satellite_paths[2], np.zeros((48, 48, 3), np.uint8))
  open(split.satellite_paths[4], "w").write("not an image")


def test_probe_reads_the_header_and_names_a_cut_file(tmp_path):
  split = _split(tmp_path)
  assert image_io.probe(split.ground_paths[0]) == ("JPEG", (20, 60))
  assert image_io.probe(split.satellite_paths[0]) == ("PNG", (24, 24))
  _damage(split)
  with pytest.raises(ValueError, match="g1.jpg is truncated"):
    image_io.probe(split.ground_paths[1])
  with pytest.raises(ValueError, match="s4.png has no image header"):
    image_io.probe(split.satellite_paths[4])
  with pytest.raises(FileNotFoundError, match="gone.png"):
    image_io.probe(str(tmp_path / "gone.png"))


def test_bad_files_are_named_or_left_out(tmp_path):
  split = _split(tmp_path)
  clean = image_check.bad_masks(split)
  assert not clean[0].any() and not clean[1].any() and not clean[2]
  _damage(split)
  ground, satellite, problems = image_check.bad_masks(split, num_threads=2)
  assert list(np.flatnonzero(ground)) == [1]
  assert list(np.flatnonzero(satellite)) == [2, 4]
  assert "g1.jpg is truncated" in problems[0]
  assert "s2.png is 48x48 (height x width); 4 of the 6 files beside it are " \
         "24x24" in problems[1]
  assert "s4.png has no image header" in problems[2]

  with pytest.raises(readers.DatasetError,
                     match=r"tiny/train: 3 of 12 image files cannot be used: "
                           r".*g1.jpg is truncated.*on_bad_image='skip'.*"
                           r"odd_image_size='resize'"):
    image_check.drop_bad(split, ground, satellite, problems)
  kept, dropped = image_check.drop_bad(split, ground, satellite, problems,
                                       on_bad="skip")
  assert dropped == problems
  assert list(kept.ground_ids) == ["p0", "p3", "p5"]
  assert [os.path.basename(p) for p in kept.satellite_paths] == [
      "s0.png", "s1.png", "s3.png", "s5.png"]
  # Each kept panorama still points at its own tile.
  assert [kept.satellite_ids[p] for p in kept.positive] == ["p0", "p3", "p5"]
  np.testing.assert_array_equal(kept.ground_coords[:, 0], [0, 6, 10])

  # Sizes that differ on purpose are accepted when the config says so.
  ground, satellite, _ = image_check.bad_masks(split, odd_size="resize")
  assert list(np.flatnonzero(satellite)) == [4]


def test_without_remaps_positives_and_semi_positives(tmp_path):
  ids = np.array(["a", "b", "c"])
  split = PairIndex(
      name="vigor-like", root=str(tmp_path),
      ground_paths=np.array(["ga", "gb", "gc"]), ground_ids=ids,
      satellite_paths=np.array(["s0", "s1", "s2", "s3"]),
      satellite_ids=np.array(["0", "1", "2", "3"]),
      positive=np.array([0, 1, 3]),
      semi_positives=np.array([[1, 2], [3, -1], [1, 0]]))
  kept = split.without(np.array([False, False, False]),
                       np.array([False, True, False, False]))
  # Panorama b's true tile went, so b goes; semi-positive 1 becomes -1.
  assert list(kept.ground_ids) == ["a", "c"]
  assert list(kept.satellite_ids[kept.positive]) == ["0", "3"]
  np.testing.assert_array_equal(kept.semi_positives, [[-1, 1], [-1, 0]])
