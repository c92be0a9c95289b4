"""Fault injection: no fault may lose or silently replace what a run saved.

Each case runs `python -m cvgl_jax.main` on a tiny training stage
(`tiny_supervised.py`) in a subprocess, kills it with SIGKILL at a commit
boundary (`run_dir.fault_point`, chosen by the CVGL_JAX_FAULT environment
variable), reruns the same command, and checks that the run ends where an
uninterrupted run ends: bit-identical params in best/, the same selected
step, no duplicated record. The other cases (a second run on the same
workdir, a changed config) check the refusal and its one line.

CI runs the cases not marked `slow`; every case:
  .venv/bin/python -m pytest tests/faults -m "slow or not slow"
"""

import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax import preflight
from cvgl_jax import run_dir
from cvgl_jax import trained as trained_lib
from cvgl_jax.data import image_io
from cvgl_jax.data import synthetic
from cvgl_jax.models import encoder
from cvgl_jax.models import weights
import processes

CONFIG = os.path.join(os.path.dirname(__file__), "tiny_supervised.py")
TRANSLATE_CONFIG = os.path.join(os.path.dirname(__file__),
                                "tiny_translate.py")
STAGE = "supervised"
# 2 steps per epoch (38 pairs, batch 16), 3 epochs, a checkpoint every
# step: odd steps are mid-epoch checkpoints, even ones epoch ends (each
# evaluated, and with select="final" each selected). A kill at the last
# epoch leaves no later evaluation to paper over a lost selection: those
# run in CI.
KILLS = [("checkpoint@3", False), ("before_best@6", False),
         ("before_selected@6", False), ("checkpoint@1", True),
         ("checkpoint@4", True), ("before_best@4", True),
         ("before_selected@4", True), (f"{STAGE}.before_done", True)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("faults") / "world")
  cfg = synthetic.SyntheticConfig(map_cells=1024, pairs_per_world=24,
                                  sat_px=64, cvusa_width=154).validate()
  synthetic.write_dataset("cvusa", root, cfg, 48, 0, progress=False)
  return root


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def main_command(world, workdir, *flags, config=CONFIG):
  return [sys.executable, "-m", "cvgl_jax.main", f"--config={config}:{world}",
          f"--workdir={workdir}", *flags]


def main_env(cache, fault=None, devices=1):
  """An environment of `devices` CPU devices for `cvgl_jax.main`, with
  `fault` (the CVGL_JAX_FAULT spec) or none."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=processes.xla_flags(devices),
             JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  env.pop(run_dir.FAULT_ENV, None)
  if fault:
    env[run_dir.FAULT_ENV] = fault
  return env


def run_main(world, workdir, cache, *flags, fault=None, max_file_bytes=None,
             config=CONFIG):
  env = main_env(cache, fault)
  limit = None
  if max_file_bytes:
    # A full disk, as a per-file size limit: writes past it fail (EFBIG).
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                       (max_file_bytes, max_file_bytes))
  return subprocess.run(main_command(world, workdir, *flags, config=config),
                        env=env,
                        capture_output=True, text=True, timeout=600,
                        preexec_fn=limit)


def best_params(workdir):
  trained = trained_lib.load_trained(
      workdir, stage=STAGE, mesh=parallel.make_mesh(jax.devices()[:1]))
  return trained.step, jax.tree.map(np.asarray, trained.params)


def assert_same_best(workdir, reference):
  """best/ holds the same step and bit-identical params in both runs."""
  step, params = best_params(workdir)
  ref_step, ref_params = best_params(reference)
  assert step == ref_step
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)


def record_keys(workdir):
  with open(run_dir.metrics_file(workdir, STAGE)) as f:
    return [(r["kind"], r["step"]) for r in map(json.loads, f)]


def launch_two(world, workdir, cache, logs, flags, faults=(None, None),
               config=CONFIG):
  """Runs `cvgl_jax.main` as processes 0 and 1 of one job (a CPU device
  each, CVGL_JAX_FAULT faults[i]) to their end: [(exit code, output)]."""
  port = processes.free_port()
  commands = [main_command(world, workdir, *flags,
                           f"--coordinator_address=127.0.0.1:{port}",
                           "--num_processes=2", f"--process_id={i}",
                           config=config) for i in range(2)]
  return processes.run_all(
      commands, [main_env(f"{cache}_{i}", faults[i]) for i in range(2)],
      str(logs))


@pytest.fixture(scope="module")
def reference(world, compile_cache, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  done = run_main(world, workdir, compile_cache)
  assert done.returncode == 0, done.stderr[-3000:]
  # config.report.num_examples=0: the recall picture, no examples picture.
  pictures = os.listdir(os.path.join(workdir, run_dir.REPORT))
  assert "recall.png" in pictures and "retrieval_examples.png" not in pictures
  return workdir


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=pytest.mark.slow) if slow else f
              for f, slow in KILLS])
def test_a_kill_at_a_commit_boundary_loses_nothing(
    fault, world, compile_cache, reference, tmp_path):
  workdir = str(tmp_path / "run")
  killed = run_main(world, workdir, compile_cache, fault=fault)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = run_main(world, workdir, compile_cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_best(workdir, reference)
  assert record_keys(workdir) == record_keys(reference)
  selected = run_dir.read_done(workdir, STAGE)["selected"]
  assert selected == run_dir.read_done(reference, STAGE)["selected"]
  with open(os.path.join(workdir, STAGE, run_dir.SELECTED)) as f:
    assert json.load(f) == selected
  leftovers = [n for _, dirs, files in os.walk(workdir) for n in dirs + files
               if ".tmp" in n or "orbax-checkpoint-tmp" in n]
  assert not leftovers


def test_a_divergence_is_set_aside_and_the_rerun_resumes_before_it(
    world, compile_cache, reference, tmp_path):
  """Params gone NaN at step 4 (a diverged run's): one line naming the
  onset and the remedy, the checkpoints from it on set aside, and the
  rerun ends where an uninterrupted run ends."""
  workdir = str(tmp_path / "run")
  diverged = run_main(world, workdir, compile_cache, fault="nan_params@4")
  assert diverged.returncode == 1, diverged.stderr[-3000:]
  assert "Traceback" not in diverged.stderr
  last = diverged.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: Stage '{STAGE}' diverged") and (
      "began at step 4" in last and "resumes from checkpoint 2" in last
      and "--force_config_change" in last), last
  assert os.listdir(os.path.join(workdir, STAGE, "diverged")) == ["3"]
  resumed = run_main(world, workdir, compile_cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_best(workdir, reference)
  assert record_keys(workdir) == record_keys(reference)


@pytest.mark.slow
def test_a_nan_batch_costs_one_step(world, compile_cache, tmp_path):
  workdir = str(tmp_path / "run")
  done = run_main(world, workdir, compile_cache, fault="nan_batch@3")
  assert done.returncode == 0, done.stderr[-3000:]
  assert run_dir.read_done(workdir, STAGE)["skipped_steps"] == 1
  records = run_dir.read_records(workdir, STAGE)
  assert [r["skipped"] for r in records if r["kind"] == "train"
          and r["step"] == 3] == [1.0]
  _, params = best_params(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_a_kill_in_the_translation_loses_nothing(world, compile_cache,
                                                 tmp_path):
  """CFP and the CycleGAN write into the dataset root: each run its own.
  (Slow: three launches. CI keeps the CycleGAN's resume in
  tests/test_translate.py and the SIGKILLs at the loop's commit boundaries,
  whose helpers the CycleGAN stage shares, above.)"""
  runs = {}
  for name, fault in (("reference", None), ("killed", "translate.checkpoint@16")):
    root = str(tmp_path / name / "world")
    shutil.copytree(world, root)
    workdir = str(tmp_path / name / "run")
    first = run_main(root, workdir, compile_cache, fault=fault,
                     config=TRANSLATE_CONFIG)
    if fault:
      assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
      first = run_main(root, workdir, compile_cache, config=TRANSLATE_CONFIG)
    assert first.returncode == 0, first.stderr[-3000:]
    runs[name] = root, workdir
  (ref_root, ref_dir), (root, workdir) = runs["reference"], runs["killed"]
  fakes = sorted(os.listdir(os.path.join(ref_root, "g2a_sat")))
  assert fakes == sorted(os.listdir(os.path.join(root, "g2a_sat")))
  for name in fakes:
    with open(os.path.join(ref_root, "g2a_sat", name), "rb") as a, open(
        os.path.join(root, "g2a_sat", name), "rb") as b:
      assert a.read() == b.read(), name
  steps = lambda d: [r["step"] for r in map(json.loads, open(
      run_dir.metrics_file(d, "translate")))]
  assert steps(workdir) == steps(ref_dir)


def test_two_processes_share_the_file_stages_and_the_cyclegan(
    world, compile_cache, tmp_path):
  """CFP and the translation as processes 0 and 1 (a CPU device each)
  against one process with two devices, a global CycleGAN batch of 2:
  the same steps and losses (one data-parallel training, not one per
  process), the same BEVs, the same fakes up to rounding, every file
  written although process 1 lists the outputs late (after process 0 has
  written its share), each record once."""
  batch = "--config.translate.batch_size=2"
  runs = {}
  for name in ("one", "two"):
    root = str(tmp_path / name / "world")
    shutil.copytree(world, root)
    workdir = str(tmp_path / name / "run")
    if name == "one":
      done = subprocess.run(
          main_command(root, workdir, batch, config=TRANSLATE_CONFIG),
          env=main_env(compile_cache + "_2", devices=2), capture_output=True,
          text=True, timeout=600)
      outputs = [(done.returncode, done.stderr)]
    else:
      outputs = launch_two(root, workdir, compile_cache, tmp_path / "logs",
                           [batch], faults=(None, "list_late"),
                           config=TRANSLATE_CONFIG)
    for code, text in outputs:
      assert code == 0, text[-3000:]
      assert "the CycleGAN trains on 2 of 2 devices" in text
    runs[name] = root, workdir
  (one_root, one_dir), (two_root, two_dir) = runs["one"], runs["two"]
  records = lambda d: [json.loads(line) for line in open(
      run_dir.metrics_file(d, "translate"))]
  one, two = records(one_dir), records(two_dir)
  assert [r["step"] for r in two] == [r["step"] for r in one]
  for a, b in zip(one, two):
    for key in ("g_total", "cycle_a", "d_a", "d_b"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
  for stage, folder in (("cfp", "g2a"), ("translate", "g2a_sat")):
    names = sorted(f for f in os.listdir(os.path.join(one_root, folder))
                   if f.endswith(".png"))
    assert names == sorted(f for f in os.listdir(os.path.join(
        two_root, folder)) if f.endswith(".png"))
    assert run_dir.read_done(two_dir, stage)["written"] == len(names)
    diff = [np.abs(image_io.read_rgb(os.path.join(one_root, folder, n))
                   .astype(int) - image_io.read_rgb(
                       os.path.join(two_root, folder, n))) for n in names]
    if folder == "g2a":
      assert max(d.max() for d in diff) == 0
    else:  # The generators differ by float rounding.
      assert max(d.max() for d in diff) <= 2, max(d.max() for d in diff)


def test_sigterm_checkpoints_at_the_next_step_and_exits_0(
    world, compile_cache, reference, tmp_path):
  """As a scheduler's time limit: checkpoints only at epoch ends (2, 4,
  6), SIGTERM after step 3 -> a checkpoint at step 3, exit 0; the rerun
  ends where an uninterrupted run ends."""
  workdir = str(tmp_path / "run")
  sparse = "--config.train.checkpoint_every_steps=100"
  stopped = run_main(world, workdir, compile_cache, sparse,
                     fault="sigterm@3")
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert "Pre-empted: Stage 'supervised' stopped at step 3" in stopped.stderr
  assert run_dir.checkpoint_step(
      run_dir.checkpoints_dir(workdir, STAGE)) == 3
  assert not run_dir.read_done(workdir, STAGE)
  resumed = run_main(world, workdir, compile_cache, sparse)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_best(workdir, reference)
  assert record_keys(workdir) == record_keys(reference)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    world, compile_cache, tmp_path):
  """JAX's preemption service: process 1 gets SIGTERM after step 3; both
  processes checkpoint at the step they agree on (a few later on a loaded
  machine: the notice travels through the coordination service), exit 0,
  and the rerun resumes there. Process 1 also sees every evaluation's
  label-free score negated: were "save the selected params" its own
  decision, it would skip the collective save process 0 makes and hang."""
  workdir = str(tmp_path / "run")

  def launch(fault):
    # 10 epochs of 2 steps: room for the notice to reach the other process,
    # however loaded the machine, before the run would end; evaluated after
    # epochs 5 and 10 (two decisions after the stop).
    return launch_two(
        world, workdir, compile_cache, tmp_path / (fault or "rerun"),
        ["--config.train.checkpoint_every_steps=100",
         "--config.train.select=label_free", "--config.supervised.epochs=10",
         "--config.train.eval_every_epochs=5"],
        faults=(None, ",".join(["disagree"] + [fault] * bool(fault))))

  stopped = set()
  for code, err in launch("sigterm@3"):
    found = re.search(r"Pre-empted: Stage 'supervised' stopped at step "
                      r"(\d+)", err)
    assert code == 0 and found, err[-3000:]
    stopped.add(int(found[1]))
  # Both at the one step they agreed on, after the signal, before the end;
  # its checkpoint is where the rerun starts: no step is lost.
  (step,) = stopped
  assert 3 <= step < 20
  assert run_dir.checkpoint_step(
      run_dir.checkpoints_dir(workdir, STAGE)) == step
  for code, err in launch(None):
    assert code == 0, err[-3000:]
  done = run_dir.read_done(workdir, STAGE)
  assert done["step"] == 20
  # Process 0's choice (the highest score) is in best/.
  assert run_dir.checkpoint_step(os.path.join(
      workdir, STAGE, run_dir.BEST)) == done["selected"]["step"]


@pytest.mark.slow
def test_a_resume_keeps_a_label_free_selection(world, compile_cache,
                                               tmp_path):
  flag = "--config.train.select=label_free"
  reference_dir = str(tmp_path / "reference")
  assert run_main(world, reference_dir, compile_cache, flag).returncode == 0
  workdir = str(tmp_path / "run")
  killed = run_main(world, workdir, compile_cache, flag, fault="checkpoint@5")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert run_main(world, workdir, compile_cache, flag).returncode == 0
  assert (run_dir.read_done(workdir, STAGE)["selected"]
          == run_dir.read_done(reference_dir, STAGE)["selected"])
  assert_same_best(workdir, reference_dir)


# Slow: it failed once when run after test_main in one session (passing
# alone and with tests/faults; cause not found yet, BUILD_NOTES.md).
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_resumes(
    world, compile_cache, reference, tmp_path):
  workdir = str(tmp_path / "run")
  full = run_main(world, workdir, compile_cache, max_file_bytes=40_000)
  assert full.returncode == 1, full.stderr[-3000:]
  # The last line, and the only one of ours (the checkpointer's own error
  # logs before it are the console issue's: third-party chatter).
  lines = [l for l in full.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "no space left writing" in lines[0], lines
  assert full.stderr.rstrip().splitlines()[-1] == lines[0]
  assert not os.path.exists(os.path.join(workdir, run_dir.LOCK))
  resumed = run_main(world, workdir, compile_cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_best(workdir, reference)


def test_a_second_run_on_the_workdir_is_refused(tmp_path):
  workdir = str(tmp_path)
  with run_dir.locked(workdir):
    with pytest.raises(run_dir.RunDirError) as e:
      with run_dir.locked(workdir):
        pass
  message = str(e.value)
  assert f"pid {os.getpid()}" in message and "in use by another run" in message
  # Released: the next run takes it.
  with run_dir.locked(workdir):
    assert os.path.exists(os.path.join(workdir, run_dir.LOCK))
  assert not os.path.exists(os.path.join(workdir, run_dir.LOCK))


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  lock = tmp_path / run_dir.LOCK
  lock.write_text(json.dumps({"host": os.uname().nodename,
                              "pid": int(dead.stdout), "started": "then"}))
  with run_dir.locked(str(tmp_path)):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert "taking it over" in caplog.text
  # Held from another host: never taken over.
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1,
                              "started": "then"}))
  with pytest.raises(run_dir.RunDirError, match="host elsewhere, pid 1"):
    with run_dir.locked(str(tmp_path)):
      pass


def test_a_changed_config_is_refused_unless_forced(tmp_path):
  from tiny_supervised import get_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  config = get_config("/data")
  assert run_dir.save_config(workdir, config) == {}
  config.train.log_every_steps = 7  # Safe on resume: rewritten silently.
  assert list(run_dir.save_config(workdir, config)) == [
      "train.log_every_steps"]
  config.train.lr = 5e-4
  config.model.dims = (8, 32)
  with pytest.raises(run_dir.RunDirError) as e:
    run_dir.save_config(workdir, config)
  assert "model.dims: [8, 16] -> [8, 32]" in str(e.value)
  assert "train.lr: 0.001 -> 0.0005" in str(e.value)
  assert run_dir.read_config(workdir).train.lr == 1e-3  # Not overwritten.
  run_dir.save_config(workdir, config, force=True)
  assert run_dir.read_config(workdir).train.lr == 5e-4
  with open(os.path.join(workdir, run_dir.CONFIG_CHANGES)) as f:
    change = json.loads(f.readline())
  assert change["changes"]["train.lr"] == [1e-3, 5e-4]
  # A workdir written before a key existed resumes when the key keeps its
  # default (the behaviour before it), and not when it is set otherwise.
  saved = run_dir.read_config(workdir).to_dict()
  del saved["train"]["max_skipped_steps"]
  run_dir.write_json(run_dir.config_file(workdir), saved)
  defaults = config_lib.default_config()
  assert run_dir.save_config(workdir, config, defaults=defaults) == {}
  # Read back (export, report) with the key at its default.
  assert "max_skipped_steps" not in run_dir.read_config(workdir).train
  assert run_dir.read_config(workdir, defaults.to_dict()
                             ).train.max_skipped_steps == 10
  assert run_dir.read_config(workdir, defaults.to_dict()).train.lr == 5e-4
  config.train.max_skipped_steps = 3
  with pytest.raises(run_dir.RunDirError, match="max_skipped_steps"):
    run_dir.save_config(workdir, config, defaults=defaults,
                        safe_keys=())


def test_refusals_are_one_line_and_exit_2(world, compile_cache, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / run_dir.LOCK).write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "started": "then"}))
  refused = run_main(world, str(workdir), compile_cache)
  assert refused.returncode == 2
  lines = [l for l in refused.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "in use by another run" in lines[0]
  assert "Traceback" not in refused.stderr
  assert not (workdir / STAGE).exists()


def test_a_dataset_of_another_layout_is_named_in_one_error_exit_2(
    compile_cache, tmp_path):
  root = tmp_path / "cvusa"
  (root / "streetview").mkdir(parents=True)  # Not CVUSA's folder names.
  (root / "train.csv").write_text("")
  refused = run_main(str(root), str(tmp_path / "run"), compile_cache)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert "Traceback" not in refused.stderr
  message = refused.stderr[refused.stderr.index("error:"):]
  assert "splits/train-19zl.csv does not exist" in message
  assert f"Found in {root}: streetview/, train.csv" in message
  assert not (tmp_path / "run" / STAGE).exists()


def test_a_corrupt_image_is_named_before_training_or_left_out(
    world, compile_cache, tmp_path):
  damaged = str(tmp_path / "world")
  shutil.copytree(world, damaged)
  tile = sorted(glob.glob(os.path.join(damaged, "bingmap", "**", "*.jpg"),
                          recursive=True))[3]
  data = open(tile, "rb").read()
  open(tile, "wb").write(data[:len(data) // 2])
  refused = run_main(damaged, str(tmp_path / "run"), compile_cache)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert "Traceback" not in refused.stderr
  lines = [l for l in refused.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and f"{tile} is truncated" in lines[0], lines
  assert not (tmp_path / "run" / STAGE).exists()
  done = run_main(damaged, str(tmp_path / "skip"), compile_cache,
                  "--config.data.on_bad_image=skip")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Left out 1 unusable image files" in done.stdout
  with open(tmp_path / "skip" / run_dir.RESULTS) as f:
    skipped = json.load(f)["skipped_images"]
  assert len(skipped) == 1 and tile in skipped[0]


def test_a_gpu_config_on_a_cpu_only_jax_stops_before_any_work(
    world, compile_cache, tmp_path):
  assert config_lib.platform_problem("accelerator", "gpu") == ""
  assert config_lib.platform_problem("any", "cpu") == ""
  assert "found only cpu" in config_lib.platform_problem("tpu", "cpu")
  refused = run_main(world, str(tmp_path / "run"), compile_cache,
                     "--config.platform=accelerator")
  assert refused.returncode == 2, refused.stderr[-3000:]
  lines = [l for l in refused.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "config.platform='accelerator' but JAX found " \
      "only cpu devices" in lines[0], lines
  assert not os.path.exists(tmp_path / "run")
  # The real-data configs ask for an accelerator.
  assert config_lib.paradigm("cvusa").platform == "accelerator"
  assert config_lib.supervised("vigor").platform == "accelerator"


def test_records_are_truncated_to_the_resumed_step(tmp_path):
  (tmp_path / "s").mkdir()
  lines = [{"step": 2, "epoch": 1, "kind": "epoch_start"},
           {"step": 3, "epoch": 1, "kind": "train"},
           {"step": 4, "epoch": 2, "kind": "eval"},
           {"step": 4, "epoch": 2, "kind": "epoch_start"},
           {"step": 5, "epoch": 2, "kind": "train"}]
  path = tmp_path / "s" / run_dir.METRICS
  path.write_text("".join(json.dumps(x) + "\n" for x in lines)
                  + '{"step": 6, "ki')  # Cut short by a kill.
  assert run_dir.truncate_records(str(tmp_path), "s", 4, ("epoch_start",)) == 3
  assert [(r["kind"], r["step"]) for r in
          run_dir.read_records(str(tmp_path), "s")] == [
              ("epoch_start", 2), ("train", 3), ("eval", 4)]
  assert run_dir.truncate_records(str(tmp_path), "s", None) == 3
  assert path.read_text() == ""


def test_job_mistakes_are_named_before_any_stage_runs(tmp_path):
  from tiny_supervised import get_config  # pylint: disable=g-import-not-at-top
  config = get_config(str(tmp_path))
  model = encoder.from_config(config.model)
  params = jax.eval_shape(
      model.init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, 32, 128, 3), np.float32),
      jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))["params"]
  backbone = jax.tree.map(lambda x: np.ones(x.shape, np.float32),
                          params["query"]["backbone"])
  path = str(tmp_path / "other_variant.safetensors")
  weights.save_timm(backbone, path)
  config.model.pretrained = path
  config.model.dims = (8, 24)   # Not the file's variant.
  config.train.batch_size = 12  # Does not split over 8 devices.
  config.train.grad_cache_chunk = 4  # Divides 12, but not over 8 devices.
  config.stages = ("cfp", "supervised")
  with pytest.raises(config_lib.ConfigError) as e:
    preflight.check(config, parallel.make_mesh())
  message = str(e.value)
  assert "train.batch_size: the global batch 12" in message
  assert f"config.model.pretrained='{path}'" in message
  assert "wrong shapes" in message
  assert "train.grad_cache_chunk=4 must be a multiple of the 8 devices" in (
      message)
  config.model.dims = (8, 16)
  config.train.batch_size = 16
  config.train.grad_cache_chunk = 8
  preflight.check(config, parallel.make_mesh())  # The file fits: no error.
  config.train.lr = -1e-4
  with pytest.raises(config_lib.ConfigError, match=r"train.lr=-0.0001 must"):
    config_lib.validate(config)
  config.train.lr, config.train.grad_cache_chunk = 1e-4, 6
  with pytest.raises(config_lib.ConfigError,
                     match=r"grad_cache_chunk=6 must divide config.train."
                     r"batch_size=16"):
    config_lib.validate(config)
