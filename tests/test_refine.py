"""Tests of cvgl_jax.pseudo.refine on embeddings with known answers."""

import itertools
import math

import numpy as np
import pytest

from cvgl_jax.pseudo import refine as refine_lib


def embed(scores):
  """Embeddings whose ground @ satellite.T is exactly `scores` [Ng, Ns]."""
  scores = np.asarray(scores, np.float32)
  return np.eye(scores.shape[0], dtype=np.float32), scores.T.copy()


def settings(**kw):
  kw = {"tau": 0.25, "epochs": 40, "curriculum": False, "backend": "exact",
        **kw}
  return refine_lib.RefineSettings(**kw)


# g0 -> s0 (mutual, margin 0.25); g1 -> s0 (s0 prefers g0: not mutual);
# g2 -> s2 (mutual, margin 0.375). Multiples of 1/8: exact in float32.
SCORES = [[0.75, 0.5, 0.25],
          [0.625, 0.5, 0.0],
          [0.0, 0.125, 0.5]]


def pair_set(result):
  return {tuple(p) for p in result.pairs.tolist()}


def test_mutual_pairs_and_margins():
  r = refine_lib.refine(*embed(SCORES), 0, settings(tau=0.0))
  assert pair_set(r) == {(0, 0), (2, 2)}
  np.testing.assert_array_equal(r.margins, np.float32([0.25, 0.375]))
  assert r.pairs.dtype == np.int64 and r.margins.dtype == np.float32
  assert r.stats["candidates/pairs"] == 3
  assert r.stats["mutual/pairs"] == 2


def test_margin_exactly_at_threshold_is_kept():
  g, s = embed(SCORES)
  at = refine_lib.refine(g, s, 0, settings(tau=0.25))
  assert pair_set(at) == {(0, 0), (2, 2)}
  next_up = float(np.nextafter(np.float32(0.25), np.float32(1)))
  above = refine_lib.refine(g, s, 0, settings(tau=next_up))
  assert pair_set(above) == {(2, 2)}


def test_curriculum_schedule_values():
  st = settings(tau=0.05, epochs=40, curriculum=True)
  assert refine_lib.threshold(st, 0) == pytest.approx(0.05, abs=1e-15)
  assert refine_lib.threshold(st, 10) == pytest.approx(
      0.05 * (1 + math.sqrt(0.5)) / 2, abs=1e-15)
  assert refine_lib.threshold(st, 20) == pytest.approx(0.025, abs=1e-15)
  assert refine_lib.threshold(st, 40) == pytest.approx(0.0, abs=1e-15)
  values = [refine_lib.threshold(st, e) for e in range(41)]
  assert all(a > b for a, b in zip(values, values[1:]))
  flat = settings(tau=0.05, epochs=40, curriculum=False)
  assert {refine_lib.threshold(flat, e) for e in range(41)} == {0.05}
  with pytest.raises(ValueError, match="epoch=41"):
    refine_lib.threshold(st, 41)


def test_curriculum_loosens_the_filter_over_epochs():
  g, s = embed(SCORES)
  st = settings(tau=0.3, epochs=10, curriculum=True)
  early = refine_lib.refine(g, s, 0, st)  # tau_e = 0.3: only g2 (0.375).
  late = refine_lib.refine(g, s, 5, st)  # tau_e = 0.15: g0 (0.25) too.
  assert pair_set(early) == {(2, 2)}
  assert pair_set(late) == {(0, 0), (2, 2)}
  assert late.stats["tau_e"] == pytest.approx(0.15)


def test_ties_kept_with_margin_outside_the_tie_set():
  # g0 ties s0 and s1 (both prefer g0); the next score is 0.5.
  scores = [[0.75, 0.75, 0.5, 0.25],
            [0.25, 0.5, 0.25, 0.75]]
  g, s = embed(scores)
  tied = refine_lib.refine(g, s, 0, settings(keep_ties=True))
  assert pair_set(tied) == {(0, 0), (0, 1), (1, 3)}
  np.testing.assert_array_equal(tied.margins, np.float32([0.25, 0.25, 0.25]))
  # The CVUSA path: one nearest satellite, a tie makes the margin 0.
  plain = refine_lib.refine(g, s, 0, settings(keep_ties=False, tau=0.0))
  assert (0, 1) not in pair_set(plain)
  assert plain.margins[plain.pairs[:, 0] == 0].tolist() == [0.0]
  assert pair_set(refine_lib.refine(g, s, 0, settings())) == {(1, 3)}


def test_tie_tolerance():
  near = np.float32(0.75) - np.float32(2.0 ** -22)  # 1.8e-7 below.
  scores = [[0.75, near, 0.25], [0.0, 0.0, 0.5]]
  g, s = embed(scores)
  loose = refine_lib.refine(g, s, 0, settings(keep_ties=True, tau=0.5))
  assert pair_set(loose) == {(0, 0), (0, 1), (1, 2)}
  exact = refine_lib.refine(
      g, s, 0, settings(keep_ties=True, tau=0.0, tie_tolerance=0.0))
  assert pair_set(exact) == {(0, 0), (1, 2)}
  assert exact.margins[0] == np.float32(0.75) - near


def test_many_to_one_through_ties():
  # g0 ties s0 and s1, g1 ties s1 and s2; s0 and s1 prefer g0, s2 prefers
  # g1: each ground pairs with its whole tie set, so s1 serves g0 and g1.
  scores = [[0.75, 0.75, 0.0, 0.0],
            [0.0, 0.5, 0.5, 0.125]]
  g, s = embed(scores)
  r = refine_lib.refine(g, s, 0, settings(keep_ties=True, tau=0.375))
  assert pair_set(r) == {(0, 0), (0, 1), (1, 1), (1, 2)}
  np.testing.assert_array_equal(r.margins,
                                np.float32([0.75, 0.75, 0.375, 0.375]))
  # Without mutual matching several grounds share a satellite.
  many = refine_lib.refine(*embed(SCORES), 0, settings(mutual=False,
                                                       tau=0.0))
  assert pair_set(many) == {(0, 0), (1, 0), (2, 2)}


def reference(scores, tau_e, mutual, margin_filter):
  """The authors' CVUSA path on a dense matrix, with the switches."""
  g2s = scores.argmax(1)
  s2g = scores.argmax(0)
  ids = np.arange(len(scores))
  keep = s2g[g2s] == ids if mutual else np.ones(len(scores), bool)
  top2 = np.sort(scores, axis=1)[:, -2:]
  if margin_filter:
    keep &= (top2[:, 1] - top2[:, 0]) >= tau_e
  return {(int(i), int(g2s[i])) for i in ids[keep]}


def clustered(n, d, noise, seed):
  rng = np.random.default_rng(seed)
  c = rng.standard_normal((n, d), dtype=np.float32)
  g = c + noise * rng.standard_normal((n, d), dtype=np.float32)
  s = c + noise * rng.standard_normal((n, d), dtype=np.float32)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  s /= np.linalg.norm(s, axis=1, keepdims=True)
  return g, s


@pytest.mark.parametrize("mutual,margin_filter",
                         list(itertools.product([True, False], repeat=2)))
def test_ablation_switches_match_the_dense_reference(mutual, margin_filter):
  g, s = clustered(400, 16, 1.0, seed=0)
  scores = g @ s.T
  st = settings(tau=0.1, epochs=10, curriculum=True, mutual=mutual,
                margin_filter=margin_filter)
  for epoch in (0, 5):
    r = refine_lib.refine(g, s, epoch, st)
    tau_e = 0.1 * (1 + math.cos(math.pi * epoch / 10)) / 2
    assert pair_set(r) == reference(scores, tau_e, mutual, margin_filter)
  # The noise is high enough that each switch matters on this data.
  assert 0 < len(reference(scores, 0.1, True, True)) < len(
      reference(scores, 0.1, True, False)) < 400
  assert len(reference(scores, 0.1, True, False)) < len(
      reference(scores, 0.1, False, False))


def test_curriculum_switch_only_changes_the_threshold():
  g, s = clustered(400, 16, 1.0, seed=1)
  on = refine_lib.refine(g, s, 5, settings(tau=0.1, epochs=10,
                                           curriculum=True))
  off_half = refine_lib.refine(g, s, 7, settings(tau=0.05, epochs=10))
  assert on.stats["tau_e"] == pytest.approx(0.05)
  assert pair_set(on) == pair_set(off_half)
  off = refine_lib.refine(g, s, 5, settings(tau=0.1, epochs=10))
  assert off.stats["tau_e"] == 0.1
  assert pair_set(off) < pair_set(on)
  for name in ("candidates", "mutual"):
    assert on.stats[f"{name}/pairs"] == off.stats[f"{name}/pairs"]


def test_precision_and_recall_against_truth():
  g, s = embed(SCORES)
  r = refine_lib.refine(g, s, 0, settings(tau=0.3),
                        true_positive=np.array([0, 1, 1]))
  assert r.stats["candidates/precision"] == pytest.approx(1 / 3)
  assert r.stats["candidates/recall"] == pytest.approx(1 / 3)
  assert r.stats["mutual/precision"] == pytest.approx(1 / 2)
  assert r.stats["mutual/recall"] == pytest.approx(1 / 3)
  assert r.stats["margin/pairs"] == 1
  assert r.stats["margin/precision"] == 0.0
  assert r.stats["margin/recall"] == 0.0
  partial = refine_lib.refine(g, s, 0, settings(tau=0.3),
                              true_positive=np.array([0, -1, 2]))
  assert partial.stats["candidates/precision"] == 1.0
  assert partial.stats["candidates/recall"] == 1.0
  assert partial.stats["margin/recall"] == 0.5
  assert "margin/precision" not in refine_lib.refine(g, s, 0,
                                                     settings()).stats


def test_precision_on_clustered_world():
  g, s = clustered(400, 16, 0.6, seed=2)
  truth = np.arange(400)
  truth[::4] = -1
  r = refine_lib.refine(g, s, 0, settings(tau=0.05), true_positive=truth)
  rows, cols = r.pairs.T
  known = truth[rows] >= 0
  assert r.stats["margin/precision"] == pytest.approx(
      np.mean(cols[known] == rows[known]))
  assert r.stats["margin/recall"] == pytest.approx(
      np.sum(cols[known] == rows[known]) / 300)
  assert r.stats["margin/precision"] > r.stats["candidates/precision"]


def test_bad_input_is_named():
  g, s = embed(SCORES)
  with pytest.raises(ValueError, match="true_positive"):
    refine_lib.refine(g, s, 0, settings(), true_positive=np.array([0, 1]))
  with pytest.raises(ValueError, match="true_positive values"):
    refine_lib.refine(g, s, 0, settings(), true_positive=np.array([0, 1, 3]))
  with pytest.raises(ValueError, match="k=1"):
    settings(k=1)
  with pytest.raises(ValueError, match="epochs"):
    settings(epochs=0)
  with pytest.raises(ValueError, match="tau"):
    settings(tau=-0.1)
  with pytest.raises(ValueError, match="unknown ScaNN option"):
    settings(knn_options={"leaves": 3})
  with pytest.raises(ValueError, match="Ns >= 2"):
    refine_lib.refine(g, s[:1], 0, settings())
