"""Tests of the training engine: mesh, state, steps and the epoch loop.

A tiny two-tower ConvNeXt (two stages of one block; XLA:CPU compile time
grows with depth and dominates these tests) on a tiny world written with
cv2: 16 panoramas (32x64) with their fake satellite images (32x32). Each
place has its own random colour pattern; its fake is the centre of its
panorama's pattern, so pairs can be learnt. One jitted cross-view step on
the 8 simulated CPU devices is compiled once and shared by the tests.
"""

import glob
import json
import math
import os
import struct

import cv2
import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax.data import augment
from cvgl_jax.data import pipeline
from cvgl_jax.data.index import PairIndex
from cvgl_jax.models import convnext
from cvgl_jax.models import encoder
from cvgl_jax.train import loop
from cvgl_jax.train import state as state_lib
from cvgl_jax.train import steps

Q = 16
G_SIZE, S_SIZE = (32, 64), (32, 32)
BATCH = 8  # Global batch: one per simulated device.
SPE = Q // BATCH
LR = 1e-3
NO_AUG = augment.no_view_augmentation()
# Augmentation off in the compiled steps: a few steps then show learning
# clearly. That random augmentation draws the same numbers however the
# batch is sharded is tested on its own (compiling it into the model's
# step would cost minutes).
PAIRED_OFF = augment.PairedConfig(flip_p=0.0, rotate_p=0.0)


def _model():
  return encoder.TwoTower(
      variant=convnext.Variant((1, 1), (8, 16), False),
      head="gap", drop_path_rate=0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("world"))
  rng = np.random.default_rng(0)
  ids = np.array([f"p{i:02d}" for i in range(Q)])
  g_paths = []
  for i, pid in enumerate(ids):
    pattern = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
    pano = cv2.resize(pattern, (64, 32), interpolation=cv2.INTER_NEAREST)
    fake = cv2.resize(pattern[:, 2:6], (32, 32),
                      interpolation=cv2.INTER_NEAREST)
    g_paths.append(os.path.join(root, "pano", f"{pid}.png"))
    for path, img in ((g_paths[-1], pano),
                      (os.path.join(root, "g2a_sat", f"{pid}.png"), fake),
                      (os.path.join(root, "sat", f"{pid}.png"), fake)):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      assert cv2.imwrite(path, img)
  return PairIndex(
      name="tiny/train", root=root, ground_paths=np.array(g_paths),
      ground_ids=ids,
      satellite_paths=np.array([os.path.join(root, "sat", f"{i}.png")
                                for i in ids]),
      satellite_ids=ids, positive=np.arange(Q))


def _pipe(world):
  return pipeline.cross_view(world, ground_size=G_SIZE,
                             satellite_size=S_SIZE, batch_size=BATCH, seed=3,
                             num_threads=2)


class _Engine:
  """The model, optimizer and compiled step the tests share."""

  def __init__(self):
    self.model = _model()
    self.mesh = parallel.make_mesh()
    # E = 4 so that the loop tests' 2 epochs see two distinct rates.
    self.tx = state_lib.create_optimizer(LR, 0.01, SPE, 4)
    self.step = steps.make_cross_step(
        self.model, self.tx, self.mesh, label_smoothing=0.3,
        ground_aug=NO_AUG, satellite_aug=NO_AUG,
        paired_aug=PAIRED_OFF)

  def state(self, seed=0, mesh=None):
    return state_lib.create_state(
        self.model, self.tx, ground_size=G_SIZE, satellite_size=S_SIZE,
        seed=seed, mesh=mesh or self.mesh)


@pytest.fixture(scope="module")
def engine():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  return _Engine()


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_mesh_and_to_global_shard_the_batch():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == 8
  x = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
  g = parallel.to_global({"x": x}, mesh)["x"]
  assert g.shape == (16, 3) and len(g.addressable_shards) == 8
  assert all(s.data.shape == (2, 3) for s in g.addressable_shards)
  np.testing.assert_array_equal(parallel.gather(g, mesh), x)
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    parallel.check_batch_size(12, mesh)


def test_cosine_schedule_is_constant_within_an_epoch():
  sched = state_lib.cosine_per_epoch(1e-4, steps_per_epoch=10, num_epochs=4)
  got = np.array([float(sched(s)) for s in range(40)])
  want = np.repeat([1e-4 * (1 + math.cos(math.pi * e / 4)) / 2
                    for e in range(4)], 10)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[9] == got[0] and got[10] < got[9]
  with pytest.raises(ValueError, match="steps_per_epoch"):
    state_lib.cosine_per_epoch(1e-4, 0, 4)


def test_augmentation_does_not_depend_on_the_sharding(world):
  """The paired flip / rotate-roll of a global batch sharded over 8 devices
  equals that of the same batch on one device, for the same key."""
  batch = next(_pipe(world).iterator(0))
  cfg = augment.PairedConfig(flip_p=0.5, rotate_p=0.5)
  outs = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = parallel.make_mesh(devices)
    b = parallel.to_global(batch, mesh)
    outs.append(parallel.gather(augment.augment_pairs(
        jax.random.PRNGKey(5), b["ground"], b["satellite"], NO_AUG, NO_AUG,
        cfg), mesh))
  for x, y in zip(*outs):
    np.testing.assert_array_equal(x, y)
  # The key mattered: some examples were flipped or rotated.
  assert not np.array_equal(outs[0][1], batch["satellite"] / 255.0)


def test_sharded_step_equals_one_device(engine, world):
  """8 devices vs 1 on the same global batch and key: same loss, grads
  (AdamW's first moment after one step is 0.1 * grad) and params."""
  mesh1 = parallel.make_mesh(jax.devices()[:1])
  step1 = steps.make_cross_step(
      engine.model, engine.tx, mesh1, label_smoothing=0.3,
      ground_aug=NO_AUG, satellite_aug=NO_AUG,
      paired_aug=PAIRED_OFF)
  state8 = engine.state(seed=1)
  state1 = parallel.put_replicated(_host(state8), mesh1)
  batch = next(_pipe(world).iterator(0))
  new8, m8 = engine.step(state8, parallel.to_global(batch, engine.mesh))
  new1, m1 = step1(state1, parallel.to_global(batch, mesh1))
  m8, m1 = _host(m8), _host(m1)
  for k in ("loss", "grad_norm", "logit_scale", "lr", "accuracy_q2r"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
  assert m8["grad_norm"] > 0
  mu8 = _host(new8.opt_state.inner_state[0].mu)
  mu1 = _host(new1.opt_state.inner_state[0].mu)
  _assert_trees_close(mu8, mu1, rtol=1e-4, atol=1e-7)
  _assert_trees_close(_host(new8.params), _host(new1.params), rtol=1e-5,
                      atol=1e-6)
  assert int(new8.step) == 1


def test_cross_step_reduces_the_loss(engine, world):
  state = engine.state(seed=2)
  batch = parallel.to_global(next(_pipe(world).iterator(0)), engine.mesh)
  losses = []
  for _ in range(6):
    state, m = engine.step(state, batch)
    losses.append(float(m["loss"]))
  assert all(math.isfinite(v) for v in losses)
  assert losses[-1] < losses[0] - 0.2, losses


class _Recorder:
  """Wraps a step: records each batch's panorama indices (and, asked, the
  state after each call), and can raise (a crash) before a given call."""

  def __init__(self, step, crash_at=None, keep_states=False):
    self.step, self.crash_at = step, crash_at
    self.order, self.calls = [], 0
    self.states = {} if keep_states else None

  def __call__(self, state, batch):
    self.calls += 1
    if self.calls == self.crash_at:
      raise RuntimeError("simulated crash")
    self.order.append(tuple(np.asarray(jax.device_get(batch[k]))
                            for k in ("ground_index", "satellite_index",
                                      "labeled") if k in batch))
    state, metrics = self.step(state, batch)
    if self.states is not None:  # Host copies: the next step donates it.
      self.states[self.calls] = jax.tree.map(np.asarray,
                                             jax.device_get(state))
    return state, metrics


def _train(engine, world, workdir, step_fn, seed=0, average_epochs=0.0,
           **kw):
  hook_calls = []

  def hook(state, epoch):
    hook_calls.append(epoch)
    return {"metrics": {"epoch_seen": epoch}}
  evals = iter([10.0, 30.0, 20.0])
  options = dict(stage="cross", num_epochs=2, steps_per_epoch=SPE,
                 ckpt_every_steps=3, log_every_steps=1, eval_every_epochs=1,
                 progress=False)
  options.update({k: kw.pop(k) for k in list(kw)
                  if k in loop.LoopConfig.__dataclass_fields__})
  args = dict(mesh=engine.mesh, workdir=str(workdir),
              eval_fn=lambda s: {"R@1": next(evals)}, epoch_start_fn=hook)
  args.update(kw)
  start = state_lib.with_average(engine.state(seed), average_epochs, SPE)
  state, summary = loop.train(start, step_fn, _pipe(world),
                              loop.LoopConfig(**options), **args)
  return state, summary, hook_calls


def _read_events(folder):
  """(tag, step, value) of every scalar in the TensorBoard event files,
  read with the record framing and protobuf alone."""
  out = []
  for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


def test_resume_after_crash_equals_straight_run(engine, world, tmp_path):
  straight = _Recorder(engine.step)
  state_a, summary_a, hooks_a = _train(engine, world, tmp_path / "a",
                                       straight)
  assert summary_a["finished"] and summary_a["step"] == 2 * SPE
  assert hooks_a == [0, 1]

  # Checkpoints at steps 2 (epoch end) and 3; the crash comes in step 4.
  crashing = _Recorder(engine.step, crash_at=4)
  with pytest.raises(RuntimeError, match="simulated crash"):
    _train(engine, world, tmp_path / "b", crashing)
  # A new process: fresh state (another seed), pipeline and recorder; the
  # checkpoint of step 3 decides everything.
  resumed = _Recorder(engine.step)
  state_b, summary_b, hooks_b = _train(engine, world, tmp_path / "b",
                                       resumed, seed=99)
  assert hooks_b == []  # Epoch 1 resumed mid-way: its pairing is restored.
  assert summary_b["step"] == 2 * SPE and summary_b["finished"]
  order_b = crashing.order + resumed.order
  assert len(order_b) == len(straight.order) == 4
  for x, y in zip(straight.order, order_b):
    np.testing.assert_array_equal(x, y)
  _assert_trees_close(_host(state_a.params), _host(state_b.params),
                      rtol=1e-6, atol=1e-7)
  assert int(state_b.step) == 4
  # Best by R@1: the evals gave 10 then 30, so the best is the epoch-1 end.
  assert summary_a["best"] == {"step": 2 * SPE, "R@1": 30.0}
  best = loop.restore_params(str(tmp_path / "a" / "cross" / "best"),
                             state_a.params)
  _assert_trees_close(_host(best), _host(state_a.params), 0, 0)

  # metrics.jsonl: train lines every step with the per-epoch rate; eval and
  # epoch-start lines.
  lines = [json.loads(l) for l in
           open(tmp_path / "a" / "cross" / "metrics.jsonl")]
  train_lines = [l for l in lines if l["kind"] == "train"]
  assert [l["step"] for l in train_lines] == [1, 2, 3, 4]
  lr = [l["lr"] for l in train_lines]
  np.testing.assert_allclose(lr, [LR, LR] + [LR * (1 + math.cos(
      math.pi / 4)) / 2] * 2, rtol=1e-6)
  assert all(l["images_per_s"] > 0 and math.isfinite(l["loss"])
             for l in train_lines)
  assert [l["R@1"] for l in lines if l["kind"] == "eval"] == [10.0, 30.0]
  assert [l["epoch_seen"] for l in lines if l["kind"] == "epoch_start"] == [
      0, 1]
  events = _read_events(str(tmp_path / "a" / "cross" / "tensorboard"))
  loss_events = sorted((s, v) for t, s, v in events if t == "train/loss")
  assert [s for s, _ in loss_events] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in loss_events],
                             [l["loss"] for l in train_lines], rtol=1e-6)
  # Tags are spelt so that no writer renames them ("R@1" is not a legal
  # TensorBoard tag): one "eval/R1" and no "eval/R_1".
  assert ("eval/R1", 2 * SPE, 30.0) in events
  assert not [t for t, _, _ in events if "_1" in t]


def test_a_nan_batch_is_skipped_and_the_run_goes_on(engine, world, tmp_path,
                                                   monkeypatch):
  monkeypatch.setenv(run_dir.FAULT_ENV, "nan_batch@3")
  recorder = _Recorder(engine.step, keep_states=True)
  state, summary, _ = _train(engine, world, tmp_path, recorder)
  assert summary["finished"] and summary["skipped_steps"] == 1
  lines = [json.loads(l) for l in open(tmp_path / "cross" / "metrics.jsonl")]
  train = {l["step"]: l for l in lines if l["kind"] == "train"}
  assert [train[s]["skipped"] for s in sorted(train)] == [0, 0, 1, 0]
  assert math.isnan(train[3]["loss"]) and math.isfinite(train[4]["loss"])
  # Step 3 left the params and the optimizer state as they were.
  before, after = recorder.states[2], recorder.states[3]
  for x, y in zip(jax.tree.leaves(_host((before.params, before.opt_state))),
                  jax.tree.leaves(_host((after.params, after.opt_state)))):
    np.testing.assert_array_equal(x, y)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host(
      state.params)))


def test_divergence_sets_aside_its_checkpoints_and_the_rerun_resumes_before_it(
    engine, world, tmp_path, monkeypatch):
  """Params gone non-finite at step 4 (as a diverged run's): the stage
  stops, the checkpoints from the onset on go to diverged/, and the rerun
  resumes from the last one before it and ends as a straight run does."""
  straight, _, _ = _train(engine, world, tmp_path / "straight", engine.step,
                          ckpt_every_steps=1)
  monkeypatch.setenv(run_dir.FAULT_ENV, "nan_params@4")
  with pytest.raises(loop.DivergedError,
                     match=r"diverged: 1 step\(s\) in a row .*not finite.*"
                           r"began at step 4 \(loss nan.*checkpoints 3 "
                           r"were moved to .*diverged; a rerun resumes from "
                           r"checkpoint 2.*lower learning rate"):
    _train(engine, world, tmp_path / "a", engine.step, ckpt_every_steps=1)
  stage = tmp_path / "a" / "cross"
  assert sorted(p.name for p in (stage / "diverged").iterdir()) == ["3"]
  monkeypatch.delenv(run_dir.FAULT_ENV)
  resumed, summary, _ = _train(engine, world, tmp_path / "a", engine.step,
                               ckpt_every_steps=1)
  assert summary["finished"]
  _assert_trees_close(_host(resumed.params), _host(straight.params), 0, 0)


def test_divergence_onset_is_where_the_blow_up_began():
  ok = [(s, 2.0 + 0.01 * (s % 3), 1.0 + 0.1 * (s % 2)) for s in range(1, 41)]
  # A bump that recovered, then a blow-up of the gradient norm from step
  # 46 and of the loss from 48, then NaN.
  bump = [(41, 2.0, 50.0), (42, 2.0, 1.0), (43, 2.0, 1.0), (44, 2.0, 1.1),
          (45, 2.1, 1.0)]
  ramp = [(46, 2.2, 30.0), (47, 3.0, 300.0), (48, 9.0, 3e4),
          (49, math.inf, math.nan), (50, math.nan, math.nan)]
  onset, why = loop.divergence_onset(ok + bump + ramp)
  assert onset == 46 and "gradient norm 30" in why
  onset, why = loop.divergence_onset(ok + [(41, math.nan, math.nan)])
  assert onset == 41 and "loss nan" in why
  assert loop.divergence_onset([(7, math.nan, 1.0)])[0] == 7


def test_train_rejects_a_started_state_without_checkpoint(engine, world,
                                                          tmp_path):
  state = engine.state()
  state = state.replace(step=parallel.put_replicated(np.int32(5),
                                                     engine.mesh))
  with pytest.raises(ValueError, match="step 5, not 0"):
    loop.train(state, engine.step, _pipe(world),
               loop.LoopConfig("x", num_epochs=1, steps_per_epoch=SPE,
                               progress=False),
               mesh=engine.mesh, workdir=str(tmp_path))


def test_the_moving_average_is_evaluated_resumed_and_handed_on(
    engine, world, tmp_path):
  """With a moving average of the params (`with_average`: a time constant
  of 2 epochs = 4 steps, decay 0.75), every step averages its new params
  into it; the evaluations see the average, best/ holds it, and a run
  resumed after a crash carries it on exactly."""
  decay = 0.75
  assert state_lib.with_average(engine.state(), 2.0, SPE).average_decay == (
      decay)
  assert state_lib.with_average(engine.state(), 0.0, SPE).average is None
  straight = _Recorder(engine.step, keep_states=True)
  evaluated = []

  def eval_fn(state):
    evaluated.append(_host(state_lib.model_params(state)))
    return {"R@1": [10.0, 30.0][len(evaluated) - 1]}
  state_a, summary_a, _ = _train(engine, world, tmp_path / "a", straight,
                                 average_epochs=2.0, eval_fn=eval_fn)
  want = _host(engine.state().params)
  for call in range(1, 2 * SPE + 1):
    want = jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, want,
                        straight.states[call].params)
    _assert_trees_close(straight.states[call].average, want, rtol=1e-5,
                        atol=1e-6)
    if call % SPE == 0:
      _assert_trees_close(evaluated[call // SPE - 1], want, 0, 0)
  # The average lags the params: a model of its own, not a copy.
  assert max(np.abs(x - y).max() for x, y in zip(
      jax.tree.leaves(want), jax.tree.leaves(straight.states[4].params))
             ) > 1e-4
  best = loop.restore_params(str(tmp_path / "a" / "cross" / "best"),
                             state_a.params)
  assert summary_a["best"]["step"] == 2 * SPE
  _assert_trees_close(_host(best), want, 0, 0)
  # The model a checkpoint holds (export's "latest") is the average too.
  latest = loop.restore_params(str(tmp_path / "a" / "cross" / "checkpoints"),
                               state_a.params)
  _assert_trees_close(_host(latest), want, 0, 0)

  with pytest.raises(RuntimeError, match="simulated crash"):
    _train(engine, world, tmp_path / "b", _Recorder(engine.step, crash_at=4),
           average_epochs=2.0)
  state_b, _, _ = _train(engine, world, tmp_path / "b",
                         _Recorder(engine.step), seed=99, average_epochs=2.0)
  _assert_trees_close(_host(state_b.average), _host(state_a.average),
                      rtol=1e-6, atol=1e-7)


def test_pseudo_pair_epochs_take_the_hooks_pairing_and_resume_it(
    engine, world, tmp_path):
  """A pseudo-pair pipeline gets each epoch's pairing from the epoch-start
  hook; after a crash mid-epoch the checkpoint restores that pairing (the
  hook is not asked again) and the next epoch asks it anew."""
  pipe = lambda: pipeline.pseudo_pairs(  # pylint: disable=g-long-lambda
      world, ground_size=G_SIZE, satellite_size=S_SIZE, batch_size=BATCH,
      seed=4, num_threads=2)
  ground = np.arange(Q)

  def run(step_fn, hook_calls, seed):
    def hook(state, epoch):
      hook_calls.append(epoch)
      return {"pairs": np.stack([ground, (ground + epoch + 1) % Q], 1),
              "labeled": ground % 2 == 0}
    return loop.train(engine.state(seed), step_fn, pipe(),
                      loop.LoopConfig("pseudo", num_epochs=3,
                                      steps_per_epoch=SPE, ckpt_every_steps=3,
                                      log_every_steps=10, progress=False),
                      mesh=engine.mesh, workdir=str(tmp_path),
                      epoch_start_fn=hook)

  calls_a, calls_b = [], []
  crashing = _Recorder(engine.step, crash_at=4)  # Checkpoint at step 3.
  with pytest.raises(RuntimeError, match="simulated crash"):
    run(crashing, calls_a, 0)
  resumed = _Recorder(engine.step)
  _, summary = run(resumed, calls_b, 5)
  assert calls_a == [0, 1] and calls_b == [2]
  assert summary["step"] == 3 * SPE and summary["finished"]
  seen = crashing.order + resumed.order
  assert len(seen) == 3 * SPE
  for step, (g, s, lab) in enumerate(seen):
    epoch = step // SPE
    np.testing.assert_array_equal(s, (g + epoch + 1) % Q)
    np.testing.assert_array_equal(lab, g % 2 == 0)


def test_create_state_loads_pretrained_backbones_replicated(engine):
  """Both towers get the checkpoint's ConvNeXt (a tiny timm-named golden
  file); params and optimizer state live replicated on all 8 devices."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "golden",
                      "convnext_conv_mlp.safetensors")
  model = encoder.TwoTower(
      variant=convnext.Variant((1, 1, 2, 1), (16, 24, 32, 48), True),
      head="gap")
  state = state_lib.create_state(model, engine.tx, ground_size=G_SIZE,
                                 satellite_size=S_SIZE, seed=0,
                                 mesh=engine.mesh, pretrained=path)
  stem = load_file(path)["stem.0.weight"].transpose(2, 3, 1, 0)
  for tower in ("query", "reference"):
    kernel = state.params[tower]["backbone"]["stem_conv"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), stem)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated
    assert len(leaf.sharding.device_set) == 8
  assert int(state.step) == 0


def test_loop_config_names_a_bad_value():
  with pytest.raises(ValueError, match="steps_per_epoch must be > 0, got 0"):
    loop.LoopConfig("x", num_epochs=1, steps_per_epoch=0)
  with pytest.raises(ValueError, match="eval_every_epochs must be >= 0"):
    loop.LoopConfig("x", num_epochs=1, steps_per_epoch=1, eval_every_epochs=-1)
  assert loop.LoopConfig("x", num_epochs=3, steps_per_epoch=4).total_steps == 12
