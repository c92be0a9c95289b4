"""Tests of cvgl_jax.data.pipeline on a tiny hand-made PairIndex.

Every image is one flat colour that names it: red = 1 + 5 * index, green
says which pile (ground 0, satellite 100, fake satellite 200), blue = 250.
Files are written with cv2 (BGR) at a size other than the configured one,
so a batch shows the RGB order, the resize and which file was read.
"""

import os

import cv2
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cvgl_jax.data import pipeline
from cvgl_jax.data.index import PairIndex

Q, R = 12, 10
G_SIZE, S_SIZE = (16, 32), (16, 16)
GREEN = {"ground": 0, "satellite": 100, "fake": 200}


def _write(path, code, green, shape):
  img = np.empty((*shape, 3), np.uint8)
  img[...] = (250, green, code)  # BGR on disk.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(path, img)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("world"))
  ground_ids = np.array([f"g{i:02d}" for i in range(Q)])
  g_paths = np.array([os.path.join(root, "pano", f"{i}.png")
                      for i in ground_ids])
  s_paths = np.array([os.path.join(root, "sat", f"s{i:02d}.png")
                      for i in range(R)])
  for i, p in enumerate(g_paths):
    _write(p, 1 + 5 * i, GREEN["ground"], (20, 40))
    _write(os.path.join(root, "g2a_sat", f"{ground_ids[i]}.png"),
           1 + 5 * i, GREEN["fake"], (24, 24))
  for i, p in enumerate(s_paths):
    _write(p, 1 + 5 * i, GREEN["satellite"], (24, 24))
  return PairIndex(name="tiny/train", root=root, ground_paths=g_paths,
                   ground_ids=ground_ids, satellite_paths=s_paths,
                   satellite_ids=np.array([f"s{i}" for i in range(R)]),
                   positive=np.arange(Q) % R)


def _check_images(images, indices, pile):
  """Each image is its file's colour, RGB, at the configured size."""
  assert images.dtype == np.uint8
  for img, i in zip(images, indices):
    assert (img == np.array([1 + 5 * i, GREEN[pile], 250])).all()


def _epoch(it):
  return list(it)


def _intra(index, **kw):
  return pipeline.intra_view(index, ground_size=G_SIZE,
                             satellite_size=S_SIZE, **{"batch_size": 4,
                                                       "seed": 7, **kw})


def test_decode_gives_rgb_resized_and_names_bad_files(index, tmp_path):
  img = pipeline.decode(index.ground_paths[3], G_SIZE)
  assert img.shape == (*G_SIZE, 3)
  _check_images(img[None], [3], "ground")
  with pytest.raises(FileNotFoundError, match="nope.png"):
    pipeline.decode(str(tmp_path / "nope.png"), G_SIZE)
  bad = tmp_path / "corrupt.png"
  bad.write_bytes(b"\x89PNG not really")
  with pytest.raises(ValueError, match="corrupt.png"):
    pipeline.decode(str(bad), G_SIZE)


def test_truncated_images_are_named_not_decoded_grey(index, tmp_path):
  ground = cv2.imread(index.ground_paths[3])
  for ext in (".jpg", ".png"):
    whole = tmp_path / f"whole{ext}"
    cv2.imwrite(str(whole), ground)
    np.testing.assert_array_equal(pipeline.decode(str(whole), G_SIZE),
                                  pipeline.decode(str(whole), G_SIZE))
    data = whole.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(ValueError, match=f"cut{ext} is truncated"):
      pipeline.decode(str(cut), G_SIZE)
  # A trailer after the JPEG's end marker (some cameras write one) is fine.
  trailer = tmp_path / "trailer.jpg"
  trailer.write_bytes((tmp_path / "whole.jpg").read_bytes() + b"META" * 8)
  assert pipeline.decode(str(trailer), G_SIZE).shape == (*G_SIZE, 3)


def test_a_bad_file_fails_the_pipeline_naming_it(index, tmp_path):
  paths = list(index.satellite_paths[:3]) + [str(tmp_path / "gone.png")]
  with pytest.raises(FileNotFoundError, match="gone.png"):
    list(pipeline.evaluation(paths, size=S_SIZE, batch_size=2))


def test_intra_view_is_seeded_and_epochs_differ(index):
  a = _epoch(_intra(index).iterator(0))
  b = _epoch(_intra(index).iterator(0))
  c = _epoch(_intra(index).iterator(1))
  d = _epoch(_intra(index, seed=8).iterator(0))
  assert len(a) == 3  # max(Q, R) = 12 rows, batch 4.
  for x, y in zip(a, b):
    assert x.keys() == {"ground", "ground_index", "satellite",
                        "satellite_index"}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  order = lambda e, k: np.concatenate([x[k] for x in e])
  assert not np.array_equal(order(a, "ground_index"), order(c, "ground_index"))
  assert not np.array_equal(order(a, "ground_index"), order(d, "ground_index"))
  # Each pile is a permutation, the shorter one continued.
  assert sorted(order(a, "ground_index")) == list(range(Q))
  sat = order(a, "satellite_index")
  assert set(sat[:R]) == set(range(R)) and len(sat) == Q
  for x in a:
    _check_images(x["ground"], x["ground_index"], "ground")
    _check_images(x["satellite"], x["satellite_index"], "satellite")
    assert x["ground"].shape == (4, *G_SIZE, 3)
    assert x["satellite"].shape == (4, *S_SIZE, 3)
  one = _epoch(_intra(index, piles=("satellite",)).iterator(0))
  assert len(one) == 2 and one[0].keys() == {"satellite", "satellite_index"}


def test_two_processes_get_disjoint_shards_that_cover(index):
  for batch_size, steps in ((3, 2), (5, 1)):
    seen = []
    for p in range(2):
      pipe = _intra(index, batch_size=batch_size, process_index=p,
                    process_count=2)
      batches = _epoch(pipe.iterator(2))
      assert len(batches) == steps == pipe.steps_per_epoch()
      assert all(len(x["ground_index"]) == batch_size for x in batches)
      seen.append(np.concatenate([x["ground_index"] for x in batches]))
    assert not set(seen[0]) & set(seen[1])
    union = np.concatenate(seen)
    assert len(union) == 2 * steps * batch_size  # Remainder dropped.
    if 2 * batch_size * steps == Q:
      assert sorted(union) == list(range(Q))
  with pytest.raises(ValueError, match="fewer than one global batch"):
    _intra(index, batch_size=7, process_count=2, process_index=1)\
        .iterator(0)


def test_cross_view_pairs_each_panorama_with_its_fake(index, tmp_path):
  pipe = pipeline.cross_view(index, ground_size=G_SIZE,
                             satellite_size=S_SIZE, batch_size=4, seed=0)
  batches = _epoch(pipe.iterator(0))
  assert len(batches) == 3
  for x in batches:
    assert x.keys() == {"ground", "ground_index", "satellite"}
    _check_images(x["ground"], x["ground_index"], "ground")
    _check_images(x["satellite"], x["ground_index"], "fake")
  no_fakes = PairIndex(**{**index.__dict__, "root": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="g2a_sat"):
    pipeline.cross_view(no_fakes, ground_size=G_SIZE, satellite_size=S_SIZE,
                        batch_size=4, seed=0)


def _pseudo(index, **kw):
  return pipeline.pseudo_pairs(index, ground_size=G_SIZE,
                               satellite_size=S_SIZE,
                               **{"batch_size": 4, "seed": 3, **kw})


def test_pseudo_pairs_follow_the_pairing_of_each_epoch(index):
  pipe = _pseudo(index)
  g = np.arange(Q)
  first = np.stack([g, g % R], axis=1)
  labeled = g % 3 != 0
  it = pipe.iterator(0, first, labeled)
  assert it.steps_per_epoch == 3
  for x in it:
    np.testing.assert_array_equal(x["satellite_index"],
                                  x["ground_index"] % R)
    np.testing.assert_array_equal(x["labeled"], x["ground_index"] % 3 != 0)
    _check_images(x["satellite"], x["satellite_index"], "satellite")
    _check_images(x["ground"], x["ground_index"], "ground")
  # A new, shorter pairing at the next epoch start: 8 labelled rows.
  second = np.stack([g[:8], (g[:8] + 3) % R], axis=1)
  it.set_epoch(1, second)
  batches = _epoch(it)
  assert it.epoch == 1 and len(batches) == 2
  got = np.concatenate([x["ground_index"] for x in batches])
  assert sorted(got) == list(range(8))
  for x in batches:
    np.testing.assert_array_equal(x["satellite_index"],
                                  (x["ground_index"] + 3) % R)
    assert x["labeled"].all()
  with pytest.raises(ValueError, match="satellite indices"):
    pipe.iterator(0, np.stack([g, g], axis=1))
  with pytest.raises(ValueError, match=r"\[M, 2\]"):
    pipe.iterator(0, g)
  with pytest.raises(ValueError, match="needs this epoch's pairs"):
    pipe.iterator(0)
  with pytest.raises(ValueError, match="pseudo_pairs pipelines only"):
    _intra(index).iterator(0, first)


def test_evaluation_sees_every_image_once_with_a_mask(index):
  for count, batch_size in ((2, 4), (3, 4), (3, 5)):
    got = []
    steps = set()
    for p in range(count):
      ev = pipeline.evaluation(index.satellite_paths, size=S_SIZE,
                               batch_size=batch_size, process_index=p,
                               process_count=count)
      batches = list(ev)
      assert len(batches) == ev.num_batches
      steps.add(len(batches))
      for x in batches:
        assert x["image"].shape == (batch_size, *S_SIZE, 3)
        np.testing.assert_array_equal(x["mask"], x["index"] >= 0)
        assert not x["image"][~x["mask"]].any()
        _check_images(x["image"][x["mask"]], x["index"][x["mask"]],
                      "satellite")
        got.extend(x["index"][x["mask"]])
    assert len(steps) == 1  # Every process runs the same number of steps.
    assert sorted(got) == list(range(R))


def test_iterator_state_round_trips_through_orbax_mid_epoch(index, tmp_path):
  g = np.arange(Q)
  pairs = np.stack([g, (g * 7) % R], axis=1)
  labeled = g % 2 == 0
  it = _pseudo(index).iterator(1, pairs, labeled)
  next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = list(it)
    assert len(want) == 2
    # A fresh iterator at another epoch with another pairing...
    other = _pseudo(index).iterator(0, np.stack([g, g % R], axis=1))
    mngr.restore(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(other)))
  # ... continues exactly where the saved one was.
  assert other.epoch == 1
  np.testing.assert_array_equal(other.pairs, pairs)
  np.testing.assert_array_equal(other.labeled, labeled)
  got = list(other)
  assert len(got) == len(want)
  for x, y in zip(got, want):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_state_set_and_checked_directly(index):
  it = _intra(index).iterator(3)
  next(it)
  state = it.get_state()
  want = next(it)
  fresh = _intra(index).iterator(0)
  fresh.set_state(state)
  assert fresh.epoch == 3
  np.testing.assert_array_equal(next(fresh)["ground_index"],
                                want["ground_index"])
  with pytest.raises(ValueError, match="seed"):
    _intra(index, seed=99).iterator(0).set_state(state)
  with pytest.raises(ValueError, match="pairing"):
    _pseudo(index).iterator(0, np.stack([np.arange(Q)] * 2, 1) % R)\
        .set_state({**state, "seed": 3})


def test_decode_threads_follow_the_cores_this_process_may_use(monkeypatch):
  assert pipeline.decode_threads(3) == 3
  devices = jax.local_device_count()
  for cores, expected in ((1, 1), (2, 1), (12, 11),
                          (1000, 16 * devices)):
    monkeypatch.setattr(os, "sched_getaffinity",
                        lambda pid, n=cores: set(range(n)))
    assert pipeline.decode_threads(0) == min(expected, 16 * devices)
