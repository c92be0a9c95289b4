"""The pseudo-label rounds of stage 3: what each epoch trains on.

At every epoch's start (`make_epoch_start` builds the loop's hook): during
the warm-up epochs, the labelled fraction's true pairs alone; after it,
one round -- embed the training split through the label-free views of
`pseudo.views` with `state_lib.model_params` (the params' moving average
where the state keeps one: a mean teacher), refine mutual pairs with the
margin curriculum (`pseudo.refine`), add the true pairs and lay out the
epoch's rows (`pseudo.pairing`). Process 0 alone refines and decides,
then broadcasts: the shards of an epoch fit together, no process raises
alone, and the others do not repeat the search. The round's statistics go
to the loop's records (`kind: "epoch_start"`), from which
`records.round_table` reads the round table.

With a teacher (the `retrain` stage), there are no rounds: the teacher's
params label the split once, by the last round's rule (the curriculum's
threshold at its end), and every epoch lays out rows from those labels.
"""

from __future__ import annotations

from typing import Callable

import ml_collections
import numpy as np

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax.data.index import PairIndex
from cvgl_jax.pseudo import pairing
from cvgl_jax.pseudo import refine as refine_lib
from cvgl_jax.train import state as state_lib

# params -> (ground [Q, D], satellite [R, D]) embeddings of the train split.
EmbedFn = Callable[[object], tuple[np.ndarray, np.ndarray]]


def first_epoch(gt_pairs: np.ndarray, warmup_epochs: int,
                teacher: object = None) -> int:
  """The schedule epoch the stage starts at. The warm-up epochs train the
  true pairs alone; without any, the authors' warm-up trains nothing but
  its epochs still count in the cosine rate and the curriculum, so stage 3
  starts at epoch `warmup_epochs`. With a teacher (the retrain stage)
  there is no warm-up: epoch 0."""
  if teacher is not None or len(gt_pairs):
    return 0
  return warmup_epochs


def make_epoch_start(config: ml_collections.ConfigDict, index: PairIndex,
                     gt_pairs: np.ndarray, embed: EmbedFn,
                     teacher: object = None
                     ) -> Callable[[object, int], dict]:
  """The loop's epoch-start hook of stage 3 (or, with a teacher, of the
  `retrain` stage).

  Args:
    config: the run's config (`seed`, `pseudo_label`).
    index: the training split.
    gt_pairs: [G, 2] (ground, satellite) true pairs of the labelled
      fraction (`pairing.gt_subset`).
    embed: params -> the split's (ground, satellite) embeddings; called on
      every process (the embedding is sharded).
    teacher: None for stage 3's rounds; else the params (replicated) that
      label the split once, by the rule of stage 3's last round, for every
      epoch (no warm-up, no rounds).

  Returns:
    hook(state, loop_epoch) -> {"pairs" [M, 2], "labeled" [M], "metrics"}.

  Raises (from the hook):
    config_lib.ConfigError: an epoch with no labels at all (e.g. tau too
      high for this model), on every process.
  """
  p = config.pseudo_label
  start = first_epoch(gt_pairs, p.warmup_epochs, teacher)
  settings = refine_lib.RefineSettings(
      tau=p.tau, epochs=p.epochs, mutual=p.mutual,
      margin_filter=p.margin_filter, curriculum=p.curriculum,
      keep_ties=index.semi_positives is not None, backend=p.knn_backend)
  truth = np.asarray(index.positive)
  taught = []  # The teacher's refine result (process 0), once embedded.

  def labels(state, epoch: int):
    """This epoch's refine result on process 0 (None elsewhere)."""
    if teacher is None:
      ground, satellite = embed(state_lib.model_params(state))
      if parallel.is_main_process():
        # Precision reads the truth for the round table only (telemetry).
        return refine_lib.refine(ground, satellite, epoch, settings,
                                 true_positive=truth)
      return None
    if not taught:
      ground, satellite = embed(teacher)
      taught.append(refine_lib.refine(ground, satellite, settings.epochs,
                                      settings, true_positive=truth)
                    if parallel.is_main_process() else None)
    return taught[0]

  def epoch_start(state, loop_epoch: int) -> dict:
    epoch = start + loop_epoch
    rng = np.random.default_rng([config.seed, epoch])
    if teacher is None and epoch < p.warmup_epochs:
      rows, labeled, info = pairing.epoch_rows(
          np.zeros((0, 2)), gt_pairs, index.num_ground, index.num_satellite,
          1.0, rng)
      return {"pairs": rows, "labeled": labeled,
              "metrics": dict(info, warmup=1.0, schedule_epoch=float(epoch))}
    result = labels(state, epoch)
    rows = np.zeros((index.num_ground, 2), np.int64)
    labeled = np.zeros(index.num_ground, bool)
    info, stats, problem = {}, {}, ""
    if parallel.is_main_process():
      stats = result.stats
      try:
        rows, labeled, info = pairing.epoch_rows(
            result.pairs, gt_pairs, index.num_ground, index.num_satellite,
            p.labeled_ratio, rng)
      except ValueError as e:
        problem = str(e)
    failed, rows, labeled = parallel.from_main_process(
        (np.bool_(bool(problem)), rows, labeled))
    if failed:
      # The config cannot drive this run (one line, exit 2); the earlier
      # stages are kept and a rerun with a lower tau
      # (--force_config_change) starts from them.
      raise config_lib.ConfigError(
          (problem or "Process 0 found no pseudo or ground-truth labels "
           "this epoch; its log says more.") + " The finished stages are "
          "kept: rerun with the change and --force_config_change.")
    return {"pairs": rows, "labeled": labeled,
            "metrics": dict(stats, **info, warmup=0.0,
                            schedule_epoch=float(epoch))}
  return epoch_start
