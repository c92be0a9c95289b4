"""Tests of cvgl_jax.pseudo.knn: exact and ScaNN nearest neighbours."""

import numpy as np
import pytest

from cvgl_jax.pseudo import knn


def random_unit(n, d, seed):
  x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_knn_matches_numpy_across_chunks():
  q, db = random_unit(203, 24, 0), random_unit(517, 24, 1)
  # 8 KiB of similarities per chunk: 8 rows of 517, 26 chunks, last padded.
  scores, indices = knn.knn(q, db, 5, backend="exact", chunk_bytes=8 << 10)
  full = q.astype(np.float64) @ db.T.astype(np.float64)
  want = np.argsort(-full, axis=1)[:, :5]
  np.testing.assert_array_equal(indices, want)
  np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1),
                             atol=1e-6)
  assert scores.dtype == np.float32 and indices.dtype == np.int64
  assert np.all(np.diff(scores, axis=1) <= 0)


def test_exact_cross_topk_gives_both_directions_in_one_pass():
  g, s = random_unit(301, 16, 2), random_unit(157, 16, 3)
  g[250] = g[40]  # A duplicated ground: satellites that prefer it get 40.
  nb = knn.cross_topk(g, s, 3, backend="exact", chunk_bytes=4 << 10)
  full = g.astype(np.float64) @ s.T.astype(np.float64)
  np.testing.assert_array_equal(nb.g2s_indices,
                                np.argsort(-full, axis=1)[:, :3])
  np.testing.assert_array_equal(nb.s2g_indices, full.argmax(axis=0))
  np.testing.assert_allclose(nb.s2g_scores, full.max(axis=0), atol=1e-6)
  assert 250 not in nb.s2g_indices
  assert nb.s2g_indices.dtype == np.int64 and nb.s2g_scores.shape == (157,)


def test_scann_brute_force_matches_exact():
  q, db = random_unit(300, 32, 4), random_unit(2_000, 32, 5)
  s_exact, i_exact = knn.knn(q, db, 4, backend="exact")
  s_scann, i_scann = knn.knn(q, db, 4, backend="scann")
  np.testing.assert_array_equal(i_scann, i_exact)
  np.testing.assert_allclose(s_scann, s_exact, atol=1e-5)
  assert i_scann.dtype == np.int64 and s_scann.dtype == np.float32


def mutual_pairs(nb):
  ids = np.arange(len(nb.g2s_indices))
  best = nb.g2s_indices[:, 0]
  keep = nb.s2g_indices[best] == ids
  return set(zip(ids[keep].tolist(), best[keep].tolist()))


def test_exact_and_scann_agree_on_mutual_pairs_past_brute_force():
  # 24k clustered pairs in 64-d: neighbourhoods of 16 look-alike places,
  # ground and satellite noisy copies of their place. Above ScaNN's
  # brute-force limit (20k rows): tree + asymmetric hashing + re-ordering.
  n = 24_000
  assert n > knn.ScannOptions().brute_force_max
  rng = np.random.default_rng(6)
  hoods = rng.standard_normal((n // 16, 64)).astype(np.float32)
  places = np.repeat(hoods, 16, axis=0)
  places += 0.3 * rng.standard_normal(places.shape).astype(np.float32)
  g = places + 0.5 * rng.standard_normal(places.shape).astype(np.float32)
  s = places + 0.5 * rng.standard_normal(places.shape).astype(np.float32)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  s /= np.linalg.norm(s, axis=1, keepdims=True)
  exact = mutual_pairs(knn.cross_topk(g, s, 2, backend="exact"))
  approx = mutual_pairs(knn.cross_topk(g, s, 2, backend="scann"))
  assert 0.3 * n < len(exact) < n  # Not trivially all or none.
  assert len(exact & approx) >= 0.98 * len(exact)
  assert len(approx - exact) <= 0.02 * len(exact)


def test_auto_backend_choice():
  assert knn._backend("auto", 10, 10) == "exact"
  big = knn.AUTO_EXACT_MAX_PRODUCT + 1
  want = "scann" if knn.jax.default_backend() == "cpu" else "exact"
  assert knn._backend("auto", big, 1) == want
  assert knn._backend("scann", 10, 10) == "scann"


def test_bad_input_is_named():
  q, db = random_unit(4, 8, 7), random_unit(6, 8, 8)
  with pytest.raises(ValueError, match="D=8 but database has D=9"):
    knn.knn(q, np.zeros((6, 9), np.float32), 2)
  with pytest.raises(ValueError, match="k=7"):
    knn.knn(q, db, 7)
  with pytest.raises(ValueError, match="backend='faiss'"):
    knn.knn(q, db, 2, backend="faiss")
  with pytest.raises(ValueError, match="unknown ScaNN option"):
    knn.knn(q, db, 2, leaves=4)
  with pytest.raises(ValueError, match="satellite must be a non-empty"):
    knn.cross_topk(q, db[0], 2)
  with pytest.raises(ValueError, match="floating point"):
    knn.knn(q.astype(np.int32), db, 2)


def test_leaves_searched_grow_with_the_database():
  # The measured operating points (BUILD_NOTES.md): 10 % of the leaves at
  # 105k held 99.95 % of the mutual pairs, at 1M only 88.5 % (25 %: 98.9 %).
  assert knn.leaves_to_search(105_214, 324) == 33  # measured with 32
  assert knn.leaves_to_search(1_000_000, 1_000) == 250
  assert knn.leaves_to_search(50_000, 223) == 22
  assert knn.leaves_to_search(10 ** 8, 10_000) == 3_000
  assert knn.leaves_to_search(30_000, 20) == 8  # at least 8 leaves
  assert knn.leaves_to_search(30_000, 5) == 5   # never more than exist
  shares = [knn.leaves_to_search(n, 1_000) for n in
            (10 ** 5, 2 * 10 ** 5, 5 * 10 ** 5, 10 ** 6, 3 * 10 ** 6)]
  assert shares == sorted(shares) and shares[0] < shares[-1]


def clustered_pairs(n, d, seed, spread=0.3, noise=0.5):
  """Neighbourhoods of 16 look-alike places; ground and satellite are noisy
  unit copies of their place."""
  rng = np.random.default_rng(seed)
  places = np.repeat(rng.standard_normal((n // 16, d)), 16, axis=0)
  places += spread * rng.standard_normal(places.shape)
  g = places + noise * rng.standard_normal(places.shape)
  s = places + noise * rng.standard_normal(places.shape)
  return tuple((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(
      np.float32) for x in (g, s))


def test_pca_basis_keeps_the_inner_products_of_low_rank_rows():
  rng = np.random.default_rng(9)
  x = rng.standard_normal((3_000, 12)) @ rng.standard_normal((12, 64))
  x = x.astype(np.float32)
  basis = knn.pca_basis([x[:1_000], x[1_000:]], 12, sample=1_500)
  assert basis.shape == (64, 12) and basis.dtype == np.float32
  np.testing.assert_allclose(basis.T @ basis, np.eye(12), atol=1e-5)
  reduced = x @ basis
  np.testing.assert_allclose(reduced[:50] @ reduced[50:100].T,
                             x[:50] @ x[50:100].T, rtol=1e-3, atol=1e-3)


def test_rescore_ranks_by_exact_score_and_drops_padding():
  q, db = random_unit(3, 8, 10), random_unit(20, 8, 11)
  db[7] = db[4]  # A tie: the lower row comes first, as the exact backend.
  cand = np.array([[7, 4, 0, 2], [5, 0, 9, 0], [1, 3, 4, 7]])
  found = np.array([[1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 1]], bool)
  scores, rows = knn._rescore(q, db, cand, found, 3)
  full = q @ db.T
  for i in range(3):
    real = [c for c, f in zip(cand[i], found[i]) if f]
    want = sorted(real, key=lambda c: (-full[i, c], c))[:3]
    want += [None] * (3 - len(want))
    for got_row, got_score, w in zip(rows[i], scores[i], want):
      if w is None:
        assert got_score == -np.inf  # Padding never outranks a real row.
      else:
        assert (got_row, got_score) == (w, pytest.approx(full[i, w],
                                                         abs=1e-6))
  tied = [r for r in rows[0] if r in (4, 7)]
  assert tied == [4, 7] or tied == [4]  # The tie, lower row first.


def test_reduced_search_finds_the_exact_mutual_pairs(monkeypatch):
  # 24k pairs in 256-d: the PCA path (128-d candidates, a k-means tree with
  # 20 % of the leaves visited, brute force inside), re-scored exactly.
  g, s = clustered_pairs(24_000, 256, 12)
  calls = []
  rescore = knn._rescore
  monkeypatch.setattr(knn, "_rescore",
                      lambda *a, **k: calls.append(1) or rescore(*a, **k))
  exact = knn.cross_topk(g, s, 2, backend="exact")
  approx = knn.cross_topk(g, s, 2, backend="scann")
  assert len(calls) == 2  # Both directions went through the PCA path.
  pairs_exact, pairs_approx = mutual_pairs(exact), mutual_pairs(approx)
  assert 0.3 * len(g) < len(pairs_exact) < len(g)
  assert len(pairs_exact & pairs_approx) >= 0.99 * len(pairs_exact)
  assert len(pairs_approx - pairs_exact) <= 0.01 * len(pairs_exact)
  # The scores returned are exact inner products of the rows returned.
  rows = np.arange(len(g))
  np.testing.assert_allclose(
      approx.g2s_scores[:, 0],
      np.einsum("nd,nd->n", g, s[approx.g2s_indices[:, 0]]), atol=1e-5)
  np.testing.assert_allclose(
      approx.s2g_scores, np.einsum("nd,nd->n", s[rows],
                                   g[approx.s2g_indices]), atol=1e-5)
