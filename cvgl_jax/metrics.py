"""Retrieval metrics: recall@K, recall@top-1 % and VIGOR's hit rate.

Similarities are exact inner products (cosine for L2-normalised
embeddings), computed in float32 on the default jax device for one chunk of
queries at a time: the whole Q x R matrix never exists at once.

Definitions (docs/METHOD.md, Evaluation; as the authors' `calculate_scores`):
  - a query's rank is the number of references scoring STRICTLY higher
    than its true tile, so ties go in the query's favour; rank 0 is a hit;
  - R@k is the percentage of queries with rank < k;
  - R@p % uses k = max(1, floor(R * p / 100)). The authors (UCVGL and
    Sample4Geo) append `R // 100` to their list of k, i.e. floor; we follow
    that and only raise k to 1 where R < 100 / p, where theirs would be 0
    and the metric always 0 %;
  - hit rate (VIGOR): the top-1 reference is the positive or one of its
    semi-positives, i.e. no reference scores strictly higher than the best
    of them. (The authors' `calculate_scores_vigor` instead counts a hit
    when every reference scoring above the positive itself is a
    semi-positive; the two differ only when a non-semi-positive scores
    between the best semi-positive and the positive.)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class RecallResult(NamedTuple):
  """What `recall_at_k` returns.

  Attributes:
    metrics: {"R@1": ..., "R@5": ..., "R@10": ..., "R@1%": ...,
      "hit_rate": ... (only with semi-positives)}: floats in percent.
    ranks: [Q] int64, number of references scoring strictly higher than each
      query's positive.
    top1: [Q] int64, index of each query's best-scoring reference (the
      lowest index among ties).
  """
  metrics: dict
  ranks: np.ndarray
  top1: np.ndarray


def top_percent_k(num_references: int, top_percent: float = 1.0) -> int:
  """k of R@top_percent %: max(1, floor(num_references * top_percent / 100)).

  The small epsilon keeps exact products such as 300 * 1.0 / 100 from
  falling below their integer in floating point.
  """
  return max(1, math.floor(num_references * top_percent / 100.0 + 1e-9))


@jax.jit
def _chunk_stats(queries, refs, positive, semi):
  """Rank, top-1 and hit of one chunk of queries.

  Args:
    queries: [c, D] float32.
    refs: [R, D] float32.
    positive: [c] int32, index of each query's true reference.
    semi: [c, S] int32 semi-positive indices, -1 for none (S may be 0).

  Returns:
    rank [c] int32, top1 [c] int32, hit [c] bool.
  """
  sims = jnp.matmul(queries, refs.T, precision=jax.lax.Precision.HIGHEST)
  pos_score = jnp.take_along_axis(sims, positive[:, None], axis=1)[:, 0]
  rank = jnp.sum(sims > pos_score[:, None], axis=1, dtype=jnp.int32)
  top1 = jnp.argmax(sims, axis=1).astype(jnp.int32)
  semi_score = jnp.where(
      semi >= 0,
      jnp.take_along_axis(sims, jnp.maximum(semi, 0), axis=1), -jnp.inf)
  best = jnp.maximum(pos_score, jnp.max(semi_score, axis=1, initial=-jnp.inf))
  hit = best >= jnp.max(sims, axis=1)
  return rank, top1, hit


def _check_inputs(query_emb, ref_emb, positive, ks, top_percent,
                  semi_positives, chunk_size):
  """Raises ValueError naming the bad argument; returns host index arrays."""
  if query_emb.ndim != 2 or ref_emb.ndim != 2:
    raise ValueError(
        f"recall_at_k: query_emb and ref_emb must be 2-D [N, D]; got "
        f"{query_emb.shape} and {ref_emb.shape}.")
  (num_q, dim), (num_r, ref_dim) = query_emb.shape, ref_emb.shape
  if dim != ref_dim:
    raise ValueError(
        f"recall_at_k: query_emb has D={dim} but ref_emb has D={ref_dim}.")
  if num_q == 0 or num_r == 0:
    raise ValueError(
        f"recall_at_k: empty input: {num_q} queries, {num_r} references.")
  positive = np.asarray(positive)
  if positive.shape != (num_q,) or not np.issubdtype(positive.dtype,
                                                     np.integer):
    raise ValueError(
        f"recall_at_k: positive must be integer [Q] = [{num_q}]; got "
        f"{positive.dtype} {positive.shape}.")
  bad = np.flatnonzero((positive < 0) | (positive >= num_r))
  if bad.size:
    raise ValueError(
        f"recall_at_k: positive must index the {num_r} references; "
        f"{bad.size} queries do not, first query {bad[0]} -> "
        f"{positive[bad[0]]} (-1 means an unknown positive: drop those "
        f"queries before evaluating).")
  if not ks or any(not isinstance(k, (int, np.integer)) or k < 1
                   for k in ks):
    raise ValueError(
        f"recall_at_k: ks must be positive integers; got {ks!r}.")
  if not 0.0 < top_percent <= 100.0:
    raise ValueError(
        f"recall_at_k: top_percent must be in (0, 100]; got {top_percent}.")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(
        f"recall_at_k: chunk_size must be a positive integer; got "
        f"{chunk_size!r}.")
  if semi_positives is None:
    semi = np.zeros((num_q, 0), np.int32)
  else:
    semi = np.asarray(semi_positives)
    if (semi.ndim != 2 or semi.shape[0] != num_q
        or not np.issubdtype(semi.dtype, np.integer)):
      raise ValueError(
          f"recall_at_k: semi_positives must be integer [Q, S] with "
          f"Q={num_q}, -1 padded; got {semi.dtype} {semi.shape}.")
    bad = np.argwhere((semi < -1) | (semi >= num_r))
    if bad.size:
      raise ValueError(
          f"recall_at_k: semi_positives[{bad[0][0]}, {bad[0][1]}] = "
          f"{semi[tuple(bad[0])]} is neither -1 nor a reference index "
          f"< {num_r}.")
  for name, emb in (("query_emb", query_emb), ("ref_emb", ref_emb)):
    finite = np.isfinite(np.asarray(emb)).all(axis=1)  # On the host.
    if not finite.all():
      raise ValueError(
          f"recall_at_k: {name} has NaN/Inf in {np.sum(~finite)} rows, "
          f"first row {np.flatnonzero(~finite)[0]}.")
  return positive.astype(np.int32), semi.astype(np.int32)


def recall_at_k(query_emb,
                ref_emb,
                positive,
                ks: Sequence[int] = (1, 5, 10),
                top_percent: float = 1.0,
                semi_positives=None,
                chunk_size: int = 512) -> RecallResult:
  """Recall@K, recall@top_percent % and, with semi-positives, the hit rate.

  Args:
    query_emb: [Q, D] float, numpy or jax; ground embeddings, L2-normalised
      for cosine similarity.
    ref_emb: [R, D] float, numpy or jax; satellite embeddings.
    positive: [Q] int, index into ref_emb of each query's true tile.
    ks: the k of R@k.
    top_percent: p of R@p %; k = `top_percent_k(R, p)`.
    semi_positives: optional [Q, S] int, -1 padded (PairIndex's
      `semi_positives`); adds "hit_rate".
    chunk_size: queries per chunk; device memory is about
      R * D + chunk_size * R float32 values.

  Returns:
    RecallResult(metrics in percent, ranks [Q], top1 [Q]).

  Raises:
    ValueError: on shapes, indices or values that do not fit (checked before
      any similarity is computed).
  """
  positive, semi = _check_inputs(query_emb, ref_emb, positive, ks,
                                 top_percent, semi_positives, chunk_size)
  num_q, num_r = query_emb.shape[0], ref_emb.shape[0]
  refs = jnp.asarray(ref_emb, jnp.float32)
  chunk = min(int(chunk_size), num_q)
  ranks, top1, hits = [], [], []
  for start in range(0, num_q, chunk):
    stop = min(start + chunk, num_q)
    pad = chunk - (stop - start)
    # Padding the last chunk keeps one compiled shape for every chunk.
    queries = jnp.pad(jnp.asarray(query_emb[start:stop], jnp.float32),
                      ((0, pad), (0, 0)))
    pos = np.pad(positive[start:stop], (0, pad))
    sem = np.pad(semi[start:stop], ((0, pad), (0, 0)), constant_values=-1)
    out = jax.device_get(_chunk_stats(queries, refs, pos, sem))
    for acc, value in zip((ranks, top1, hits), out):
      acc.append(value[:stop - start])
  ranks = np.concatenate(ranks).astype(np.int64)
  top1 = np.concatenate(top1).astype(np.int64)
  hits = np.concatenate(hits)

  metrics = {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}
  k_top = top_percent_k(num_r, top_percent)
  metrics[f"R@{top_percent:g}%"] = 100.0 * float(np.mean(ranks < k_top))
  if semi_positives is not None:
    metrics["hit_rate"] = 100.0 * float(np.mean(hits))
  return RecallResult(metrics=metrics, ranks=ranks, top1=top1)
