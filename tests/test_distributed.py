"""Two processes x two CPU devices train exactly like one process x four.

Both runs are real `python -m cvgl_jax.main` processes on a tiny synthetic
CVUSA world (48 pairs, a 2-stage ConvNeXt): `cfp`, an epoch of
`cross_fake` and one `pseudo_label` round. The two-process run joins
through `--coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=I` with JAX's CPU collectives (gloo, the default of
`jax_cpu_collectives_implementation`). Every device holds the same rows of
every global batch in both runs (the pipelines hand process p block p of a
global batch), so the runs differ only in how the cross-device sums of the
gradients are ordered: the parameters must agree to float32 rounding, the
pseudo labels exactly.

To keep compile time in bounds the random augmentation is off
(`config.augment`), as in tests/test_train.py; that it draws the same
numbers however a batch is sharded is tested there and in
tests/test_augment.py. The world's fake satellite images (`g2a_sat/`) are
copies of the true tiles so that no CycleGAN has to be trained here
(test_main covers translate).
"""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax.data import image_io
from cvgl_jax.data import pipeline
from cvgl_jax.data import readers
from cvgl_jax.data import synthetic
from cvgl_jax.models import encoder
from cvgl_jax.train import loop
import processes
from test_main import CONFIGS, tiny_demo_config

TIMEOUT_S = 420  # Generous for 2 loaded cores; a hang must still end.

CONFIG_FILE = '''"""tests/test_distributed.py: the demo config + JSON overrides."""
import importlib.util
import json

import ml_collections


def _apply(config, values):
  for key, value in values.items():
    if isinstance(config[key], ml_collections.ConfigDict):
      _apply(config[key], value)
    elif isinstance(config[key], tuple):
      config[key] = tuple(value)
    else:
      config[key] = value


def get_config():
  spec = importlib.util.spec_from_file_location("base", {base!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with open({values!r}) as f:
    _apply(config, json.load(f))
  return config
'''


def _config(root):
  config = tiny_demo_config()
  config.synthetic.enabled = False
  config.data.dataset = "cvusa"
  config.data.root = str(root)
  config.data.num_threads = 2
  config.stages = ("cfp", "cross_fake", "pseudo_label")
  config.cross_fake.epochs = 1
  config.model.head = "gap"
  for key in ("dropout_p", "jitter_p", "grayscale_p", "blur_p", "warp_p",
              "paired_flip_p", "paired_rotate_p"):
    config.augment[key] = 0.0
  p = config.pseudo_label
  p.epochs, p.warmup_epochs, p.gt_ratio, p.tau = 1, 0, 0.0, 0.0
  p.knn_backend = "exact"
  p.paired_views, p.fake_view = 8, True  # The views on a 2-process job.
  return config


def _make_world(config, root):
  """The tiny world, with each panorama's true tile as its fake."""
  s = config.synthetic
  cfg = synthetic.SyntheticConfig(
      map_cells=s.map_cells, pairs_per_world=s.pairs_per_world,
      sat_px=s.sat_px, pano_width=s.pano_width,
      cvusa_width=s.cvusa_width).validate()
  synthetic.write_dataset("cvusa", str(root), cfg, s.num_pairs, s.seed,
                          progress=False)
  train = readers.read_split("cvusa", str(root), config.data.train_split)
  for i, fake in enumerate(train.derived_paths("g2a_sat")):
    os.makedirs(os.path.dirname(fake), exist_ok=True)
    shutil.copy(train.satellite_paths[train.positive[i]], fake)
  return train


def _env(devices, cache):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI", "TPU_", "JAX_"))}
  env.update(XLA_FLAGS=processes.xla_flags(devices),
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             # Compiling dominates these tiny runs: a cache lets the stages'
             # identical programs (the embedding functions) compile once.
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _crashed(log):
  # A process whose peers are gone can wait minutes in JAX's shutdown
  # barrier after its traceback: the traceback is the sign to stop.
  with open(log) as f:
    return "Traceback (most recent call last)" in f.read()


def _wait_all(procs, logs):
  """Waits for every process; kills them all when one fails or time runs
  out, and fails with the logs' tails."""
  deadline = time.monotonic() + TIMEOUT_S
  failed = None
  while any(p.poll() is None for p in procs):
    bad = [i for i, (p, log) in enumerate(zip(procs, logs))
           if p.poll() not in (None, 0) or _crashed(log)]
    if bad or time.monotonic() > deadline:
      failed = bad[0] if bad else "timeout"
      for p in procs:
        if p.poll() is None:
          p.kill()
      for p in procs:
        p.wait()
      break
    time.sleep(0.5)
  if failed is None and any(p.returncode for p in procs):
    failed = next(i for i, p in enumerate(procs) if p.returncode)
  if failed is not None:
    tails = "\n".join(f"--- {log} (exit {p.returncode}):\n"
                      + open(log).read()[-3000:] for p, log in zip(procs, logs))
    pytest.fail(f"Process {failed} of the runs failed:\n{tails}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Both runs, side by side: {"one": workdir, "two": workdir}, the train
  split, the config."""
  tmp = tmp_path_factory.mktemp("distributed")
  world = tmp / "world"
  train = _make_world(_config(world), world)
  port = processes.free_port()
  procs, logs, workdirs = [], [], {}
  for name, count, devices in (("one", 1, 4), ("two", 2, 2)):
    root = tmp / name / "world"
    shutil.copytree(world, root)
    config = _config(root)
    values = tmp / name / "values.json"
    values.write_text(config.to_json())
    config_file = tmp / name / "config.py"
    config_file.write_text(CONFIG_FILE.format(
        base=os.path.join(CONFIGS, "synthetic_unsup.py"), values=str(values)))
    workdirs[name] = str(tmp / name / "run")
    for i in range(count):
      cmd = [sys.executable, "-m", "cvgl_jax.main", f"--config={config_file}",
             f"--workdir={workdirs[name]}"]
      cmd += ([f"--coordinator_address=127.0.0.1:{port}",
               f"--num_processes={count}", f"--process_id={i}"]
              if count > 1 else ["--distributed=off"])
      logs.append(str(tmp / name / f"process_{i}.log"))
      with open(logs[-1], "w") as log:
        procs.append(subprocess.Popen(cmd, env=_env(devices, tmp / name /
                                                   f"cache_{i}"), stdout=log,
                                      stderr=subprocess.STDOUT))
  _wait_all(procs, logs)
  return workdirs, train, _config(world)


def _params(workdir, stage, config):
  """The final params of a stage's checkpoints as numpy."""
  model = encoder.from_config(config.model)
  ground = np.zeros((1, *config.data.ground_size, 3), np.float32)
  satellite = np.zeros((1, *config.data.satellite_size, 3), np.float32)
  shapes = jax.eval_shape(lambda k: model.init(k, ground, satellite)["params"],
                          jax.random.PRNGKey(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      shapes)
  params = loop.restore_params(
      os.path.join(workdir, stage, run_dir.CHECKPOINTS), like)
  return jax.tree.map(np.asarray, params)


def _pairings(workdir, stage):
  """{process file: [M, 3] rows} of the stage's last checkpoint's data
  iterator state (the epoch's pairing every process trained on)."""
  folder = os.path.join(workdir, stage, run_dir.CHECKPOINTS)
  with ocp.CheckpointManager(os.path.abspath(folder)) as mngr:
    step = mngr.latest_step()
  data = os.path.join(folder, str(step), "data")
  out = {}
  for name in sorted(os.listdir(data)):
    if name.startswith("process_") and name.endswith(".json"):
      with open(os.path.join(data, name)) as f:
        state = json.load(f)
      out[name] = pipeline._decode_pairs(  # pylint: disable=protected-access
          state["pairs"])
  return out


def test_parameters_equal_one_process(runs):
  workdirs, _, config = runs
  for stage in ("cross_fake", "pseudo_label"):
    one = _params(workdirs["one"], stage, config)
    two = _params(workdirs["two"], stage, config)
    for path, a in jax.tree_util.tree_leaves_with_path(one):
      b = two
      for key in path:
        b = b[key.key]
      # Both runs sum the same four per-device gradients, in an order that
      # may differ (gloo across processes vs. XLA within one): float32
      # rounding, ~1e-7 relative, grown over 4 Adam steps of lr 3e-4.
      np.testing.assert_allclose(
          b, a, rtol=1e-4, atol=1e-5,
          err_msg=f"{stage} {jax.tree_util.keystr(path)}")
  # The tolerance is far below what the pseudo-label steps moved (about
  # 2 x lr = 6e-4; the runs differ by ~1e-6).
  start = _params(workdirs["one"], "cross_fake", config)
  end = _params(workdirs["one"], "pseudo_label", config)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(start), jax.tree.leaves(end)))
  assert moved > 1e-4


def test_pseudo_labels_are_identical_on_every_process(runs):
  workdirs, train, _ = runs
  one = _pairings(workdirs["one"], "pseudo_label")
  two = _pairings(workdirs["two"], "pseudo_label")
  assert sorted(one) == ["process_0-of-1.json"]
  assert sorted(two) == ["process_0-of-2.json", "process_1-of-2.json"]
  rows = one["process_0-of-1.json"]
  assert rows.shape == (train.num_ground, 3)
  for name, other in two.items():
    np.testing.assert_array_equal(other, rows, err_msg=name)
  # A real round: some pseudo pairs were labelled.
  assert rows[:, 2].sum() > 0


def test_only_process_zero_writes_and_outputs_agree(runs):
  workdirs, train, _ = runs
  for stage in ("cfp", "cross_fake", "pseudo_label"):
    done_one = run_dir.read_done(workdirs["one"], stage)
    done_two = run_dir.read_done(workdirs["two"], stage)
    assert done_two is not None, stage
    if stage == "cfp":  # Each process projected half; the counts add up.
      assert done_one["written"] == done_two["written"] == train.num_ground
      continue
    assert done_two["step"] == done_one["step"] > 0
    lines = [json.loads(line) for line in open(
        os.path.join(workdirs["two"], stage, "metrics.jsonl"))]
    kinds = [(r["kind"], r["step"]) for r in lines]
    assert len(kinds) == len(set(kinds)), "metrics written more than once"
    ref = [json.loads(line) for line in open(
        os.path.join(workdirs["one"], stage, "metrics.jsonl"))]
    assert [(r["kind"], r["step"]) for r in ref] == kinds
    for a, b in zip(ref, lines):
      if a["kind"] == "epoch_start":  # Pseudo-label round statistics.
        assert a == b
  for name in ("one", "two"):
    world = os.path.join(workdirs[name], os.pardir, "world")
    bev = [image_io.read_rgb(os.path.join(world, "g2a", f"{i}.png"))
           for i in train.ground_ids]
    if name == "one":
      reference = bev
    else:
      for i, a, b in zip(train.ground_ids, reference, bev):
        np.testing.assert_array_equal(a, b, err_msg=f"g2a/{i}.png")
    assert not [f for f in os.listdir(os.path.join(world, "g2a"))
                if f.endswith(".tmp")]


def test_initialize_rejects_half_given_flags_before_contacting_anyone():
  with pytest.raises(ValueError, match=r"without \['coordinator_address'\]"):
    parallel.initialize(num_processes=2, process_id=0)
  with pytest.raises(ValueError, match="must be host:port"):
    parallel.initialize("127.0.0.1", 2, 0)
  with pytest.raises(ValueError, match="process_id=2"):
    parallel.initialize("127.0.0.1:1234", 2, 2)
  # One process needs no coordinator.
  assert parallel.initialize("127.0.0.1:1234", 1, 0) is False


def test_detected_cluster_only_for_several_tasks(monkeypatch):
  for key in list(os.environ):
    if key.startswith(("SLURM_", "OMPI_", "TPU_")):
      monkeypatch.delenv(key)
  assert parallel.detected_cluster() is None
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}
  for key, value in slurm.items():
    monkeypatch.setenv(key, value)
  assert parallel.detected_cluster() is None  # One task: a plain process.
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert parallel.detected_cluster() == "SLURM"
  monkeypatch.delenv("SLURM_STEP_NODELIST")  # The batch script, not srun.
  assert parallel.detected_cluster() is None
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  assert parallel.detected_cluster() == "TPU"


def test_gpus_bound_to_slurm_tasks_are_all_used():
  task = {"SLURM_LOCALID": "3", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"}
  # Every task sees every GPU of its node: JAX's default (task k, GPU k).
  assert parallel.task_bound_device_ids(
      dict(task, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")) is None
  # --gpus-per-task=1 / --gpu-bind: task 3 sees one GPU, its own, as 0.
  assert parallel.task_bound_device_ids(
      dict(task, CUDA_VISIBLE_DEVICES="3")) == [0]
  assert parallel.task_bound_device_ids(
      {"SLURM_LOCALID": "0", "SLURM_GPUS_PER_TASK": "2",
       "CUDA_VISIBLE_DEVICES": "0,1"}) == [0, 1]
  # Two GPUs each of the node's four, known only from the job's list.
  assert parallel.task_bound_device_ids(
      {"SLURM_LOCALID": "0", "SLURM_STEP_GPUS": "0,1,2,3",
       "ROCR_VISIBLE_DEVICES": "0,1"}) == [0, 1]
  # A cgroup that hides the rest, no job list: the index is past them.
  assert parallel.task_bound_device_ids(
      {"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "5"}) == [0]
  # Not SLURM, or nothing hidden: JAX decides.
  assert parallel.task_bound_device_ids({"CUDA_VISIBLE_DEVICES": "0"}) is None
  assert parallel.task_bound_device_ids({"SLURM_LOCALID": "0"}) is None
