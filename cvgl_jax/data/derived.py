"""Folders a run derives inside a dataset root, stamped with what made them.

The BEV images (`root/g2a/`) and the fake satellite images
(`root/g2a_sat/`) are written into the dataset root, as the authors'
pipeline does, so several runs (other workdirs, other settings) see the
same folders. Each folder carries `MADE_BY.json`: the settings that made
its images (CFP's projection parameters; the generator that translated
them). A run whose settings differ, or a folder without a stamp (made by
an older version, or by a run killed while replacing it), is emptied and
rewritten; the same settings resume, keeping the images already written.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from cvgl_jax import parallel

STAMP = "MADE_BY.json"
VERSION = 1


def read_stamp(folder: str) -> dict | None:
  path = os.path.join(folder, STAMP)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError:
      return None


def claim(folder: str, made_by: Mapping[str, Any]) -> bool:
  """Makes `folder` hold only images made by `made_by` (call on one
  process, then let the others pass a barrier).

  Returns True when the folder's images were made with these settings and
  are kept (a resume), False when the folder was created or emptied.
  Order: the stamp goes first, then the images; an emptied folder gets
  its new stamp only after the old images are gone, so a kill in between
  leaves no stamp and the next run empties it again.
  """
  made_by = json.loads(json.dumps({"version": VERSION, **made_by}))
  found = read_stamp(folder)
  if found == made_by:
    return True
  if os.path.isdir(folder):
    names = [n for n in os.listdir(folder) if n != STAMP]
    if names:
      logging.warning(
          "%s holds %d images made by %s, not by this run's %s: replacing "
          "them.", folder, len(names), found or "an unknown run (no stamp)",
          made_by)
    stamp = os.path.join(folder, STAMP)
    if os.path.exists(stamp):
      os.remove(stamp)
    for name in names:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        os.remove(path)
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{STAMP}.tmp.{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(made_by, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(folder, STAMP))
  return False


def params_digest(params: Any) -> str:
  """A short hash of a param tree's values (which generator made a fake)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def first_missing(paths) -> int:
  """The index of the first of `paths` that does not exist (len(paths) when
  all do), the same on every process: process 0 looks and broadcasts, so
  that a file system that shows one host a file late cannot split the
  job's decision. Call on every process."""
  first = len(paths)
  if parallel.is_main_process():
    first = next((i for i, p in enumerate(paths)
                  if not os.path.exists(p)), len(paths))
  return int(parallel.from_main_process(np.int64(first)))


def check_all_written(paths, what: str) -> None:
  """Raises RuntimeError, on every process alike, unless every one of
  `paths` exists: the last check of a file stage before its DONE marker
  (each process wrote a share; a lost share must not pass as done).
  Call on every process after they have all written."""
  first = first_missing(paths)
  if first < len(paths):
    missing = sum(not os.path.exists(p) for p in paths[first:])
    raise RuntimeError(
        f"{missing} of {len(paths)} {what} are missing after the stage, the "
        f"first {os.fspath(paths[first])}: a process wrote less than its "
        f"share. Rerun the same command to write them.")
