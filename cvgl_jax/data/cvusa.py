"""Reader of CVUSA in its "19zl" layout (docs/FORMATS.md).

Each line of `splits/{train,val}-19zl.csv` is `satellite path,panorama
path,annotation path` relative to the root; line i gives pair i, so
satellite i is the positive of panorama i. The pair id is the panorama's
numeric file stem. CVUSA has no coordinates. The validation split is the
test split of every paper since 2019.
"""

from __future__ import annotations

import os

import numpy as np

from cvgl_jax.data import index
from cvgl_jax.data import readers

LAYOUT = """ROOT/
  splits/train-19zl.csv   lines 'bingmap/19/<id>.jpg,streetview/panos/<id>.jpg,
  splits/val-19zl.csv            streetview/annotations/<id>.png'
                          (paths relative to ROOT, no header)
  bingmap/19/<id>.jpg     satellite tiles
  streetview/panos/<id>.jpg  panoramas"""

SPLIT_FILES = {
    "train": os.path.join("splits", "train-19zl.csv"),
    "val": os.path.join("splits", "val-19zl.csv"),
}


def read(root: str, split: str, *,
         max_missing_fraction: float = readers.DEFAULT_MAX_MISSING_FRACTION
         ) -> index.PairIndex:
  """Reads one CVUSA split.

  Args:
    root: the CVUSA folder.
    split: "train" or "val".
    max_missing_fraction: the largest tolerated fraction of the split's
      image files (panoramas + tiles) absent on disk; a pair with either
      file missing is dropped.

  Returns:
    PairIndex with Q = R pairs, `positive = arange(Q)`, ids the numeric
    stems, no coordinates.
  """
  if split not in SPLIT_FILES:
    raise ValueError(f"CVUSA split must be one of {sorted(SPLIT_FILES)}, "
                     f"got {split!r}.")
  readers.check_fraction(max_missing_fraction)
  root = os.path.abspath(root)
  readers.require_dir(root, "CVUSA root", LAYOUT)
  csv_path = os.path.join(root, SPLIT_FILES[split])
  readers.require_file(csv_path, "CVUSA split file", LAYOUT)

  sat_paths, pano_paths, ids = [], [], []
  for number, line in readers.read_lines(csv_path):
    fields = [f.strip() for f in line.split(",")]
    if len(fields) < 2 or not fields[0] or not fields[1]:
      raise ValueError(f"{csv_path}:{number}: expected 'satellite path,"
                       f"panorama path,annotation path', got {line!r}.")
    stem = os.path.splitext(os.path.basename(fields[1]))[0]
    if not stem.isdigit():
      raise ValueError(f"{csv_path}:{number}: expected a panorama file with "
                       f"a numeric name like streetview/panos/0000001.jpg, "
                       f"got {fields[1]!r}.")
    sat_paths.append(os.path.join(root, fields[0]))
    pano_paths.append(os.path.join(root, fields[1]))
    ids.append(stem)
  name = f"cvusa/{split}"
  if not ids:
    raise ValueError(f"{csv_path} lists no pairs. Expected layout:\n"
                     f"{LAYOUT}")
  readers.check_ids(name, ids, pano_paths)

  keep = readers.complete_pairs(name, pano_paths, sat_paths, LAYOUT,
                                max_missing_fraction)

  sat_paths = np.array(sat_paths)[keep]
  return index.PairIndex(
      name=name,
      root=root,
      ground_paths=np.array(pano_paths)[keep],
      ground_ids=np.array(ids)[keep],
      satellite_paths=sat_paths,
      satellite_ids=np.array(
          [os.path.splitext(os.path.basename(p))[0] for p in sat_paths],
          dtype=str),
      positive=np.arange(len(sat_paths), dtype=np.int64),
  )
