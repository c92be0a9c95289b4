"""`main`: config validation, and the demo config's stages end to end."""

import atexit
import importlib.util
import json
import os
import shutil
import tempfile

import jax
import pytest

from cvgl_jax import config_lib
from cvgl_jax import main as main_lib
from cvgl_jax import pretrain as pretrain_lib
from cvgl_jax import run_dir
from cvgl_jax.data import derived
from cvgl_jax.data import splits
from cvgl_jax.train import stage as stage_lib

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def load_config_module(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name, arg=None):
  module = load_config_module(name)
  return module.get_config() if arg is None else module.get_config(arg)


def tiny_demo_config():
  """The demo config shrunk to CI size: 48 pairs, a 2-stage ConvNeXt."""
  config = load_config("synthetic_unsup")
  config.synthetic.num_pairs = 48
  config.synthetic.pairs_per_world = 24
  config.synthetic.map_cells = 1024
  config.synthetic.sat_px = 64
  config.synthetic.cvusa_width = 154
  config.data.ground_size = (32, 128)
  config.data.satellite_size = (64, 64)
  config.cfp.out_size = 48
  t = config.translate
  t.ngf, t.ndf, t.n_blocks, t.n_layers_d = 4, 4, 1, 1
  t.load_size, t.crop_size, t.n_epochs, t.n_epochs_decay = 36, 32, 1, 0
  config.model.variant = "custom"
  config.model.depths, config.model.dims = (1, 1), (8, 16)
  config.train.batch_size = 16
  config.train.eval_batch_size = 16
  config.train.log_every_steps = 1
  config.intra.epochs = 1
  config.cross_fake.epochs = 1
  config.pseudo_label.epochs = 2
  config.pseudo_label.warmup_epochs = 1
  # One view per round keeps the CI runs short; the session's demo run
  # (conftest.py) and the 2-process test compare the label-free views.
  config.pseudo_label.paired_views = 1
  config.pseudo_label.fake_view = False
  # A tiny stand-in: 24 source pairs, one epoch, a cache of its own.
  config.pretrain.num_pairs = 24
  config.pretrain.epochs = 1
  config.pretrain.cache_dir = tempfile.mkdtemp(prefix="cvgl_pretrain_")
  # Removed when the test process exits (each call left one in /tmp).
  atexit.register(shutil.rmtree, config.pretrain.cache_dir, True)
  return config


def demo_run_config():
  """The session's demo run (conftest.py's `demo_run`, also timed by
  benchmarks/compile_time.py): every stage, 37.5 % labels, each epoch
  evaluated, stage 3 with a moving average of its params."""
  config = tiny_demo_config()
  config.train.eval_every_epochs = 1
  p = config.pseudo_label
  p.epochs, p.warmup_epochs, p.gt_ratio, p.tau = 2, 1, 0.375, 0.0
  p.knn_backend = "exact"
  # Every paired view and the fake view: the round table's hand count
  # (test_paradigm) recomputes what they compare.
  p.paired_views, p.fake_view = 8, True
  config.train.select = "label_free"  # The path with more to check.
  # A mean teacher: the rounds, evaluations and export read the average
  # (test_paradigm's hand count restores it).
  p.ema_epochs = 0.5
  return config


@pytest.mark.parametrize("name", ["cvusa_unsup", "cvact_unsup", "vigor_unsup",
                                  "cvusa_supervised", "cvact_supervised",
                                  "vigor_supervised"])
def test_dataset_configs_validate_once_given_a_root(name, tmp_path):
  config = load_config(name)
  with pytest.raises(config_lib.ConfigError, match="data.root is empty"):
    config_lib.validate(config)
  config.data.root = str(tmp_path)
  config_lib.validate(config)


def test_sample4geo_config_shares_one_gap_encoder():
  config = load_config("cvusa_supervised", "sample4geo")
  assert config.model.share_weights and config.model.head == "gap"
  with pytest.raises(config_lib.ConfigError,
                     match=r"one of \('paper', 'sample4geo'\)"):
    load_config("cvusa_supervised", "transgeo")


def test_validation_names_every_bad_key(tmp_path):
  config = load_config("cvusa_unsup")
  config.data.root = str(tmp_path / "nowhere")
  config.model.pretrained = str(tmp_path / "convnext.safetensors")
  config.stages = ("cfp", "intra", "pseudo_labels")
  config.train.batch_size = 0
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  msg = str(e.value)
  assert "data.root=" in msg and "is not a directory" in msg
  assert "convnext.safetensors' does not exist" in msg
  assert "'pseudo_labels'" in msg
  assert "train.batch_size=0" in msg
  config = load_config("cvusa_unsup")
  config.data.root = str(tmp_path)
  config.cross_fake.fake_folder = "bev"
  config.translate.source = "street"
  config.translate.crop_size = 30
  config.augment.blur_p = 1.5
  config.report.num_examples = -1
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  msg = str(e.value)
  assert "cross_fake.fake_folder='bev'" in msg
  assert "translate.source='street'" in msg
  # Before the run, not when the translate stage starts hours later.
  assert "config.translate.crop_size=30 must be a multiple of 4" in msg
  assert "augment.blur_p=1.5" in msg
  assert "report.num_examples=-1 must be >= 0" in msg
  config = load_config("cvusa_unsup")
  config.data.root = str(tmp_path)
  config.train.batchsize = 64
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert "config.train.batchsize (did you mean 'batch_size'?)" in str(e.value)
  config = load_config("synthetic_unsup")
  config.synthetic.block_m = (60.0, 30.0)
  with pytest.raises(config_lib.ConfigError, match=r"config.synthetic: "
                     r"SyntheticConfig.block_m=\(60.0, 30.0\)"):
    config_lib.validate(config)


def test_a_repeated_override_is_refused_not_concatenated():
  assert main_lib.repeated_overrides([
      "--config=c.py", "--config.data.ground_size=(64,256)",
      "--workdir=w", "--config.data.ground_size=(32,128)",
      "--config.train.lr=1e-3"]) == ["config.data.ground_size"]
  assert main_lib.repeated_overrides(["--config.train.lr=1", "--config=x"]
                                     ) == []


def test_previous_training_stage():
  config = load_config("synthetic_unsup")
  assert stage_lib.previous_training_stage(config, "cross_fake") == "intra"
  assert stage_lib.previous_training_stage(config, "intra") is None


def test_the_retrain_stage_needs_stage_3_and_a_cold_start_before_it():
  config = config_lib.synthetic_demo()
  config.stages = (*config.stages, "retrain")
  config_lib.validate(config)
  config.retrain.start_from = "pseudo_label"
  with pytest.raises(config_lib.ConfigError,
                     match=r"retrain.start_from='pseudo_label' must be a "
                     r"training stage run before stage 3 \(one of "
                     r"\['intra', 'cross_fake'\]"):
    config_lib.validate(config)
  config.retrain.start_from = "cross_fake"
  config.stages = ("cfp", "translate", "intra", "cross_fake", "retrain")
  with pytest.raises(config_lib.ConfigError,
                     match="runs 'retrain' without 'pseudo_label' before"):
    config_lib.validate(config)


def test_demo_stages_run_end_to_end_and_a_rerun_skips_them(demo_run):
  config, workdir, results = demo_run
  assert list(results) == ["pretrain", "cfp", "translate", "intra",
                           "cross_fake", "pseudo_label"]
  world = os.path.join(workdir, run_dir.SYNTHETIC_WORLD)
  train = splits.read_splits(config, workdir)[0]
  for folder in ("g2a", "g2a_sat"):
    assert sorted(os.listdir(os.path.join(world, folder))) == sorted(
        [f"{i}.png" for i in train.ground_ids] + [derived.STAMP])
  assert results["cfp"]["written"] == train.num_ground
  assert results["translate"]["written"] == train.num_ground
  for stage in ("intra", "cross_fake", "pseudo_label"):
    summary = results[stage]
    assert summary["finished"] and summary["step"] > 0
    assert 0.0 <= summary["eval"]["R@1"] <= 100.0
    assert summary["eval"]["num_queries"] > 0
    lines = open(os.path.join(workdir, stage, "metrics.jsonl")).readlines()
    assert any(json.loads(line)["kind"] == "eval" for line in lines)
    assert run_dir.read_done(workdir, stage) == json.loads(json.dumps(summary))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["synthetic"]["num_pairs"] == 48

  done_times = {s: os.path.getmtime(os.path.join(workdir, s, run_dir.DONE))
                for s in results}
  again = main_lib.run(config, workdir)
  assert again == json.loads(json.dumps(results))
  assert done_times == {s: os.path.getmtime(os.path.join(workdir, s, run_dir.DONE))
                        for s in results}


def test_pseudo_label_stage_reports_rounds_with_precision(demo_run):
  config, workdir, results = demo_run
  summary = results["pseudo_label"]
  assert summary["epochs_done"] == 2
  rounds = [json.loads(line) for line in
            open(os.path.join(workdir, "pseudo_label", "metrics.jsonl"))
            if json.loads(line)["kind"] == "epoch_start"]
  assert [r["epoch"] for r in rounds] == [0, 1]
  warm, first = rounds
  train = splits.read_splits(config, workdir)[0]
  num_gt = int(config.pseudo_label.gt_ratio * train.num_ground)
  # Warm-up: the labelled fraction's true pairs only.
  assert warm["warmup"] == 1.0 and warm["num_labels"] == num_gt
  assert warm["labelled_only"] == 1.0
  # A round: mutual pairs with precision against the truth file's pairing,
  # merged with the true pairs.
  assert first["warmup"] == 0.0
  mutual = first["mutual/pairs"]
  assert 0 < mutual <= train.num_ground
  assert 0.0 <= first["mutual/precision"] <= 1.0
  assert num_gt <= first["num_labels"] <= mutual + num_gt
  assert summary["last_round"]["epoch"] == 1


def test_benchmark_rows_change_only_what_their_names_say():
  demo = load_config("synthetic_unsup")
  config_lib.validate(demo)
  assert demo.stages == ("pretrain", "cfp", "translate", "intra",
                         "cross_fake", "pseudo_label")
  flat = lambda c: dict(_flatten(c.to_dict()))
  base = flat(load_config("synthetic_benchmark", "ours_0"))
  # The benchmark is the demo on a larger world, its rounds comparing one
  # view as the paper (the _views rows: the demo's label-free views), its
  # CycleGAN trained the 1 + 1 epochs its table was measured with.
  assert {k: v for k, v in base.items() if flat(demo)[k] != v} == {
      "synthetic.num_pairs": 2500, "pseudo_label.paired_views": 1,
      "pseudo_label.fake_view": False, "translate.n_epochs": 1,
      "translate.n_epochs_decay": 1}
  views = {"pseudo_label.paired_views": 8, "pseudo_label.fake_view": True}
  without = lambda *names: tuple(s for s in demo.stages if s not in names)
  expected = {
      "ours_0": {},
      "ours_10": {"pseudo_label.gt_ratio": 0.1},
      "ours_0_views": views,
      "ours_10_views": dict(views, **{"pseudo_label.gt_ratio": 0.1}),
      "ours_0_ema": {"pseudo_label.ema_epochs": 1.0},
      "ours_10_ema": {"pseudo_label.ema_epochs": 1.0,
                      "pseudo_label.gt_ratio": 0.1},
      "ours_0_retrain": {"stages": (*demo.stages, "retrain")},
      "ours_10_retrain": {"stages": (*demo.stages, "retrain"),
                          "pseudo_label.gt_ratio": 0.1},
      "ours_100": {"pseudo_label.gt_ratio": 1.0},
      "from_scratch": {"stages": without("pretrain")},
      "source_pairs": {"pretrain.objective": "pairs"},
      "authors_switch": {"pseudo_label.labeled_ratio": 0.4},
      "no_mutual": {"pseudo_label.mutual": False},
      "no_threshold": {"pseudo_label.margin_filter": False},
      "no_curriculum": {"pseudo_label.curriculum": False},
      "no_translation": {"cross_fake.fake_folder": "g2a",
                         "stages": without("translate")},
      "no_bev": {"translate.source": "panorama", "stages": without("cfp")},
      "no_intra": {"stages": without("intra")},
      # As many epochs as the paradigm's three training stages together,
      # with stage 3's label smoothing.
      "supervised": {"stages": ("pretrain", "supervised"),
                     "supervised.epochs": demo.intra.epochs
                     + demo.cross_fake.epochs + demo.pseudo_label.epochs,
                     "supervised.label_smoothing":
                         demo.pseudo_label.label_smoothing},
  }
  assert set(expected) == set(load_config_module("synthetic_benchmark").ROWS)
  for row, changes in expected.items():
    config = load_config("synthetic_benchmark", row)
    config_lib.validate(config)
    got = flat(config)
    diff = {k: got[k] for k in got if got[k] != base[k]}
    assert diff == changes, row
  got = flat(load_config("synthetic_benchmark", "no_mutual@10#2"))
  assert {k: got[k] for k in got if got[k] != base[k]} == {
      "pseudo_label.mutual": False, "pseudo_label.gt_ratio": 0.1, "seed": 2}
  with pytest.raises(ValueError, match="unknown row 'no_gan'"):
    load_config("synthetic_benchmark", "no_gan")
  # A second world changes the world's generator settings only, and shares
  # the pretraining stand-in (its source world does not follow).
  dense = load_config("synthetic_benchmark", "ours_10#1+dense")
  config_lib.validate(dense)
  got = flat(dense)
  assert {k: got[k] for k in got if got[k] != base[k]} == {
      "pseudo_label.gt_ratio": 0.1, "seed": 1, "synthetic.seed": 1,
      "synthetic.block_m": (30.0, 60.0), "synthetic.sat_appearance": 0.5}
  assert pretrain_lib.fingerprint(dense) == pretrain_lib.fingerprint(
      load_config("synthetic_benchmark", "ours_0"))
  with pytest.raises(ValueError, match="unknown world 'sparse'"):
    load_config("synthetic_benchmark", "ours_0+sparse")


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", tuple(value) if isinstance(value, list) else (
          value)


def test_the_run_ends_with_a_recall_table_and_pictures(demo_run):
  config, workdir, results = demo_run
  text = main_lib.recall_table(results)
  stage_table = text.split("\n\n")[0]
  rows = {line.split("|")[1].strip(): line
          for line in stage_table.splitlines()
          if line.startswith("| ") and not line.startswith(("| stage",
                                                             "| ---"))}
  assert list(rows) == ["intra", "cross_fake", "pseudo_label"]
  last = results["pseudo_label"]["last_round"]
  assert f"| {last['num_labels']:.0f} (" in rows["pseudo_label"]
  r1 = results["cross_fake"]["eval"]["R@1"]
  assert rows["cross_fake"].split("|")[2].strip() == f"{r1:.1f}"
  n = results["cross_fake"]["eval"]["num_references"]
  assert f"Chance R@1: {100 / n:.2f} %" in text
  for name in ("recall.png", "pseudo_labels.png", "retrieval_examples.png"):
    assert os.path.getsize(os.path.join(workdir, "report", name)) > 1000


def test_the_compilation_cache_follows_the_config(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("CVGL_JAX_CACHE_DIR", str(tmp_path))
    main_lib._use_compilation_cache("auto")  # pylint: disable=protected-access
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    main_lib._use_compilation_cache("auto")  # pylint: disable=protected-access
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    main_lib._use_compilation_cache("")  # pylint: disable=protected-access
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_a_round_without_labels_is_one_error_and_keeps_the_stages(
    demo_run, tmp_path):
  """A margin no pair clears (tau above every cosine margin) leaves
  nothing to train on: a ConfigError naming tau (main: one line, exit 2),
  before any pseudo-label step; the cold start is kept for the rerun."""
  config, workdir, _ = demo_run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "pseudo_label", run_dir.RESULTS, run_dir.LOCK))
  strict = config.copy_and_resolve_references()
  p = strict.pseudo_label
  p.gt_ratio, p.warmup_epochs, p.tau = 0.0, 0, 2.0
  with pytest.raises(config_lib.ConfigError,
                     match="no mutual pairs above the margin.*tau.*"
                     "--force_config_change"):
    main_lib.run(strict, copy, force_config_change=True)
  assert run_dir.read_done(copy, "cross_fake") is not None
  assert run_dir.checkpoint_step(
      run_dir.checkpoints_dir(copy, "pseudo_label")) is None
