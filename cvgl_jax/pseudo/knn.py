"""Nearest neighbours by inner product: exact (chunked matmul) and ScaNN.

Two entry points, both NumPy in and NumPy out, best first:

  knn(queries, database, k)        each query's top-k database rows.
  cross_topk(ground, satellite, k) each ground's top-k satellites AND each
                                   satellite's nearest ground: everything
                                   mutual matching with a margin needs.

Backends:
  exact  `jax.lax.top_k` over a jitted matmul, on the default device (an
         accelerator when there is one), in chunks of query rows so that no
         more than `chunk_bytes` of similarities exist at once (never the
         whole Nq x Nd matrix). `cross_topk` makes ONE pass over the ground
         x satellite similarity: the row top-k and a running column max /
         argmax come from the same chunk, so the second matrix (s @ g.T) of
         the authors' code is never computed.
  scann  `scann.scann_ops_pybind` (CPU, no TensorFlow), configured from the
         database size. Below `reduced_max` database rows and for inputs
         of more than `reduce_dims` dimensions (the pseudo-label stage's
         all-vs-all search of 1024-8192-d descriptors), the candidates
         are found in a PCA space: both piles projected on the top
         `reduce_dims` eigenvectors of their (uncentred) second moment,
         searched by ScaNN (a k-means tree, `reduced_leaves_share` of the
         leaves visited, brute force inside them) for `candidates` rows
         per query, which are then re-scored exactly in the full space: the
         tree search touches 128 dimensions where the full space costs
         1024, and no quantizer is trained (benchmarks/refine.py and
         BUILD_NOTES.md have the times and the share of the exact pairs
         kept). Otherwise: brute force below
         `brute_force_max` rows; above it
         a k-means partition tree (~sqrt(N) leaves, of which
         `leaves_to_search` visits 10 % up to 100k rows, rising to 25 %
         at 1M: all-vs-all mutual matching on clustered data found
         99.95 % of the exact pairs at 105k x 1024 with 10 %, but 88.5 %
         at 1M x 256 with 10 % and 98.9 % with 25 %),
         asymmetric hashing (anisotropic threshold 0.2) and exact
         re-ordering of max(100, 4k) candidates. ScaNN's rules of thumb
         (tree from 100k, 2 dims per block) target single-query latency;
         for all-vs-all search of 1024-d embeddings the tree from 20k rows
         and 4 dims per block measured 2.8x faster than AH alone at 35k x
         1024 with identical mutual pairs (benchmarks/refine.py). Every knob
         is a keyword override. `cross_topk` builds two indexes.
  auto   exact when Nq * Nd is at most `AUTO_EXACT_MAX_PRODUCT` (below it
         ScaNN is brute force anyway), whenever an accelerator is present,
         or where ScaNN is not installed (it ships x86-64 Linux wheels
         only: aarch64 nodes such as GH200 run without it); ScaNN
         otherwise.

Inputs are float32 [N, D]; for cosine similarity L2-normalise them first.
Scores are inner products (larger is closer); indices are int64.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Above this many query x database similarities, "auto" picks ScaNN on a CPU
# host (ScaNN's brute-force limit squared; see the module docstring).
AUTO_EXACT_MAX_PRODUCT = 20_000 ** 2
BACKENDS = ("auto", "exact", "scann")


@dataclasses.dataclass(frozen=True)
class ScannOptions:
  """ScaNN configuration; `None` fields are derived from the database size.

  Attributes:
    brute_force_max: below this many database rows, score by brute force.
    tree_min: from this many rows on, partition with a k-means tree.
    num_leaves: tree leaves (default ~sqrt(N), at least 16).
    num_leaves_to_search: leaves visited per query (default
      `leaves_to_search(N, leaves)`: 10 % of them up to 100k rows, growing
      with log N to 25 % at 1M and 30 % beyond; at least 8).
    training_sample_size: rows used to train the tree and the quantizer.
    dims_per_block: asymmetric-hashing dimensions per block.
    anisotropic_threshold: anisotropic quantization threshold (dot product).
    reorder: candidates re-scored exactly (default max(100, 4 k)).
    batch_size: queries per `search_batched_parallel` batch.
    num_threads: search threads (0: ScaNN's default, all cores).
    reduce_dims: PCA dimensions of the candidate search (0: search the full
      space); used for inputs of more dimensions and databases below
      `reduced_max` rows.
    candidates: rows per query found in the PCA space and re-scored
      exactly (at least k).
    reduced_max: from this many database rows on, the full-space
      configuration (tree + asymmetric hashing) is used instead.
    reduced_share: share of the tree's leaves visited in the PCA space
      (default `reduced_leaves_share(N)`; more than in the full space: the
      projection blurs the partition).
  """
  brute_force_max: int = 20_000
  tree_min: int = 20_000
  num_leaves: int | None = None
  num_leaves_to_search: int | None = None
  training_sample_size: int | None = None
  dims_per_block: int = 4
  anisotropic_threshold: float = 0.2
  reorder: int | None = None
  batch_size: int = 256
  num_threads: int = 0
  reduce_dims: int = 128
  candidates: int = 32
  reduced_max: int = 250_000
  reduced_share: float | None = None


class CrossNeighbours(NamedTuple):
  """Result of `cross_topk` (NumPy).

  Attributes:
    g2s_scores: [Ng, k] float32, each ground's best satellite scores.
    g2s_indices: [Ng, k] int64, the satellites, best first.
    s2g_scores: [Ns] float32, each satellite's best ground score.
    s2g_indices: [Ns] int64, that ground (the first one on exact ties).
  """
  g2s_scores: np.ndarray
  g2s_indices: np.ndarray
  s2g_scores: np.ndarray
  s2g_indices: np.ndarray


def _check(name: str, x) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} must be a non-empty [N, D] array, got shape "
                     f"{x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name} must be floating point, got {x.dtype}")
  return np.ascontiguousarray(x, dtype=np.float32)


def _check_pair(qname, queries, dname, database, k):
  queries, database = _check(qname, queries), _check(dname, database)
  if queries.shape[1] != database.shape[1]:
    raise ValueError(f"{qname} has D={queries.shape[1]} but {dname} has "
                     f"D={database.shape[1]}")
  if not 1 <= k <= database.shape[0]:
    raise ValueError(f"k={k} must be in [1, {database.shape[0]}] (the rows "
                     f"of {dname})")
  return queries, database


def scann_options(overrides: Mapping[str, Any]) -> ScannOptions:
  """`ScannOptions` from keyword overrides; unknown names are an error."""
  names = {f.name for f in dataclasses.fields(ScannOptions)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"unknown ScaNN option(s) {unknown}; known: "
                     f"{sorted(names)}")
  return ScannOptions(**overrides)


@functools.cache
def scann_available() -> bool:
  """Whether the optional `scann` package is installed."""
  return importlib.util.find_spec("scann") is not None


def _backend(backend: str, nq: int, nd: int) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}, expected one of {BACKENDS}")
  if backend == "scann" and not scann_available():
    raise ValueError("backend='scann' but the scann package is not "
                     "installed (its wheels are x86-64 Linux only): use "
                     "'exact' or 'auto'.")
  if backend != "auto":
    return backend
  if (jax.default_backend() != "cpu" or nq * nd <= AUTO_EXACT_MAX_PRODUCT
      or not scann_available()):
    return "exact"
  return "scann"


class ExactSearcher:
  """Exact top-k over a fixed database [N, D], with the `search_batched`
  of a ScaNN searcher: what a retrieval bundle searches with where ScaNN
  is not installed."""

  def __init__(self, database: np.ndarray):
    self.database = np.ascontiguousarray(database, np.float32)

  def search_batched(self, queries, final_num_neighbors: int,
                     pre_reorder_num_neighbors: int = 0):
    del pre_reorder_num_neighbors  # Exact: nothing to re-order.
    scores, rows = knn(queries, self.database, final_num_neighbors,
                       backend="exact")
    return rows, scores


# ---------------------------------------------------------------- exact ----


def _chunk_rows(n_query: int, n_db: int, chunk_bytes: int) -> int:
  """Query rows per chunk so that [rows, n_db] float32 fits chunk_bytes."""
  rows = max(8, chunk_bytes // (4 * n_db) // 8 * 8)
  return min(rows, -(-n_query // 8) * 8)


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_chunk(q, db, k):
  s = jnp.dot(q, db.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(s, k)


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(0, 1))
def _cross_chunk(col_best, col_arg, q, offset, n_valid, db, k):
  """Row top-k of one ground chunk and the running column max / argmax."""
  s = jnp.dot(q, db.T, precision=jax.lax.Precision.HIGHEST)
  top_s, top_i = jax.lax.top_k(s, k)
  valid = jnp.arange(q.shape[0]) < n_valid
  s = jnp.where(valid[:, None], s, -jnp.inf)
  cmax, carg = s.max(axis=0), s.argmax(axis=0).astype(jnp.int32) + offset
  better = cmax > col_best  # Strict: earlier chunks win ties (first index).
  return (jnp.where(better, cmax, col_best), jnp.where(better, carg, col_arg),
          top_s, top_i)


def _padded_chunks(x: np.ndarray, rows: int):
  for start in range(0, x.shape[0], rows):
    chunk = x[start:start + rows]
    n = chunk.shape[0]
    if n < rows:
      chunk = np.concatenate([chunk, np.zeros((rows - n, x.shape[1]),
                                              x.dtype)])
    yield start, n, chunk


def _exact_knn(queries, database, k, chunk_bytes):
  db = jax.device_put(database)
  rows = _chunk_rows(queries.shape[0], database.shape[0], chunk_bytes)
  scores = np.empty((queries.shape[0], k), np.float32)
  indices = np.empty((queries.shape[0], k), np.int64)
  for start, n, chunk in _padded_chunks(queries, rows):
    s, i = _topk_chunk(chunk, db, k)
    scores[start:start + n] = np.asarray(s)[:n]
    indices[start:start + n] = np.asarray(i)[:n]
  return scores, indices


def _exact_cross(ground, satellite, k, chunk_bytes):
  db = jax.device_put(satellite)
  ns = satellite.shape[0]
  rows = _chunk_rows(ground.shape[0], ns, chunk_bytes)
  col_best = jnp.full((ns,), -jnp.inf, jnp.float32)
  col_arg = jnp.zeros((ns,), jnp.int32)
  scores = np.empty((ground.shape[0], k), np.float32)
  indices = np.empty((ground.shape[0], k), np.int64)
  for start, n, chunk in _padded_chunks(ground, rows):
    col_best, col_arg, s, i = _cross_chunk(
        col_best, col_arg, chunk, np.int32(start), np.int32(n), db, k)
    scores[start:start + n] = np.asarray(s)[:n]
    indices[start:start + n] = np.asarray(i)[:n]
  return CrossNeighbours(scores, indices, np.asarray(col_best),
                         np.asarray(col_arg).astype(np.int64))


# ---------------------------------------------------------------- scann ----


def leaves_to_search(n: int, num_leaves: int) -> int:
  """Default leaves visited per query for an `n`-row database.

  The share grows with log10(n): 10 % up to 100k rows, 25 % at 1M, capped
  at 30 %; at least 8 leaves (or all of them when fewer). Measured by
  `benchmarks/refine.py` (BUILD_NOTES.md): mutual pairs need more of the
  tree as leaves get denser with neighbours.
  """
  share = min(0.30, 0.10 + 0.15 * max(0.0, math.log10(n / 100_000)))
  return min(num_leaves, max(8, round(share * num_leaves)))


def scann_searcher(database: np.ndarray, k: int, options: ScannOptions):
  """Builds a dot-product ScaNN searcher for `database` [N, D] float32."""
  from scann import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  n = database.shape[0]
  builder = scann_ops_pybind.builder(database, k, "dot_product")
  sample = options.training_sample_size or min(n, 250_000)
  if n >= options.tree_min:
    leaves = options.num_leaves or max(16, int(math.sqrt(n)))
    search = options.num_leaves_to_search or leaves_to_search(n, leaves)
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=search,
                           training_sample_size=min(sample, n))
  if n < options.brute_force_max:
    builder = builder.score_brute_force()
  else:
    builder = builder.score_ah(
        options.dims_per_block,
        anisotropic_quantization_threshold=options.anisotropic_threshold,
        training_sample_size=min(sample, n))
    builder = builder.reorder(options.reorder or max(100, 4 * k))
  searcher = builder.build()
  if options.num_threads:
    searcher.set_num_threads(options.num_threads)
  return searcher


def reduced_leaves_share(n: int) -> float:
  """Default share of the leaves the PCA-space search visits for an
  `n`-row database: 0.2 up to 40k rows, rising with log n to 0.3 from
  100k. Measured (benchmarks/refine.py, 1024-d, 32 candidates): 0.2 kept
  99.5 % of the exact mutual pairs at 35,532 but 98.4 % at 105,214, where
  0.25 kept 99.1 % and 0.3 99.45 %."""
  growth = math.log(max(n, 40_000) / 40_000) / math.log(100_000 / 40_000)
  return min(0.3, 0.2 + 0.1 * growth)


def pca_basis(piles: Sequence[np.ndarray], dims: int, sample: int = 16_384,
              seed: int = 0) -> np.ndarray:
  """[D, dims] float32: the top eigenvectors of the uncentred second
  moment of the rows of `piles` (arrays [N_i, D]; a random sample of
  `sample` rows of them all, drawn without copying the piles), the
  subspace that keeps most of their inner products."""
  sizes = np.array([len(p) for p in piles])
  rows = np.random.default_rng(seed).choice(
      sizes.sum(), min(sample, sizes.sum()), replace=False)
  which = np.searchsorted(np.cumsum(sizes), rows, side="right")
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  x = np.concatenate([piles[i][np.sort(rows[which == i] - starts[i])]
                      for i in range(len(piles))]).astype(np.float64)
  _, vectors = np.linalg.eigh(x.T @ x)
  return np.ascontiguousarray(vectors[:, ::-1][:, :dims], np.float32)


def _reduction(options: ScannOptions, *piles: np.ndarray):
  """`piles` projected on their PCA basis for the reduced search, or None
  where the full-space configuration applies."""
  dims = piles[0].shape[1]
  largest = max(len(p) for p in piles)
  if not 0 < options.reduce_dims < dims or largest >= options.reduced_max:
    return None
  basis = pca_basis(piles, options.reduce_dims)
  return tuple(p @ basis for p in piles)


def _rescore(queries, database, candidates, found, k, rows=128):
  """Each query's top k of its candidate rows by exact inner product.

  Args:
    queries: [Nq, D]; database: [Nd, D] float32.
    candidates: [Nq, C] int64 database rows; `found` [Nq, C] bool marks the
      real ones (ScaNN pads a short list with row 0 and a NaN score).
    k: <= C.

  Returns:
    scores [Nq, k] float32 and indices [Nq, k] int64, best first; equal
    scores in row order, as the exact backend.
  """
  scores = np.empty((len(queries), k), np.float32)
  indices = np.empty((len(queries), k), np.int64)
  for start in range(0, len(queries), rows):
    cand = candidates[start:start + rows]
    exact = np.matmul(database[cand],
                      queries[start:start + rows, :, None])[..., 0]
    exact = np.where(found[start:start + rows], exact, -np.inf)
    order = np.lexsort((cand, -exact), axis=-1)[:, :k]
    scores[start:start + rows] = np.take_along_axis(exact, order, 1)
    indices[start:start + rows] = np.take_along_axis(cand, order, 1)
  return scores, indices


def reduced_options(options: ScannOptions, n: int) -> ScannOptions:
  """How `scann_searcher` indexes an `n`-row pile in the PCA space: a tree
  (from `tree_min` rows), brute force inside the leaves, and
  `reduced_share` (else `reduced_leaves_share(n)`) of them visited."""
  leaves = options.num_leaves or max(16, int(math.sqrt(n)))
  share = options.reduced_share or reduced_leaves_share(n)
  return dataclasses.replace(
      options, brute_force_max=n + 1, num_leaves=leaves,
      num_leaves_to_search=(options.num_leaves_to_search or min(
          leaves, max(8, round(share * leaves)))))


def _scann_knn(queries, database, k, options, reduced=None):
  """ScaNN's top k; with `reduced` (queries and database in the PCA space)
  the candidates come from there and are re-scored in the full space."""
  if reduced is not None:
    n = len(database)
    want = min(n, max(k, options.candidates))
    searcher = scann_searcher(reduced[1], want, reduced_options(options, n))
    cand, cand_scores = searcher.search_batched_parallel(
        reduced[0], final_num_neighbors=want,
        batch_size=options.batch_size)
    cand_scores = np.asarray(cand_scores).reshape(-1, want)
    return _rescore(queries, database,
                    np.asarray(cand, np.int64).reshape(-1, want),
                    np.isfinite(cand_scores), k)
  searcher = scann_searcher(database, k, options)
  indices, scores = searcher.search_batched_parallel(
      queries, final_num_neighbors=k, batch_size=options.batch_size)
  return (np.asarray(scores, np.float32).reshape(-1, k),
          np.asarray(indices, np.int64).reshape(-1, k))


# ----------------------------------------------------------------- public ----


def knn(queries, database, k: int, backend: str = "auto", *,
        chunk_bytes: int = 256 << 20, **scann_overrides
        ) -> tuple[np.ndarray, np.ndarray]:
  """Top-k database rows by inner product for every query.

  Args:
    queries: [Nq, D] float.
    database: [Nd, D] float.
    k: neighbours per query, 1 <= k <= Nd.
    backend: "exact", "scann" or "auto" (see the module docstring).
    chunk_bytes: exact backend: bytes of similarities held at once.
    **scann_overrides: fields of `ScannOptions`.

  Returns:
    scores [Nq, k] float32 and indices [Nq, k] int64, best first.
  """
  queries, database = _check_pair("queries", queries, "database", database, k)
  options = scann_options(scann_overrides)
  if _backend(backend, len(queries), len(database)) == "exact":
    return _exact_knn(queries, database, k, chunk_bytes)
  return _scann_knn(queries, database, k, options,
                    _reduction(options, queries, database))


def cross_topk(ground, satellite, k: int, backend: str = "auto", *,
               chunk_bytes: int = 256 << 20, **scann_overrides
               ) -> CrossNeighbours:
  """Each ground's top-k satellites and each satellite's nearest ground.

  The exact backend gets both directions from one chunked pass over
  ground @ satellite.T; ScaNN searches a satellite index with the grounds
  (k) and a ground index with the satellites (1).

  Args:
    ground: [Ng, D] float.
    satellite: [Ns, D] float.
    k: satellites per ground, 1 <= k <= Ns.
    backend: "exact", "scann" or "auto".
    chunk_bytes: exact backend: bytes of similarities held at once.
    **scann_overrides: fields of `ScannOptions`.

  Returns:
    A `CrossNeighbours` of NumPy arrays.
  """
  ground, satellite = _check_pair("ground", ground, "satellite", satellite, k)
  options = scann_options(scann_overrides)
  if _backend(backend, len(ground), len(satellite)) == "exact":
    return _exact_cross(ground, satellite, k, chunk_bytes)
  reduced = _reduction(options, ground, satellite)  # One basis for both.
  g_s, g_i = _scann_knn(ground, satellite, k, options, reduced)
  s_s, s_i = _scann_knn(satellite, ground, 1, options,
                        reduced and reduced[::-1])
  return CrossNeighbours(g_s, g_i, s_s[:, 0], s_i[:, 0])
