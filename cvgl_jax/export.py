r"""Retrieval bundle: a trained encoder and its reference index, on disk.

  python -m cvgl_jax.export --workdir=DIR --out=BUNDLE \
      [--stage=pseudo_label] [--checkpoint=best|latest] \
      [--references=eval|train|all]

A bundle is a folder that `cvgl_jax.retrieve` loads in a fresh process,
without the training workdir:

  manifest.json       format name and version; the model spec (what rebuilds
                      the TwoTower: variant, depths, dims, head, sharing,
                      dtype and the image sizes its SAFA heads were built
                      for) and its fingerprint; the preprocessing (RGB,
                      OpenCV resize, ImageNet mean / std); the source
                      (workdir, stage, checkpoint step, eval metrics); the
                      reference set and the ScaNN settings; the size and
                      SHA-256 of every other file;
  params.safetensors  the TwoTower params, float32, flattened with "/"
                      ("query/backbone/...");
  embeddings.npy      [R, D] float32 unit embeddings of the reference tiles
                      (reference tower), row r = reference r;
  references.npz      [R] ids and paths (relative to the dataset root),
                      coordinates [R, 2] float64 (NaN where unknown), world
                      [R] int (synthetic worlds; -1 otherwise), and the
                      model fingerprint and params SHA-256 the embeddings
                      were computed with;
  queries.npz         the dataset's ground images (relative paths, ids) and
                      the reference row of each one's true tile (-1 when
                      unknown or not among the references): how `retrieve`
                      marks the true tile of a query taken from the dataset;
  scann/              the ScaNN searcher over embeddings.npy
                      (`searcher.serialize(..., relative_path=True)`).

Coordinates (`coord_kind`): "latlon" (VIGOR: lat, lon in degrees), "utm"
(CVACT: northing, easting in metres), "synthetic" (a synthetic world's
tile centre, east and north in metres in world `world`, from its
`synthetic_truth.json`) or "" (CVUSA has none).

The model fingerprint is the SHA-256 of the model spec and every param's
shape and dtype: bundles with equal fingerprints hold interchangeable
architectures. The params SHA-256 ties the embeddings to the exact weights
that computed them. The bundle is written to `BUNDLE.partial` and renamed
when complete, so an interrupted export leaves no half bundle.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cvgl_jax import cli
from cvgl_jax import config_lib
from cvgl_jax import embed as embed_lib
from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax import stages
from cvgl_jax.data import augment
from cvgl_jax.data import image_io
from cvgl_jax.data import synthetic
from cvgl_jax.data.index import PairIndex
from cvgl_jax.models import encoder
from cvgl_jax.models import weights
from cvgl_jax.pseudo import knn
from cvgl_jax.train import loop

FORMAT = "cvgl_jax.retrieval_bundle"
VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
EMBEDDINGS = "embeddings.npy"
REFERENCES = "references.npz"
QUERIES = "queries.npz"
INDEX_DIR = "scann"

REFERENCE_SETS = ("eval", "train", "all")
MODEL_KEYS = ("variant", "depths", "dims", "head", "share_weights",
              "num_safa_heads", "dtype", "depthwise_impl")
COORD_LABELS = {"latlon": ("lat_deg", "lon_deg"),
                "utm": ("northing_m", "easting_m"),
                "synthetic": ("east_m", "north_m"), "": ()}
# Neighbours the ScaNN searcher is built for (a query may ask for more).
INDEX_NEIGHBOURS = 10


class ExportError(ValueError):
  """The workdir cannot be exported as asked; the message says why."""


# ------------------------------------------------------------- the model ----


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config (`run_dir.read_config`, keys added since the run at
  their defaults), or FileNotFoundError."""
  try:
    return run_dir.read_config(workdir,
                               config_lib.default_config().to_dict())
  except run_dir.RunDirError as e:
    raise FileNotFoundError(str(e)) from None


def model_spec(config: ml_collections.ConfigDict) -> dict:
  """What rebuilds the run's TwoTower: `config.model`'s architecture keys
  and the (H, W) image sizes (SAFA's params depend on them)."""
  m = config.model
  spec = {k: m[k] for k in MODEL_KEYS}
  spec.update(depths=[int(v) for v in m.depths],
              dims=[int(v) for v in m.dims],
              share_weights=bool(m.share_weights),
              num_safa_heads=int(m.num_safa_heads),
              ground_size=[int(v) for v in config.data.ground_size],
              satellite_size=[int(v) for v in config.data.satellite_size])
  return spec


def build_model(spec: dict) -> encoder.TwoTower:
  """The TwoTower of a `model_spec`."""
  missing = [k for k in MODEL_KEYS + ("ground_size", "satellite_size")
             if k not in spec]
  if missing:
    raise ValueError(f"Model spec lacks {missing}; it has {sorted(spec)}.")
  return encoder.from_config(
      ml_collections.ConfigDict({k: spec[k] for k in MODEL_KEYS}))


def abstract_params(model: encoder.TwoTower, spec: dict) -> Any:
  """The param tree of `model` as ShapeDtypeStructs (nothing computed)."""
  ground = jnp.zeros((1, *spec["ground_size"], 3), jnp.float32)
  satellite = jnp.zeros((1, *spec["satellite_size"], 3), jnp.float32)
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), ground, satellite))["params"]


def param_shapes(params: Any) -> dict[str, list]:
  """{"query/backbone/...": [*shape, dtype]} of a param tree."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return {k: [*map(int, v.shape), str(np.dtype(v.dtype))]
          for k, v in sorted(flat.items())}


def fingerprint(spec: dict, params: Any) -> str:
  """SHA-256 of the model spec and the param shapes and dtypes."""
  text = json.dumps({"spec": spec, "params": param_shapes(params)},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def preprocess_spec(spec: dict) -> dict:
  """How images become model inputs (what `retrieve` must do the same)."""
  return {"color": "RGB", "dtype": "uint8",
          "ground_size": spec["ground_size"],
          "satellite_size": spec["satellite_size"],
          "resize": "OpenCV INTER_AREA when shrinking both sides, else "
                    "INTER_LINEAR (cvgl_jax.data.image_io.resize)",
          "mean": list(augment.IMAGENET_MEAN),
          "std": list(augment.IMAGENET_STD)}


# ----------------------------------------------------- trained params ----


@dataclasses.dataclass(frozen=True)
class Trained:
  """Params of one checkpoint of a run.

  Attributes:
    config: the run's config.
    stage: the training stage, e.g. "pseudo_label".
    checkpoint: "best" or "latest" (what was found).
    step: the checkpoint's training step.
    spec: `model_spec(config)`.
    model: the TwoTower.
    params: the param tree, replicated on `mesh`.
    mesh: the data mesh the params live on.
  """
  config: ml_collections.ConfigDict
  stage: str
  checkpoint: str
  step: int
  spec: dict
  model: encoder.TwoTower
  params: Any
  mesh: jax.sharding.Mesh


def load_trained(workdir: str, *, stage: Optional[str] = None,
                 checkpoint: str = "best",
                 mesh: Optional[jax.sharding.Mesh] = None) -> Trained:
  """Restores a stage's params (default: the last trained stage's best).

  Args:
    workdir: the run's folder.
    stage: a training stage of the run; None picks the last one that
      saved a checkpoint.
    checkpoint: "best" (falls back to "latest") or "latest".
    mesh: where the params go, replicated; default all devices.
  """
  config = read_config(workdir)
  if stage is None:
    try:
      stage = run_dir.last_trained_stage(
          workdir, [s for s in config.stages
                    if s in config_lib.TRAINING_STAGES])
    except run_dir.RunDirError as e:
      raise ExportError(str(e)) from e
  elif stage not in config_lib.TRAINING_STAGES:
    raise ExportError(f"stage={stage!r} is not a training stage; choose "
                      f"one of {config_lib.TRAINING_STAGES}.")
  try:
    kind, folder, step = run_dir.trained_checkpoint(workdir, stage,
                                                    checkpoint)
  except run_dir.RunDirError as e:
    raise ExportError(str(e)) from e
  mesh = parallel.make_mesh() if mesh is None else mesh
  spec = model_spec(config)
  model = build_model(spec)
  sharding = parallel.replicated(mesh)
  like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      abstract_params(model, spec))
  params = loop.restore_params(folder, like, step)
  return Trained(config, stage, kind, step, spec, model, params, mesh)


# -------------------------------------------------------- the references ----


def _synthetic_coordinates(index: PairIndex, paths: np.ndarray):
  """Tile centres of a synthetic CVUSA world ([R, 2] east, north metres and
  [R] world), from its truth file; None when there is no truth file."""
  path = os.path.join(index.root, synthetic.TRUTH_FILE)
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


# ------------------------------------------------------------ the bundle ----


def file_digest(path: str) -> dict:
  """{"bytes": size, "sha256": hex digest} of a file."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def bundle_files(folder: str) -> list[str]:
  """Every file of a bundle but the manifest, relative, sorted."""
  out = []
  for base, _, names in os.walk(folder):
    for name in names:
      rel = os.path.relpath(os.path.join(base, name), folder)
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def write_manifest(folder: str, manifest: dict) -> dict:
  """Adds the digest of every bundle file to `manifest` and writes it."""
  manifest = dict(manifest, files={
      rel: file_digest(os.path.join(folder, rel))
      for rel in bundle_files(folder)})
  with open(os.path.join(folder, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  return manifest


def save_params(path: str, params: Any) -> None:
  """A param tree as safetensors, keys joined with "/"."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  weights.save_safetensors({k: np.asarray(v) for k, v in flat.items()}, path)


def index_settings(num_references: int) -> dict:
  """How `knn.scann_searcher` builds the index for this many references
  with the default `ScannOptions` (what a search may override); where
  ScaNN is not installed, the bundle is searched exactly (no index)."""
  if not knn.scann_available():
    return {"backend": "exact", "distance": "dot_product"}
  o = knn.ScannOptions()
  brute = num_references < o.brute_force_max
  return {"backend": "scann", "distance": "dot_product",
          "neighbours": INDEX_NEIGHBOURS,
          "tree": num_references >= o.tree_min,
          "scoring": "brute_force" if brute else "asymmetric_hashing",
          "reorder": None if brute else max(100, 4 * INDEX_NEIGHBOURS)}


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
  trained = load_trained(workdir, stage=stage, checkpoint=checkpoint,
                         mesh=mesh)
  config, spec = trained.config, trained.spec
  train, evaluation = stages.read_data(config, workdir)
  splits = {"eval": [evaluation], "train": [train],
            "all": [evaluation, train]}[references]
  refs = reference_table(splits)
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
    with open(os.path.join(out, MANIFEST)) as f:
      return json.load(f)
  partial = out.rstrip(os.sep) + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  save_params(os.path.join(partial, PARAMS), trained.params)
  params_sha = file_digest(os.path.join(partial, PARAMS))["sha256"]
  model_fp = fingerprint(spec, trained.params)
  np.save(os.path.join(partial, EMBEDDINGS), embeddings)
  np.savez(os.path.join(partial, REFERENCES), ids=refs["ids"],
           paths=refs["paths"], coordinates=refs["coordinates"],
           world=refs["world"], model_fingerprint=np.array(model_fp),
           params_sha256=np.array(params_sha))
  np.savez(os.path.join(partial, QUERIES), **queries)
  index = index_settings(len(refs["ids"]))
  if index["backend"] == "scann":
    os.makedirs(os.path.join(partial, INDEX_DIR))
    searcher = knn.scann_searcher(embeddings, INDEX_NEIGHBOURS,
                                  knn.ScannOptions())
    searcher.serialize(os.path.join(partial, INDEX_DIR), relative_path=True)

  manifest = {
      "format": FORMAT, "version": VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "model": dict(spec, fingerprint=model_fp,
                    embedding_dim=int(embeddings.shape[1])),
      "preprocess": dict(preprocess_spec(spec), query_size=list(
          image_io.probe(evaluation.ground_paths[0])[1])),
      "source": {"workdir": os.path.abspath(workdir),
                 "stage": trained.stage, "checkpoint": trained.checkpoint,
                 "step": trained.step,
                 "eval": run_dir.eval_record(workdir, trained.stage,
                                       trained.step)},
      "dataset": {"name": evaluation.name, "root": evaluation.root,
                  "references": references,
                  "num_references": int(len(refs["ids"])),
                  "coord_kind": refs["coord_kind"],
                  "coord_labels": list(COORD_LABELS[refs["coord_kind"]])},
      "index": index,
  }
  manifest = write_manifest(partial, manifest)
  if os.path.exists(out):
    shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
  os.replace(partial, out)
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
