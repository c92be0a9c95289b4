"""The `translate` stage: train the CycleGAN, then write every fake satellite.

`train_translation` trains `cfp.translate.CycleGAN` between BEV images
(domain A, `root/g2a/`) and satellite tiles (domain B), checkpointing with
orbax and resuming from the latest checkpoint of its workdir. The data order
is a pure function of (seed, epoch, position), and each step's key is
`fold_in(state.rng, step)`, so an interrupted run that resumes takes exactly
the steps of an uninterrupted one.

`translate_split` runs the trained A -> B generator over BEV images and
writes PNGs atomically, skipping those already written; `translate` chains
the two for a dataset split, writing `root/g2a_sat/<id>.png` for every
`root/g2a/<id>.png`.

Several devices and processes: the CycleGAN trains data-parallel, as the
encoders do: the state replicated, each global batch of
`config.batch_size` split over the devices (`parallel.devices_for_batch`:
all of them when the batch is a multiple of the device count, fewer when
it is smaller; the official batch 1 trains on one device of a one-process
job and is refused for several processes). Every loss is a per-image mean
and instance normalisation is per image, so the split step is the one-
device step of the same global batch (tests/test_translate.py). Each
process loads only its rows of each batch; orbax checkpoints the
replicated state, and only process 0 writes the metrics and the config.
Each process then translates its own share of the images with process 0's
generator.

Host images are uint8 RGB (cv2 decodes BGR; we convert at once), resized
to `load_size` squared as the official `resize_and_crop` does (PIL bicubic
there, which anti-aliases; cv2 INTER_AREA when shrinking, INTER_CUBIC when
enlarging here), then randomly cropped to `crop_size` and flipped.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import time
from typing import Optional, Sequence

from absl import logging
import cv2
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax.cfp import translate as tr
from cvgl_jax.data import derived
from cvgl_jax.data import image_io
from cvgl_jax.train import loop


# ----------------------------------------------------------------------------
# Config and input checks (cheap, before any compute).
# ----------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every bad key of a translate section (the
  checks `config_lib.validate` runs on `config.translate`)."""
  errors = config_lib.section_problems(config, config_lib.translate_defaults(),
                                      "translate.")
  if not errors:
    errors = config_lib.translate_problems(config)
  if errors:
    raise ValueError("translate config: " + "; ".join(errors) + ".")


def _decodable(path: str) -> bool:
  # A reduced decode is enough to reject truncated or foreign files; for
  # JPEG it is several times cheaper than a full one.
  return cv2.imread(os.fspath(path), cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None


def _image_problem(path: str, what: str, decode: bool) -> str:
  """Why `path` cannot be read as an image ("" if it can)."""
  if not os.path.isfile(path):
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
      return (f"{what} folder {folder} does not exist (first missing file: "
              f"{path}).")
    return f"{what} {path} does not exist."
  if decode and not _decodable(path):
    return f"{what} {path} is not a readable image."
  return ""


def check_images(paths: Sequence[str], what: str, num_threads: int = 4,
                 decode: bool = True, same_on_every_process: bool = True
                 ) -> None:
  """Raises ValueError naming the first missing or unreadable image.

  Args:
    paths: image files.
    what: what they are, for the message (e.g. "BEV image").
    num_threads: decoding threads (cv2 releases the GIL).
    decode: also decode each file (at 1/8 scale), not only stat it.
    same_on_every_process: `paths` is the same list on every process:
      each checks every process_count-th file and all raise the same
      error (one host need not read a pod's dataset alone). False: each
      checks its own list.
  """
  if not len(paths):
    raise ValueError(f"No {what}s given.")
  share = (range(jax.process_index(), len(paths), jax.process_count())
           if same_on_every_process else range(len(paths)))
  missing = [i for i in share if not os.path.isfile(paths[i])]
  first = missing[0] if missing else len(paths)
  if decode and not missing:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      ok = pool.map(_decodable, [paths[i] for i in share])
      first = next((i for i, good in zip(share, ok) if not good), first)
  if same_on_every_process:
    first = parallel.min_over_processes(first)
  if first < len(paths):
    raise ValueError(_image_problem(paths[first], what, decode))


# ----------------------------------------------------------------------------
# Host data: a deterministic plan per epoch, loaded by grain threads.
# ----------------------------------------------------------------------------


def steps_per_epoch(n_a: int, n_b: int, batch_size: int) -> int:
  """An epoch is max(n_a, n_b) images, as the official UnalignedDataset."""
  n = max(n_a, n_b)
  if n < batch_size:
    raise ValueError(f"translate: batch_size={batch_size} exceeds the larger "
                     f"domain ({n} images).")
  return n // batch_size


def epoch_plan(seed: int, epoch: int, n_a: int, n_b: int, n_items: int):
  """Which images an epoch uses, in order: a pure function of its inputs.

  Returns:
    (a_index [n_items], b_index [n_items], item_seed [n_items]): A follows a
    permutation of max(n_a, n_b) taken modulo n_a (shuffled serial A as the
    official loader), B is drawn uniformly, item seeds drive crops/flips.
  """
  rng = np.random.default_rng([seed, epoch])
  a = rng.permutation(max(n_a, n_b))[:n_items] % n_a
  b = rng.integers(0, n_b, n_items)
  seeds = rng.integers(0, 2 ** 63 - 1, n_items)
  return a, b, seeds


def load_train_pair(record, config) -> dict:
  """(a path, b path, seed) -> {"a", "b": [S, S, 3] uint8} crops."""
  a_path, b_path, seed = record
  rng = np.random.default_rng(seed)
  out = {}
  for name, path in (("a", a_path), ("b", b_path)):
    image = image_io.resize(image_io.read_rgb(path), (config.load_size,) * 2)
    y, x = rng.integers(0, config.load_size - config.crop_size + 1, 2)
    image = image[y:y + config.crop_size, x:x + config.crop_size]
    if config.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    out[name] = np.ascontiguousarray(image)
  return out


def epoch_batches(a_paths, b_paths, config, epoch: int, start_step: int,
                  spe: int, process_index: int = 0, process_count: int = 1):
  """Iterator over this process's shares of the global batches of `epoch`
  from step `start_step` on: {"a", "b": [batch_size / process_count, S, S,
  3] uint8}, rows process_index * share ... of each global batch."""
  bs = config.batch_size
  share = bs // process_count
  a, b, seeds = epoch_plan(config.seed, epoch, len(a_paths), len(b_paths),
                           spe * bs)
  records = [(a_paths[i], b_paths[j], int(s))
             for n, (i, j, s) in enumerate(zip(a, b, seeds))
             if n // share % process_count == process_index][
                 start_step * share:]
  ds = (grain.MapDataset.source(records)
        .map(lambda r: load_train_pair(r, config))
        .batch(share, drop_remainder=True)
        .to_iter_dataset(grain.ReadOptions(
            num_threads=config.num_threads,
            prefetch_buffer_size=4 * config.num_threads)))
  return iter(ds)


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def check_finite(metrics: dict, step: int) -> None:
  """Raises FloatingPointError naming the non-finite losses of a step."""
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"CycleGAN training diverged at step {step}: {bad}. The last "
        "checkpoint before this step is kept; lower config.lr or check the "
        "input images.")


def train_translation(bev_paths: Sequence[str],
                      satellite_paths: Sequence[str], workdir: str,
                      config: ml_collections.ConfigDict, *,
                      max_steps: Optional[int] = None,
                      progress: bool = True) -> tr.TranslateState:
  """Trains (or resumes training) the BEV -> satellite CycleGAN.

  Checkpoints (params, both Adam states, both pools, step, rng) go to
  `workdir/checkpoints` every `ckpt_every_steps` steps, at every epoch end
  and when stopping; losses to `workdir/metrics.jsonl`. A rerun resumes from
  the latest checkpoint; a finished run returns its final state at once.

  Args:
    bev_paths: domain A images (geometric BEVs).
    satellite_paths: domain B images (satellite tiles).
    workdir: this stage's folder.
    config: see `config_lib.translate_defaults`.
    max_steps: stop after this many steps in total (e.g. a time-boxed job);
      None trains the whole schedule.
    progress: show a tqdm bar.

  Returns:
    The state after the last step taken.
  """
  validate_config(config)
  bev_paths = [os.fspath(p) for p in bev_paths]
  satellite_paths = [os.fspath(p) for p in satellite_paths]
  check_images(bev_paths, "BEV image", config.num_threads)
  check_images(satellite_paths, "satellite image", config.num_threads)
  spe = steps_per_epoch(len(bev_paths), len(satellite_paths),
                        config.batch_size)
  total = (config.n_epochs + config.n_epochs_decay) * spe
  stop = total if max_steps is None else min(total, int(max_steps))

  model = tr.get_model(config)
  main = parallel.is_main_process()
  mesh = parallel.make_mesh(parallel.devices_for_batch(
      config.batch_size, "translate.batch_size"))
  logging.info("translate: the CycleGAN trains on %d of %d devices (global "
               "batch %d%s).", mesh.size, jax.device_count(),
               config.batch_size,
               "" if mesh.size == jax.device_count() else
               f"; a multiple of {jax.device_count()} uses them all")
  os.makedirs(workdir, exist_ok=True)
  if main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  mngr = loop.checkpoint_manager(os.path.join(workdir, "checkpoints"),
                                 config.keep_checkpoints)
  key = jax.random.PRNGKey(config.seed)
  latest = mngr.latest_step()
  loop.drop_rewritten_records(os.path.dirname(os.path.abspath(workdir)),
                              os.path.basename(os.path.abspath(workdir)),
                              latest)
  if latest is None:
    state = parallel.replicate_local(model.init(key, spe), mesh)
  else:
    repl = parallel.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
        jax.eval_shape(lambda k: model.init(k, spe), key))
    try:
      state = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as err:
      mngr.close()
      raise ValueError(
          f"Checkpoint {mngr.directory}/{latest} does not fit this config "
          "(ngf, ndf, n_blocks, n_layers_d, crop_size or pool_size changed?)."
          " Use a new workdir.") from err
    if int(state.steps_per_epoch) != spe:
      mngr.close()
      raise ValueError(
          f"Checkpoint {mngr.directory}/{latest} was trained with "
          f"{int(state.steps_per_epoch)} steps per epoch, the data now gives "
          f"{spe}: the image lists or batch_size changed. Use a new workdir.")
  step = int(state.step)

  log = loop.StageLog(workdir, desc="translate: train", total=stop,
                      initial=step, progress=progress)
  # Step 1 is logged too, to show the starting losses (not a resumed run's
  # first step: its records must be those of an uninterrupted run).
  try:
    while step < stop:
      epoch, pos = divmod(step, spe)
      for batch in epoch_batches(bev_paths, satellite_paths, config, epoch,
                                 pos, spe, jax.process_index(),
                                 jax.process_count()):
        state, metrics = model.jit_train_step(
            state, parallel.to_global(batch, mesh))
        step += 1
        log.bar.update(1)
        preempted = parallel.preemption_point()
        save = (step % config.ckpt_every_steps == 0 or step % spe == 0
                or step == stop or preempted)
        due = step % config.log_every_steps == 0 or step == 1
        if save or due:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          check_finite(metrics, step)
          log.write(step, epoch, metrics, config.batch_size,
                    {"G": "g_total", "D_A": "d_a", "D_B": "d_b"})
        if save:
          mngr.save(step, args=ocp.args.StandardSave(state))
          run_dir.fault_point("translate.checkpoint", step,
                              mngr.wait_until_finished)
        if preempted:
          raise parallel.Preempted(
              loop.preempted_message("translate", step, str(mngr.directory)))
        if step >= stop or step % spe == 0:
          break
  finally:
    log.close()
    mngr.wait_until_finished()
    mngr.close()
  return state


# ----------------------------------------------------------------------------
# Writing fake satellite images.
# ----------------------------------------------------------------------------


def translate_split(bev_paths: Sequence[str], out_paths: Sequence[str],
                    params_g_ab, config: ml_collections.ConfigDict, *,
                    progress: bool = True, process_index: int = 0,
                    process_count: int = 1) -> int:
  """Writes g_ab(BEV) for every BEV whose output does not exist yet.

  BEVs are resized to `crop_size` (no crop, no flip: the official test-time
  transform) and the `crop_size` square fakes are written as PNG.

  Args:
    bev_paths: [N] input BEV images.
    out_paths: [N] output PNG paths.
    params_g_ab: params of the A -> B generator (`state.params_g["g_ab"]`).
    config: the training config (architecture and `crop_size`).
    progress: show a tqdm bar.
    process_index, process_count: this process translates the missing
      images number process_index, process_index + process_count, ...

  Returns:
    How many images this process wrote.
  """
  validate_config(config)
  if len(bev_paths) != len(out_paths):
    raise ValueError(f"translate_split: {len(bev_paths)} BEV paths but "
                     f"{len(out_paths)} output paths.")
  # Shares are fixed before looking at the disk (see `project_split`).
  pairs = list(zip(bev_paths, out_paths))[process_index::process_count]
  todo = [(os.fspath(i), os.fspath(o)) for i, o in pairs
          if not os.path.exists(o)]
  if not todo:
    return 0
  check_images([i for i, _ in todo], "BEV image", config.num_threads,
               decode=False, same_on_every_process=False)
  model = tr.get_model(config)
  bs = config.translate_batch_size
  load = lambda p: image_io.resize(image_io.read_rgb(p), (config.crop_size,) * 2)
  bar = tqdm.tqdm(total=len(todo), disable=not progress,
                  desc="translate: write g2a_sat", unit="img")
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(config.num_threads) as pool:
    chunks = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    loaded = pool.map(lambda c: np.stack([load(p) for p, _ in c]), chunks)
    for chunk, images in zip(chunks, loaded):
      n = len(images)
      if n < bs:  # pad to one compiled shape
        images = np.concatenate([images, np.repeat(images[-1:], bs - n, 0)])
      fakes = np.asarray(model.jit_translate(params_g_ab, images))[:n]
      for (_, out), fake in zip(chunk, fakes):
        image_io.write_png_atomic(out, fake)
      bar.update(n)
      bar.set_postfix({"img/s": f"{bar.n / (time.perf_counter() - t0):.1f}"})
  bar.close()
  return len(todo)


def translate(index, workdir: str, config: ml_collections.ConfigDict, *,
              progress: bool = True) -> dict:
  """The stage: BEVs `root/g2a/<id>.png` -> fakes `root/g2a_sat/<id>.png`.

  Trains on the split's BEVs and its satellite tiles (unpaired), then
  translates every BEV of the split. (`main` marks the stage done.) With
  `config.source = "panorama"` the panoramas take the BEVs' place (the
  "without BEV" ablation).

  Args:
    index: a `cvgl_jax.data.index.PairIndex` (the training split).
    workdir: the run's workdir; this stage uses `workdir/translate`.
    config: see `config_lib.translate_defaults`.
    progress: show progress bars.

  Returns:
    {"steps": training steps, "written": fakes written, "total": BEVs}.
  """
  validate_config(config)
  if config.source == "g2a":
    bev_dir = os.path.join(index.root, "g2a")
    if not os.path.isdir(bev_dir):
      raise ValueError(f"BEV folder {bev_dir} does not exist: run the cfp "
                       "stage first.")
    bev_paths = list(index.derived_paths("g2a"))
  else:
    bev_paths = list(index.ground_paths)
  out_paths = list(index.derived_paths("g2a_sat"))
  stage_dir = os.path.join(workdir, "translate")
  state = train_translation(bev_paths, list(index.satellite_paths), stage_dir,
                            config, progress=progress)
  # Replicated, hence equal everywhere; process 0's copy makes the fakes
  # of every process bit-identical to a one-process run's all the same.
  params = parallel.from_main_process(
      jax.device_get(state.params_g["g_ab"]))
  # Fakes of another generator (another run on this dataset) are replaced.
  if parallel.is_main_process() and out_paths:
    derived.claim(os.path.dirname(os.fspath(out_paths[0])),
                  {"made_by": "translate", "source": config.source,
                   "crop_size": int(config.crop_size),
                   "generator": derived.params_digest(params)})
  parallel.sync("translate:claimed")
  if run_dir.fault_requested("list_late"):
    time.sleep(run_dir.LIST_LATE_S)
  written = translate_split(
      bev_paths, out_paths, params, config,
      progress=progress and parallel.is_main_process(),
      process_index=jax.process_index(), process_count=jax.process_count())
  written = parallel.sum_over_processes(written)
  derived.check_all_written(out_paths, "fake satellite images")
  return {"steps": int(state.step), "written": written,
          "total": len(bev_paths)}
