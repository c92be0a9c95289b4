"""Evaluation: embeddings of a split -> recall@K, recall@1 % and hit rate.

`embed_split` runs an evaluation pipeline (`cvgl_jax.data.pipeline.
evaluation`: each process reads its own block of the pile, padded batches
with a mask and the image's index) through a jitted embedding function on
the mesh; embeddings come back replicated, so every process assembles the
whole [N, D] array, each image exactly once. `recall_metrics` then scores
ground queries against satellite references with `cvgl_jax.metrics.
recall_at_k` (exact cosine similarity, in chunks of queries).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np
import tqdm

from cvgl_jax import metrics as metrics_lib
from cvgl_jax import parallel
from cvgl_jax.data import pipeline as pipeline_lib
from cvgl_jax.data.index import PairIndex
from cvgl_jax.pseudo import refine as refine_lib
from cvgl_jax.train import steps

EmbedFn = Callable[[dict, jax.Array], jax.Array]
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


def embed_split(embed_fn: EmbedFn, params, paths: Sequence[str], *,
                size: Sequence[int], batch_size: int,
                mesh: jax.sharding.Mesh, num_threads: int = 8,
                progress: bool = False, desc: str = "embed") -> np.ndarray:
  """Embeds every image of `paths` once, across all processes.

  Args:
    embed_fn: from `steps.make_embed_fn` (uint8 images sharded on `data`
      -> replicated [B, D] float32).
    params: the model params (replicated).
    paths: [N] image files (e.g. `index.ground_paths`), the same list on
      every process.
    size: (H, W) the images are resized to.
    batch_size: images per process per batch; batch_size * process_count
      must divide over the mesh's devices.
    mesh: the data mesh.
    num_threads: decoding threads.
    progress: tqdm bar on process 0.
    desc: the bar's label.

  Returns:
    [N, D] float32 numpy, row i the embedding of paths[i], on every process.
  """
  parallel.check_batch_size(batch_size * jax.process_count(), mesh,
                            "eval batch_size x process count")
  pipe = pipeline_lib.evaluation(paths, size=size, batch_size=batch_size,
                                 num_threads=num_threads)
  n = len(pipe.paths)
  out, seen = None, np.zeros(n, np.int64)
  bar = tqdm.tqdm(total=pipe.num_batches, desc=desc, unit="batch",
                  disable=not (progress and parallel.is_main_process()))
  def store(job):
    nonlocal out
    emb, index, mask = (np.asarray(x) for x in job)
    if out is None:
      out = np.zeros((n, emb.shape[1]), np.float32)
    out[index[mask]] = emb[mask]
    np.add.at(seen, index[mask], 1)
    bar.update(1)

  # One batch in flight: a batch is dispatched before the previous one's
  # embeddings are fetched, so the device never waits for the host's copy.
  pending = None
  for batch in pipe:
    batch = parallel.to_global(batch, mesh)
    job = (embed_fn(params, batch["image"]),
           *parallel.replicate((batch["index"], batch["mask"]), mesh))
    if pending is not None:
      store(pending)
    pending = job
  if pending is not None:
    store(pending)
  bar.close()
  if not (seen == 1).all():
    bad = np.flatnonzero(seen != 1)
    raise RuntimeError(f"embed_split: {bad.size} of {n} images were embedded "
                       f"{seen[bad[0]]} times instead of once (first: "
                       f"{paths[bad[0]]}).")
  return out


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
  """A `train(eval_fn=...)` callback: state -> recall metrics on `index`
  (and, with `label_free_tau`, `label_free_metrics`).

  The two embedding functions are built (and compiled) once and reused at
  every evaluation.
  """
  embed_g = steps.make_embed_fn(model, mesh, "ground")
  embed_s = steps.make_embed_fn(model, mesh, "satellite")

  def eval_fn(state) -> dict[str, float]:
    return evaluate(state.params, index, ground_size=ground_size,
                    satellite_size=satellite_size, batch_size=batch_size,
                    mesh=mesh, embed_fns=(embed_g, embed_s), ks=ks,
                    top_percent=top_percent, num_threads=num_threads,
                    progress=progress, label_free_tau=label_free_tau)
  return eval_fn


def evaluate(params, index: PairIndex, *, ground_size: Sequence[int],
             satellite_size: Sequence[int], batch_size: int,
             mesh: jax.sharding.Mesh, model=None,
             embed_fns: Optional[tuple[EmbedFn, EmbedFn]] = None,
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
    embed_fns: (ground, satellite) functions from `steps.make_embed_fn`.
    ks, top_percent, num_threads, progress: see `embed_split` and
      `recall_metrics`.
  """
  if embed_fns is None:
    if model is None:
      raise ValueError("evaluate: give the model or embed_fns.")
    embed_fns = (steps.make_embed_fn(model, mesh, "ground"),
                 steps.make_embed_fn(model, mesh, "satellite"))
  common = dict(batch_size=batch_size, mesh=mesh, num_threads=num_threads,
                progress=progress)
  ground = embed_split(embed_fns[0], params, index.ground_paths,
                       size=ground_size, desc="embed ground", **common)
  satellite = embed_split(embed_fns[1], params, index.satellite_paths,
                          size=satellite_size, desc="embed satellite",
                          **common)
  result = recall_metrics(ground, satellite, index, ks, top_percent)
  if label_free_tau is not None:
    result.update(label_free_metrics(ground, satellite, label_free_tau))
  return result
