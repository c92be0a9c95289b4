r"""CycleGAN translation: our stage vs the authors' PyTorch training, per epoch.

Both train the same networks with the same losses and update order
(`benchmarks/torch_cyclegan.py`, checked against ours by
tests/test_translate.py's golden test) on the same BEVs and satellite tiles:
a synthetic world made by the `cfp` stage of `--config` (cached in
`--workdir`). Variants, timed round-robin, each turn `--steps` steps
(default: one epoch, max(|A|, |B|) images at batch 1):

  ours_epoch   `translate_stage.train_translation`, the stage as it runs:
               grain decoding, the jitted step, logging, a checkpoint at
               the epoch's end. Each turn resumes from the last one; the
               cost of a call that takes no step (image check, restore) is
               timed as one more variant and subtracted.
  torch_epoch  the official loop: DataLoader(UnalignedDataset, num_workers)
               + `optimize_parameters`, losses read back every 100 steps.
  ours_step / torch_step   the steps alone, on one fixed batch.
  ours_data / torch_data   the input alone: grain vs the DataLoader.
  ours_<impl>_step         the steps alone with another
               `translate.upsample_impl` (--upsample_impls).

The torch side runs in its own interpreter (`--torch_python`, a throwaway
venv: `python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install
torch==2.14.1 torchvision==0.29.1`; OMP_WAIT_POLICY=PASSIVE), so neither
framework shares a heap or a thread pool with the other.

  python benchmarks/translate.py --torch_python=/tmp/torchvenv/bin/python
  python benchmarks/translate.py --steps=200
  python benchmarks/translate.py --size=paper --steps=1 --rounds=2 \
      --variants=step --upsample_impls=subpixel,transpose

--size=demo is the synthetic configs' CycleGAN (8 filters, 2 residual
blocks, 64 px crops), --size=paper the authors' (64 filters, 9 blocks,
320 px crops of 360 px resizes), where a CPU step takes seconds.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # pylint: disable=g-import-not-at-top,wrong-import-position

from cvgl_jax import cli  # pylint: disable=wrong-import-position
from cvgl_jax import config_lib  # pylint: disable=wrong-import-position
from cvgl_jax import parallel  # pylint: disable=wrong-import-position
from cvgl_jax import stages  # pylint: disable=wrong-import-position
from cvgl_jax.cfp import translate as tr  # pylint: disable=wrong-import-position
from cvgl_jax.cfp import translate_stage  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic_unsup.py",
    "Run config whose world and CycleGAN are timed.")
flags.DEFINE_string("workdir", "runs/translate_bench",
                    "Where the world and its BEVs are kept between runs.")
flags.DEFINE_enum("size", "demo", ["demo", "paper"],
                  "The config's CycleGAN, or the authors' sizes.")
flags.DEFINE_integer("steps", 0, "Steps per turn (0: one epoch).")
flags.DEFINE_integer("rounds", 3, "Round-robin rounds.")
flags.DEFINE_integer("num_threads", 0,
                     "Decoding threads (ours) and DataLoader workers (torch);"
                     " 0: the config's translate.num_threads.")
flags.DEFINE_string("torch_python", "/tmp/torchvenv/bin/python",
                    "Interpreter with torch + torchvision ('' : ours only).")
flags.DEFINE_list("variants", ["epoch", "step", "data"],
                  "Which of epoch, step, data to time.")
flags.DEFINE_list("upsample_impls", ["auto"],
                  "translate.upsample_impl values to time ours with (the "
                  "first is ours_*, the others ours_<impl>_step).")

PAPER_SIZE = dict(ngf=64, ndf=64, n_blocks=9, n_layers_d=3, load_size=360,
                  crop_size=320)


def world(config, workdir):
  """(BEV paths, satellite paths) of the config's training split, made by
  the cfp stage on first use."""
  run = stages.setup(config, workdir)
  bevs = list(run.train.derived_paths("g2a"))
  if not all(os.path.exists(p) for p in bevs):
    stages.run_cfp(run)
  return bevs, list(run.train.satellite_paths)


class Ours:
  """Our side: the stage's training function and its parts."""

  def __init__(self, bevs, sats, config, steps, rounds):
    self.bevs, self.sats, self.steps = bevs, sats, steps
    spe = translate_stage.steps_per_epoch(len(bevs), len(sats),
                                          config.batch_size)
    config = config.copy_and_resolve_references()
    # Enough constant-lr epochs for every turn; no decay.
    config.n_epochs = (rounds + 2) * max(1, -(-steps // spe))
    config.n_epochs_decay = 0
    config.ckpt_every_steps = max(config.ckpt_every_steps, steps)
    self.config = config
    self.dir = tempfile.mkdtemp(prefix="translate_bench_")
    self.done = 0
    self.model = tr.get_model(config)
    self.mesh = parallel.make_mesh(parallel.devices_for_batch(
        config.batch_size, "translate.batch_size"))
    self.state = parallel.replicate_local(
        self.model.init(jax.random.PRNGKey(0), spe), self.mesh)
    batch = next(translate_stage.epoch_batches(bevs, sats, config, 0, 0,
                                               spe))
    self.batch = parallel.to_global(batch, self.mesh)
    self.spe = spe

  def epoch(self):
    self.done += self.steps
    self.resume()

  def resume(self):
    """The stage's call up to the steps done: with none left to take, the
    cost of a call outside its steps (image check, restore)."""
    translate_stage.train_translation(self.bevs, self.sats, self.dir,
                                      self.config, max_steps=self.done,
                                      progress=False)

  def step(self):
    for _ in range(self.steps):
      self.state, metrics = self.model.jit_train_step(self.state, self.batch)
    jax.block_until_ready(metrics)

  def data(self):
    left, epoch = self.steps, 0
    while left:
      for _ in translate_stage.epoch_batches(self.bevs, self.sats,
                                             self.config, epoch, 0, self.spe):
        left -= 1
        if not left:
          break
      epoch += 1

  def close(self):
    shutil.rmtree(self.dir, ignore_errors=True)


class Torch:
  """The official training in a worker interpreter (torch_cyclegan.serve)."""

  def __init__(self, python, bevs, sats, config, steps, num_workers):
    keys = ("ngf", "ndf", "n_blocks", "n_layers_d", "lr", "beta1", "beta2",
            "lambda_cycle", "lambda_identity", "pool_size", "load_size",
            "crop_size", "flip", "batch_size", "seed")
    spec = {"config": {k: config[k] for k in keys}, "a_paths": bevs,
            "b_paths": sats, "num_workers": num_workers, "steps": steps}
    fd, self.spec = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
      json.dump(spec, f)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    here = os.path.dirname(os.path.abspath(__file__))
    self.proc = subprocess.Popen(
        [python, os.path.join(here, "torch_cyclegan.py"), self.spec],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.banner = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch worker exited ({self.proc.wait()}).")
    return line.strip()

  def __call__(self, command):
    """Runs `command` in the worker; returns the seconds it reports."""
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return float(self._read())

  def close(self):
    self.proc.stdin.write("quit\n")
    self.proc.stdin.flush()
    self.proc.wait()
    os.remove(self.spec)


def main(argv):
  del argv
  cli.setup_console()
  config = _CONFIG.value
  config_lib.validate(config)
  bevs, sats = world(config, FLAGS.workdir)
  t = config.translate
  if FLAGS.size == "paper":
    t.update(PAPER_SIZE)
  if FLAGS.num_threads:
    t.num_threads = FLAGS.num_threads
  spe = translate_stage.steps_per_epoch(len(bevs), len(sats), t.batch_size)
  steps = FLAGS.steps or spe
  print(f"CycleGAN ngf {t.ngf}, {t.n_blocks} blocks, PatchGAN {t.n_layers_d}"
        f" layers, {t.load_size} -> {t.crop_size} px crops, batch "
        f"{t.batch_size}, pool {t.pool_size}, upsampling "
        f"{FLAGS.upsample_impls[0]}; {len(bevs)} BEVs, {len(sats)} "
        f"tiles ({spe} steps per epoch); {steps} steps per turn, "
        f"{t.num_threads} decoding threads / workers; {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}")
  impls = FLAGS.upsample_impls
  t.upsample_impl = impls[0]
  ours = Ours(bevs, sats, t, steps, FLAGS.rounds)
  variants = {}
  for kind in FLAGS.variants:
    variants[f"ours_{kind}"] = getattr(ours, kind)
  others = []
  for impl in impls[1:]:
    other = t.copy_and_resolve_references()
    other.upsample_impl = impl
    others.append(Ours(bevs, sats, other, steps, FLAGS.rounds))
    variants[f"ours_{impl}_step"] = others[-1].step
  torch = None
  if FLAGS.torch_python and not os.path.exists(FLAGS.torch_python):
    print(f"No interpreter at --torch_python={FLAGS.torch_python}: timing "
          "ours only (make one as this file's docstring says).")
  elif FLAGS.torch_python:
    torch = Torch(FLAGS.torch_python, bevs, sats, t, steps, t.num_threads)
    print(f"jax {jax.__version__}; {torch.banner}")
    for kind in FLAGS.variants:
      variants[f"torch_{kind}"] = lambda kind=kind: torch(kind)
  # Warm-up: compile, start the workers, fill the caches.
  for name, fn in variants.items():
    start = time.perf_counter()
    fn()
    print(f"  {name} first turn {time.perf_counter() - start:.1f} s")
  if "ours_epoch" in variants:
    variants["ours_resume"] = ours.resume
  med = timing.medians(timing.round_robin(variants, FLAGS.rounds))
  if "ours_resume" in med:
    overhead = med.pop("ours_resume")
    med["ours_epoch"] -= overhead
    print(f"ours_epoch: {overhead:.2f} s per call of the stage outside its "
          "steps (image check, restore) subtracted")
  print(f"ms per step, medians of {FLAGS.rounds} rounds of {steps} steps:")
  for name, seconds in med.items():
    print(f"  {name:12s} {1e3 * seconds / steps:9.2f} ms/step  "
          f"(epoch of {spe}: {seconds * spe / steps:7.1f} s)")
  for kind in FLAGS.variants:
    if f"torch_{kind}" in med:
      print(f"  {kind}: torch / ours time = "
            f"{med[f'torch_{kind}'] / med[f'ours_{kind}']:.2f}x")
  for o in [ours] + others:
    o.close()
  if torch is not None:
    torch.close()


if __name__ == "__main__":
  app.run(main)
