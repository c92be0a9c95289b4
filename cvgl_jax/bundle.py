r"""The retrieval bundle's format: written, verified and loaded.

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

A bundle is refused with a `BundleError` that names the file when: a file
is missing, truncated or differs from its SHA-256 in the manifest (corrupt,
or copied from another bundle); the manifest is not a bundle manifest of a
version this code reads; the params do not fit the model the manifest
describes (another model's params); the reference embeddings were computed
by another model or other weights than the bundle's; or the bundle's
normalisation differs from this code's.

Who does what: `cvgl_jax.export` computes a run's contents (its trained
params, the reference table and embeddings, the dataset's queries) and
hands them to `write_bundle`; `load_bundle` reads and checks a bundle and
searches it (`Bundle`), what `cvgl_jax.retrieve` runs on the command line.

Python API:

  from cvgl_jax import bundle as bundle_lib
  bundle = bundle_lib.load_bundle("BUNDLE")
  scores, rows = bundle.search(images, top_k=10)   # uint8 RGB images
  results = bundle.search_files(["query.jpg"], top_k=10)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Optional, Sequence

import flax.traverse_util
import jax
import numpy as np
import safetensors
import safetensors.numpy

from cvgl_jax import embed as embed_lib
from cvgl_jax import parallel
from cvgl_jax.data import augment
from cvgl_jax.data import image_io
from cvgl_jax.models import encoder
from cvgl_jax.models import weights
from cvgl_jax.pseudo import knn

FORMAT = "cvgl_jax.retrieval_bundle"
VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
EMBEDDINGS = "embeddings.npy"
REFERENCES = "references.npz"
QUERIES = "queries.npz"
INDEX_DIR = "scann"
# The arrays of references.npz and queries.npz, each [R] or [Q] rows.
REFERENCE_KEYS = ("ids", "paths", "coordinates", "world",
                  "model_fingerprint", "params_sha256")
QUERY_KEYS = ("paths", "ids", "reference_row")

COORD_LABELS = {"latlon": ("lat_deg", "lon_deg"),
                "utm": ("northing_m", "easting_m"),
                "synthetic": ("east_m", "north_m"), "": ()}
# Neighbours the ScaNN searcher is built for (a query may ask for more).
INDEX_NEIGHBOURS = 10
# Query images per call of the query tower (`Bundle.embed`).
_EMBED_BATCH = 32


class BundleError(ValueError):
  """The folder is not a usable bundle; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Match:
  """One retrieved tile.

  Attributes:
    rank: 1-based position.
    row: the tile's row in the bundle's references.
    id: the dataset's tile id.
    path: the tile file relative to the dataset root.
    score: inner product of the unit embeddings (cosine similarity).
    coordinates: (a, b) as the bundle's `coord_labels`, or None.
    world: synthetic world of the tile, or -1.
  """
  rank: int
  row: int
  id: str
  path: str
  score: float
  coordinates: Optional[tuple[float, float]]
  world: int


@dataclasses.dataclass(frozen=True)
class QueryResult:
  """The ranked tiles of one query image.

  Attributes:
    query: the image file.
    matches: best first.
    true_row: reference row of the query's true tile; -1 when unknown.
    true_rank: 1-based rank of the true tile among `matches`, or None.
    in_dataset: the query is an image of the bundle's dataset.
  """
  query: str
  matches: list[Match]
  true_row: int
  true_rank: Optional[int]
  in_dataset: bool = False

  @property
  def truth(self) -> str:
    """Where the true tile is, in words."""
    if not self.in_dataset:
      return "not a dataset image: true tile unknown"
    if self.true_row < 0:
      return "its true tile is not among the references"
    if self.true_rank is None:
      return f"true tile not in the top {len(self.matches)}"
    return f"true tile at rank {self.true_rank}"

  def to_json(self) -> dict:
    return {"query": self.query, "in_dataset": self.in_dataset,
            "true_row": self.true_row, "true_rank": self.true_rank,
            "matches": [dataclasses.asdict(m) for m in self.matches]}


# ------------------------------------------------------------- the model ----


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
  """How images become model inputs (what `Bundle.preprocess` and a
  reader of the bundle in another language must do the same)."""
  return {"color": "RGB", "dtype": "uint8",
          "ground_size": spec["ground_size"],
          "satellite_size": spec["satellite_size"],
          "resize": "OpenCV INTER_AREA when shrinking both sides, else "
                    "INTER_LINEAR (cvgl_jax.data.image_io.resize)",
          "mean": list(augment.IMAGENET_MEAN),
          "std": list(augment.IMAGENET_STD)}


# ------------------------------------------------------------- writing ----


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


def write_bundle(out: str, *, spec: dict, params: Any,
                 embeddings: np.ndarray, references: dict,
                 queries: dict, query_size: Sequence[int], source: dict,
                 dataset: dict) -> dict:
  """Writes a bundle to `out.partial` and renames it to `out` (replacing
  an `out` there); returns its manifest.

  Args:
    out: the bundle folder.
    spec: the model spec (`encoder.model_spec`).
    params: the TwoTower's param tree (host or replicated).
    embeddings: [R, D] float32 unit embeddings of the references (the
      reference tower, computed with `params`).
    references: {"ids", "paths" (relative to the dataset root),
      "coordinates" [R, 2] float64 (NaN unknown), "world" [R] int64 (-1
      unknown)} arrays, and "coord_kind" (a key of `COORD_LABELS`).
    queries: {"paths", "ids", "reference_row"} arrays [Q]: the dataset's
      ground images and the reference row of each one's true tile (-1
      unknown or not among the references).
    query_size: (H, W) of the dataset's ground images (the aspect queries
      are checked against).
    source: the manifest's "source" section (workdir, stage, checkpoint,
      step, eval metrics).
    dataset: the manifest's "dataset" section: name, root and which
      references; the count, coordinate kind and labels are added here.
  """
  partial = out.rstrip(os.sep) + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  save_params(os.path.join(partial, PARAMS), params)
  params_sha = file_digest(os.path.join(partial, PARAMS))["sha256"]
  model_fp = fingerprint(spec, params)
  np.save(os.path.join(partial, EMBEDDINGS), embeddings)
  np.savez(os.path.join(partial, REFERENCES), ids=references["ids"],
           paths=references["paths"],
           coordinates=references["coordinates"],
           world=references["world"], model_fingerprint=np.array(model_fp),
           params_sha256=np.array(params_sha))
  np.savez(os.path.join(partial, QUERIES),
           **{k: queries[k] for k in QUERY_KEYS})
  num_references = int(len(references["ids"]))
  index = index_settings(num_references)
  if index["backend"] == "scann":
    os.makedirs(os.path.join(partial, INDEX_DIR))
    searcher = knn.scann_searcher(embeddings, INDEX_NEIGHBOURS,
                                  knn.ScannOptions())
    searcher.serialize(os.path.join(partial, INDEX_DIR), relative_path=True)

  coord_kind = references["coord_kind"]
  manifest = {
      "format": FORMAT, "version": VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "model": dict(spec, fingerprint=model_fp,
                    embedding_dim=int(embeddings.shape[1])),
      "preprocess": dict(preprocess_spec(spec),
                         query_size=list(query_size)),
      "source": source,
      "dataset": dict(dataset, num_references=num_references,
                      coord_kind=coord_kind,
                      coord_labels=list(COORD_LABELS[coord_kind])),
      "index": index,
  }
  manifest = write_manifest(partial, manifest)
  if os.path.exists(out):
    shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
  os.replace(partial, out)
  return manifest


# ------------------------------------------------------------- loading ----


def _require(folder: str, rel: str) -> str:
  path = os.path.join(folder, rel)
  if not os.path.isfile(path):
    raise BundleError(f"Bundle {folder}: file {rel} is missing.")
  return path


def read_manifest(folder: str) -> dict:
  """The bundle's manifest, checked for format and version."""
  if not os.path.isdir(folder):
    raise BundleError(f"Bundle folder {folder} does not exist.")
  path = _require(folder, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BundleError(f"Bundle {folder}: {MANIFEST} is not valid JSON "
                      f"({e}): the file is corrupt.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise BundleError(f"{path} is not a {FORMAT} manifest.")
  if manifest.get("version") != VERSION:
    raise BundleError(f"{path} has format version "
                      f"{manifest.get('version')!r}; this cvgl_jax reads "
                      f"version {VERSION}. Re-export the bundle.")
  for key in ("model", "preprocess", "dataset", "index", "files"):
    if key not in manifest:
      raise BundleError(f"{path} lacks the section {key!r}.")
  return manifest


def verify_files(folder: str, manifest: dict) -> None:
  """Every file the manifest lists exists with its size and SHA-256, the
  bundle has the files a bundle needs, and holds no file the manifest
  does not list."""
  files = manifest["files"]
  for rel in (PARAMS, EMBEDDINGS, REFERENCES, QUERIES):
    if rel not in files:
      raise BundleError(f"Bundle {folder}: the manifest lists no {rel}.")
  if manifest["index"].get("backend", "scann") == "scann" and not any(
      r.startswith(INDEX_DIR + "/") for r in files):
    raise BundleError(f"Bundle {folder}: the manifest lists no ScaNN "
                      f"index files ({INDEX_DIR}/).")
  # A file the loader reads but the manifest omits would go unchecked.
  unlisted = sorted(set(bundle_files(folder)) - set(files))
  if unlisted:
    raise BundleError(
        f"Bundle {folder}: {', '.join(unlisted)} "
        f"{'is' if len(unlisted) == 1 else 'are'} not in the manifest, so "
        f"nothing vouches for {'it' if len(unlisted) == 1 else 'them'}: "
        f"the bundle was changed after export. Re-export the bundle.")
  for rel, expected in sorted(files.items()):
    path = _require(folder, rel)
    size = os.path.getsize(path)
    if size != expected["bytes"]:
      raise BundleError(
          f"Bundle {folder}: {rel} has {size} bytes, the manifest says "
          f"{expected['bytes']}: the file is truncated or was replaced.")
    got = file_digest(path)["sha256"]
    if got != expected["sha256"]:
      raise BundleError(
          f"Bundle {folder}: {rel} has SHA-256 {got[:16]}..., the "
          f"manifest says {expected['sha256'][:16]}...: the file is "
          f"corrupt or comes from another bundle. Re-export the bundle.")


def _load_params(folder: str, model, spec: dict) -> Any:
  """The params file, checked against the manifest's model."""
  path = os.path.join(folder, PARAMS)
  try:
    flat = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise BundleError(f"Bundle {folder}: cannot read {PARAMS} ({e}).") from e
  expected = flax.traverse_util.flatten_dict(
      encoder.abstract_params(model, spec), sep="/")
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = [(k, flat[k].shape, expected[k].shape) for k in sorted(expected)
           if k in flat and (flat[k].shape != expected[k].shape
                             or flat[k].dtype != expected[k].dtype)]
  if missing or extra or wrong:
    detail = []
    if wrong:
      k, got, want = wrong[0]
      detail.append(f"{len(wrong)} params differ in shape or dtype, e.g. "
                    f"{k} is {got}, the model needs {want}")
    if missing:
      detail.append(f"{len(missing)} params missing, e.g. {missing[0]}")
    if extra:
      detail.append(f"{len(extra)} unexpected params, e.g. {extra[0]}")
    raise BundleError(
        f"Bundle {folder}: {PARAMS} holds another model's params "
        f"than the manifest's ({spec['variant']} {spec['dims']}, head "
        f"{spec['head']}): " + "; ".join(detail) + ".")
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _load_npz(folder: str, rel: str, keys: Sequence[str]) -> dict:
  path = os.path.join(folder, rel)
  try:
    with np.load(path, allow_pickle=False) as data:
      out = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise BundleError(f"Bundle {folder}: cannot read {rel} ({e}).") from e
  missing = [k for k in keys if k not in out]
  if missing:
    raise BundleError(f"Bundle {folder}: {rel} lacks {missing}.")
  return out


class Bundle:
  """A loaded retrieval bundle (see `load_bundle`).

  Attributes:
    folder: the bundle folder.
    manifest: its manifest.
    spec: the model spec (`encoder.model_spec`).
    model: the TwoTower.
    params: host param tree.
    embeddings: [R, D] float32 reference embeddings.
    references: {"ids", "paths", "coordinates", "world"} arrays [R].
    queries: {"paths", "ids", "reference_row"}: the dataset's grounds.
    searcher: the ScaNN searcher (`knn.ExactSearcher` where the bundle was
      exported without ScaNN).
  """

  def __init__(self, folder, manifest, spec, model, params, embeddings,
               references, queries, searcher):
    self.folder = folder
    self.manifest = manifest
    self.spec = spec
    self.model = model
    self.params = params
    self.embeddings = embeddings
    self.references = references
    self.queries = queries
    self.searcher = searcher
    self._embed = None
    by_path, by_name, names = {}, {}, {}
    for path, row in zip(queries["paths"], queries["reference_row"]):
      by_path[os.path.normpath(str(path))] = int(row)
      name = os.path.basename(str(path))
      names[name] = names.get(name, 0) + 1
      by_name[name] = int(row)
    self._true_by_path = by_path
    self._true_by_name = {k: v for k, v in by_name.items()
                          if names[k] == 1}

  @property
  def num_references(self) -> int:
    return int(self.embeddings.shape[0])

  @property
  def coord_kind(self) -> str:
    return self.manifest["dataset"]["coord_kind"]

  def _embed_fn(self):
    if self._embed is None:
      mesh = parallel.make_mesh(jax.local_devices())
      fn = embed_lib.make_embed_fn(self.model, mesh, "ground")
      params = parallel.put_replicated(self.params, mesh)
      n_dev = mesh.devices.size

      def embed(images):
        n = images.shape[0]
        pad = -n % n_dev
        if pad:
          images = np.concatenate(
              [images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        batch = parallel.to_global({"image": images}, mesh)["image"]
        return np.asarray(fn(params, batch))[:n]
      self._embed = embed
    return self._embed

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> the bundle's ground size."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f"A query image must be [H, W, 3] uint8 RGB, got "
                       f"{image.dtype} {image.shape}.")
    return image_io.resize(image, self.spec["ground_size"])

  def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Query embeddings [B, D] float32 of uint8 RGB ground images of any
    size (resized to the bundle's ground size)."""
    images = [self.preprocess(i) for i in images]
    if not images:
      raise ValueError("embed: no images given.")
    fn = self._embed_fn()
    out = [fn(np.stack(images[s:s + _EMBED_BATCH]))
           for s in range(0, len(images), _EMBED_BATCH)]
    return np.concatenate(out)

  def search_embeddings(self, embeddings: np.ndarray, top_k: int = 10
                        ) -> tuple[np.ndarray, np.ndarray]:
    """ScaNN top-k of query embeddings [B, D]: scores [B, k] float32 and
    reference rows [B, k] int64, best first."""
    if not 1 <= top_k <= self.num_references:
      raise ValueError(f"top_k={top_k} must be in [1, "
                       f"{self.num_references}] (the bundle's references).")
    reorder = self.manifest["index"].get("reorder") or 0
    rows, scores = self.searcher.search_batched(
        np.ascontiguousarray(embeddings, np.float32),
        final_num_neighbors=top_k,
        pre_reorder_num_neighbors=max(reorder, top_k))
    return (np.asarray(scores, np.float32).reshape(-1, top_k),
            np.asarray(rows, np.int64).reshape(-1, top_k))

  def search(self, images: Sequence[np.ndarray], top_k: int = 10
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k tiles of uint8 RGB ground images: (scores, rows) [B, k]."""
    return self.search_embeddings(self.embed(images), top_k)

  def dataset_row(self, path: str) -> Optional[int]:
    """For an image of the bundle's dataset, the reference row of its true
    tile (-1 when that tile is not among the references); None for an
    image the dataset does not hold.

    Matches the path's trailing components against the dataset's relative
    ground paths, then a file name that is unique in the dataset.
    """
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    for n in range(len(parts) - 1, 0, -1):
      row = self._true_by_path.get(os.path.join(*parts[-n:]))
      if row is not None:
        return row
    return self._true_by_name.get(os.path.basename(path))

  def true_row(self, path: str) -> int:
    """Reference row of the true tile of a dataset image, else -1."""
    row = self.dataset_row(path)
    return -1 if row is None else row

  def match(self, row: int, rank: int, score: float) -> Match:
    coords = self.references["coordinates"][row]
    return Match(rank=rank, row=int(row),
                 id=str(self.references["ids"][row]),
                 path=str(self.references["paths"][row]), score=float(score),
                 coordinates=(tuple(float(c) for c in coords)
                              if np.isfinite(coords).all() else None),
                 world=int(self.references["world"][row]))

  def search_files(self, paths: Sequence[str], top_k: int = 10
                   ) -> list[QueryResult]:
    """Reads ground image files and returns their ranked tiles."""
    if not paths:
      raise ValueError("search_files: no image files given.")
    images = [image_io.read_rgb(p) for p in paths]
    scores, rows = self.search(images, top_k)
    results = []
    for path, s, r in zip(paths, scores, rows):
      found = self.dataset_row(path)
      true = -1 if found is None else found
      hit = np.flatnonzero(r == true) if true >= 0 else []
      results.append(QueryResult(
          query=str(path),
          matches=[self.match(row, k + 1, score)
                   for k, (row, score) in enumerate(zip(r, s))],
          true_row=true, true_rank=int(hit[0]) + 1 if len(hit) else None,
          in_dataset=found is not None))
    return results

  def tile_path(self, row: int, data_root: Optional[str] = None) -> str:
    """The tile file of a reference row under the dataset root (or
    `data_root` when the dataset has moved)."""
    root = data_root or self.manifest["dataset"]["root"]
    return os.path.join(root, str(self.references["paths"][row]))


def load_bundle(folder: str, *, verify: bool = True) -> Bundle:
  """Loads and checks a bundle (see the module docstring for refusals).

  Args:
    folder: the bundle folder.
    verify: check every file's size and SHA-256 against the manifest
      (reads every byte once).

  Raises:
    BundleError: naming the file and what is wrong with it.
  """
  manifest = read_manifest(folder)
  if verify:
    verify_files(folder, manifest)
  pre = manifest["preprocess"]
  ours = (list(augment.IMAGENET_MEAN), list(augment.IMAGENET_STD))
  if (pre.get("mean"), pre.get("std")) != ours or pre.get("color") != "RGB":
    raise BundleError(
        f"Bundle {folder} normalises RGB={pre.get('color')} mean "
        f"{pre.get('mean')} std {pre.get('std')}; this cvgl_jax uses RGB "
        f"mean {ours[0]} std {ours[1]}: it cannot embed queries as the "
        f"bundle's model expects.")
  spec = {k: v for k, v in manifest["model"].items()
          if k not in ("fingerprint", "embedding_dim")}
  try:
    model = encoder.build_model(spec)
  except (ValueError, KeyError, TypeError) as e:
    raise BundleError(f"Bundle {folder}: the manifest's model cannot be "
                      f"built: {e}") from e
  params = _load_params(folder, model, spec)
  model_fp = fingerprint(spec, params)
  if model_fp != manifest["model"].get("fingerprint"):
    raise BundleError(
        f"Bundle {folder}: the model's fingerprint {model_fp[:16]}... "
        f"differs from the manifest's "
        f"{str(manifest['model'].get('fingerprint'))[:16]}...: the manifest "
        f"describes another model.")
  references = _load_npz(folder, REFERENCES, REFERENCE_KEYS)
  params_sha = file_digest(os.path.join(folder, PARAMS))["sha256"]
  if str(references["model_fingerprint"]) != model_fp:
    raise BundleError(
        f"Bundle {folder}: {EMBEDDINGS} was computed by another model"
        f" (fingerprint {str(references['model_fingerprint'])[:16]}..., "
        f"the bundle's model is {model_fp[:16]}...). Re-export the bundle.")
  if str(references["params_sha256"]) != params_sha:
    raise BundleError(
        f"Bundle {folder}: {EMBEDDINGS} was computed with other "
        f"weights than {PARAMS} (params SHA-256 "
        f"{str(references['params_sha256'])[:16]}... vs "
        f"{params_sha[:16]}...). Re-export the bundle.")
  try:
    embeddings = np.load(os.path.join(folder, EMBEDDINGS),
                         allow_pickle=False)
  except (OSError, ValueError) as e:
    raise BundleError(f"Bundle {folder}: cannot read {EMBEDDINGS} "
                      f"({e}).") from e
  r, dim = len(references["ids"]), manifest["model"].get("embedding_dim")
  if embeddings.shape != (r, dim) or embeddings.dtype != np.float32:
    raise BundleError(
        f"Bundle {folder}: {EMBEDDINGS} is {embeddings.dtype} "
        f"{embeddings.shape}; expected float32 ({r}, {dim}) for {r} "
        f"references of the model's {dim}-d embeddings.")
  queries = _load_npz(folder, QUERIES, QUERY_KEYS)
  backend = manifest["index"].get("backend", "scann")
  if backend == "exact":
    searcher = knn.ExactSearcher(embeddings)
  elif not knn.scann_available():
    raise BundleError(f"Bundle {folder} has a ScaNN index but the scann "
                      f"package is not installed here (x86-64 Linux wheels "
                      f"only); export the bundle again on this machine, "
                      f"which writes one searched exactly.")
  else:
    from scann import scann_ops_pybind  # pylint: disable=g-import-not-at-top
    index_dir = os.path.join(folder, INDEX_DIR)
    try:
      searcher = scann_ops_pybind.load_searcher(index_dir)
    except Exception as e:  # ScaNN raises bare RuntimeErrors from C++.
      raise BundleError(f"Bundle {folder}: cannot load the ScaNN index in "
                        f"{index_dir} ({e}).") from e
  return Bundle(folder, manifest, spec, model, params, embeddings,
                references, queries, searcher)
