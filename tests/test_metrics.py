"""Tests of the retrieval metrics against a naive per-query loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax import metrics


def _naive(queries, refs, positive, semi=None, ks=(1, 5, 10), k_top=1):
  """Per-query loop: ranks, R@k, R@top and the hit rate, in percent."""
  ranks, hits = [], []
  for i, q in enumerate(queries):
    sims = refs @ q
    ranks.append(int(np.sum(sims > sims[positive[i]])))
    members = [positive[i]] + ([j for j in semi[i] if j >= 0]
                               if semi is not None else [])
    hits.append(any(not np.any(sims > sims[j]) for j in members))
  ranks = np.array(ranks)
  out = {f"R@{k}": 100.0 * np.mean(ranks < k) for k in ks}
  out["top"] = 100.0 * np.mean(ranks < k_top)
  out["hit_rate"] = 100.0 * np.mean(hits)
  return ranks, out


def _random(rng, num_q, num_r, dim, integer=False):
  if integer:
    # Small integer vectors: exact in float32 and full of tied scores.
    queries = rng.integers(-1, 2, size=(num_q, dim)).astype(np.float32)
    refs = rng.integers(-1, 2, size=(num_r, dim)).astype(np.float32)
  else:
    queries = rng.normal(size=(num_q, dim)).astype(np.float32)
    refs = rng.normal(size=(num_r, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
  positive = rng.integers(0, num_r, size=num_q)
  semi = rng.integers(0, num_r, size=(num_q, 3))
  semi[rng.random((num_q, 3)) < 0.3] = -1
  return queries, refs, positive, semi


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_matches_naive_loop(integer, chunk_size):
  rng = np.random.default_rng(1)
  queries, refs, positive, semi = _random(rng, 45, 230, 3 if integer else 6,
                                          integer)
  if not integer:
    # Some positives made close, so that recall is neither 0 nor 100 %.
    refs[positive[:20]] = queries[:20] + 0.2 * refs[positive[:20]]
  result = metrics.recall_at_k(queries, refs, positive, semi_positives=semi,
                               chunk_size=chunk_size)
  ranks, want = _naive(queries, refs, positive, semi, k_top=2)
  np.testing.assert_array_equal(result.ranks, ranks)
  for k in (1, 5, 10):
    assert result.metrics[f"R@{k}"] == pytest.approx(want[f"R@{k}"])
  assert result.metrics["R@1%"] == pytest.approx(want["top"])
  assert result.metrics["hit_rate"] == pytest.approx(want["hit_rate"])
  sims = refs @ queries.T
  np.testing.assert_array_equal(result.top1, np.argmax(sims, axis=0))
  assert 0 < result.metrics["R@10"] < 100
  if integer:
    # The strictly-higher rule matters here: counting ties as higher
    # would give other ranks.
    tied = np.sum(sims >= sims[positive, np.arange(45)], axis=0) - 1
    assert np.any(tied != ranks)


def test_ties_count_for_the_query():
  refs = np.array([[2.0], [1.0], [1.0], [1.0], [0.0]], np.float32)
  queries = np.ones((2, 1), np.float32)
  # Query 0's positive (ref 2) ties with refs 1 and 3, below ref 0: rank 1.
  # Query 1's positive (ref 0) is the unique best: rank 0.
  result = metrics.recall_at_k(queries, refs, np.array([2, 0]), ks=(1, 2))
  np.testing.assert_array_equal(result.ranks, [1, 0])
  assert result.metrics == {"R@1": 50.0, "R@2": 100.0, "R@1%": 50.0}


def test_top_percent_uses_floor_like_the_authors():
  assert metrics.top_percent_k(350) == 3  # round() would give 4
  assert metrics.top_percent_k(300) == 3
  assert metrics.top_percent_k(8884) == 88
  assert metrics.top_percent_k(50) == 1  # R // 100 = 0, raised to 1
  assert metrics.top_percent_k(1000, 5.0) == 50
  # 350 references on a line; query scores are ref values (D = 1).
  refs = np.linspace(1.0, 0.0, 350, dtype=np.float32)[:, None]
  queries = np.ones((2, 1), np.float32)
  # Positives at positions 3 and 2: ranks 3 and 2; k = 3 counts only one.
  result = metrics.recall_at_k(queries, refs, np.array([3, 2]))
  np.testing.assert_array_equal(result.ranks, [3, 2])
  assert result.metrics["R@1%"] == 50.0
  assert result.metrics["R@5"] == 100.0
  result = metrics.recall_at_k(queries, refs, np.array([3, 2]),
                               top_percent=2.0)
  assert result.metrics["R@2%"] == 100.0  # k = 7


def test_hit_rate_with_semi_positives():
  refs = np.eye(4, dtype=np.float32)
  queries = np.array([[0.1, 0.9, 0.5, 0.0],   # top-1 ref 1: a semi-positive
                      [0.9, 0.1, 0.5, 0.0],   # top-1 ref 0: the positive
                      [0.1, 0.5, 0.9, 0.0]],  # top-1 ref 2: neither
                     np.float32)
  semi = np.array([[1, -1], [3, -1], [3, 1]])
  result = metrics.recall_at_k(queries, refs, np.array([0, 0, 0]),
                               ks=(1,), semi_positives=semi)
  np.testing.assert_array_equal(result.ranks, [2, 0, 2])
  np.testing.assert_array_equal(result.top1, [1, 0, 2])
  assert result.metrics["R@1"] == pytest.approx(100 / 3)
  assert result.metrics["hit_rate"] == pytest.approx(200 / 3)
  no_semi = metrics.recall_at_k(queries, refs, np.array([0, 0, 0]), ks=(1,))
  assert "hit_rate" not in no_semi.metrics


def test_jax_and_numpy_inputs_agree():
  rng = np.random.default_rng(2)
  queries, refs, positive, _ = _random(rng, 20, 150, 4)
  a = metrics.recall_at_k(queries, refs, positive, chunk_size=6)
  b = metrics.recall_at_k(jnp.asarray(queries), jnp.asarray(refs), positive,
                          chunk_size=6)
  np.testing.assert_array_equal(a.ranks, b.ranks)
  assert a.metrics == b.metrics


def test_bad_inputs_fail_with_clear_messages():
  queries = np.ones((3, 2), np.float32)
  refs = np.ones((5, 2), np.float32)
  with pytest.raises(ValueError, match="first query 1 -> -1"):
    metrics.recall_at_k(queries, refs, np.array([0, -1, 2]))
  with pytest.raises(ValueError, match="D=2 but ref_emb has D=3"):
    metrics.recall_at_k(queries, np.ones((5, 3)), np.array([0, 1, 2]))
  with pytest.raises(ValueError, match=r"semi_positives\[2, 0\] = 5"):
    metrics.recall_at_k(queries, refs, np.array([0, 1, 2]),
                        semi_positives=np.array([[1], [-1], [5]]))
  with pytest.raises(ValueError, match="ks must be positive"):
    metrics.recall_at_k(queries, refs, np.array([0, 1, 2]), ks=(0, 1))
  bad = queries.copy()
  bad[1, 0] = np.nan
  with pytest.raises(ValueError, match="query_emb has NaN/Inf in 1 rows"):
    metrics.recall_at_k(bad, refs, np.array([0, 1, 2]))
