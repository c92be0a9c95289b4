"""A split's image files, checked before any stage decodes one.

`check_split` probes every panorama and tile of a split
(`image_io.probe`: header and tail, no pixels, in threads) and finds the
files no stage could use as they are:

  - unreadable: missing, cut short (no JPEG end marker / PNG IEND: decoders
    fill the rest with grey and carry on), or without a header a decoder
    recognises;
  - of an odd size: not the (height, width) that most of the split's files
    of that side have (a panorama of another crop, a tile of another zoom
    level). The pipeline resizes every image to the config's size, so such
    a file would otherwise pass silently; `odd_size="resize"` accepts them,
    for datasets that mix sizes on purpose.

`bad_masks` finds them; `drop_bad` with `on_bad="error"` raises
`readers.DatasetError` naming the files and how to go on, with
`on_bad="skip"` drops them (`PairIndex.without`: a panorama whose true
tile is dropped goes too) and returns what it dropped and why, which the
run logs and lists in its results.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time

from absl import logging
import numpy as np

from cvgl_jax import data
from cvgl_jax.data import image_io
from cvgl_jax.data import index as index_lib
from cvgl_jax.data import pipeline
from cvgl_jax.data import readers

ON_BAD = data.ON_BAD_IMAGE
ODD_SIZE = data.ODD_IMAGE_SIZE
# How many bad files an error message names.
_NUM_NAMED = 5


def _probe(path: str):
  try:
    return image_io.probe(path)[1]
  except (OSError, ValueError) as e:
    return str(e)


def bad_files(paths, *, odd_size: str = "error",
              num_threads: int = 8) -> dict[int, str]:
  """{index into `paths`: problem} of the files that cannot be used.

  Args:
    paths: [N] image files of one side of a split.
    odd_size: "error" counts a file whose (height, width) differs from the
      most common one as bad; "resize" accepts it.
    num_threads: probing threads (the work is file reads); 0 as
      `pipeline.decode_threads`.
  """
  with concurrent.futures.ThreadPoolExecutor(
      pipeline.decode_threads(num_threads)) as pool:
    found = list(pool.map(_probe, [str(p) for p in paths]))
  bad = {i: r for i, r in enumerate(found) if isinstance(r, str)}
  sizes = collections.Counter(r for r in found if isinstance(r, tuple))
  if sizes and odd_size == "error":
    (h, w), count = sizes.most_common(1)[0]
    for i, r in enumerate(found):
      if isinstance(r, tuple) and r != (h, w):
        bad[i] = (f"Image file {paths[i]} is {r[0]}x{r[1]} (height x "
                  f"width); {count} of the {len(found)} files beside it are "
                  f"{h}x{w}")
  return dict(sorted(bad.items()))


def bad_masks(split: index_lib.PairIndex, *, odd_size: str = "error",
              num_threads: int = 8
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """([Q] bool, [R] bool, problems): which panoramas and tiles of `split`
  cannot be used, and why ("<file> ..." sentences, panoramas first)."""
  if odd_size not in ODD_SIZE:
    raise ValueError(f"odd_size={odd_size!r}; choose one of {ODD_SIZE}.")
  start = time.time()
  masks, problems = [], []
  for paths in (split.ground_paths, split.satellite_paths):
    bad = bad_files(paths, odd_size=odd_size, num_threads=num_threads)
    masks.append(np.isin(np.arange(len(paths)), list(bad)))
    problems += bad.values()
  logging.info("%s: %d image files checked in %.1f s, %d unusable.",
               split.name, split.num_ground + split.num_satellite,
               time.time() - start, len(problems))
  return masks[0], masks[1], problems


def drop_bad(split: index_lib.PairIndex, ground: np.ndarray,
             satellite: np.ndarray, problems: list[str], *,
             on_bad: str = "error") -> tuple[index_lib.PairIndex, list[str]]:
  """(the split without the files `bad_masks` found, what was dropped).

  `problems` may be empty where another process probed (multi-process
  runs: process 0 probes, everyone gets its masks).

  Raises:
    readers.DatasetError: a bad file and `on_bad="error"`; the message
      names the first files, the count, and the config keys that go on.
  """
  if on_bad not in ON_BAD:
    raise ValueError(f"on_bad={on_bad!r}; choose one of {ON_BAD}.")
  count = int(np.sum(ground) + np.sum(satellite))
  if not count:
    return split, []
  total = split.num_ground + split.num_satellite
  if on_bad == "error":
    more = (f" (and {count - _NUM_NAMED} more)" if count > _NUM_NAMED
            else "")
    named = "; ".join(problems[:_NUM_NAMED]) or "process 0's log names them"
    odd = any(" beside it are " in p for p in problems)
    raise readers.DatasetError(
        f"{split.name}: {count} of {total} image files cannot be used: "
        f"{named}{more}. Replace them, or set config.data.on_bad_image="
        f"'skip' to leave them out"
        + (" (or config.data.odd_image_size='resize' to accept other sizes)"
           if odd else "") + ".")
  kept = split.without(ground, satellite)
  logging.warning(
      "%s: left out %d unusable image files (config.data.on_bad_image="
      "'skip'); %d panoramas and %d tiles remain. %s", split.name, count,
      kept.num_ground, kept.num_satellite, "; ".join(problems))
  return kept, problems
