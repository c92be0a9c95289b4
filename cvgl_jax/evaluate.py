"""Evaluation: embeddings of a split -> recall@K, recall@1 % and hit rate.

`evaluate` embeds both piles of a split with `cvgl_jax.embed.embed_split`
(every image once, replicated on every process); `recall_metrics` then
scores ground queries against satellite references with `cvgl_jax.metrics.
recall_at_k` (exact cosine similarity, in chunks of queries).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np

from cvgl_jax import embed as embed_lib
from cvgl_jax import metrics as metrics_lib
from cvgl_jax.data.index import PairIndex
from cvgl_jax.pseudo import refine as refine_lib
from cvgl_jax.train import state as state_lib

# The label-free score `train.select = "label_free"` maximises.
LABEL_FREE = "mutual_margin"


def label_free_metrics(ground_emb: np.ndarray, satellite_emb: np.ndarray,
                       tau: float) -> dict[str, float]:
  """A model-selection score that reads no pairing label.

  {"mutual_margin": % of the ground images that are in a mutual nearest
  pair with the satellite pile whose top-1 minus top-2 margin is >= tau}:
  the pseudo-label stage's own admission rule (without the curriculum)
  applied to two unpaired piles. A model whose embedding space separates
  places admits many; a collapsed or confused one admits few.

  Args:
    ground_emb: [Q, D] unit embeddings of a pile of ground images.
    satellite_emb: [R, D] unit embeddings of a pile of satellite images.
    tau: the margin (config.pseudo_label.tau).
  """
  settings = refine_lib.RefineSettings(tau=tau, epochs=1, curriculum=False,
                                       backend="exact")
  result = refine_lib.refine(ground_emb, satellite_emb, 0, settings)
  return {LABEL_FREE: 100.0 * len(result.pairs) / max(len(ground_emb), 1)}


def recall_metrics(ground_emb: np.ndarray, satellite_emb: np.ndarray,
                   index: PairIndex, ks: Sequence[int] = (1, 5, 10),
                   top_percent: float = 1.0) -> dict[str, float]:
  """R@k, R@top_percent % and (with semi-positives) the hit rate, in %.

  Args:
    ground_emb: [Q, D] query embeddings, row i of `index.ground_paths[i]`.
    satellite_emb: [R, D] reference embeddings.
    index: gives each query's positive (and VIGOR's semi-positives); queries
      whose positive is unknown (-1) are left out.
    ks, top_percent: see `metrics.recall_at_k`.

  Returns:
    {"R@1", "R@5", "R@10", "R@1%", ["hit_rate"], "num_queries",
    "num_references"}.
  """
  positive = np.asarray(index.positive)
  if ground_emb.shape[0] != index.num_ground or (
      satellite_emb.shape[0] != index.num_satellite):
    raise ValueError(
        f"recall_metrics: {ground_emb.shape[0]} ground and "
        f"{satellite_emb.shape[0]} satellite embeddings for PairIndex "
        f"{index.name!r} with {index.num_ground} and {index.num_satellite}.")
  known = positive >= 0
  if not known.any():
    raise ValueError(f"PairIndex {index.name!r} has no known positives: it "
                     f"cannot be evaluated.")
  semi = None
  if index.semi_positives is not None:
    semi = np.asarray(index.semi_positives)[known]
  result = metrics_lib.recall_at_k(
      ground_emb[known], satellite_emb, positive[known], ks=tuple(ks),
      top_percent=top_percent, semi_positives=semi)
  return dict(result.metrics, num_queries=float(known.sum()),
              num_references=float(index.num_satellite))


def make_eval_fn(model, index: PairIndex, *, ground_size: Sequence[int],
                 satellite_size: Sequence[int], batch_size: int,
                 mesh: jax.sharding.Mesh, ks: Sequence[int] = (1, 5, 10),
                 top_percent: float = 1.0, num_threads: int = 8,
                 progress: bool = False,
                 label_free_tau: Optional[float] = None) -> Callable:
  """A `train(eval_fn=...)` callback: state -> recall metrics of
  `state_lib.model_params(state)` on `index` (and, with `label_free_tau`,
  `label_free_metrics`).

  The two embedding functions are built (and compiled) once and reused at
  every evaluation.
  """
  embed_g, embed_s = embed_lib.make_embed_fns(model, mesh)

  def eval_fn(state) -> dict[str, float]:
    return evaluate(state_lib.model_params(state), index,
                    ground_size=ground_size, satellite_size=satellite_size,
                    batch_size=batch_size, mesh=mesh,
                    embed_fns=(embed_g, embed_s), ks=ks,
                    top_percent=top_percent, num_threads=num_threads,
                    progress=progress, label_free_tau=label_free_tau)
  return eval_fn


def evaluate(params, index: PairIndex, *, ground_size: Sequence[int],
             satellite_size: Sequence[int], batch_size: int,
             mesh: jax.sharding.Mesh, model=None,
             embed_fns: Optional[tuple[embed_lib.EmbedFn,
                                        embed_lib.EmbedFn]] = None,
             ks: Sequence[int] = (1, 5, 10), top_percent: float = 1.0,
             num_threads: int = 8, progress: bool = False,
             label_free_tau: Optional[float] = None) -> dict[str, float]:
  """Embeds both piles of `index` and returns `recall_metrics` (and, with
  `label_free_tau`, `label_free_metrics` of the two piles).

  Args:
    params: model params (replicated).
    index: the evaluation split.
    ground_size, satellite_size: (H, W) of the images.
    batch_size: images per process per batch.
    mesh: the data mesh.
    model: the TwoTower, when `embed_fns` is not given.
    embed_fns: (ground, satellite) functions from `embed.make_embed_fn`.
    ks, top_percent, num_threads, progress: see `embed.embed_split` and
      `recall_metrics`.
  """
  if embed_fns is None:
    if model is None:
      raise ValueError("evaluate: give the model or embed_fns.")
    embed_fns = embed_lib.make_embed_fns(model, mesh)
  common = dict(batch_size=batch_size, mesh=mesh, num_threads=num_threads,
                progress=progress)
  ground = embed_lib.embed_split(
      embed_fns[0], params, index.ground_paths, size=ground_size,
      desc="embed ground", **common)
  satellite = embed_lib.embed_split(
      embed_fns[1], params, index.satellite_paths, size=satellite_size,
      desc="embed satellite", **common)
  result = recall_metrics(ground, satellite, index, ks, top_percent)
  if label_free_tau is not None:
    result.update(label_free_metrics(ground, satellite, label_free_tau))
  return result
