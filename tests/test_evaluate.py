"""Tests of cvgl_jax.embed (a split embedded once) and cvgl_jax.evaluate
(recall metrics)."""

import dataclasses
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax import embed as embed_lib
from cvgl_jax import evaluate
from cvgl_jax import parallel
from cvgl_jax.data.index import PairIndex
from cvgl_jax.models import convnext
from cvgl_jax.train import state as state_lib
from cvgl_jax.models import encoder

SIZE = (32, 32)


def _write_images(folder, colours):
  paths = []
  os.makedirs(folder, exist_ok=True)
  for i, rgb in enumerate(colours):
    path = os.path.join(folder, f"{i:03d}.png")
    img = np.empty((*SIZE, 3), np.uint8)
    img[...] = rgb[::-1]  # BGR on disk.
    assert cv2.imwrite(path, img)
    paths.append(path)
  return np.array(paths)


def test_embed_split_sees_every_image_once_with_padding(tmp_path):
  """13 images in batches of 8: the last batch is padded; each row of the
  result is its own image's colour (a jitted mean-colour "embedding")."""
  colours = np.random.default_rng(0).integers(0, 256, (13, 3))
  paths = _write_images(str(tmp_path), colours)
  mesh = parallel.make_mesh()
  calls = []

  def mean_colour(params, images):
    del params
    calls.append(images.shape)
    return jnp.mean(images.astype(jnp.float32), axis=(1, 2))
  embed_fn = jax.jit(mean_colour, out_shardings=parallel.replicated(mesh))
  out = embed_lib.embed_split(embed_fn, {}, paths, size=SIZE, batch_size=8,
                              mesh=mesh, num_threads=2)
  assert out.shape == (13, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, colours, atol=1e-4)
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    embed_lib.embed_split(embed_fn, {}, paths, size=SIZE, batch_size=6,
                          mesh=mesh)


def _index(q, r, positive, semi=None):
  return PairIndex(name="t/val", root="/nowhere",
                   ground_paths=np.array([f"g{i}" for i in range(q)]),
                   ground_ids=np.array([f"g{i}" for i in range(q)]),
                   satellite_paths=np.array([f"s{i}" for i in range(r)]),
                   satellite_ids=np.array([f"s{i}" for i in range(r)]),
                   positive=np.asarray(positive), semi_positives=semi)


def test_recall_metrics_on_constructed_ranks():
  """Reference j has embedding e_j; query i scores its positive below
  exactly rank_i references, so R@k = mean(rank < k)."""
  r = 200
  refs = np.eye(r, dtype=np.float32)
  ranks = np.array([0, 0, 1, 3, 4, 7, 12, 150])
  positive = np.arange(len(ranks)) * 10
  queries = np.zeros((len(ranks), r), np.float32)
  for i, (p, k) in enumerate(zip(positive, ranks)):
    others = [j for j in range(r) if j != p][:k]
    queries[i, others] = 1.0
    queries[i, p] = 0.5
  m = evaluate.recall_metrics(queries, refs, _index(len(ranks), r, positive))
  assert m["R@1"] == pytest.approx(100 * 2 / 8)
  assert m["R@5"] == pytest.approx(100 * 5 / 8)
  assert m["R@10"] == pytest.approx(100 * 6 / 8)
  assert m["R@1%"] == pytest.approx(100 * 3 / 8)  # k = 2.
  assert "hit_rate" not in m and m["num_queries"] == 8


def test_recall_metrics_hit_rate_and_unknown_positives():
  refs = np.eye(4, dtype=np.float32)
  # Query 0 prefers 1 (its semi-positive), query 1 prefers 3 (not one),
  # query 2 has no known positive and is left out.
  queries = np.array([[0.5, 1, 0, 0], [0.5, 0, 0, 1], [1, 0, 0, 0]],
                     np.float32)
  semi = np.array([[1, -1], [2, -1], [-1, -1]])
  m = evaluate.recall_metrics(queries, refs,
                              _index(3, 4, [0, 0, -1], semi=semi))
  assert m["num_queries"] == 2
  assert m["R@1"] == 0.0 and m["hit_rate"] == 50.0
  with pytest.raises(ValueError, match="no known positives"):
    evaluate.recall_metrics(queries, refs, _index(3, 4, [-1, -1, -1]))
  with pytest.raises(ValueError, match="3 ground and 4 satellite"):
    evaluate.recall_metrics(queries, refs, _index(2, 4, [0, 1]))


def test_evaluate_end_to_end_finds_identical_pairs(tmp_path):
  """A shared-weight tiny model sees each query's true tile as the very
  same image, so every query ranks it first: R@1 = 100 %. The positives
  are a permutation, so any mix-up of rows would show."""
  rng = np.random.default_rng(1)
  n = 12
  patterns = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
  perm = rng.permutation(n)
  root = str(tmp_path)
  g_paths, s_paths = [], []
  for i in range(n):
    for folder, paths, img in (("g", g_paths, patterns[i]),
                               ("s", s_paths, patterns[np.argsort(perm)[i]])):
      path = os.path.join(root, folder, f"{i}.png")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      assert cv2.imwrite(path, cv2.resize(img, SIZE[::-1],
                                          interpolation=cv2.INTER_NEAREST))
      paths.append(path)
  # satellite j shows pattern argsort(perm)[j], so ground i's tile is perm[i].
  index = PairIndex(name="t/val", root=root, ground_paths=np.array(g_paths),
                    ground_ids=np.arange(n).astype(str),
                    satellite_paths=np.array(s_paths),
                    satellite_ids=np.arange(n).astype(str), positive=perm)
  model = encoder.TwoTower(
      variant=convnext.Variant((1, 1), (8, 16), False),
      head="gap", share_weights=True)
  mesh = parallel.make_mesh()
  params = jax.jit(model.init)(jax.random.PRNGKey(0),
                               jnp.zeros((1, *SIZE, 3)),
                               jnp.zeros((1, *SIZE, 3)))["params"]
  eval_fn = evaluate.make_eval_fn(model, index, ground_size=SIZE,
                                  satellite_size=SIZE, batch_size=8,
                                  mesh=mesh, num_threads=2)

  state = state_lib.TrainState(params=params, opt_state=None, step=0,
                               rng=None)
  m = eval_fn(state)
  assert m["R@1"] == 100.0 and m["num_queries"] == n
  wrong = dataclasses.replace(index, positive=np.roll(perm, 1))
  m = evaluate.evaluate(params, wrong, ground_size=SIZE, satellite_size=SIZE,
                        batch_size=8, mesh=mesh, model=model, num_threads=2)
  assert m["R@1"] < 50.0
