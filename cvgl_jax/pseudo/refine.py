"""Pseudo labels from embeddings: mutual matching, margin filter, curriculum.

`refine` is a pure function of the embeddings of every training ground and
satellite image (docs/METHOD.md, stage 3):

  1. candidates: each ground image's nearest satellite(s);
  2. mutual matching: ground i and satellite j pair when j is i's nearest
     satellite AND i is j's nearest ground;
  3. margin filter: keep a pair when the ground's top-1 minus top-2
     similarity is at least tau_e = tau * (1 + cos(pi e / E)) / 2.

Decisions (where the paper is silent, from the authors' code):
  * The margin is read on the GROUND's row (its best satellite minus its
    second best), as both of the authors' paths do: the label is assigned
    to the ground image and its row is what retrieval ranks at test time.
    The comparison is `margin >= tau_e` with both in float32 (their NumPy
    casts the Python float threshold to the float32 array's type too).
  * Ties (`keep_ties`, the authors' VIGOR path): the satellites whose score
    is within `tie_tolerance` of a ground's best are all its nearest; when
    ANY of them has that ground as its nearest, EVERY tied satellite pairs
    with it, and the margin is the best score minus the best score outside
    the tie set (their `np.unique` over the top-10). They test ties with
    float equality; we use a tolerance (default 1e-6, a few float32 ulps of
    a 1024-d inner product of unit vectors) because the same two identical
    tiles need not give bit-identical dot products in a blocked matmul or
    from ScaNN. Set it to 0 for exact equality. A tie set that fills all k
    neighbours gets the margin best - k-th score (about 0): raise k when
    larger tie sets are expected. Their code then keeps one satellite per
    ground (a dict); we return every tied pair and let the caller choose.
  * Without ties (`keep_ties=False`, their CVUSA / CVACT path) a ground's
    nearest satellite is its first-ranked one and a tie makes the margin 0.
  * Many-to-one: a satellite's nearest ground is one ground (the first on
    ties, like `np.argmax`); several grounds can still share a satellite
    when mutual matching is off or through tie sets.
  * Ablations: `mutual=False` makes every ground's nearest satellite(s) a
    pair; `margin_filter=False` keeps every pair; `curriculum=False` uses
    tau_e = tau at every epoch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import numpy as np

from cvgl_jax.pseudo import knn as knn_lib

STAGES = ("candidates", "mutual", "margin")


@dataclasses.dataclass(frozen=True)
class RefineSettings:
  """How pseudo labels are chosen.

  Attributes:
    tau: margin threshold at epoch 0 (0.05 CVUSA, 0.025 CVACT, 0.035 VIGOR).
    epochs: E, the stage's total epochs (the curriculum's period).
    mutual: require mutual nearest neighbours.
    margin_filter: require margin >= tau_e.
    curriculum: tau_e follows the cosine schedule; else tau_e = tau.
    keep_ties: keep every satellite tied for a ground's best (VIGOR).
    tie_tolerance: scores within this of the best are tied (keep_ties).
    k: satellites retrieved per ground (>= 2: the margin needs a second).
    backend: nearest-neighbour backend, see `cvgl_jax.pseudo.knn`.
    knn_options: overrides of `knn.ScannOptions` fields.
  """
  tau: float
  epochs: int
  mutual: bool = True
  margin_filter: bool = True
  curriculum: bool = True
  keep_ties: bool = False
  tie_tolerance: float = 1e-6
  k: int = 4
  backend: str = "auto"
  knn_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not (self.tau >= 0 and math.isfinite(self.tau)):
      raise ValueError(f"RefineSettings.tau={self.tau} must be finite, >= 0")
    if int(self.epochs) != self.epochs or self.epochs < 1:
      raise ValueError(f"RefineSettings.epochs={self.epochs} must be an "
                       "integer >= 1")
    if not self.tie_tolerance >= 0:
      raise ValueError(f"RefineSettings.tie_tolerance={self.tie_tolerance} "
                       "must be >= 0")
    if int(self.k) != self.k or self.k < 2:
      raise ValueError(f"RefineSettings.k={self.k} must be an integer >= 2")
    if self.backend not in knn_lib.BACKENDS:
      raise ValueError(f"RefineSettings.backend={self.backend!r}, expected "
                       f"one of {knn_lib.BACKENDS}")
    knn_lib.scann_options(self.knn_options)  # Names bad keys early.


@dataclasses.dataclass(frozen=True)
class RefineResult:
  """Pseudo pairs of one refinement round.

  Attributes:
    pairs: [M, 2] int64 (ground index, satellite index), by ground index.
    margins: [M] float32, the ground's top-1 minus top-2 (outside ties).
    stats: floats: `tau_e`; per stage in STAGES `<stage>/pairs` and
      `<stage>/grounds` (distinct grounds with a pair); with a truth also
      `<stage>/correct` (pairs that are the true pair), `<stage>/precision`
      (correct pairs / pairs with a known truth, NaN
      when there are none) and `<stage>/recall` (grounds with a known truth
      holding a correct pair / grounds with a known truth).
  """
  pairs: np.ndarray
  margins: np.ndarray
  stats: dict[str, float]


def threshold(settings: RefineSettings, epoch: int) -> float:
  """tau_e = tau * (1 + cos(pi e / E)) / 2, or tau without the curriculum."""
  if not 0 <= epoch <= settings.epochs:
    raise ValueError(f"epoch={epoch} must be in [0, {settings.epochs}]")
  if not settings.curriculum:
    return float(settings.tau)
  return settings.tau * (1 + math.cos(math.pi * epoch / settings.epochs)) / 2


def _stage_stats(name, rows, cols, truth, stats):
  stats[f"{name}/pairs"] = float(rows.size)
  stats[f"{name}/grounds"] = float(np.unique(rows).size)
  if truth is None:
    return
  known = truth[rows] >= 0
  correct = known & (truth[rows] == cols)
  n_known = int(known.sum())
  stats[f"{name}/correct"] = float(correct.sum())
  stats[f"{name}/precision"] = (float(correct.sum()) / n_known if n_known
                                else float("nan"))
  n_truth = int((truth >= 0).sum())
  stats[f"{name}/recall"] = (float(np.unique(rows[correct]).size) / n_truth
                             if n_truth else float("nan"))


def refine(ground_emb: np.ndarray, satellite_emb: np.ndarray, epoch: int,
           settings: RefineSettings,
           true_positive: Optional[np.ndarray] = None) -> RefineResult:
  """Pseudo pairs for one epoch of the pseudo-label stage.

  Args:
    ground_emb: [Ng, D] float32 ground embeddings (L2-normalised).
    satellite_emb: [Ns, D] float32 satellite embeddings (L2-normalised).
    epoch: e, 0-based epoch of the stage, 0 <= e <= settings.epochs.
    settings: a `RefineSettings`.
    true_positive: optional [Ng] int, each ground's true satellite index or
      -1 when unknown; used only for the statistics.

  Returns:
    A `RefineResult`.
  """
  ground_emb = np.asarray(ground_emb)
  satellite_emb = np.asarray(satellite_emb)
  if satellite_emb.ndim != 2 or satellite_emb.shape[0] < 2:
    raise ValueError("satellite_emb must be [Ns, D] with Ns >= 2 (the "
                     f"margin needs a second best), got {satellite_emb.shape}")
  tau_e = threshold(settings, epoch)
  truth = None
  if true_positive is not None:
    truth = np.asarray(true_positive)
    if (truth.shape != (len(ground_emb),)
        or not np.issubdtype(truth.dtype, np.integer)):
      raise ValueError(f"true_positive must be [{len(ground_emb)}] integers, "
                       f"got {truth.shape} {truth.dtype}")
    if truth.size and (truth.min() < -1 or truth.max() >= len(satellite_emb)):
      raise ValueError("true_positive values must be -1 or satellite indices "
                       f"< {len(satellite_emb)}")
  k = min(settings.k, len(satellite_emb))
  nb = knn_lib.cross_topk(ground_emb, satellite_emb, k, settings.backend,
                          **settings.knn_options)
  scores, sats = nb.g2s_scores, nb.g2s_indices

  # tied[i, c]: satellite sats[i, c] is one of ground i's nearest.
  if settings.keep_ties:
    tied = scores >= scores[:, :1] - np.float32(settings.tie_tolerance)
  else:
    tied = np.zeros(scores.shape, bool)
    tied[:, 0] = True
  second = np.where(tied, -np.inf, scores).max(axis=1)
  second = np.where(np.isfinite(second), second, scores[:, -1])
  margin = (scores[:, 0] - second.astype(np.float32)).astype(np.float32)

  ground_ids = np.arange(len(ground_emb))
  is_mutual = (tied & (nb.s2g_indices[sats] == ground_ids[:, None])).any(1)
  keep = {"candidates": tied}
  keep["mutual"] = tied & is_mutual[:, None] if settings.mutual else tied
  keep["margin"] = keep["mutual"]
  if settings.margin_filter:
    keep["margin"] = keep["mutual"] & (margin >= np.float32(tau_e))[:, None]

  stats = {"tau_e": float(tau_e)}
  for name in STAGES:
    rows, cols = np.nonzero(keep[name])
    _stage_stats(name, rows, sats[rows, cols], truth, stats)
  rows, cols = np.nonzero(keep["margin"])
  pairs = np.stack([rows, sats[rows, cols]], axis=1).astype(np.int64)
  return RefineResult(pairs=pairs, margins=margin[rows], stats=stats)
