"""Retrieval bundle (export -> retrieve) and the run report, on one tiny run.

The module exports the session's tiny demo run (tests/conftest.py: a
synthetic CVUSA world of 48 pairs, a 2-stage ConvNeXt, every stage, the
pseudo-label stage for a warm-up epoch and one round) once; every test
reads those.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from cvgl_jax import bundle as bundle_lib
from cvgl_jax import embed as embed_lib
from cvgl_jax import evaluate
from cvgl_jax import export
from cvgl_jax import metrics
from cvgl_jax import plots
from cvgl_jax import run_dir
from cvgl_jax import report
from cvgl_jax import retrieve
from cvgl_jax import trained as trained_lib
from cvgl_jax.models import encoder
from cvgl_jax.pseudo import knn
from cvgl_jax.data import splits
import processes

MARK = (0x1a, 0x9e, 0x3f)  # plots.TRUE_COLOUR, the true tile's frame, RGB.


@pytest.fixture(scope="module")
def run(demo_run, tmp_path_factory):
  """(config, workdir, eval split, bundle folder) of the session's tiny
  demo run (tests/conftest.py), exported once."""
  config, workdir, _ = demo_run
  bundle = str(tmp_path_factory.mktemp("export") / "bundle")
  export.export(workdir, bundle)
  evaluation = splits.read_splits(config, workdir)[1]
  return config, workdir, evaluation, bundle


def copy_bundle(bundle, tmp_path, name="copy"):
  out = str(tmp_path / name)
  shutil.copytree(bundle, out)
  return out


def test_round_trip_ranks_as_evaluate(run):
  config, workdir, ev, bundle_dir = run
  trained = trained_lib.load_trained(workdir)
  assert (trained.stage, trained.checkpoint) == ("pseudo_label", "best")
  fns = embed_lib.embed_fns(trained.model, trained.mesh)
  common = dict(batch_size=16, mesh=trained.mesh)
  expected = evaluate.evaluate(
      trained.params, ev, ground_size=config.data.ground_size,
      satellite_size=config.data.satellite_size, embed_fns=fns, **common)
  ground = embed_lib.embed_split(fns[0], trained.params, ev.ground_paths,
                                 size=config.data.ground_size, **common)
  satellite = embed_lib.embed_split(fns[1], trained.params,
                                    ev.satellite_paths,
                                    size=config.data.satellite_size, **common)
  truth = metrics.recall_at_k(ground, satellite, ev.positive)

  bundle = bundle_lib.load_bundle(bundle_dir)
  np.testing.assert_array_equal(bundle.references["ids"], ev.satellite_ids)
  np.testing.assert_allclose(bundle.embeddings, satellite, atol=1e-6)
  results = bundle.search_files(list(ev.ground_paths),
                                top_k=ev.num_satellite)
  assert all(r.in_dataset for r in results)
  assert [r.true_row for r in results] == list(ev.positive)
  ranks = np.array([r.true_rank - 1 for r in results])
  np.testing.assert_array_equal(ranks, truth.ranks)
  np.testing.assert_array_equal([r.matches[0].row for r in results],
                                truth.top1)
  for k in (1, 5, 10):
    assert 100.0 * np.mean(ranks < k) == pytest.approx(expected[f"R@{k}"])
  scores = np.array([[m.score for m in r.matches] for r in results])
  assert (np.diff(scores, axis=1) <= 0).all()
  np.testing.assert_allclose(scores[:, 0], (ground @ satellite.T).max(1),
                             atol=1e-5)

  manifest = bundle.manifest
  # The bundle ships what the stage handed on (chosen without labels).
  selected = run_dir.read_done(workdir, "pseudo_label")["selected"]
  assert manifest["source"]["step"] == selected["step"]
  assert manifest["source"]["eval"]["R@1"] == selected["eval"]["R@1"]
  # The synthetic world's tile centres are the references' coordinates.
  with open(os.path.join(ev.root, "synthetic_truth.json")) as f:
    centres = {p["satellite_id"]: (p["recorded_en_m"], p["world"])
               for p in json.load(f)["pairs"]}
  m = results[0].matches[0]
  assert manifest["dataset"]["coord_kind"] == "synthetic"
  assert [list(m.coordinates), m.world] == list(centres[m.id])


def test_a_fresh_process_retrieves_without_the_workdir(run, tmp_path):
  _, workdir, ev, bundle_dir = run
  moved = copy_bundle(bundle_dir, tmp_path, "bundle")
  data = str(tmp_path / "data")
  shutil.copytree(ev.root, data)
  queries = [os.path.join(data, os.path.relpath(p, ev.root))
             for p in ev.ground_paths[:3]]
  expected = bundle_lib.load_bundle(bundle_dir).search_files(queries, 3)
  picture = str(tmp_path / "matches.png")
  env = dict(os.environ, XLA_FLAGS=processes.xla_flags())
  hidden = workdir + ".hidden"
  os.rename(workdir, hidden)
  try:
    out = subprocess.run(
        [sys.executable, "-m", "cvgl_jax.retrieve", f"--bundle={moved}",
         "--top_k=3", "--json", f"--picture={picture}",
         f"--data_root={data}", *queries],
        capture_output=True, text=True, env=env, timeout=300)
  finally:
    os.rename(hidden, workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  got = [json.loads(line) for line in out.stdout.splitlines()]
  assert [g["query"] for g in got] == queries
  for g, e in zip(got, expected):
    assert [m["row"] for m in g["matches"]] == [m.row for m in e.matches]
    np.testing.assert_allclose([m["score"] for m in g["matches"]],
                               [m.score for m in e.matches], atol=1e-5)
    assert (g["true_row"], g["true_rank"]) == (e.true_row, e.true_rank)
  assert f"Picture: {picture}" in out.stderr
  image = cv2.imread(picture, cv2.IMREAD_COLOR_RGB)
  assert image is not None and image.shape[1] > image.shape[0] > 300
  assert image.std() > 20


def test_the_cli_refuses_a_corrupt_bundle(run, tmp_path):
  _, _, ev, bundle_dir = run
  bad = copy_bundle(bundle_dir, tmp_path)
  with open(os.path.join(bad, bundle_lib.PARAMS), "r+b") as f:
    f.seek(-3, os.SEEK_END)
    f.write(b"\x00\x01\x02")
  out = subprocess.run(
      [sys.executable, "-m", "cvgl_jax.retrieve", f"--bundle={bad}",
       ev.ground_paths[0]], capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "Refused" in out.stderr and "params.safetensors" in out.stderr
  assert "corrupt" in out.stderr


def _rewrite_manifest(folder):
  """Re-hashes every file (as if the bundle had been assembled by hand)."""
  with open(os.path.join(folder, bundle_lib.MANIFEST)) as f:
    manifest = json.load(f)
  bundle_lib.write_manifest(folder, manifest)


def _edit_manifest(folder, edit):
  path = os.path.join(folder, bundle_lib.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  edit(manifest)
  with open(path, "w") as f:
    json.dump(manifest, f)


def test_refuses_missing_truncated_and_corrupt_files(run, tmp_path):
  bundle_dir = run[3]
  bad = copy_bundle(bundle_dir, tmp_path, "missing")
  os.remove(os.path.join(bad, bundle_lib.QUERIES))
  with pytest.raises(bundle_lib.BundleError, match="queries.npz is missing"):
    bundle_lib.load_bundle(bad)

  bad = copy_bundle(bundle_dir, tmp_path, "truncated")
  path = os.path.join(bad, bundle_lib.EMBEDDINGS)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 64)
  with pytest.raises(bundle_lib.BundleError,
                     match=f"embeddings.npy has {size - 64} bytes.*"
                           f"says {size}.*truncated"):
    bundle_lib.load_bundle(bad)

  bad = copy_bundle(bundle_dir, tmp_path, "flipped")
  path = os.path.join(bad, bundle_lib.INDEX_DIR, "dataset.npy")
  data = bytearray(open(path, "rb").read())
  data[-5] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(bundle_lib.BundleError,
                     match="scann/dataset.npy has SHA-256.*corrupt"):
    bundle_lib.load_bundle(bad)

  # An entry removed from the manifest does not switch off its file's check.
  bad = copy_bundle(bundle_dir, tmp_path, "unlisted")
  index_file = os.path.join(bundle_lib.INDEX_DIR, "dataset.npy")
  _edit_manifest(bad, lambda m: m["files"].pop(index_file))
  with pytest.raises(bundle_lib.BundleError,
                     match="scann/dataset.npy is not in the manifest"):
    bundle_lib.load_bundle(bad)

  bad = copy_bundle(bundle_dir, tmp_path, "version")
  _edit_manifest(bad, lambda m: m.update(version=99))
  with pytest.raises(bundle_lib.BundleError, match="version 99"):
    bundle_lib.load_bundle(bad)
  with pytest.raises(bundle_lib.BundleError, match="does not exist"):
    bundle_lib.load_bundle(str(tmp_path / "nowhere"))


def test_refuses_a_bundle_of_another_model(run, tmp_path):
  bundle_dir = run[3]
  bundle = bundle_lib.load_bundle(bundle_dir)

  # Another architecture's params (wider second stage).
  other = dict(bundle.spec, dims=[8, 24])
  shapes = encoder.abstract_params(encoder.build_model(other), other)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  bad = copy_bundle(bundle_dir, tmp_path, "other_params")
  bundle_lib.save_params(os.path.join(bad, bundle_lib.PARAMS), zeros)
  with pytest.raises(bundle_lib.BundleError,
                     match="params.safetensors has .*(bytes|SHA-256)"):
    bundle_lib.load_bundle(bad)
  _rewrite_manifest(bad)
  with pytest.raises(bundle_lib.BundleError,
                     match="another model's params.*differ in shape"):
    bundle_lib.load_bundle(bad)

  # The manifest describes another model than the params hold.
  bad = copy_bundle(bundle_dir, tmp_path, "other_spec")
  _edit_manifest(bad, lambda m: m["model"].update(dims=[8, 24]))
  with pytest.raises(bundle_lib.BundleError, match="another model's params"):
    bundle_lib.load_bundle(bad)
  bad = copy_bundle(bundle_dir, tmp_path, "other_fingerprint")
  _edit_manifest(bad, lambda m: m["model"].update(fingerprint="0" * 64))
  with pytest.raises(bundle_lib.BundleError,
                     match="manifest describes another model"):
    bundle_lib.load_bundle(bad)

  # Same architecture, other weights: the embeddings no longer match.
  bad = copy_bundle(bundle_dir, tmp_path, "other_weights")
  bundle_lib.save_params(os.path.join(bad, bundle_lib.PARAMS),
                         jax.tree.map(lambda x: x * 0.5, bundle.params))
  _rewrite_manifest(bad)
  with pytest.raises(bundle_lib.BundleError,
                     match="embeddings.npy was computed with other weights"):
    bundle_lib.load_bundle(bad)


def test_without_scann_the_bundle_is_searched_exactly(run, tmp_path,
                                                      monkeypatch):
  """Where scann has no wheel (aarch64): the same retrieval, no index."""
  _, workdir, _, bundle_dir = run
  with_index = bundle_lib.load_bundle(bundle_dir)
  monkeypatch.setattr(knn, "scann_available", lambda: False)
  out = str(tmp_path / "exact")
  manifest = export.export(workdir, out)
  assert manifest["index"] == {"backend": "exact", "distance": "dot_product"}
  assert not os.path.exists(os.path.join(out, bundle_lib.INDEX_DIR))
  exact = bundle_lib.load_bundle(out)
  queries = with_index.embeddings[:5] + 0.01
  scores_a, rows_a = with_index.search_embeddings(queries, 3)
  scores_b, rows_b = exact.search_embeddings(queries, 3)
  np.testing.assert_array_equal(rows_a, rows_b)
  np.testing.assert_allclose(scores_a, scores_b, rtol=1e-5)
  with pytest.raises(bundle_lib.BundleError, match="scann package is not "
                     "installed"):
    bundle_lib.load_bundle(bundle_dir)
  with pytest.raises(ValueError, match="scann package is not installed"):
    knn.knn(queries, with_index.embeddings, 2, backend="scann")
  assert knn._backend("auto", 10**6, 10**6) == "exact"  # pylint: disable=protected-access


def test_export_refuses_bad_requests_before_embedding(run, tmp_path):
  _, workdir, _, bundle_dir = run
  with pytest.raises(export.ExportError, match="exists and is not empty"):
    export.export(workdir, bundle_dir)
  out = str(tmp_path / "b")
  with pytest.raises(export.ExportError, match="not a training stage"):
    export.export(workdir, out, stage="cfp")
  with pytest.raises(export.ExportError,
                     match="'supervised' has no checkpoint"):
    export.export(workdir, out, stage="supervised")
  with pytest.raises(export.ExportError, match="references='test'"):
    export.export(workdir, out, references="test")
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    export.export(str(tmp_path), out)
  assert not os.path.exists(out)


def test_draw_panels_frames_only_the_true_tile(tmp_path):
  rng = np.random.default_rng(0)
  grey = lambda *s: rng.integers(60, 200, s + (3,), dtype=np.uint8)
  panel = plots.Panel(query=grey(32, 128), title="q",
                      tiles=[grey(64, 64) for _ in range(5)],
                      captions=[f"#{i + 1}" for i in range(5)])

  def marked_pixels(panels):
    path = str(tmp_path / "p.png")
    plots.draw_panels(panels, path, title="t")
    image = cv2.imread(path, cv2.IMREAD_COLOR_RGB)
    return image, int((np.abs(image.astype(int) - MARK).sum(-1) < 10).sum())

  image, none = marked_pixels([panel, panel])
  assert none == 0 and image.shape[1] > image.shape[0]
  _, framed = marked_pixels([dataclasses.replace(panel, true_index=2),
                             panel])
  assert framed > 400  # A 5 px frame around one tile.


def test_choose_examples_mixes_hits_and_misses():
  ranks = np.array([0, 3, 0, 0, 7, 0, 1, 0])
  chosen = report.choose_examples(ranks, 4)
  assert list(chosen) == sorted(chosen) and len(set(chosen)) == 4
  assert (ranks[chosen] == 0).sum() == 2
  assert list(report.choose_examples(np.zeros(3, int), 6)) == [0, 1, 2]
  assert len(report.choose_examples(np.array([2, 0, 5]), 2)) == 2


def test_read_records_keeps_the_last_of_a_resumed_step(tmp_path):
  (tmp_path / "s").mkdir()
  lines = [{"step": 2, "epoch": 1, "kind": "eval", "R@1": 1.0},
           {"step": 1, "epoch": 0, "kind": "train", "loss": 3.0},
           {"step": 2, "epoch": 1, "kind": "eval", "R@1": 5.0}]
  (tmp_path / "s" / "metrics.jsonl").write_text(
      "".join(json.dumps(x) + "\n" for x in lines))
  records = run_dir.read_records(str(tmp_path), "s")
  assert [(r["kind"], r.get("R@1")) for r in records] == [
      ("train", None), ("eval", 5.0)]


def test_report_writes_the_pictures_of_the_run(run):
  config, workdir, ev, _ = run
  written = report.write_report(workdir, num_examples=4)
  assert sorted(written) == ["pseudo_labels", "recall", "retrieval_examples"]
  sizes = {"recall": (450, 800), "pseudo_labels": (900, 800)}
  for name, path in written.items():
    assert path == os.path.join(workdir, "report", f"{name}.png")
    image = cv2.imread(path, cv2.IMREAD_COLOR_RGB)
    assert image is not None and image.std() > 10, name
    if name in sizes:
      assert image.shape[:2] == sizes[name]

  curves = report.recall_curves(workdir, config)
  assert [c["stage"] for c in curves] == ["intra", "cross_fake",
                                          "pseudo_label"]
  assert list(curves[-1]["epochs"]) == [1, 2]
  done = run_dir.read_done(workdir, "pseudo_label")
  assert curves[-1]["R@1"][-1] == done["eval"]["R@1"]
  rounds = report.pseudo_rounds(workdir)
  assert [(r["epoch"], r["warmup"]) for r in rounds] == [(0, 1.0), (1, 0.0)]

  panels, title = report.example_panels(workdir, config, count=4)
  assert len(panels) == 4 and ev.name in title
  for panel in panels:
    rank = int(panel.title.rsplit(" ", 1)[1])
    assert panel.true_index == (rank - 1 if rank <= 5 else -1)
    assert len(panel.tiles) == 5


def test_two_processes_export_the_same_bundle(run, tmp_path):
  """`python -m cvgl_jax.export` as processes 0 and 1 of one job (a CPU
  device each, as the workers of a pod): each embeds its share, process 0
  writes the bundle, and it holds the one-process bundle's embeddings."""
  _, workdir, _, bundle_dir = run
  out = str(tmp_path / "bundle")
  port = processes.free_port()
  env = dict(os.environ, XLA_FLAGS=processes.xla_flags())
  outputs = processes.run_all(
      [[sys.executable, "-m", "cvgl_jax.export", f"--workdir={workdir}",
        f"--out={out}", f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2", f"--process_id={i}"] for i in range(2)],
      [env, env], str(tmp_path), timeout=300)
  texts = [text for _, text in outputs]
  for code, text in outputs:
    assert code == 0, text[-3000:]
  assert '"num_references"' in texts[0] and '"num_references"' not in texts[1]
  np.testing.assert_allclose(
      np.load(os.path.join(out, bundle_lib.EMBEDDINGS)),
      np.load(os.path.join(bundle_dir, bundle_lib.EMBEDDINGS)), atol=1e-5)
  assert (bundle_lib.read_manifest(out)["source"]
          == bundle_lib.read_manifest(bundle_dir)["source"])
  bundle_lib.load_bundle(out)  # Whole, and every file as the manifest says.


def test_bundle_files_take_the_users_umask(run):
  """The safetensors writer makes its files 0600; a bundle shared with a
  group must be readable as the user's umask says (0644 under 022)."""
  _, _, _, bundle_dir = run
  umask = os.umask(0)
  os.umask(umask)
  for folder, _, files in os.walk(bundle_dir):
    for name in files:
      mode = os.stat(os.path.join(folder, name)).st_mode & 0o777
      assert mode == 0o666 & ~umask, (name, oct(mode))


def test_retrieve_refuses_a_non_image_or_a_foreign_aspect(run, tmp_path):
  """One line and exit 2 each; the dataset's own queries pass the aspect
  check, a square crop of one does not (unless --any_aspect)."""
  _, _, ev, bundle_dir = run
  manifest = bundle_lib.read_manifest(bundle_dir)
  h, w = cv2.imread(ev.ground_paths[0]).shape[:2]
  assert manifest["preprocess"]["query_size"] == [h, w]
  own = {p: (h, w) for p in ev.ground_paths[:3]}
  assert retrieve.query_size_problems(manifest, own) == []
  square = str(tmp_path / "square.png")
  cv2.imwrite(square, cv2.imread(ev.ground_paths[0])[:, :h])
  (problem,) = retrieve.query_size_problems(manifest, {square: (h, h)})
  assert f"{h} x {h} px" in problem and f"{w} x {h}" in problem
  text = str(tmp_path / "notes.png")
  with open(text, "w") as f:
    f.write("not an image")
  env = dict(os.environ, XLA_FLAGS=processes.xla_flags())
  procs = {name: subprocess.Popen(
      [sys.executable, "-m", "cvgl_jax.retrieve", f"--bundle={bundle_dir}",
       query], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for name, query in (("text", text), ("square", square))}
  expected = {"text": "no image header", "square": "--any_aspect"}
  for name, p in procs.items():
    _, stderr = p.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (name, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
    assert expected[name] in lines[0], (name, lines)
