"""Reader of CVACT (docs/FORMATS.md).

Train and val come from `ACT_data.mat`: `panoIds` (N ids), `utm` (N x 2
metres) and the structs `trainSet` / `valSet`, whose second field holds
1-based indices into `panoIds` -- the public loaders read them as
`mat['trainSet'][0][0][1] - 1`. Their images live in `ANU_data_small/`
(some copies drop that level and keep `streetview/` and `satview_polish/`
directly under the root). Test is the whole `ANU_data_test/` folder, paired
by id; its UTM coordinates come from `ACT_data.mat` when the file is there
and lists the id (NaN otherwise).

The satellite tile of a pair is centred on its panorama, so both sides get
the same coordinates. UTM columns are passed on in the order the .mat file
stores them.
"""

from __future__ import annotations

import os
from typing import Optional

from absl import logging
import numpy as np
import scipy.io

from cvgl_jax.data import index
from cvgl_jax.data import readers

LAYOUT = """ROOT/
  ACT_data.mat      panoIds (N ids), utm (N x 2), trainSet / valSet (structs
                    whose second field holds 1-based indices into panoIds)
  ANU_data_small/streetview/<id>_grdView.jpg            (train, val)
  ANU_data_small/satview_polish/<id>_satView_polish.jpg
    (or streetview/ and satview_polish/ directly under ROOT)
  ANU_data_test/streetview/<id>_grdView.jpg             (test)
  ANU_data_test/satview_polish/<id>_satView_polish.jpg"""

MAT_FILE = "ACT_data.mat"
GROUND_SUFFIX = "_grdView.jpg"
SATELLITE_SUFFIX = "_satView_polish.jpg"
_SETS = {"train": "trainSet", "val": "valSet"}
_UTM_MAX_M = 1e7


def read(root: str, split: str, *,
         max_missing_fraction: float = readers.DEFAULT_MAX_MISSING_FRACTION
         ) -> index.PairIndex:
  """Reads one CVACT split.

  Args:
    root: the CVACT folder.
    split: "train", "val" or "test".
    max_missing_fraction: the largest tolerated fraction of the split's
      image files (panoramas + tiles) absent on disk; a pair with either
      file missing is dropped.

  Returns:
    PairIndex with Q = R pairs, `positive = arange(Q)`, ids the panorama
    ids, UTM coordinates (coord_kind "utm"; for test without ACT_data.mat,
    none).
  """
  if split not in ("train", "val", "test"):
    raise ValueError(f"CVACT split must be 'train', 'val' or 'test', got "
                     f"{split!r}.")
  readers.check_fraction(max_missing_fraction)
  root = os.path.abspath(root)
  readers.require_dir(root, "CVACT root", LAYOUT)
  name = f"cvact/{split}"
  if split == "test":
    ids, coords, folder = _test_ids(root)
  else:
    ids, coords = _mat_split(root, split)
    folder = os.path.join(root, "ANU_data_small")
    if not os.path.isdir(folder):
      folder = root
  if not ids:
    raise ValueError(f"{name}: the split lists no pairs. Expected layout:\n"
                     f"{LAYOUT}")
  ground_paths = [os.path.join(folder, "streetview", i + GROUND_SUFFIX)
                  for i in ids]
  sat_paths = [os.path.join(folder, "satview_polish", i + SATELLITE_SUFFIX)
               for i in ids]
  readers.check_ids(name, ids, ground_paths)

  keep = readers.complete_pairs(name, ground_paths, sat_paths, LAYOUT,
                                max_missing_fraction)

  ids = np.array(ids)[keep]
  if coords is not None:
    coords = coords[keep]
  return index.PairIndex(
      name=name,
      root=root,
      ground_paths=np.array(ground_paths)[keep],
      ground_ids=ids,
      satellite_paths=np.array(sat_paths)[keep],
      satellite_ids=ids.copy(),
      positive=np.arange(len(ids), dtype=np.int64),
      ground_coords=coords,
      satellite_coords=None if coords is None else coords.copy(),
      coord_kind="" if coords is None else "utm",
  )


def _load_mat(path: str) -> dict:
  """ACT_data.mat with `panoIds` as [N] str and `utm` as [N, 2] float64."""
  try:
    mat = scipy.io.loadmat(path)
  except (ValueError, TypeError, NotImplementedError) as e:
    raise ValueError(f"{path} cannot be read by scipy.io.loadmat ({e}); "
                     f"expected a MATLAB v5 file. Expected layout:\n"
                     f"{LAYOUT}") from e
  for field in ("panoIds", "utm"):
    if field not in mat:
      raise KeyError(f"{path} has no field {field!r} (it has "
                     f"{sorted(k for k in mat if not k.startswith('__'))}). "
                     f"Expected layout:\n{LAYOUT}")
  ids = _strings(mat["panoIds"], path)
  utm = np.asarray(mat["utm"])
  if utm.dtype.kind not in "iuf" or utm.shape != (len(ids), 2):
    raise ValueError(f"{path}: field 'utm' must be a numeric "
                     f"[{len(ids)}, 2] array (one row per panoId), got "
                     f"{utm.dtype} {utm.shape}.")
  # A damaged file can load without error: values out of any UTM zone's
  # range (northing < 10,000 km, easting < 1,000 km) or repeated ids say so.
  bad = ~np.isfinite(utm) | (np.abs(utm) > _UTM_MAX_M)
  if bad.any():
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    raise ValueError(f"{path}: field 'utm' has {int(bad.any(axis=1).sum())} "
                     f"rows that are not UTM metres (non-finite or beyond "
                     f"{_UTM_MAX_M:.0e} m), first row {row} "
                     f"({ids[row]}): {utm[row].tolist()}. The file is "
                     f"damaged; copy it again.")
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"{path}: field 'panoIds' repeats "
                     f"{int((counts > 1).sum())} ids, e.g. "
                     f"{unique[counts > 1][0]!r}. The file is damaged; copy "
                     f"it again.")
  mat["panoIds"] = ids
  mat["utm"] = utm.astype(np.float64)
  return mat


def _strings(value: np.ndarray, path: str) -> list[str]:
  """panoIds as a list of str: a MATLAB char matrix loads as [N] padded
  strings, a cell array as an object array of 1-element string arrays."""
  out = []
  for item in np.asarray(value).ravel():
    while isinstance(item, np.ndarray) and item.dtype == object:
      item = item.ravel()[0] if item.size == 1 else None
    if isinstance(item, np.ndarray) and item.size == 1:
      item = item.ravel()[0]
    if not isinstance(item, str):
      raise ValueError(f"{path}: field 'panoIds' must hold strings, got "
                       f"{item!r}.")
    out.append(item.strip())
  return out


def _mat_split(root: str, split: str) -> tuple[list[str], np.ndarray]:
  """Ids [Q] and UTM [Q, 2] of the train or val split."""
  path = os.path.join(root, MAT_FILE)
  readers.require_file(path, "CVACT index", LAYOUT)
  mat = _load_mat(path)
  field = _SETS[split]
  if field not in mat:
    raise KeyError(f"{path} has no field {field!r}. Expected layout:\n"
                   f"{LAYOUT}")
  idx = _set_indices(mat, field, path)
  other = _SETS["val" if split == "train" else "train"]
  if other in mat:
    shared = np.intersect1d(idx, _set_indices(mat, other, path))
    if len(shared):
      raise ValueError(f"{path}: trainSet and valSet share {len(shared)} "
                       f"panoramas (e.g. {mat['panoIds'][shared[0]]}); they "
                       f"must be disjoint. The file is damaged; copy it "
                       f"again.")
  ids = [mat["panoIds"][i] for i in idx]
  return ids, mat["utm"][idx]


def _set_indices(mat: dict, field: str, path: str) -> np.ndarray:
  """0-based indices into panoIds of the struct `field` (trainSet, valSet)."""
  struct = mat[field]
  if (struct.dtype.names is None or len(struct.dtype.names) < 2
      or struct.size < 1):
    raise ValueError(f"{path}: field {field!r} must be a MATLAB struct whose "
                     f"second field holds 1-based indices into panoIds, got "
                     f"{struct.dtype} {struct.shape}.")
  raw = np.asarray(struct[0][0][1])
  n = len(mat["panoIds"])
  if (raw.dtype.kind not in "iuf" or raw.size == 0
      or not np.all(raw == np.round(raw)) or raw.min() < 1 or raw.max() > n):
    raise ValueError(f"{path}: {field}.{struct.dtype.names[1]} must hold "
                     f"1-based integer indices into panoIds in [1, {n}], got "
                     f"{raw.dtype} {raw.shape}"
                     + (f" in [{raw.min()}, {raw.max()}]."
                        if raw.size and raw.dtype.kind in "iuf" else "."))
  return raw.astype(np.int64).ravel() - 1


def _test_ids(root: str
              ) -> tuple[list[str], Optional[np.ndarray], str]:
  """Ids of every panorama or tile in ANU_data_test, their UTM, the folder.

  An id with only one of its two files appears once, so the missing-file
  check counts its partner as missing.
  """
  folder = os.path.join(root, "ANU_data_test")
  readers.require_dir(folder, "CVACT test folder", LAYOUT)
  listing = readers.list_folders(
      [os.path.join(folder, "streetview"),
       os.path.join(folder, "satview_polish")], LAYOUT)
  grounds, sats = listing.values()
  ids = sorted({n[:-len(GROUND_SUFFIX)] for n in grounds
                if n.endswith(GROUND_SUFFIX)}
               | {n[:-len(SATELLITE_SUFFIX)] for n in sats
                  if n.endswith(SATELLITE_SUFFIX)})
  path = os.path.join(root, MAT_FILE)
  if not os.path.isfile(path):
    logging.warning("cvact/test: %s not found; the split has no "
                    "coordinates.", path)
    return ids, None, folder
  mat = _load_mat(path)
  row = {i: r for r, i in enumerate(mat["panoIds"])}
  coords = np.full((len(ids), 2), np.nan)
  found = np.array([i in row for i in ids], dtype=bool)
  coords[found] = mat["utm"][[row[i] for i, f in zip(ids, found) if f]]
  if not found.all():
    logging.warning("cvact/test: %d of %d ids are not in %s; their "
                    "coordinates are NaN.", (~found).sum(), len(ids), path)
  return ids, coords, folder
