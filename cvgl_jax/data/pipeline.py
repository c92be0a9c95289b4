"""grain input pipelines for each kind of stage; numpy batches per host.

Hosts only decode (cv2, RGB) and resize; every random augmentation runs on
device (`cvgl_jax.data.augment`). So a host pipeline is a deterministic
function of (seed, epoch, process, pairing): it reads rows of an epoch
table, decodes the images each row names, and batches them.

  intra_view    one image of the ground pile and/or one of the satellite
                pile per row (the device makes two views of each);
  cross_view    a panorama and its fake satellite image
                (`PairIndex.derived_paths("g2a_sat")`);
  pseudo_pairs  a panorama and the satellite tile its current pseudo label
                names; the pairing is handed in per epoch;
  evaluation    every image of a pile exactly once across processes, padded
                batches with a validity mask and the image's index.

Training epochs: one global permutation per (seed, epoch), the same on every
process, cut into global batches of batch_size x P rows (the remainder is
dropped); process p takes block p of each global batch. `parallel.to_global`
puts process p's rows after those of processes 0 .. p-1, so a global batch
holds the same rows in the same order for any number of processes, and a
run on 2 processes x 2 devices computes what 1 process x 4 devices does.

The grain Dataset API (MapDataset -> IterDataset) is used rather than
DataLoader: an epoch's table changes with the pseudo pairing, slicing by
process is one line, and its iterators have JSON-able dict states.
`TrainIterator` wraps one epoch's grain iterator; its state holds the epoch,
the seed and the pairing as well, so an orbax restore
(`grain.checkpoint.CheckpointRestore`) lands on the same epoch, pairing and
position without the training loop saving the pairing itself:

  it = pipe.iterator(epoch=0, pairs=pairs0)      # pairs: pseudo_pairs only
  if mngr.latest_step() is not None:             # it.epoch, it.pairs restored
    mngr.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(it), ...))
  for epoch in range(it.epoch, num_epochs):
    if epoch != it.epoch:
      it.set_epoch(epoch, pairs=new_pairs, labeled=new_labeled)
    for batch in it: ...                         # stops at the epoch's end

Decoding runs in grain's reader threads (cv2 releases the GIL while it
decodes and resizes), so no worker processes are needed.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import zlib
from typing import Callable, Optional, Sequence

import cv2
import grain
import jax
import numpy as np

from cvgl_jax.data import image_io
from cvgl_jax.data.index import PairIndex


# Decode threads per local device that `decode_threads` allows at most: a
# device step takes longer than 16 images' decode (BUILD_NOTES.md).
_MAX_THREADS_PER_DEVICE = 16


def decode_threads(requested: int = 0) -> int:
  """Host threads that read and decode images in this process.

  `requested` > 0 is taken as is; 0 (`config.data.num_threads`'s default)
  gives the cores this process may run on (`os.sched_getaffinity`: what
  SLURM's --cpus-per-task or taskset leave it, not the node's count) less
  one for the training loop, at most 16 per local device, at least 1.
  """
  if requested > 0:
    return int(requested)
  cores = len(os.sched_getaffinity(0)) if hasattr(
      os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(cores - 1,
                    _MAX_THREADS_PER_DEVICE * jax.local_device_count()))


def _read_options(num_threads: int, prefetch_buffer_size: int):
  threads = decode_threads(num_threads)
  if threads > 1:
    # OpenCV's own thread pool inside every decode thread oversubscribes
    # the cores; the parallelism is the decode threads'.
    cv2.setNumThreads(1)
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=prefetch_buffer_size)


def decode(path: str, size: Sequence[int]) -> np.ndarray:
  """Reads an image file as [H, W, 3] uint8 RGB resized to size (H, W)."""
  return image_io.resize(image_io.read_rgb(path), size)


def _check_size(name: str, size) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in size)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be (height, width), got {size!r}.") from None
  if h <= 0 or w <= 0:
    raise ValueError(f"{name} must be positive (height, width), got {size}.")
  return h, w


def _process(process_index, process_count) -> tuple[int, int]:
  p = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= p < n:
    raise ValueError(f"process_index {p} must lie in [0, process_count={n}).")
  return p, n


def _check_batch_size(batch_size) -> int:
  if int(batch_size) <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  return int(batch_size)


@dataclasses.dataclass(frozen=True)
class _Column:
  """One image per row: batch[key] from paths[row[col]], and the index as
  batch[index_key] unless that is empty."""
  key: str
  paths: np.ndarray
  size: tuple[int, int]
  index_key: str = ""


def _encode_pairs(rows: Optional[np.ndarray]) -> str:
  if rows is None:
    return ""
  data = zlib.compress(np.ascontiguousarray(rows, "<i4").tobytes())
  return base64.b64encode(data).decode("ascii")


def _decode_pairs(text: str) -> Optional[np.ndarray]:
  if not text:
    return None
  data = zlib.decompress(base64.b64decode(text))
  return np.frombuffer(data, "<i4").reshape(-1, 3).copy()


class TrainIterator(grain.DatasetIterator):
  """Batches of one epoch of a `TrainPipeline`; checkpointable with orbax.

  Iterating stops at the end of the epoch; `set_epoch` starts another one
  (with a new pairing for `pseudo_pairs`). `get_state` / `set_state` cover
  the epoch, the pairing and the position inside the epoch.
  """

  def __init__(self, pipeline: TrainPipeline, epoch: int,
               rows: Optional[np.ndarray]):
    super().__init__()
    self._pipeline = pipeline
    self._inner = None
    self._start(epoch, rows)

  def _start(self, epoch: int, rows: Optional[np.ndarray]):
    if self._inner is not None:
      self._inner.close()
    self._epoch, self._rows = epoch, rows
    self._inner = iter(self._pipeline.epoch_dataset(epoch, rows))

  @property
  def epoch(self) -> int:
    return self._epoch

  @property
  def pairs(self) -> Optional[np.ndarray]:
    """[M, 2] (ground, satellite) of this epoch; None but for pseudo pairs."""
    return None if self._rows is None else self._rows[:, :2].copy()

  @property
  def labeled(self) -> Optional[np.ndarray]:
    """[M] bool of this epoch; None but for pseudo pairs."""
    return None if self._rows is None else self._rows[:, 2].astype(bool)

  @property
  def steps_per_epoch(self) -> int:
    return self._pipeline.steps_per_epoch(self._rows)

  def set_epoch(self, epoch: int, pairs: Optional[np.ndarray] = None,
                labeled: Optional[np.ndarray] = None) -> None:
    """Starts `epoch` from its first batch (pairs / labeled: see
    `pseudo_pairs`)."""
    self._start(epoch, self._pipeline.check_pairs(pairs, labeled))

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._inner)

  def get_state(self) -> dict:
    return {"seed": self._pipeline.seed, "epoch": self._epoch,
            "pairs": _encode_pairs(self._rows),
            "inner": self._inner.get_state()}

  def set_state(self, state: dict) -> None:
    if state["seed"] != self._pipeline.seed:
      raise ValueError(f"Iterator state was written with seed "
                       f"{state['seed']}, this pipeline has seed "
                       f"{self._pipeline.seed}.")
    rows = _decode_pairs(state["pairs"])
    self._pipeline.check_rows(rows)
    self._start(int(state["epoch"]), rows)
    self._inner.set_state(state["inner"])

  def start_prefetch(self) -> None:
    self._inner.start_prefetch()

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()
    super().close()


class TrainPipeline:
  """Shuffled, process-sharded, drop-remainder batches; see the module doc.

  Built by `intra_view`, `cross_view` or `pseudo_pairs`.
  """

  def __init__(self, columns: Sequence[_Column],
               make_rows: Callable[[np.random.Generator, Optional[np.ndarray]],
                                   np.ndarray],
               *, batch_size: int, seed: int, num_rows: Optional[int],
               process_index: Optional[int], process_count: Optional[int],
               num_threads: int, prefetch_buffer_size: int):
    self.columns = tuple(columns)
    self._make_rows = make_rows
    self.batch_size = _check_batch_size(batch_size)
    self.seed = int(seed)
    # None: the rows are the pairing handed in per epoch (pseudo_pairs).
    self.num_rows = num_rows
    self.needs_pairs = num_rows is None
    self.process_index, self.process_count = _process(process_index,
                                                      process_count)
    self._read = _read_options(num_threads, prefetch_buffer_size)

  # Validation of the per-epoch pairing.

  def check_pairs(self, pairs, labeled) -> Optional[np.ndarray]:
    """[M, 2] pairs (+ [M] labeled) -> [M, 3] int32 rows, or None."""
    if not self.needs_pairs:
      if pairs is not None or labeled is not None:
        raise ValueError("pairs / labeled are for pseudo_pairs pipelines "
                         "only; this pipeline pairs images itself.")
      return None
    if pairs is None:
      raise ValueError("pseudo_pairs needs this epoch's pairs: an [M, 2] "
                       "int array of (ground index, satellite index).")
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(
        pairs.dtype, np.integer):
      raise ValueError(f"pairs must be an [M, 2] int array, got "
                       f"{pairs.dtype} {pairs.shape}.")
    if labeled is None:
      labeled = np.ones(len(pairs), bool)
    labeled = np.asarray(labeled)
    if labeled.shape != (len(pairs),) or labeled.dtype != bool:
      raise ValueError(f"labeled must be a [{len(pairs)}] bool array, got "
                       f"{labeled.dtype} {labeled.shape}.")
    rows = np.concatenate([pairs, labeled[:, None]], axis=1).astype(np.int32)
    self.check_rows(rows)
    return rows

  def check_rows(self, rows: Optional[np.ndarray]) -> None:
    if (rows is None) != (not self.needs_pairs):
      raise ValueError("Iterator state and pipeline disagree on whether the "
                       "epochs have a pairing (pseudo_pairs or not).")
    if rows is None:
      return
    for col, name in ((0, "ground"), (1, "satellite")):
      n = len(self.columns[col].paths)
      if rows.size and (rows[:, col].min() < 0 or rows[:, col].max() >= n):
        raise ValueError(f"pairs: {name} indices must lie in [0, {n}), got "
                         f"[{rows[:, col].min()}, {rows[:, col].max()}].")
    self.steps_per_epoch(rows)

  # Epochs.

  def _epoch_rows(self, epoch: int, rows: Optional[np.ndarray]) -> np.ndarray:
    if int(epoch) < 0:
      raise ValueError(f"epoch must be >= 0, got {epoch}.")
    rng = np.random.default_rng([self.seed, int(epoch)])
    table = self._make_rows(rng, rows)
    steps = self.steps_per_epoch(rows)
    b, p, n = self.batch_size, self.process_index, self.process_count
    blocks = table[:steps * n * b].reshape(steps, n, b, *table.shape[1:])
    return blocks[:, p].reshape(steps * b, *table.shape[1:])

  def steps_per_epoch(self, rows: Optional[np.ndarray] = None) -> int:
    """Batches per epoch, the same on every process (rows: the pairing's
    [M, 3] rows for pseudo_pairs)."""
    return self.steps_for_rows(len(rows) if self.needs_pairs
                               else self.num_rows)

  def steps_for_rows(self, num_rows: int) -> int:
    """Batches in an epoch of `num_rows` rows (all processes together); a
    pseudo_pairs stage knows its epochs' length before their pairing."""
    global_batch = self.batch_size * self.process_count
    if num_rows < global_batch:
      raise ValueError(f"An epoch has {num_rows} rows, fewer than one global "
                       f"batch of {global_batch} (batch_size "
                       f"{self.batch_size} x {self.process_count} processes).")
    return num_rows // global_batch

  def _load(self, row: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for col, c in enumerate(self.columns):
      i = int(row[col])
      out[c.key] = decode(c.paths[i], c.size)
      if c.index_key:
        out[c.index_key] = np.int32(i)
    if self.needs_pairs:
      out["labeled"] = np.bool_(row[2])
    return out

  def epoch_dataset(self, epoch: int,
                    rows: Optional[np.ndarray]) -> grain.IterDataset:
    """This process's batches of `epoch` as a grain IterDataset."""
    return (grain.MapDataset.source(self._epoch_rows(epoch, rows))
            .map(self._load)
            .to_iter_dataset(self._read)
            .batch(self.batch_size, drop_remainder=True))

  def iterator(self, epoch: int = 0, pairs: Optional[np.ndarray] = None,
               labeled: Optional[np.ndarray] = None) -> TrainIterator:
    """A checkpointable iterator positioned at the start of `epoch`."""
    return TrainIterator(self, int(epoch), self.check_pairs(pairs, labeled))


def _pile_column(index: PairIndex, pile: str, size) -> _Column:
  if pile == "ground":
    return _Column("ground", np.asarray(index.ground_paths),
                   _check_size("ground_size", size), "ground_index")
  if pile == "satellite":
    return _Column("satellite", np.asarray(index.satellite_paths),
                   _check_size("satellite_size", size), "satellite_index")
  raise ValueError(f"Unknown pile {pile!r}; expected 'ground' or "
                   f"'satellite'.")


def _permutations(rng: np.random.Generator, n: int, length: int):
  """`length` indices of [0, n): concatenated fresh permutations."""
  reps = -(-length // n)
  return np.concatenate([rng.permutation(n) for _ in range(reps)])[:length]


def intra_view(index: PairIndex, *, ground_size=None, satellite_size=None,
               batch_size: int, seed: int,
               piles: Sequence[str] = ("ground", "satellite"),
               process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_threads: int = 8,
               prefetch_buffer_size: int = 256) -> TrainPipeline:
  """Stage 1: one image of each pile per row; the device makes two views.

  With both piles an epoch has max(Q, R) rows; each pile is an independent
  permutation, the shorter one continued with further permutations.
  Batches: {pile: [B, H, W, 3] uint8, pile + "_index": [B] int32} per pile.
  """
  piles = tuple(piles)
  if not piles or len(set(piles)) != len(piles):
    raise ValueError(f"piles must name 'ground' and/or 'satellite' once, "
                     f"got {piles}.")
  sizes = {"ground": ground_size, "satellite": satellite_size}
  columns = [_pile_column(index, p, sizes[p]) for p in piles]
  for c in columns:
    if not len(c.paths):
      raise ValueError(f"PairIndex {index.name!r} has no {c.key} images.")
  length = max(len(c.paths) for c in columns)

  def make_rows(rng, rows):
    del rows
    return np.stack([_permutations(rng, len(c.paths), length)
                     for c in columns], axis=1)

  return TrainPipeline(columns, make_rows, batch_size=batch_size, seed=seed,
                       num_rows=length, process_index=process_index,
                       process_count=process_count, num_threads=num_threads,
                       prefetch_buffer_size=prefetch_buffer_size)


def cross_view(index: PairIndex, *, ground_size, satellite_size,
               batch_size: int, seed: int, fake_folder: str = "g2a_sat",
               fake_suffix: str = ".png",
               process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_threads: int = 8,
               prefetch_buffer_size: int = 256) -> TrainPipeline:
  """Stage 2: each panorama with its own fake satellite image.

  Batches: {"ground": [B, H, W, 3], "satellite": [B, S, S, 3] uint8 (the
  fake), "ground_index": [B] int32}.
  """
  folder = os.path.join(index.root, fake_folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Fake satellite folder {folder} does not exist;"
                            f" run the CFP translation stage first.")
  fakes = index.derived_paths(fake_folder, fake_suffix)
  columns = [_pile_column(index, "ground", ground_size),
             _Column("satellite", fakes,
                     _check_size("satellite_size", satellite_size))]
  # The fake's index is the panorama's: no "satellite_index".
  n = index.num_ground

  def make_rows(rng, rows):
    del rows
    perm = rng.permutation(n)
    return np.stack([perm, perm], axis=1)

  return TrainPipeline(columns, make_rows, batch_size=batch_size, seed=seed,
                       num_rows=n, process_index=process_index,
                       process_count=process_count, num_threads=num_threads,
                       prefetch_buffer_size=prefetch_buffer_size)


def pseudo_pairs(index: PairIndex, *, ground_size, satellite_size,
                 batch_size: int, seed: int,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None, num_threads: int = 8,
                 prefetch_buffer_size: int = 256) -> TrainPipeline:
  """Stage 3: panoramas with the satellite tiles their pseudo labels name.

  Each epoch gets its pairing: `pipe.iterator(epoch, pairs, labeled)` or
  `it.set_epoch(epoch, pairs, labeled)`, pairs [M, 2] int (ground index,
  satellite index), labeled [M] bool (default all True: False marks a
  filler satellite the partial-label loss treats as "no match"). The epoch
  shuffles these M rows; repeat rows to fill an epoch. Batches: {"ground",
  "satellite": uint8 images, "ground_index", "satellite_index": [B] int32,
  "labeled": [B] bool}.
  """
  columns = [_pile_column(index, "ground", ground_size),
             _pile_column(index, "satellite", satellite_size)]

  def make_rows(rng, rows):
    return rows[rng.permutation(len(rows))]

  return TrainPipeline(columns, make_rows, batch_size=batch_size, seed=seed,
                       num_rows=None, process_index=process_index,
                       process_count=process_count, num_threads=num_threads,
                       prefetch_buffer_size=prefetch_buffer_size)


class EvalPipeline:
  """Every image of a pile once across processes, in padded batches.

  Process p reads the contiguous block p of ceil(N / P) images; every
  process yields `num_batches` batches {"image": [B, H, W, 3] uint8,
  "index": [B] int32 (-1 for padding), "mask": [B] bool (False for
  padding, whose image is zeros)}.
  """

  def __init__(self, paths: Sequence[str], *, size, batch_size: int,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_threads: int = 8,
               prefetch_buffer_size: int = 256):
    self.paths = np.asarray(paths)
    if not len(self.paths):
      raise ValueError("EvalPipeline needs at least one image path.")
    self.size = _check_size("size", size)
    self.batch_size = _check_batch_size(batch_size)
    p, n = _process(process_index, process_count)
    per = -(-len(self.paths) // n)
    mine = np.arange(p * per, min(len(self.paths), (p + 1) * per))
    self.num_batches = max(1, -(-per // self.batch_size))
    self.indices = np.full(self.num_batches * self.batch_size, -1, np.int32)
    self.indices[:len(mine)] = mine
    self._read = _read_options(num_threads, prefetch_buffer_size)

  def _load(self, i) -> dict[str, np.ndarray]:
    i = int(i)
    if i < 0:
      image = np.zeros((*self.size, 3), np.uint8)
    else:
      image = decode(self.paths[i], self.size)
    return {"image": image, "index": np.int32(i), "mask": np.bool_(i >= 0)}

  def dataset(self) -> grain.IterDataset:
    return (grain.MapDataset.source(self.indices).map(self._load)
            .to_iter_dataset(self._read).batch(self.batch_size))

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset())


def evaluation(paths: Sequence[str], *, size, batch_size: int,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None,
               num_threads: int = 8) -> EvalPipeline:
  """Evaluation / embedding pipeline over one pile (e.g.
  `index.ground_paths` or `index.satellite_paths`); see `EvalPipeline`."""
  return EvalPipeline(paths, size=size, batch_size=batch_size,
                      process_index=process_index,
                      process_count=process_count, num_threads=num_threads)
