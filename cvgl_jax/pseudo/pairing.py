"""One epoch's training rows of the pseudo-label stage, from its labels.

docs/METHOD.md stage 3, steps 4-6: the epoch's labels are the refined pseudo
pairs plus the ground-truth pairs of the labelled fraction (a ground image
with a true label takes it over its pseudo label). Then either
  - fewer than `labeled_ratio` of the ground images have a label: the epoch
    trains on the labelled pairs only, repeated (in fresh random orders) to
    fill an epoch of `num_ground` rows, all labelled; or
  - every ground image is one row: paired with its label when it has one,
    else with a random satellite image that is nobody's label, marked
    unlabelled (the partial-label InfoNCE then targets "no match").
Every epoch thus has exactly `num_ground` rows, so the optimizer's
per-epoch schedule and the loop's fixed epoch length hold in every mode.
"""

from __future__ import annotations

import numpy as np


def gt_subset(positive: np.ndarray, gt_ratio: float, seed: int) -> np.ndarray:
  """[G, 2] (ground, satellite) true pairs of a random `gt_ratio` of the
  ground images with a known positive (G = floor(gt_ratio * known))."""
  known = np.flatnonzero(np.asarray(positive) >= 0)
  count = int(np.floor(gt_ratio * len(known)))
  chosen = np.sort(np.random.default_rng([seed, 7]).choice(
      known, count, replace=False))
  return np.stack([chosen, np.asarray(positive)[chosen]], 1).astype(np.int64)


def _fill(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
  """`length` indices into [0, n): concatenated fresh permutations."""
  if length == 0:  # Every ground image labelled (100 % GT): no fillers.
    return np.zeros(0, np.int64)
  reps = -(-length // n)
  return np.concatenate([rng.permutation(n) for _ in range(reps)])[:length]


def epoch_rows(pseudo_pairs: np.ndarray, gt_pairs: np.ndarray,
               num_ground: int, num_satellite: int, labeled_ratio: float,
               rng: np.random.Generator):
  """The epoch's (pairs [Q, 2] int64, labeled [Q] bool, info dict).

  Args:
    pseudo_pairs: [M, 2] (ground, satellite) from `refine` (a ground image
      may appear once; satellites may repeat, as in VIGOR).
    gt_pairs: [G, 2] true pairs of the labelled fraction.
    num_ground, num_satellite: Q and R of the training split.
    labeled_ratio: below this labelled fraction, train on labels only.
    rng: numpy generator (seeded by the caller per epoch).

  Raises:
    ValueError: no labels at all (nothing to learn from this epoch).
  """
  label = np.full(num_ground, -1, np.int64)
  pseudo_pairs = np.asarray(pseudo_pairs, np.int64).reshape(-1, 2)
  gt_pairs = np.asarray(gt_pairs, np.int64).reshape(-1, 2)
  label[pseudo_pairs[:, 0]] = pseudo_pairs[:, 1]
  label[gt_pairs[:, 0]] = gt_pairs[:, 1]
  labelled = np.flatnonzero(label >= 0)
  fraction = len(labelled) / num_ground
  info = {"num_labels": float(len(labelled)),
          "labelled_fraction": float(fraction),
          "num_gt_labels": float(len(gt_pairs))}
  if not len(labelled):
    raise ValueError(
        "No pseudo or ground-truth labels this epoch: nothing to train on. "
        "The cold start found no mutual pairs above the margin; lower "
        "config.pseudo_label.tau, train the cold start longer, or add "
        "labels (config.pseudo_label.gt_ratio).")
  if fraction < labeled_ratio:
    ground = labelled[_fill(len(labelled), num_ground, rng)]
    pairs = np.stack([ground, label[ground]], 1)
    info["labelled_only"] = 1.0
    return pairs, np.ones(num_ground, bool), info
  ground = np.arange(num_ground)
  unlabelled = np.flatnonzero(label < 0)
  free = np.setdiff1d(np.arange(num_satellite), label[labelled])
  if not len(free):  # Every tile is somebody's label: any tile will do.
    free = np.arange(num_satellite)
  fillers = free[_fill(len(free), len(unlabelled), rng)]
  satellite = label.copy()
  satellite[unlabelled] = fillers
  info["labelled_only"] = 0.0
  return np.stack([ground, satellite], 1), label >= 0, info
