r"""Images/s of a full training step, ours vs PyTorch/timm, and the input
pipeline's batches/s.

Ours is the step the stages run: `steps.make_cross_step` (jitted, state
donated) with its on-device augmentation (`cvgl_jax.data.augment`:
docs/METHOD.md's dropout, colour jitter, grayscale, blur, satellite warp, paired
flip/rotation), ImageNet normalisation, two ConvNeXt towers with SAFA heads
(drop path 0.2), symmetric InfoNCE with label smoothing 0.1 and AdamW, on
uint8 batches. The baseline (`torch_reference.py`) is timm ConvNeXt towers
+ the authors' SAFA + the same loss + `torch.optim.AdamW`, fed the same
uint8 pixels. Augmentation (--augment):

  full  ours: the whole on-device augmentation above. torch: in-step tensor
        ops only -- uint8 -> float, the paired flip / 90-degree rotation
        (satellite rot90, panorama rolled by quarter widths), ImageNet
        normalisation; no dropout, jitter, blur or warp (cheaper than ours).
  none  both: uint8 -> float and ImageNet normalisation only (ours runs
        make_cross_step with every augmentation probability 0).

The variants are timed round-robin (each round --steps steps of each, in
turn) and medians reported. Each turn opens with --turn_warmup untimed
steps (default 1), timed and reported apart: on the dev VM the first step
after the other framework's turn pays for memory the host took back
meanwhile (ours: 6-11 s of kernel time instead of 0.7 s, 10.9-13.3 s
instead of 7.6-7.9 s), which a training loop, running step after step,
does not see. --turn_warmup=0 times those steps too.

By default (--isolate) each variant runs in its own worker process, started
with the environment it runs with in practice: ours with
`glibc.malloc.hugetlb=1`, as `python -m cvgl_jax.main` sets it
(`cvgl_jax/cpu/hostmem.py`), torch with this process's environment. Why: in one
process the two frameworks share glibc's heap, and on the dev CPU our step
right after a torch step spent 11 s instead of 2.7 s in the kernel faulting
in its 4.1 GB of temporaries (13.5 vs 9.3 s/step); huge pages make our step
faster alone (9.05 vs 10.27 s with --small_pages --torch=false) but torch's
slower (6.25 -> 7.40 s), so one environment for both would favour one side.
--isolate=false times both in this process, under this process's
environment. --small_pages adds ours under the caller's environment too
(`jax_4k`), timing what the huge pages are worth in the same run.

Then the grain pipeline (`pipeline.pseudo_pairs` over true pairs, as the
supervised stage reads them) decodes and resizes batches of the same size
from a synthetic CVUSA-layout world (`cvgl_jax.data.synthetic`), timed
alone: batches/s against our steps/s says whether input keeps up (both
share the same cores when training, so this is an upper bound).

Defaults are the issue's reference point (ConvNeXt-T x2, batch 16, ground
128x512, satellite 128x128); on the 2-core dev machine, idle, a run with
--rounds=3 --steps=2 took about 4 minutes (compile ~30 s, ours 5.9-6.0
s/step, torch 6.4-7.1 s/step, 1.06-1.22x); smaller flags shorten the
steps, not the compile.

  python benchmarks/train_step.py
  python benchmarks/train_step.py --variant=atto --batch=8 --augment=none
  python benchmarks/train_step.py --depthwise=shifts   # the pure-XLA conv

The header says which depthwise conv ours runs ("auto": the C++ kernel on
CPU, or the shifted sum where it cannot be built).

--devices=1,2 times our step on meshes of the first 1 and 2 devices in the
same round robin. On a CPU host, several XLA devices come from
XLA_FLAGS=--xla_force_host_platform_device_count=N; each device runs its
share of the batch on its own thread, which asks whether XLA:CPU leaves
cores idle (on the 2-core dev machine it does not: 2 devices gave 1.04x,
BUILD_NOTES.md):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python benchmarks/train_step.py --devices=1,2
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# pylint: disable=g-import-not-at-top,wrong-import-position
import multiprocessing
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from cvgl_jax import cpu
from cvgl_jax import parallel
from cvgl_jax.cpu import depthwise
from cvgl_jax.cpu import hostmem
from cvgl_jax.data import augment
from cvgl_jax.data import pipeline
from cvgl_jax.data import readers
from cvgl_jax.data.synthetic import config as synthetic_config
from cvgl_jax.data.synthetic import layouts
from cvgl_jax.models import convnext
from cvgl_jax.models import encoder
from cvgl_jax.train import state as state_lib
from cvgl_jax.train import steps
import timing
import torch_reference

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "tiny", "ConvNeXt size of both towers.")
flags.DEFINE_list("ground", ["128", "512"], "Ground image H,W.")
flags.DEFINE_integer("satellite", 128, "Satellite image side.")
flags.DEFINE_integer("batch", 16, "Pairs per step.")
flags.DEFINE_enum("depthwise", "auto", list(cpu.DEPTHWISE_IMPLS),
                  "Our DepthwiseConv impl (auto: the C++ kernel on CPU).")
flags.DEFINE_enum("augment", "full", ["full", "none"],
                  "Augmentation on each side (module docstring).")
flags.DEFINE_integer("rounds", 3, "Round-robin rounds.")
flags.DEFINE_integer("steps", 1, "Timed steps per side per round.")
flags.DEFINE_integer("turn_warmup", 1,
                     "Untimed steps at the start of each variant's turn "
                     "(timed and reported apart; module docstring).")
flags.DEFINE_bool("torch", True, "Time the PyTorch/timm baseline too.")
flags.DEFINE_integer("pipeline_batches", 8,
                     "Batches to time the input pipeline on (0: skip).")
flags.DEFINE_integer("pipeline_threads", 8, "grain reader threads.")
flags.DEFINE_list("devices", [],
                  "Mesh sizes to time ours on (default: all devices).")
flags.DEFINE_bool("isolate", True,
                  "Run each variant in its own worker process, ours with "
                  "the huge-page setting `cvgl_jax.main` runs with; the "
                  "steps are still timed round robin (module docstring).")
flags.DEFINE_bool("small_pages", False,
                  "With --isolate, also time ours under the caller's "
                  "environment (4 KiB pages where the caller did not ask "
                  "for huge ones), as variant `<name>_4k`: what the "
                  "huge-page re-exec of `cvgl_jax.main` is worth.")

LABEL_SMOOTHING = 0.1
DROP_PATH = 0.2
# Real CVUSA sizes (1232 x 224 panorama crops, 750 x 750 tiles), so decode
# and resize cost what they cost on the real data.
WORLD = synthetic_config.SyntheticConfig(sat_px=750, cvusa_width=1232)


def _images(rng, batch, hw):
  return rng.integers(0, 256, (batch, hw[0], hw[1], 3), dtype=np.uint8)


def jax_step_fn(variant, ground_hw, satellite_hw, batch, augmentation,
                depthwise_impl="auto", num_devices=None):
  """Returns run() doing one of our training steps on a fixed batch, on a
  mesh of the first `num_devices` devices (None: all)."""
  mesh = parallel.make_mesh(None if num_devices is None
                            else jax.devices()[:num_devices])
  model = encoder.TwoTower(variant=variant, head="safa",
                           drop_path_rate=DROP_PATH,
                           depthwise_impl=depthwise_impl)
  tx = state_lib.create_optimizer(1e-4, 0.01, steps_per_epoch=1000,
                                  num_epochs=10)
  st = state_lib.create_state(model, tx, ground_size=ground_hw,
                              satellite_size=satellite_hw, seed=0, mesh=mesh)
  if augmentation == "full":
    augs = {}
  else:
    augs = dict(ground_aug=augment.no_view_augmentation(),
                satellite_aug=augment.no_view_augmentation(),
                paired_aug=augment.PairedConfig(flip_p=0.0, rotate_p=0.0))
  step = steps.make_cross_step(model, tx, mesh,
                               label_smoothing=LABEL_SMOOTHING, **augs)
  rng = np.random.default_rng(0)
  batch_np = {"ground": _images(rng, batch, ground_hw),
              "satellite": _images(rng, batch, satellite_hw)}
  data = parallel.to_global(batch_np, mesh)
  holder = [st]

  def run():
    holder[0], metrics = step(holder[0], data)
    metrics["loss"].block_until_ready()
  return run


def torch_step_fn(variant, ground_hw, satellite_hw, batch, augmentation):
  """Returns run() doing the PyTorch/timm step on the same pixels."""
  import torch
  torch.manual_seed(0)
  towers, logit_scale = torch_reference.two_tower(variant, ground_hw,
                                                  satellite_hw, DROP_PATH)
  opt = torch_reference.adamw(towers, logit_scale)
  rng = np.random.default_rng(0)
  ground = torch.from_numpy(_images(rng, batch, ground_hw))
  satellite = torch.from_numpy(_images(rng, batch, satellite_hw))
  mean = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
  gen = torch.Generator().manual_seed(1)

  def prepare(images):
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std

  def paired_geometry(g, s):
    out_g, out_s = [], []
    width = g.shape[-1]
    for gi, si in zip(g, s):
      if torch.rand((), generator=gen) < 0.5:
        gi, si = gi.flip(-1), si.flip(-1)
      if torch.rand((), generator=gen) < 0.5:
        k = int(torch.randint(1, 4, (), generator=gen))
        gi = gi.roll(k * width // 4, dims=-1)
        si = si.rot90(k, dims=(-2, -1))
      out_g.append(gi)
      out_s.append(si)
    return torch.stack(out_g), torch.stack(out_s)

  def run():
    g, s = prepare(ground), prepare(satellite)
    if augmentation == "full":
      g, s = paired_geometry(g, s)
    torch_reference.train_step(towers, logit_scale, opt, g, s,
                               LABEL_SMOOTHING)
  return run


def _step_fn(name, args):
  """run() of variant `name`: "torch", "jax" or "jax_<k>dev", each of ours
  optionally with the suffix "_4k" (which only changes its environment)."""
  if name == "torch":
    return torch_step_fn(*args[:5])
  k = name.removesuffix("_4k").removeprefix("jax").removeprefix("_")
  k = k.removesuffix("dev")
  return jax_step_fn(*args, num_devices=int(k) if k else None)


def _serve(conn, name, args):
  """Worker process: builds variant `name`, then runs one step per request
  until it receives None."""
  run = _step_fn(name, args)
  conn.send("ready")
  while conn.recv() is not None:
    run()
    conn.send("done")


class _Worker:
  """A variant in its own spawned process; calling it runs one step there.

  `environ` is the worker's whole environment (the parent's is restored
  after the start)."""

  def __init__(self, name, args, environ):
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
      self._process = ctx.Process(target=_serve, args=(child, name, args),
                                  daemon=True)
      self._process.start()
    finally:
      os.environ.clear()
      os.environ.update(saved)
    child.close()
    self._receive()

  def _receive(self):
    try:
      return self._conn.recv()
    except EOFError:
      raise RuntimeError(f"benchmark worker exited with code "
                         f"{self._process.exitcode}") from None

  def __call__(self):
    self._conn.send("step")
    self._receive()

  def close(self):
    self._conn.send(None)
    self._process.join()


def time_pipeline(ground_hw, satellite_hw, batch, num_batches, threads):
  """(seconds to the first batch, batches/s over all) of grain alone."""
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "world")
    pairs = max(batch, 8)
    start = time.perf_counter()
    layouts.write_dataset("cvusa", root, WORLD, pairs, seed=0,
                          progress=False)
    print(f"  wrote a synthetic CVUSA world of {pairs} pairs "
          f"({WORLD.cvusa_width}-wide panoramas, {WORLD.sat_px}px tiles) in "
          f"{time.perf_counter() - start:.1f} s")
    index = readers.read_split("cvusa", root, "train")
    known = np.flatnonzero(np.asarray(index.positive) >= 0)
    true = np.stack([known, np.asarray(index.positive)[known]], 1)
    # Repeat the pairs so one epoch holds num_batches + 1 batches.
    rows = np.resize(true, ((num_batches + 1) * batch, 2))
    pipe = pipeline.pseudo_pairs(index, ground_size=ground_hw,
                                 satellite_size=satellite_hw,
                                 batch_size=batch, seed=0,
                                 num_threads=threads)
    # From the iterator's creation: its prefetch runs ahead of next().
    start = time.perf_counter()
    it = iter(pipe.iterator(epoch=0, pairs=rows))
    first = next(it)
    t_first = time.perf_counter() - start
    if first["ground"].shape != (batch, *ground_hw, 3):
      raise RuntimeError(f"pipeline gave {first['ground'].shape}")
    for _ in range(num_batches):
      next(it)
    return t_first, (num_batches + 1) / (time.perf_counter() - start)


def _load():
  return "load %.2f %.2f %.2f" % os.getloadavg()


def main(argv):
  del argv
  convnext.get_variant(FLAGS.variant)
  ground_hw = tuple(int(v) for v in FLAGS.ground)
  satellite_hw = (FLAGS.satellite, FLAGS.satellite)
  for name, hw in (("--ground", ground_hw), ("--satellite", satellite_hw)):
    if len(hw) != 2 or min(hw) < 32 or any(v % 32 for v in hw):
      raise ValueError(f"{name} sides must be multiples of 32, got {hw}.")
  if (FLAGS.batch < 2 or FLAGS.rounds < 1 or FLAGS.steps < 1
      or FLAGS.turn_warmup < 0):
    raise ValueError("--batch must be >= 2, --rounds and --steps >= 1, "
                     "--turn_warmup >= 0.")
  b = FLAGS.batch
  print(f"ConvNeXt-{FLAGS.variant} x2 + SAFA, batch {b} of ground "
        f"{ground_hw[0]}x{ground_hw[1]} + satellite {satellite_hw[0]}x"
        f"{satellite_hw[1]}, augment={FLAGS.augment}; {os.cpu_count()} CPUs,"
        f" {_load()}")
  args = (FLAGS.variant, ground_hw, satellite_hw, b, FLAGS.augment,
          FLAGS.depthwise)
  counts = [int(v) for v in FLAGS.devices]
  for k in counts:
    if not 1 <= k <= jax.device_count() or b % k:
      raise ValueError(f"--devices: {k} must be between 1 and the "
                       f"{jax.device_count()} devices and divide --batch={b}"
                       " (more CPU devices: XLA_FLAGS=--xla_force_host_"
                       "platform_device_count=N).")
  impl = depthwise.resolve_impl(FLAGS.depthwise, (1, 1, 1, 96), np.float32,
                               7)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s)); depthwise conv: {impl}")
  names = [f"jax_{k}dev" for k in counts] if counts else ["jax"]
  with_torch = FLAGS.torch and torch_reference.available()
  if FLAGS.torch and not with_torch:
    print("torch/timm not importable: timing ours only.")
  if with_torch:
    names.append("torch")
  if FLAGS.small_pages and not FLAGS.isolate:
    raise ValueError("--small_pages needs --isolate.")
  if FLAGS.isolate:
    ours_env = hostmem.main_environ()
    envs = {name: ours_env for name in names if name != "torch"}
    if FLAGS.small_pages:
      envs.update({f"{name}_4k": dict(os.environ) for name in list(envs)})
    if with_torch:
      envs["torch"] = dict(os.environ)
    tunables = {name: env.get("GLIBC_TUNABLES", "(unset)")
                for name, env in envs.items()}
    print(f"isolated: one worker process per variant; GLIBC_TUNABLES "
          f"{tunables}")
    variants = {name: _Worker(name, args, env) for name, env in envs.items()}
  else:
    print("in one process: every variant shares this process's heap")
    variants = {name: _step_fn(name, args) for name in names}
  if with_torch:
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  for name, run in variants.items():  # Compile / warm up.
    start = time.perf_counter()
    run()
    print(f"  {name} first step (compile + run) "
          f"{time.perf_counter() - start:.1f} s")
  first = {}
  times = timing.round_robin(variants, FLAGS.rounds, FLAGS.steps,
                             FLAGS.turn_warmup, first)
  med = timing.medians(times)
  print(f"step times over {FLAGS.rounds} rounds x {FLAGS.steps} step(s), "
        f"after {FLAGS.turn_warmup} untimed step(s) per turn, {_load()}:")
  for name, t in med.items():
    print(f"  {name:6s} {t:7.2f} s/step  {2 * b / t:6.2f} images/s "
          f"({b / t:.2f} pairs/s; min {min(times[name]):.2f}, "
          f"max {max(times[name]):.2f} s)")
  if first:
    print("  the untimed steps that open each turn (after the other "
          "variants' turns): " + ", ".join(
              f"{name} {t:.2f} s/step" for name, t in
              timing.medians(first).items()))
  ours = [name for name in med if name.startswith("jax")]
  if "torch" in med:
    for name in ours:
      print(f"  {name} / torch images/s: {med['torch'] / med[name]:.2f}x")
  if len(ours) > 1:
    print(f"  {ours[-1]} / {ours[0]} images/s: "
          f"{med[ours[0]] / med[ours[-1]]:.2f}x")
  if FLAGS.pipeline_batches > 0:
    print(f"input pipeline (grain, {FLAGS.pipeline_threads} threads, alone):")
    t_first, rate = time_pipeline(ground_hw, satellite_hw, b,
                                  FLAGS.pipeline_batches,
                                  FLAGS.pipeline_threads)
    steps_per_s = 1.0 / min(med[name] for name in ours)
    print(f"  first batch {t_first:.2f} s, {rate:.2f} batches/s over "
          f"{FLAGS.pipeline_batches + 1} vs our "
          f"{steps_per_s:.3f} steps/s: "
          f"{'keeps up' if rate >= steps_per_s else 'too slow'} "
          f"({rate / steps_per_s:.0f}x the step rate); {_load()}")
  for run in variants.values():
    if isinstance(run, _Worker):
      run.close()


if __name__ == "__main__":
  app.run(main)
