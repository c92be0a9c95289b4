"""The epoch rows of the pseudo-label stage."""

import numpy as np
import pytest

from cvgl_jax.pseudo import pairing


def test_gt_subset_takes_the_fraction_of_known_positives():
  positive = np.array([3, -1, 0, 1, 2, 4, -1, 5, 6, 7])
  gt = pairing.gt_subset(positive, 0.25, seed=0)
  assert gt.shape == (2, 2)  # floor(0.25 * 8 known)
  np.testing.assert_array_equal(positive[gt[:, 0]], gt[:, 1])
  np.testing.assert_array_equal(gt, pairing.gt_subset(positive, 0.25, 0))
  assert len(pairing.gt_subset(positive, 0.0, 0)) == 0
  assert len(pairing.gt_subset(positive, 1.0, 0)) == 8


def test_every_ground_once_labels_first_fillers_free():
  rng = np.random.default_rng(0)
  pseudo = np.array([[0, 5], [2, 7], [3, 1]])
  gt = np.array([[2, 6], [4, 0]])  # GT overrides ground 2's pseudo label.
  pairs, labeled, info = pairing.epoch_rows(pseudo, gt, 8, 10, 0.4, rng)
  np.testing.assert_array_equal(pairs[:, 0], np.arange(8))
  np.testing.assert_array_equal(labeled, [1, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(pairs[[0, 2, 3, 4], 1], [5, 6, 1, 0])
  fillers = pairs[~labeled, 1]
  assert not set(fillers) & {5, 6, 1, 0}  # Nobody's label.
  assert len(set(fillers)) == len(fillers)  # 6 free tiles for 4 rows.
  assert info == {"num_labels": 4.0, "labelled_fraction": 0.5,
                  "num_gt_labels": 2.0, "labelled_only": 0.0}


def test_below_labeled_ratio_trains_on_labels_only_repeated():
  rng = np.random.default_rng(1)
  pseudo = np.array([[1, 4], [6, 2]])
  pairs, labeled, info = pairing.epoch_rows(pseudo, np.zeros((0, 2)), 9, 9,
                                            0.4, rng)
  assert len(pairs) == 9 and labeled.all()
  assert set(map(tuple, pairs)) == {(1, 4), (6, 2)}
  counts = np.bincount(pairs[:, 0], minlength=9)
  assert sorted(counts[[1, 6]]) == [4, 5]  # Fresh permutations: balanced.
  assert info["labelled_only"] == 1.0 and info["labelled_fraction"] == 2 / 9


def test_many_to_one_labels_are_kept():
  pseudo = np.array([[0, 3], [1, 3], [2, 3]])  # VIGOR: one tile, 3 panos.
  pairs, labeled, _ = pairing.epoch_rows(pseudo, np.zeros((0, 2)), 4, 5,
                                         0.5, np.random.default_rng(0))
  np.testing.assert_array_equal(pairs[:3, 1], [3, 3, 3])
  assert labeled.tolist() == [True, True, True, False]
  assert pairs[3, 1] != 3


def test_no_labels_is_a_clear_error():
  with pytest.raises(ValueError, match="pseudo_label.tau"):
    pairing.epoch_rows(np.zeros((0, 2)), np.zeros((0, 2)), 5, 5, 0.4,
                       np.random.default_rng(0))


def test_every_ground_labelled_needs_no_fillers():
  # gt_ratio=1 (the paper's 100 % GT row): every ground image has its true
  # tile, so every row is labelled and no filler tile is drawn.
  gt = np.stack([np.arange(6), (np.arange(6) + 2) % 6], 1)
  for ratio in (0.4, 1.0):
    pairs, labeled, info = pairing.epoch_rows(
        np.zeros((0, 2)), gt, 6, 6, ratio, np.random.default_rng(0))
    assert labeled.all() and info["labelled_fraction"] == 1.0
    np.testing.assert_array_equal(pairs[np.argsort(pairs[:, 0])], gt)
