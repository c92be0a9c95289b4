"""What makes the paradigm bootstrap: the pretraining stand-in, the round
table, the labelled-only epochs, the label-free choice of what a stage
hands on, and the training-free NCC baseline. Most tests read the
session's tiny demo run (tests/conftest.py: every stage, the stand-in
included, 37.5 % labels, the pseudo-label stage for a warm-up and a round).
"""

import filecmp
import hashlib
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cvgl_jax import baseline
from cvgl_jax import config_lib
from cvgl_jax import embed as embed_lib
from cvgl_jax import evaluate
from cvgl_jax import main as main_lib
from cvgl_jax import run_dir
from cvgl_jax import pretrain
from cvgl_jax import trained as trained_lib
from cvgl_jax.data import splits
from cvgl_jax.models import encoder
from cvgl_jax.pseudo import views as views_lib
from cvgl_jax.models import weights
from cvgl_jax.train import loop
from cvgl_jax.train import stage as stage_lib
from cvgl_jax.train import state as state_lib
from test_main import _flatten


def _files(folder, suffix=".jpg"):
  out = []
  for base, _, names in os.walk(folder):
    out += [os.path.join(base, n) for n in names if n.endswith(suffix)]
  return out


def test_standin_loads_through_model_pretrained_and_changes_the_encoder(
    demo_run):
  config, workdir, results = demo_run
  path = results["pretrain"]["pretrained"]
  assert path == pretrain.standin_path(workdir) and os.path.isfile(path)
  # The same timm names a user's ImageNet file has.
  sd = weights.read_state_dict(path)
  assert "stem.0.weight" in sd and "stages.1.blocks.0.mlp.fc1.weight" in sd
  model = encoder.from_config(config.model)
  g = jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, (2, *config.data.ground_size, 3)), jnp.float32)
  s = jnp.asarray(np.random.default_rng(1).uniform(
      -1, 1, (2, *config.data.satellite_size, 3)), jnp.float32)
  params = model.init(jax.random.key(config.seed), g, s)["params"]
  host = jax.tree.map(np.asarray, params)
  loaded = weights.load_pretrained(host, path)
  for tower in ("query", "reference"):
    np.testing.assert_array_equal(loaded[tower]["backbone"]["stem_conv"][
        "kernel"], sd["stem.0.weight"].transpose(2, 3, 1, 0))
  before = model.apply({"params": params}, g, s)[0]
  after = model.apply({"params": loaded}, g, s)[0]
  assert float(jnp.abs(before - after).max()) > 1e-3
  # The first training stage started from it (config.model.pretrained is
  # empty: the stand-in is what `pretrained_file` hands it).
  assert not config.model.pretrained
  assert stage_lib.pretrained_file(config, workdir) == path


def test_standin_is_cached_and_its_world_is_disjoint(demo_run, tmp_path):
  config, workdir, results = demo_run
  assert results["pretrain"]["cached"] is False
  cached = pretrain.cached_file(config)
  assert filecmp.cmp(cached, results["pretrain"]["pretrained"],
                     shallow=False)
  # A second run with the same settings takes it from the cache.
  again = config_lib.default_config()
  again.update_from_flattened_dict(_flat(config))
  again.stages = ("pretrain",)
  other = str(tmp_path / "again")
  result = main_lib.run(again, other)["pretrain"]
  assert result["cached"] is True
  assert filecmp.cmp(result["pretrained"], cached, shallow=False)
  assert not os.path.exists(os.path.join(other, "pretrain", "intra"))
  # Another seed of the target run shares the stand-in; another source
  # world does not.
  changed = config_lib.default_config()
  changed.update_from_flattened_dict(_flat(config))
  changed.seed = config.seed + 1
  assert pretrain.fingerprint(changed) == pretrain.fingerprint(config)
  changed.pretrain.world_seed += 1
  assert pretrain.fingerprint(changed) != pretrain.fingerprint(config)
  # No image of the source world is an image of the target world.
  digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
  source = {digest(p) for p in _files(
      os.path.join(workdir, "pretrain", run_dir.SYNTHETIC_WORLD))}
  target = {digest(p) for p in _files(
      os.path.join(workdir, run_dir.SYNTHETIC_WORLD))}
  assert source and target and not source & target


def _flat(config):
  return dict(_flatten(config.to_dict()))


def test_pretrain_validation_names_the_problem():
  config = config_lib.default_config()
  config.synthetic.enabled = True
  config.stages = ("cfp", "pretrain")
  config.pretrain.world_seed = config.synthetic.seed
  config.pretrain.objective = "imagenet"
  config.model.pretrained = "/nowhere/convnext.safetensors"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  msg = str(e.value)
  assert "pretrain.objective='imagenet'" in msg
  assert "use one or the other" in msg
  assert "must be disjoint" in msg
  assert "'pretrain' must come first" in msg


def _hand_count(sim, truth, tau):
  """Mutual nearest pairs of [G, S] similarities with margin >= tau, and
  how many are true."""
  best = sim.argmax(1)
  back = sim.argmax(0)
  top2 = np.sort(sim, axis=1)[:, -2:]
  admitted = [(i, j) for i, j in enumerate(best)
              if back[j] == i and top2[i, 1] - top2[i, 0] >= tau]
  return len(admitted), sum(truth[i] == j for i, j in admitted)


def _round_similarity(config, model, mesh, params, train):
  """What a round compares, computed view by view: the mean over the
  paired views of ground . satellite, averaged with fake . satellite."""
  p = config.pseudo_label
  common = dict(batch_size=16, mesh=mesh)
  def embed(which, paths, view, size):
    fn = embed_lib.make_embed_fn(model, mesh, which, view)
    return embed_lib.embed_split(fn, params, paths, size=size, **common)
  sims = []
  for view in views_lib.VIEWS[p.paired_views]:
    sims.append(embed("ground", train.ground_paths, view,
                      config.data.ground_size)
                @ embed("satellite", train.satellite_paths, view,
                        config.data.satellite_size).T)
  sim = np.mean(sims, axis=0)
  if p.fake_view:
    fake = embed("satellite", train.derived_paths(
        config.cross_fake.fake_folder), (False, 0), config.data.satellite_size)
    sim = (sim + fake @ embed("satellite", train.satellite_paths, (False, 0),
                              config.data.satellite_size).T) / 2
  return sim


def test_round_table_precision_equals_a_hand_count(demo_run):
  config, workdir, results = demo_run
  assert config.pseudo_label.paired_views == 8 and config.pseudo_label.fake_view
  rounds = results["pseudo_label"]["rounds"]
  assert [r["round"] for r in rounds] == [0, 1]
  assert rounds[0]["warmup"] == 1.0
  row = rounds[1]
  # The model at the start of round 1 (the moving average the round
  # embeds with): the checkpoint of epoch 0's end.
  assert config.pseudo_label.ema_epochs > 0
  spe = row["step"]
  trained = trained_lib.load_trained(workdir, stage="pseudo_label",
                                     checkpoint="latest")
  params = loop.restore_params(
      os.path.join(workdir, "pseudo_label", run_dir.CHECKPOINTS),
      trained.params, step=spe)
  train = splits.read_splits(config, workdir)[0]
  sim = _round_similarity(config, trained.model, trained.mesh, params, train)
  # The combined similarity is a mean of cosines: the plain view's scale.
  assert np.abs(sim).max() <= 1 + 1e-5
  tau = row["tau_e"]
  admitted, correct = _hand_count(sim, np.asarray(train.positive), tau)
  assert admitted > 0
  assert row["margin/pairs"] == admitted
  assert row["margin/correct"] == correct
  assert row["margin/precision"] == pytest.approx(correct / admitted)
  # The round's loss and R@1 come from the records of that round.
  recs = run_dir.read_records(workdir, "pseudo_label")
  losses = [r["loss"] for r in recs if r["kind"] == "train"
            and r["epoch"] == 1]
  assert row["loss"] == pytest.approx(np.mean(losses))
  final = [r for r in recs if r["kind"] == "eval"][-1]
  assert row["R@1"] == final["R@1"] == results["pseudo_label"]["eval"]["R@1"]
  # The same rows in the end-of-run summary.
  text = main_lib.recall_table(results)
  line = [l for l in text.splitlines() if l.startswith("| 1 |")][0]
  assert f"| {admitted} | {correct} |" in line


def test_retrain_learns_stage_3s_final_labels_from_the_cold_start(
    demo_run, tmp_path):
  """The retrain stage on the demo run: its labels are the hand count of
  stage 3's handed-on model at the last round's threshold (0), it starts
  from the cold start's params (with a negligible rate, it hands them on
  unchanged), and it is the run's trained model from then on."""
  config, workdir, _ = demo_run
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("report"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.stages = (*config.stages, "retrain")
  config.retrain.epochs = 1
  config.pseudo_label.lr = 1e-12  # Stage 3's recipe, which retrain reuses.
  results = main_lib.run(config, run, force_config_change=True)
  assert set(results) == set(config.stages)
  teacher = trained_lib.load_trained(run, stage="pseudo_label")
  train = splits.read_splits(config, run)[0]
  sim = _round_similarity(config, teacher.model, teacher.mesh,
                          teacher.params, train)
  admitted, correct = _hand_count(sim, np.asarray(train.positive), 0.0)
  first = [r for r in run_dir.read_records(run, "retrain")
           if r["kind"] == "epoch_start"][0]
  assert first["tau_e"] == 0.0 and first["warmup"] == 0.0
  assert (first["margin/pairs"], first["margin/correct"]) == (
      admitted, correct)
  handed_on = trained_lib.load_trained(run)
  assert handed_on.stage == "retrain"
  cold = trained_lib.load_trained(run, stage="cross_fake").params
  gap = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                         for x, y in zip(jax.tree.leaves(a),
                                         jax.tree.leaves(b)))
  assert gap(handed_on.params, cold) < 1e-6
  assert gap(teacher.params, cold) > 1e-3


def test_every_batch_is_labelled_past_the_authors_switch(demo_run):
  """With 37.5 % true pairs and tau 0 the round labels more than the
  authors' 40 %, where their epoch would switch to every ground image
  (the unlabelled ones against "no match"); ours keeps labelled pairs."""
  config, workdir, results = demo_run
  assert config.pseudo_label.labeled_ratio == 1.0
  row = results["pseudo_label"]["rounds"][1]
  assert row["labelled_fraction"] >= 0.4
  assert row["labelled_only"] == 1.0
  train = [r for r in run_dir.read_records(workdir, "pseudo_label")
           if r["kind"] == "train"]
  assert train and all(r["labelled_fraction"] == 1.0 for r in train)


def test_a_stage_hands_on_the_checkpoint_chosen_without_labels(demo_run):
  config, workdir, results = demo_run
  assert config.train.select == "label_free"
  for stage in ("cross_fake", "pseudo_label"):
    summary = results[stage]
    evals = [r for r in run_dir.read_records(workdir, stage)
             if r["kind"] == "eval"]
    scores = [r[evaluate.LABEL_FREE] for r in evals]
    chosen = summary["selected"]
    # The first evaluation with the highest label-free score, whatever R@1.
    assert chosen["step"] == evals[int(np.argmax(scores))]["step"]
    assert chosen["metric"] == evaluate.LABEL_FREE
    assert run_dir.checkpoint_step(
        os.path.join(workdir, stage, run_dir.BEST)) == chosen["step"]
    with open(os.path.join(workdir, stage, run_dir.SELECTED)) as f:
      assert json.load(f)["step"] == chosen["step"]
    assert summary["best"]["R@1"] == max(r["R@1"] for r in evals)
  trained = trained_lib.load_trained(workdir)
  assert (trained.stage, trained.step) == (
      "pseudo_label", results["pseudo_label"]["selected"]["step"])


def test_runs_hand_on_their_final_model_by_default():
  assert config_lib.default_config().train.select == "final"
  config = config_lib.default_config()
  config.train.select = "best_r1"
  config.data.root = "/"
  with pytest.raises(config_lib.ConfigError, match="train.select='best_r1'"):
    config_lib.validate(config)


def test_label_free_score():
  rng = np.random.default_rng(0)
  sat = rng.normal(size=(50, 16)).astype(np.float32)
  sat /= np.linalg.norm(sat, axis=1, keepdims=True)
  near = sat + 0.05 * rng.normal(size=sat.shape).astype(np.float32)
  near /= np.linalg.norm(near, axis=1, keepdims=True)
  score = lambda g, tau: evaluate.label_free_metrics(g, sat, tau)[
      evaluate.LABEL_FREE]
  assert score(near, 0.05) == 100.0
  # Collapsed grounds share one nearest tile, which has one nearest ground.
  collapsed = np.repeat(sat[:1], 50, axis=0)
  assert score(collapsed, 0.05) == 100.0 / 50
  # Mutual pairs that fail the margin do not count.
  assert score(near, 5.0) == 0.0


def test_schedule_counts_skipped_epochs_and_moments_carry():
  lr, spe, epochs = 1e-3, 3, 40
  schedule = state_lib.cosine_per_epoch(lr, spe, epochs, first_epoch=6)
  assert float(schedule(0)) == pytest.approx(
      lr * (1 + math.cos(math.pi * 6 / 40)) / 2)
  assert float(schedule(spe)) == pytest.approx(
      lr * (1 + math.cos(math.pi * 7 / 40)) / 2)
  params = {"w": jnp.ones((3,))}
  tx = state_lib.create_optimizer(lr, 0.0, spe, epochs)
  old = tx.init(params)
  _, old = tx.update({"w": jnp.array([1.0, -2.0, 3.0])}, old, params)
  fresh = state_lib.create_optimizer(lr, 0.0, spe, epochs, 6).init(params)
  carried = state_lib.with_moments_of(fresh, old)
  mu = lambda s: optax.tree.get(s, "mu")["w"]
  np.testing.assert_array_equal(mu(carried), mu(old))
  assert float(jnp.abs(mu(old)).max()) > 0
  assert int(carried.count) == 0  # The new schedule starts again.


def test_ncc_baseline_beats_chance_on_the_tiny_world(demo_run):
  config, workdir, _ = demo_run
  result = baseline.ncc_recall(config, workdir, size=16)
  evaluation = splits.read_splits(config, workdir)[1]
  assert result["num_queries"] == evaluation.num_ground
  assert result["num_references"] == evaluation.num_satellite
  for k in ("R@1", "R@5", "R@10"):
    assert 0.0 <= result[k] <= 100.0
  vectors = baseline.grey_unit(
      np.random.default_rng(0).integers(0, 256, (3, 20, 30, 3), np.uint8), 8)
  np.testing.assert_allclose(vectors.mean(1), 0, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
  # The geometry alone finds tiles: true pairs correlate more than others.
  train = splits.read_splits(config, workdir)[1]
  bevs = baseline.grey_unit(baseline.bev_images(train.ground_paths,
                                                config.cfp), 16)
  from cvgl_jax.data import image_io
  tiles = baseline.grey_unit(np.stack([image_io.read_rgb(p)
                                       for p in train.satellite_paths]), 16)
  ncc = bevs @ tiles.T
  true = ncc[np.arange(len(bevs)), train.positive]
  assert true.mean() > ncc.mean() + 0.05


def test_missing_fakes_are_one_line_before_any_stage(demo_run, tmp_path):
  """fake_view needs each ground's fake tile: a run in which no stage
  writes them and they are not there stops before its first stage."""
  config, workdir, _ = demo_run
  train = splits.read_splits(config, workdir)[0]
  assert views_lib.missing_fakes(config, train, written=True) == ""
  other = config.copy_and_resolve_references()
  other.cross_fake.fake_folder = "g2a"  # CFP's BEVs: written by the run.
  other.stages = ("pseudo_label",)
  assert views_lib.missing_fakes(other, train) == ""
  other.cross_fake.fake_folder = "fakes_elsewhere"
  line = views_lib.missing_fakes(other, train)
  n = train.num_ground
  assert (f"{n} of {n} are missing" in line and "fakes_elsewhere" in line
          and "write them there first" in line
          and "fake_view=False" in line), line
  other.pseudo_label.fake_view = False
  assert views_lib.missing_fakes(other, train) == ""
  # Through a run: the error comes before any stage folder exists.
  other.pseudo_label.fake_view = True
  fresh = str(tmp_path / "run")
  shutil.copytree(os.path.join(workdir, "synthetic_world"),
                  os.path.join(fresh, "synthetic_world"))
  with pytest.raises(config_lib.ConfigError, match="fakes_elsewhere"):
    main_lib.run(other, fresh)
  assert not os.path.exists(os.path.join(fresh, "pseudo_label"))
