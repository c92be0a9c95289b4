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

A bundle is refused with a `BundleError` that names the file when: a file
is missing, truncated or differs from its SHA-256 in the manifest (corrupt,
or copied from another bundle); the manifest is not a bundle manifest of a
version this code reads; the params do not fit the model the manifest
describes (another model's params); the reference embeddings were computed
by another model or other weights than the bundle's; or the bundle's
normalisation differs from this code's.

Python API:

  bundle = retrieve.load_bundle("BUNDLE")
  scores, rows = bundle.search(images, top_k=10)   # uint8 RGB images
  results = bundle.search_files(["query.jpg"], top_k=10)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

from absl import flags
from absl import logging
import flax.traverse_util
import jax
import numpy as np
import safetensors
import safetensors.numpy

from cvgl_jax import cli
from cvgl_jax import embed as embed_lib
from cvgl_jax import export
from cvgl_jax import parallel
from cvgl_jax import plots
from cvgl_jax.data import augment
from cvgl_jax.data import image_io
from cvgl_jax.pseudo import knn

PICTURE_TILES = 5
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


# ------------------------------------------------------------- loading ----


def _require(folder: str, rel: str) -> str:
  path = os.path.join(folder, rel)
  if not os.path.isfile(path):
    raise BundleError(f"Bundle {folder}: file {rel} is missing.")
  return path


# How far a query's width / height may stray from the training images'.
ASPECT_TOLERANCE = 0.05


def read_manifest(folder: str) -> dict:
  """The bundle's manifest, checked for format and version."""
  if not os.path.isdir(folder):
    raise BundleError(f"Bundle folder {folder} does not exist.")
  path = _require(folder, export.MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BundleError(f"Bundle {folder}: {export.MANIFEST} is not valid "
                      f"JSON ({e}): the file is corrupt.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != (
      export.FORMAT):
    raise BundleError(f"{path} is not a {export.FORMAT} manifest.")
  if manifest.get("version") != export.VERSION:
    raise BundleError(f"{path} has format version "
                      f"{manifest.get('version')!r}; this cvgl_jax reads "
                      f"version {export.VERSION}. Re-export the bundle.")
  for key in ("model", "preprocess", "dataset", "index", "files"):
    if key not in manifest:
      raise BundleError(f"{path} lacks the section {key!r}.")
  return manifest


def verify_files(folder: str, manifest: dict) -> None:
  """Every file the manifest lists exists with its size and SHA-256, the
  bundle has the files a bundle needs, and holds no file the manifest
  does not list."""
  files = manifest["files"]
  needed = [export.PARAMS, export.EMBEDDINGS, export.REFERENCES,
            export.QUERIES]
  for rel in needed:
    if rel not in files:
      raise BundleError(f"Bundle {folder}: the manifest lists no {rel}.")
  if manifest["index"].get("backend", "scann") == "scann" and not any(
      r.startswith(export.INDEX_DIR + "/") for r in files):
    raise BundleError(f"Bundle {folder}: the manifest lists no ScaNN "
                      f"index files ({export.INDEX_DIR}/).")
  # A file the loader reads but the manifest omits would go unchecked.
  unlisted = sorted(set(export.bundle_files(folder)) - set(files))
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
    got = export.file_digest(path)["sha256"]
    if got != expected["sha256"]:
      raise BundleError(
          f"Bundle {folder}: {rel} has SHA-256 {got[:16]}..., the "
          f"manifest says {expected['sha256'][:16]}...: the file is "
          f"corrupt or comes from another bundle. Re-export the bundle.")


def _load_params(folder: str, model, spec: dict) -> Any:
  """The params file, checked against the manifest's model."""
  path = os.path.join(folder, export.PARAMS)
  try:
    flat = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise BundleError(f"Bundle {folder}: cannot read {export.PARAMS} "
                      f"({e}).") from e
  expected = flax.traverse_util.flatten_dict(
      export.abstract_params(model, spec), sep="/")
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
        f"Bundle {folder}: {export.PARAMS} holds another model's params "
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
    spec: the model spec (`export.model_spec`).
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
    model = export.build_model(spec)
  except (ValueError, KeyError, TypeError) as e:
    raise BundleError(f"Bundle {folder}: the manifest's model cannot be "
                      f"built: {e}") from e
  params = _load_params(folder, model, spec)
  model_fp = export.fingerprint(spec, params)
  if model_fp != manifest["model"].get("fingerprint"):
    raise BundleError(
        f"Bundle {folder}: the model's fingerprint {model_fp[:16]}... "
        f"differs from the manifest's "
        f"{str(manifest['model'].get('fingerprint'))[:16]}...: the manifest "
        f"describes another model.")
  references = _load_npz(folder, export.REFERENCES,
                         ("ids", "paths", "coordinates", "world",
                          "model_fingerprint", "params_sha256"))
  params_sha = export.file_digest(
      os.path.join(folder, export.PARAMS))["sha256"]
  if str(references["model_fingerprint"]) != model_fp:
    raise BundleError(
        f"Bundle {folder}: {export.EMBEDDINGS} was computed by another model"
        f" (fingerprint {str(references['model_fingerprint'])[:16]}..., "
        f"the bundle's model is {model_fp[:16]}...). Re-export the bundle.")
  if str(references["params_sha256"]) != params_sha:
    raise BundleError(
        f"Bundle {folder}: {export.EMBEDDINGS} was computed with other "
        f"weights than {export.PARAMS} (params SHA-256 "
        f"{str(references['params_sha256'])[:16]}... vs "
        f"{params_sha[:16]}...). Re-export the bundle.")
  try:
    embeddings = np.load(os.path.join(folder, export.EMBEDDINGS),
                         allow_pickle=False)
  except (OSError, ValueError) as e:
    raise BundleError(f"Bundle {folder}: cannot read {export.EMBEDDINGS} "
                      f"({e}).") from e
  r, dim = len(references["ids"]), manifest["model"].get("embedding_dim")
  if embeddings.shape != (r, dim) or embeddings.dtype != np.float32:
    raise BundleError(
        f"Bundle {folder}: {export.EMBEDDINGS} is {embeddings.dtype} "
        f"{embeddings.shape}; expected float32 ({r}, {dim}) for {r} "
        f"references of the model's {dim}-d embeddings.")
  queries = _load_npz(folder, export.QUERIES,
                      ("paths", "ids", "reference_row"))
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
    index_dir = os.path.join(folder, export.INDEX_DIR)
    try:
      searcher = scann_ops_pybind.load_searcher(index_dir)
    except Exception as e:  # ScaNN raises bare RuntimeErrors from C++.
      raise BundleError(f"Bundle {folder}: cannot load the ScaNN index in "
                        f"{index_dir} ({e}).") from e
  return Bundle(folder, manifest, spec, model, params, embeddings,
                references, queries, searcher)


# ------------------------------------------------------------- display ----


def format_coordinates(match: Match, labels: Sequence[str]) -> str:
  """"east_m=60.7 north_m=63.5 world=0", or "-" without coordinates."""
  if match.coordinates is None:
    return "-"
  text = " ".join(f"{k}={v:.6g}" for k, v in zip(labels, match.coordinates))
  return text + (f" world={match.world}" if match.world >= 0 else "")


def format_results(results: Sequence[QueryResult],
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


def result_panel(bundle: Bundle, result: QueryResult,
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
    bundle = load_bundle(f.bundle, verify=f.verify)
  except BundleError as e:
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
