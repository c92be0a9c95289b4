"""Choosing a dataset reader by name, and what the readers share.

`read_split("vigor", root, "test", mode="cross_area")` lets a config name a
dataset; each reader (`cvusa.read`, `cvact.read`, `vigor.read`) returns a
`PairIndex`. The helpers below give all readers one behaviour on bad input:

- a missing root, split file or folder raises `FileNotFoundError` naming the
  path and showing the expected layout;
- a malformed line raises `ValueError` naming `file:line` and what was
  expected;
- image files named by a split but absent on disk are found with one
  directory listing per folder (100k files cost a few listings, not 100k
  `stat` calls), counted and logged; if more than `max_missing_fraction` of
  the image files a split names are missing the reader fails naming how many
  and which, otherwise the affected pairs are dropped.

All these checks run before any image is decoded.
"""

from __future__ import annotations

import importlib
import os
from typing import Iterable, Iterator, Sequence

from absl import logging
import numpy as np

from cvgl_jax.data import index

# Public copies of CVACT are known to lack a few images and the public loaders
# skip them; a partly unpacked archive or a wrong root misses far more. 1% of
# the CVACT test split is 928 images: it accepts the copies people train on
# and rejects the broken ones.
DEFAULT_MAX_MISSING_FRACTION = 0.01

# How many missing file names a log line or an error message lists.
_NUM_LISTED = 10

_READERS = {
    "cvusa": "cvgl_jax.data.cvusa",
    "cvact": "cvgl_jax.data.cvact",
    "vigor": "cvgl_jax.data.vigor",
}


class DatasetError(ValueError):
  """The files on disk do not make the split the config names (layout,
  index files, missing images): the message names the file and what was
  expected. A user's situation, not a bug: `main` prints it, exit 2."""


def read_split(dataset: str, root: str, split: str,
               **options) -> index.PairIndex:
  """Reads one split of a dataset named in a config.

  Args:
    dataset: "cvusa", "cvact" or "vigor".
    root: the dataset's unpacked folder (docs/FORMATS.md).
    split: "train" / "val" (CVUSA), "train" / "val" / "test" (CVACT),
      "train" / "test" (VIGOR).
    **options: passed to the reader, e.g. `mode="same_area"` and `cities=`
      for VIGOR, `max_missing_fraction=` for all.

  Returns:
    The split's PairIndex.

  Raises:
    DatasetError: what the reader found wrong (its FileNotFoundError,
      ValueError or KeyError, with the same message).
  """
  if dataset not in _READERS:
    raise DatasetError(f"Unknown dataset {dataset!r}; expected one of "
                       f"{sorted(_READERS)}.")
  # Imported here because the readers import the helpers of this module.
  module = importlib.import_module(_READERS[dataset])
  try:
    return module.read(root, split, **options)
  except (OSError, ValueError, KeyError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise DatasetError(f"{dataset} {split!r} split under {root}: "
                       f"{message}") from e


def check_fraction(max_missing_fraction: float) -> None:
  if not 0.0 <= max_missing_fraction <= 1.0:
    raise ValueError(f"max_missing_fraction must lie in [0, 1], got "
                     f"{max_missing_fraction}.")


def _found_near(path: str) -> str:
  """What the nearest existing folder above `path` holds, for messages."""
  folder = os.path.dirname(os.path.abspath(path))
  while folder and not os.path.isdir(folder):
    parent = os.path.dirname(folder)
    if parent == folder:
      return ""
    folder = parent
  try:
    names = sorted(os.listdir(folder))
  except OSError:
    return ""
  shown = ", ".join(n + ("/" if os.path.isdir(os.path.join(folder, n))
                         else "") for n in names[:_NUM_LISTED])
  more = f", ... ({len(names)} entries)" if len(names) > _NUM_LISTED else ""
  return f"\nFound in {folder}: {shown or '(nothing)'}{more}"


def require_dir(path: str, what: str, layout: str) -> None:
  """Raises FileNotFoundError unless `path` is a directory."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} {path} is not a directory. Expected "
                            f"layout:\n{layout}{_found_near(path)}")


def require_file(path: str, what: str, layout: str) -> None:
  """Raises FileNotFoundError unless `path` is a file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} does not exist. Expected "
                            f"layout:\n{layout}{_found_near(path)}")


def read_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, stripped text) of the non-blank lines."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      line = line.strip()
      if line:
        yield number, line


def list_folders(folders: Iterable[str], layout: str) -> dict[str, set[str]]:
  """{folder: set of entry names}, one `os.scandir` per folder.

  Raises FileNotFoundError naming the folder and the layout if a folder
  does not exist.
  """
  listing = {}
  for folder in folders:
    require_dir(folder, "Image folder", layout)
    with os.scandir(folder) as entries:
      listing[folder] = {e.name for e in entries}
  return listing


def missing_mask(paths: Sequence[str], layout: str) -> np.ndarray:
  """[len(paths)] bool: which files are absent, by folder listings."""
  split = [os.path.split(p) for p in paths]
  listing = list_folders(sorted({d for d, _ in split}), layout)
  return np.array([n not in listing[d] for d, n in split], dtype=bool)


def report_missing(name: str, missing: Sequence[str], total: int,
                   max_missing_fraction: float) -> None:
  """Logs the missing files; raises if they exceed the allowed fraction.

  Args:
    name: the split, e.g. "cvact/test", for the messages.
    missing: paths of the image files the split names but the disk lacks.
    total: how many image files the split names.
    max_missing_fraction: the largest tolerated `len(missing) / total`.
  """
  if not missing:
    return
  fraction = len(missing) / max(total, 1)
  listed = ", ".join(missing[:_NUM_LISTED])
  more = (f" and {len(missing) - _NUM_LISTED} more"
          if len(missing) > _NUM_LISTED else "")
  message = (f"{name}: {len(missing)} of {total} image files are missing "
             f"({fraction:.2%}): {listed}{more}")
  if fraction > max_missing_fraction:
    raise FileNotFoundError(f"{message}. That is more than "
                            f"max_missing_fraction={max_missing_fraction}; "
                            f"check the dataset root or raise the limit.")
  logging.warning("%s. Dropping the pairs that need them.", message)


def complete_pairs(name: str, ground_paths: Sequence[str],
                   satellite_paths: Sequence[str], layout: str,
                   max_missing_fraction: float) -> np.ndarray:
  """[N] bool: pairs i whose two files both exist (one-to-one layouts).

  Missing files are reported (and fail above the fraction) by
  `report_missing`; a pair missing either file is dropped whole, so the
  pairing stays one-to-one.
  """
  ground_missing = missing_mask(ground_paths, layout)
  satellite_missing = missing_mask(satellite_paths, layout)
  missing = ([p for p, m in zip(ground_paths, ground_missing) if m] +
             [p for p, m in zip(satellite_paths, satellite_missing) if m])
  report_missing(name, missing, len(ground_paths) + len(satellite_paths),
                 max_missing_fraction)
  return ~(ground_missing | satellite_missing)


def check_ids(name: str, ids: Sequence[str], paths: Sequence[str]) -> None:
  """Ids must be usable as file stems and name one file each.

  `PairIndex.derived_paths` writes `<folder>/<id>.png`, so an id with a path
  separator would escape the folder, and two files with one id would
  overwrite each other's derived image.
  """
  seen = {}
  for i, p in zip(ids, paths):
    if not i or i in (".", "..") or "/" in i or os.sep in i or "\0" in i:
      raise ValueError(f"{name}: id {i!r} of {p} cannot be used as a file "
                       f"stem.")
    other = seen.setdefault(i, p)
    if other != p:
      raise ValueError(f"{name}: id {i!r} names two different files, "
                       f"{other} and {p}.")

