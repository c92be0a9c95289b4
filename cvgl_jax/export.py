r"""Retrieval bundle: a trained encoder and its reference index, on disk.

  python -m cvgl_jax.export --workdir=DIR --out=BUNDLE \
      [--stage=pseudo_label] [--checkpoint=best|latest] \
      [--references=eval|train|all]

Writes the retrieval bundle of a training run's checkpoint: its params,
the embeddings and the ScaNN index of the reference tiles, and the
dataset's queries with their true tiles. The format (`cvgl_jax.bundle`):
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from cvgl_jax import bundle as bundle_lib
from cvgl_jax import cli
from cvgl_jax import embed as embed_lib
from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax import trained as trained_lib
from cvgl_jax.data import image_io
from cvgl_jax.data import splits
from cvgl_jax.data.synthetic import layouts
from cvgl_jax.data.index import PairIndex

# `--help` prints the module docstring: the usage above, then the format.
__doc__ += "\n" + bundle_lib.__doc__

REFERENCE_SETS = ("eval", "train", "all")


class ExportError(ValueError):
  """The workdir cannot be exported as asked; the message says why."""


# -------------------------------------------------------- the references ----


def _synthetic_coordinates(index: PairIndex, paths: np.ndarray):
  """Tile centres of a synthetic CVUSA world ([R, 2] east, north metres and
  [R] world), from its truth file; None when there is no truth file."""
  path = os.path.join(index.root, layouts.TRUTH_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    truth = json.load(f)
  centre = {}
  for pair in truth.get("pairs", []):
    if "recorded_en_m" in pair:
      centre[pair["satellite"]] = (pair["recorded_en_m"], pair["world"])
  coords = np.full((len(paths), 2), np.nan)
  world = np.full(len(paths), -1, np.int64)
  for i, rel in enumerate(paths):
    if rel in centre:
      coords[i], world[i] = centre[rel]
  return coords, world


def reference_table(indices: Sequence[PairIndex]) -> dict[str, np.ndarray]:
  """The satellite tiles of `indices`, each file once (first seen first).

  Returns:
    {"ids" [R] str, "paths" [R] str (relative to the dataset root),
    "abs_paths" [R] str, "coordinates" [R, 2] float64 (NaN unknown),
    "world" [R] int64 (-1 unknown), "coord_kind" str}.
  """
  root = indices[0].root
  kinds = {i.coord_kind for i in indices}
  if len(kinds) > 1:
    raise ExportError(f"The splits mix coordinate kinds {sorted(kinds)}.")
  seen, rows = set(), []
  for index in indices:
    coords = index.satellite_coords
    for r, path in enumerate(index.satellite_paths):
      if path not in seen:
        seen.add(path)
        rows.append((index.satellite_ids[r], path,
                     (np.nan, np.nan) if coords is None else coords[r]))
  ids, abs_paths, coords = zip(*rows)
  rel = np.array([os.path.relpath(p, root) for p in abs_paths])
  table = {"ids": np.array(ids, str), "paths": rel,
           "abs_paths": np.array(abs_paths, str),
           "coordinates": np.array(coords, np.float64).reshape(-1, 2),
           "world": np.full(len(rel), -1, np.int64),
           "coord_kind": kinds.pop()}
  if not table["coord_kind"]:
    found = _synthetic_coordinates(indices[0], rel)
    if found is not None and np.isfinite(found[0]).any():
      table.update(coordinates=found[0], world=found[1],
                   coord_kind="synthetic")
  return table


def query_table(indices: Sequence[PairIndex],
                reference_paths: Sequence[str]) -> dict[str, np.ndarray]:
  """Every ground image of `indices` with the reference row of its true
  tile (-1 when unknown or not among `reference_paths`, absolute paths)."""
  row_of = {p: r for r, p in enumerate(reference_paths)}
  root = indices[0].root
  paths, ids, rows = [], [], []
  for index in indices:
    positive = np.asarray(index.positive)
    for q, path in enumerate(index.ground_paths):
      paths.append(os.path.relpath(path, root))
      ids.append(index.ground_ids[q])
      p = positive[q]
      rows.append(row_of.get(index.satellite_paths[p], -1) if p >= 0
                  else -1)
  return {"paths": np.array(paths, str), "ids": np.array(ids, str),
          "reference_row": np.array(rows, np.int64)}


def _check_out(out: str, overwrite: bool) -> None:
  if os.path.exists(out) and not overwrite and (
      not os.path.isdir(out) or os.listdir(out)):
    raise ExportError(f"--out={out} exists and is not empty; choose a new "
                      f"folder or pass --overwrite.")


def export(workdir: str, out: str, *, stage: Optional[str] = None,
           checkpoint: str = "best", references: str = "eval",
           overwrite: bool = False, progress: bool = False) -> dict:
  """Writes the retrieval bundle of a run; returns its manifest.

  Args:
    workdir: the run's folder (config.json, <stage>/ checkpoints, the
      synthetic world when the run generated one).
    out: the bundle folder to create.
    stage: the training stage to export; default the last one trained.
    checkpoint: "best" (the stage's best evaluation; its latest state when
      it never evaluated) or "latest".
    references: the tiles to index: the "eval" split's (as evaluation
      ranks them), the "train" split's, or "all" (both, each file once).
    overwrite: replace an existing `out`.
    progress: show embedding progress bars.

  Raises:
    ExportError, FileNotFoundError: before any embedding, when the run,
      stage, checkpoint, data or `out` do not allow the export.
  """
  if references not in REFERENCE_SETS:
    raise ExportError(f"references={references!r}; choose one of "
                      f"{REFERENCE_SETS}.")
  _check_out(out, overwrite)
  mesh = parallel.make_mesh()
  try:
    trained = trained_lib.load_trained(workdir, stage=stage,
                                       checkpoint=checkpoint, mesh=mesh)
  except trained_lib.NoTrainedModel as e:
    raise ExportError(str(e)) from e
  config, spec = trained.config, trained.spec
  train, evaluation = splits.read_splits(config, workdir)
  chosen = {"eval": [evaluation], "train": [train],
            "all": [evaluation, train]}[references]
  refs = reference_table(chosen)
  queries = query_table([evaluation, train], refs["abs_paths"])

  # Images per process per batch, a multiple of its devices.
  batch = -(-int(config.train.eval_batch_size) // mesh.devices.size
            ) * jax.local_device_count()
  embeddings = embed_lib.embed_split(
      embed_lib.embed_fns(trained.model, mesh)[1], trained.params,
      refs["abs_paths"], size=spec["satellite_size"], batch_size=batch,
      mesh=mesh, num_threads=int(config.data.num_threads),
      progress=progress, desc="embed references")

  # Every process embedded its share; process 0 writes the bundle.
  if not parallel.is_main_process():
    parallel.sync("export:written")
    with open(os.path.join(out, bundle_lib.MANIFEST)) as f:
      return json.load(f)
  manifest = bundle_lib.write_bundle(
      out, spec=spec, params=trained.params, embeddings=embeddings,
      references=refs, queries=queries,
      query_size=image_io.probe(evaluation.ground_paths[0])[1],
      source={"workdir": os.path.abspath(workdir), "stage": trained.stage,
              "checkpoint": trained.checkpoint, "step": trained.step,
              "eval": run_dir.eval_record(workdir, trained.stage,
                                          trained.step)},
      dataset={"name": evaluation.name, "root": evaluation.root,
               "references": references})
  logging.info("Bundle %s: %s step %d (%s), %d references.", out,
               trained.stage, trained.step, trained.checkpoint,
               len(refs["ids"]))
  parallel.sync("export:written")
  return manifest


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so that importing
  this module next to another absl program defines nothing)."""
  flags.DEFINE_string("workdir", None, "The training run's folder.")
  flags.DEFINE_string("out", None, "The bundle folder to write.")
  flags.DEFINE_string("stage", None, "Training stage to export (default: "
                      "the last one trained).")
  flags.DEFINE_enum("checkpoint", "best", sorted(run_dir.CHECKPOINT_KINDS),
                    "best: the stage's best evaluation (else its latest "
                    "state); latest: its last saved state.")
  flags.DEFINE_enum("references", "eval", REFERENCE_SETS,
                    "Tiles to index: the eval split's, the train split's, "
                    "or all.")
  flags.DEFINE_bool("overwrite", False, "Replace --out.")
  flags.mark_flags_as_required(["workdir", "out"])
  cli.define_job_flags()
  flags.adopt_module_key_flags(cli)  # --help lists them.


def main(argv):
  cli.setup_console()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cli.join_job()
  try:
    manifest = export(f.workdir, f.out, stage=f.stage,
                      checkpoint=f.checkpoint, references=f.references,
                      overwrite=f.overwrite, progress=True)
  except (ExportError, FileNotFoundError) as e:
    cli.user_error(f"export refused: {e}")
  if not parallel.is_main_process():
    return
  print(json.dumps({k: manifest[k] for k in ("source", "dataset", "index")},
                   indent=2))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
