r"""Query a retrieval bundle: ground images -> ranked satellite tiles.

  python -m cvgl_jax.retrieve --bundle=BUNDLE [--top_k=10] \
      [--picture=OUT.png] [--data_root=DIR] [--json] [--noverify] \
      [--any_aspect] IMAGE...

Loads a bundle written by `cvgl_jax.export` (no training workdir needed),
embeds each query panorama with the bundle's query tower and preprocessing
(RGB, resized to the bundle's ground size, ImageNet normalisation), and
searches the bundle's ScaNN index by inner product. Prints, per query, the
ranked tiles: rank, id, score (cosine similarity) and coordinates; with
`--json` one JSON object per query instead. `--picture` draws each query
beside its top-5 tiles, the true tile framed in green when the query is an
image of the bundle's dataset (matched by its path relative to the dataset
root, else by a file name unique in the dataset). Tiles are read from the
dataset root recorded in the bundle, or from `--data_root` when the
dataset has moved.

A query is refused before the bundle is read when it is not a readable
image, and after when its aspect (width / height) differs by more than 5 %
from the ground images the model was trained on (the manifest's
`preprocess.query_size`): resized to the model's input all the same, a
crop the model never saw ranks near chance. `--any_aspect` searches it
anyway, with a warning.

The bundle is checked as it loads (`cvgl_jax.bundle.load_bundle`);
its format and refusals:
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from absl import flags
from absl import logging

from cvgl_jax import bundle as bundle_lib
from cvgl_jax import cli
from cvgl_jax import plots
from cvgl_jax.data import image_io

# `--help` prints the module docstring: the usage above, then the format.
__doc__ += "\n" + bundle_lib.__doc__

PICTURE_TILES = 5
# How far a query's width / height may stray from the training images'.
ASPECT_TOLERANCE = 0.05


# ------------------------------------------------------------- display ----


def format_coordinates(match: bundle_lib.Match,
                       labels: Sequence[str]) -> str:
  """"east_m=60.7 north_m=63.5 world=0", or "-" without coordinates."""
  if match.coordinates is None:
    return "-"
  text = " ".join(f"{k}={v:.6g}" for k, v in zip(labels, match.coordinates))
  return text + (f" world={match.world}" if match.world >= 0 else "")


def format_results(results: Sequence[bundle_lib.QueryResult],
                   labels: Sequence[str]) -> str:
  """The ranked tiles of each query as text."""
  lines = []
  for result in results:
    lines.append(f"{result.query}  ({result.truth})")
    lines.append(f"  {'rank':>4}  {'id':<24} {'score':>8}  coordinates")
    for m in result.matches:
      mark = " *" if m.row == result.true_row else ""
      lines.append(f"  {m.rank:>4}  {m.id:<24} {m.score:>8.4f}  "
                   f"{format_coordinates(m, labels)}{mark}")
  return "\n".join(lines)


def result_panel(bundle: bundle_lib.Bundle, result: bundle_lib.QueryResult,
                 data_root: Optional[str] = None,
                 num_tiles: int = PICTURE_TILES) -> plots.Panel:
  """A picture row for one query file: it and its top `num_tiles` tiles."""
  shown = result.matches[:num_tiles]
  tiles = []
  for m in shown:
    path = bundle.tile_path(m.row, data_root)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"Tile {m.id} not found at {path}: the dataset moved or is not "
          f"on this machine; pass --data_root=<the dataset folder>.")
    tiles.append(image_io.read_rgb(path))
  true_index = next((i for i, m in enumerate(shown)
                     if m.row == result.true_row), -1)
  return plots.Panel(
      query=image_io.read_rgb(result.query),
      title=f"{os.path.basename(result.query)}\n{result.truth}",
      tiles=tiles,
      captions=[f"#{m.rank} {m.id}\n{m.score:.3f}" for m in shown],
      true_index=true_index)


def define_flags() -> None:
  """The CLI's flags (only when run as a program; see `export`)."""
  flags.DEFINE_string("bundle", None,
                      "The bundle folder (python -m cvgl_jax.export).")
  flags.DEFINE_integer("top_k", 10, "Tiles listed per query.")
  flags.DEFINE_string("picture", None, "Write a PNG of each query beside "
                      "its top-5 tiles.")
  flags.DEFINE_string("data_root", None, "Dataset folder for the picture's "
                      "tiles when it is not where the bundle was exported.")
  flags.DEFINE_bool("json", False, "Print one JSON object per query.")
  flags.DEFINE_bool("verify", True, "Check every bundle file's size and "
                    "SHA-256 against the manifest (reads the whole bundle).")
  flags.DEFINE_bool("any_aspect", False, "Search queries whose aspect "
                    "differs from the training ground images (refused "
                    "otherwise).")
  flags.mark_flags_as_required(["bundle"])


def query_size_problems(manifest: dict, sizes: dict[str, tuple[int, int]]
                        ) -> list[str]:
  """Queries whose aspect (width / height) differs by more than
  `ASPECT_TOLERANCE` from the ground images the bundle's model saw in
  training (its manifest's `preprocess.query_size`; bundles without it are
  not checked): a crop or a camera the model never saw, resized to its
  input all the same, ranks near chance."""
  expected = manifest["preprocess"].get("query_size")
  if not expected:
    return []
  aspect = expected[1] / expected[0]
  return [f"query {path} is {w} x {h} px (aspect {w / h:.2f}); the model "
          f"was trained on ground images of {expected[1]} x {expected[0]} "
          f"(aspect {aspect:.2f})" for path, (h, w) in sizes.items()
          if abs((w / h) / aspect - 1) > ASPECT_TOLERANCE]


def main(argv):
  cli.setup_console()
  f = flags.FLAGS
  paths = argv[1:]
  if not paths:
    cli.user_error("give one or more query image files after the flags.")
  sizes = {}
  for path in paths:
    try:
      sizes[path] = image_io.probe(path)[1]
    except (FileNotFoundError, ValueError) as e:
      cli.user_error(e)
  try:
    bundle = bundle_lib.load_bundle(f.bundle, verify=f.verify)
  except bundle_lib.BundleError as e:
    cli.user_error(f"Refused: {e}")
  odd = query_size_problems(bundle.manifest, sizes)
  if odd and not f.any_aspect:
    more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
    cli.user_error(f"{odd[0]}{more}: crop it to the training aspect, or "
                   f"pass --any_aspect to search anyway.")
  for problem in odd:
    logging.warning("%s; searching anyway (--any_aspect).", problem)
  top_k = f.top_k
  if not 1 <= top_k <= bundle.num_references:
    cli.user_error(f"--top_k={top_k} must be in [1, "
                   f"{bundle.num_references}] (the bundle's references).")
  root = f.data_root or bundle.manifest["dataset"]["root"]
  if f.picture and not os.path.isdir(root):
    cli.user_error(f"the dataset folder {root} (the picture's tiles) does "
                   f"not exist here; pass --data_root=<the dataset folder>.")
  search_k = max(top_k, min(PICTURE_TILES, bundle.num_references)
                 if f.picture else top_k)
  results = bundle.search_files(paths, search_k)
  listed = [dataclasses.replace(r, matches=r.matches[:top_k],
                                true_rank=r.true_rank
                                if r.true_rank and r.true_rank <= top_k
                                else None) for r in results]
  if f.json:
    for result in listed:
      print(json.dumps(result.to_json()))
  else:
    print(format_results(listed, bundle.manifest["dataset"]["coord_labels"]))
  if f.picture:
    plots.draw_panels(
        [result_panel(bundle, r, f.data_root) for r in results], f.picture,
        title=f"Top {PICTURE_TILES} tiles "
        f"({os.path.basename(os.path.normpath(f.bundle))})")
    print(f"Picture: {os.path.abspath(f.picture)}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
