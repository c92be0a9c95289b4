"""The epoch loop of one training stage: steps, checkpoints, eval, metrics.

`train` runs the epochs of a `TrainPipeline` through a jitted step
(`cvgl_jax.train.steps`) and owns everything with side effects:

  workdir/<stage>/checkpoints/<step>/  orbax, every `ckpt_every_steps`
      steps and at each epoch end: items "params", "train" (optimizer
      state, step, rng), "average" (the params' moving average, if the
      state keeps one) and "data" (the grain iterator: epoch, position and,
      for pseudo pairs, the epoch's pairing);
  workdir/<stage>/best/<step>/         "params" (`state_lib.model_params`: the
      moving average where the state keeps one) of the SELECTED evaluation:
      the one with the highest `select_metric` (a label-free score), or the
      last one when `select_metric` is None; `selected.json` beside it
      records its step and metrics (written after the params are);
  workdir/<stage>/metrics.jsonl        one JSON object per line:
      {"step", "epoch", "kind": "train" | "eval" | "epoch_start", ...};
  workdir/<stage>/tensorboard/         the same scalars as TensorBoard event
      files (tensorboardX: no TensorFlow), tags "<kind>/<name>" (with
      characters TensorBoard does not allow, such as "@", written "_").

A rerun resumes from the latest checkpoint: state, data position and
pairing come back; an epoch that starts after the resume point calls the
epoch-start hook again. Metrics are fetched from the device only every
`log_every_steps` steps (and before saving), so steps dispatch
asynchronously in between; every step's loss is still checked.

Non-finite losses: the step skips an update whose loss or gradient norm is
not finite (`steps._update`), so one bad batch costs one batch. A run that
skips `max_skipped_steps` steps in a row has diverged: the loop finds where
the divergence began (`divergence_onset`: the loss or the gradient norm
blowing up before the first NaN), moves every checkpoint saved from then on
to workdir/<stage>/diverged/ (kept, never resumed from) and raises
`DivergedError`; the rerun resumes from the last checkpoint before the
onset -- with a lower learning rate, as the message says, not into the same
divergence.

Only process 0 writes metrics and shows the progress bar; every process
takes part in orbax saves and restores, as orbax requires.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from cvgl_jax import parallel
from cvgl_jax import records
from cvgl_jax import run_dir
from cvgl_jax.data import pipeline as pipeline_lib
from cvgl_jax.train import state as state_lib


DIVERGED = "diverged"  # <stage>/diverged/<step>: checkpoints set aside.
AVERAGE = "average"  # The checkpoint item of the params' moving average.
# Steps whose (step, loss, grad_norm) a run keeps for `divergence_onset`.
_HISTORY = 20_000

EpochStartFn = Callable[[state_lib.TrainState, int], Optional[Mapping]]
EvalFn = Callable[[state_lib.TrainState], Mapping[str, float]]


def _split(state: state_lib.TrainState) -> dict:
  items = {"params": state.params,
           "train": {"opt_state": state.opt_state, "step": state.step,
                     "rng": state.rng}}
  if state.average is not None:
    items[AVERAGE] = state.average
  return items


def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """The orbax manager of a stage's checkpoints, keeping the `keep` latest.

  A save cut short leaves a temporary folder; it is removed on the next
  start rather than left to collide with the step saved again.
  """
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(keep),
          cleanup_tmp_directories=True))


def restore_params(directory: str, params_like: Any,
                   step: Optional[int] = None) -> Any:
  """The model's params of a `train` checkpoint (its moving average where
  it holds one: `state_lib.model_params`), restored into `params_like`'s
  sharding.

  Args:
    directory: `workdir/<stage>/checkpoints` (latest state) or
      `workdir/<stage>/best` (best evaluation).
    params_like: a param tree of the same structure (e.g. a fresh
      `create_state(...).params`); its shardings are used.
    step: which checkpoint; default the latest.

  Raises:
    FileNotFoundError: no checkpoint in `directory`.
  """
  return _restore_item(directory, (AVERAGE, "params"), params_like, step)


def restore_opt_state(directory: str, opt_state_like: Any) -> Any:
  """The optimizer state of the latest `checkpoints/` step in `directory`,
  restored into `opt_state_like`'s structure and sharding (a state of the
  same optimizer over the same params)."""
  like = {"opt_state": opt_state_like, "step": np.int32(0),
          "rng": np.zeros(2, np.uint32)}
  like = jax.tree.map(jax.numpy.asarray, like)
  return _restore_item(directory, ("train",), like)["opt_state"]


def _restore_item(directory: str, items: tuple[str, ...], like: Any,
                  step: Optional[int] = None) -> Any:
  """The first of `items` that checkpoint `step` (default: the latest)
  holds (else the last), restored into `like`."""
  with checkpoint_manager(directory, 1) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {directory}: train that "
                              f"stage first.")
    folder = os.path.join(os.path.abspath(directory), str(step))
    item = next((i for i in items[:-1]
                 if os.path.isdir(os.path.join(folder, i))), items[-1])
    out = mngr.restore(step, args=ocp.args.Composite(**{
        item: ocp.args.StandardRestore(state_lib.abstract_state(like))}))
  return out[item]


def _placeholder_iterator(pipe: pipeline_lib.TrainPipeline):
  """An iterator to restore a checkpointed one into (its state replaces the
  epoch and pairing given here)."""
  if not pipe.needs_pairs:
    return pipe.iterator(0)
  rows = pipe.batch_size * pipe.process_count
  return pipe.iterator(0, pairs=np.zeros((rows, 2), np.int64))


def _save_best(best_mngr: ocp.CheckpointManager, step: int,
               params: Any) -> None:
  """Saves `params` as best/<step>, replacing any at or after it (left by
  a run killed before it could record them)."""
  for s in best_mngr.all_steps():
    if s >= step:
      best_mngr.delete(s)
  best_mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params)), force=True)
  best_mngr.wait_until_finished()


def _resumed_records(workdir: str, stage: str, latest: Optional[int]
                     ) -> tuple[Optional[dict], dict, dict]:
  """(best R@1 {"step", "R@1"}, last eval, last train metrics) of the
  records up to the checkpoint a run resumes from (all empty for none)."""
  if latest is None:
    return None, {}, {}
  kept = [r for r in run_dir.read_records(workdir, stage)
          if r["step"] <= latest]
  evals = [r for r in kept if r["kind"] == "eval"]
  trains = [r for r in kept if r["kind"] == "train"]
  strip = lambda r: {k: v for k, v in r.items()
                     if k not in ("kind", "step", "epoch")}
  scored = [r for r in evals if "R@1" in r]
  best = max(scored, key=lambda r: r["R@1"]) if scored else None
  return ({"step": best["step"], "R@1": best["R@1"]} if best else None,
          strip(evals[-1]) if evals else {},
          strip(trains[-1]) if trains else {})


class DivergedError(FloatingPointError):
  """A stage kept producing non-finite losses. The message names the
  steps, where the divergence began, the checkpoints set aside and what to
  change for the rerun."""


def divergence_onset(history: list[tuple[int, float, float]],
                     loss_factor: float = 2.0,
                     norm_factor: float = 10.0) -> tuple[int, str]:
  """Where the divergence that ends `history` began, and the sign seen.

  Args:
    history: (step, loss, grad_norm) of consecutive steps, the last one
      non-finite; `step` is the state's step after that update (the loss
      was computed on the state of step - 1).
    loss_factor, norm_factor: a step is abnormal when its loss or norm is
      not finite, or exceeds this factor times the median of the finite
      losses (norms) of the history.

  Returns:
    (step, sign): the first step of the run of abnormal steps that ends
    the history, and why its first step counts as abnormal.
  """
  finite = [(l, g) for _, l, g in history
            if math.isfinite(l) and math.isfinite(g)]
  ref_loss = float(np.median([l for l, _ in finite])) if finite else math.inf
  ref_norm = float(np.median([g for _, g in finite])) if finite else math.inf

  def sign(loss, norm):
    if not (math.isfinite(loss) and math.isfinite(norm)):
      return f"loss {loss:g}, gradient norm {norm:g}"
    if abs(loss) > loss_factor * abs(ref_loss):
      return f"loss {loss:.4g}, {loss / ref_loss:.1f}x its median"
    if norm > norm_factor * ref_norm:
      return f"gradient norm {norm:.4g}, {norm / ref_norm:.1f}x its median"
    return ""

  first = len(history)
  while first > 0 and sign(*history[first - 1][1:]):
    first -= 1
  first = min(first, len(history) - 1)
  return history[first][0], sign(*history[first][1:])


def preempted_message(stage: str, step: int, ckpt_dir: str) -> str:
  """What a stage stopped by SIGTERM tells the user."""
  return (f"Stage {stage!r} stopped at step {step} on SIGTERM, "
          f"checkpointed in {ckpt_dir}; rerun the same command to resume.")


def drop_rewritten_records(workdir: str, stage: str, latest: Optional[int],
                           kinds_at_latest: tuple[str, ...] = ()) -> None:
  """Before a stage (re)starts at checkpoint `latest` (None: from scratch),
  drops the records it will write again -- those after `latest`, and of
  `kinds_at_latest` at it -- so a resumed run's records are those of an
  uninterrupted one. Process 0 only."""
  if parallel.is_main_process():
    run_dir.truncate_records(workdir, stage, latest, kinds_at_latest)


class StageLog:
  """The console bar and the train records of one stage's steps.

  `write` records one interval's train metrics with the images per second
  since the previous write (or `restart`), and shows them on the bar after
  `postfix` (e.g. the pseudo-label round). Only process 0 writes or shows.
  """

  def __init__(self, folder: str, *, desc: str, total: int, initial: int,
               progress: bool):
    main = parallel.is_main_process()
    self.writer = records.MetricWriter(folder, enabled=main)
    self.bar = tqdm.tqdm(total=total, initial=initial, desc=desc,
                         unit="step", disable=not (progress and main))
    self.postfix = {}
    self.restart(initial)

  def restart(self, step: int) -> None:
    """Counts the image rate from `step` on (after a pause or a resume)."""
    self._t0, self._n0 = time.perf_counter(), step

  def write(self, step: int, epoch: int, metrics: Mapping[str, float],
            images_per_step: int, shown: Mapping[str, str]) -> dict:
    """Records `metrics` of the steps up to `step` (+ "images_per_s") and
    shows the `shown` ones ({label: metric}); returns what was recorded."""
    now = time.perf_counter()
    rate = images_per_step * (step - self._n0) / max(now - self._t0, 1e-9)
    metrics = dict(metrics, images_per_s=rate)
    self._t0, self._n0 = now, step
    self.writer.write(step, epoch, "train", metrics)
    self.bar.set_postfix({**self.postfix, "img/s": f"{rate:.1f}",
                          **{label: f"{metrics[key]:.4f}"
                             for label, key in shown.items()}})
    return metrics

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def _mean(fetched):
  """Means over the steps that were applied (all of them if none was)."""
  applied = [m for _, m in fetched if not float(m.get("skipped", 0.0))]
  keys = fetched[-1][1].keys()
  out = {k: float(np.mean([float(m[k]) for m in applied or
                           [m for _, m in fetched]])) for k in keys}
  out["skipped"] = float(sum(float(m.get("skipped", 0.0))
                             for _, m in fetched))
  return out


def _set_aside(mngr: ocp.CheckpointManager, ckpt_dir: str,
               first: int) -> list[int]:
  """Moves checkpoints at or after step `first` to <stage>/diverged/;
  returns their steps (process 0 moves; every process returns them)."""
  mngr.wait_until_finished()
  moved = [s for s in mngr.all_steps() if s >= first]
  if parallel.is_main_process() and moved:
    aside = os.path.join(os.path.dirname(ckpt_dir), DIVERGED)
    os.makedirs(aside, exist_ok=True)
    for s in moved:
      target = os.path.join(aside, str(s))
      if os.path.exists(target):  # Set aside by an earlier divergence.
        target += f".{int(time.time())}"
      os.replace(os.path.join(ckpt_dir, str(s)), target)
  parallel.sync("loop:set_aside")
  return sorted(moved)


def _diverged(stage, mngr, ckpt_dir, history, skipped_run, step,
              finite) -> DivergedError:
  """Sets aside the checkpoints of a diverged run; the error to raise."""
  history = history or [(step, math.nan, math.nan)]
  state_of = "finite" if finite else "not finite"
  onset, why = divergence_onset(history)
  # The loss at `onset` was computed on the state of onset - 1.
  moved = _set_aside(mngr, ckpt_dir, onset - 1)
  kept = [s for s in mngr.all_steps() if s not in moved]
  where = (f"a rerun resumes from checkpoint {max(kept)}" if kept else
           "no checkpoint before it is left: a rerun starts the stage over")
  aside = (f"checkpoints {', '.join(map(str, moved))} were moved to "
           f"{os.path.join(os.path.dirname(ckpt_dir), DIVERGED)}; "
           if moved else "")
  return DivergedError(
      f"Stage {stage!r} diverged: {skipped_run} step(s) in a row (to step "
      f"{history[-1][0]}) had a non-finite loss or gradient norm and were "
      f"skipped, and its parameters are {state_of}. The divergence began at step {onset} ({why}); {aside}"
      f"{where}. Rerun with a lower learning rate (e.g. half: "
      f"--config.train.lr, or --config.pseudo_label.lr for stage 3) and "
      f"--force_config_change, which records the change; or check the "
      f"input data.")


@jax.jit
def _all_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all()
                            for x in jax.tree.leaves(params)]))


def _check_restored(stage, mngr, ckpt_dir, step, params):
  """Refuses a checkpoint whose params are not finite, setting it aside."""
  if not bool(_all_finite(params)):
    _set_aside(mngr, ckpt_dir, step)
    raise DivergedError(
        f"Checkpoint {step} of stage {stage!r} holds non-finite parameters "
        f"(saved by a run that diverged); it was moved to "
        f"{os.path.join(os.path.dirname(ckpt_dir), DIVERGED)}. Rerun: it "
        f"resumes from the checkpoint before it, if any, else starts the "
        f"stage over.")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How `train` runs one stage: its length, checkpoints, logs, evaluation.

  Attributes:
    stage: the stage's name, e.g. "intra"; it trains under workdir/<stage>.
    num_epochs: epochs of the stage (E of the cosine schedule).
    steps_per_epoch: steps of every epoch, as the optimizer schedule was
      built with; each epoch's iterator must agree (pseudo-pair epochs must
      be filled to this length).
    ckpt_every_steps: checkpoint interval, besides every epoch end.
    log_every_steps: interval of train metrics (means over the interval).
    eval_every_epochs: evaluate after every this many epochs (with an
      eval_fn); 0 evaluates only after the last epoch.
    select_metric: the eval metric whose maximum is the stage's output,
      kept in workdir/<stage>/best; None keeps the last evaluation. Choose
      a metric that reads no labels (`evaluate.LABEL_FREE`) when the run
      has none: R@1 is reported as telemetry ("best") either way.
    keep_checkpoints: how many of the latest checkpoints to keep.
    max_skipped_steps: this many steps in a row skipped for a non-finite
      loss or gradient norm end the stage as diverged (`DivergedError`).
    progress: show a tqdm bar (process 0).
  """
  stage: str
  num_epochs: int
  steps_per_epoch: int
  ckpt_every_steps: int = 1000
  log_every_steps: int = 50
  eval_every_epochs: int = 0
  select_metric: Optional[str] = None
  keep_checkpoints: int = 2
  max_skipped_steps: int = 10
  progress: bool = True

  def __post_init__(self):
    for name in ("num_epochs", "steps_per_epoch", "ckpt_every_steps",
                 "log_every_steps", "keep_checkpoints", "max_skipped_steps"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"train({self.stage!r}): {name} must be > 0, got "
                         f"{getattr(self, name)}.")
    if self.eval_every_epochs < 0:
      raise ValueError(f"train({self.stage!r}): eval_every_epochs must be "
                       f">= 0, got {self.eval_every_epochs}.")

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch

  @classmethod
  def from_config(cls, train_config: ml_collections.ConfigDict, *,
                  stage: str, num_epochs: int, steps_per_epoch: int,
                  select_metric: Optional[str], progress: bool
                  ) -> "LoopConfig":
    """The intervals and limits of `config.train` for one stage."""
    return cls(stage=stage, num_epochs=num_epochs,
               steps_per_epoch=steps_per_epoch,
               ckpt_every_steps=train_config.checkpoint_every_steps,
               log_every_steps=train_config.log_every_steps,
               eval_every_epochs=train_config.eval_every_epochs,
               select_metric=select_metric,
               max_skipped_steps=train_config.max_skipped_steps,
               progress=progress)


def train(state: state_lib.TrainState,
          step_fn: Callable,
          pipe: pipeline_lib.TrainPipeline,
          loop_config: LoopConfig,
          *,
          mesh: jax.sharding.Mesh,
          workdir: str,
          eval_fn: Optional[EvalFn] = None,
          epoch_start_fn: Optional[EpochStartFn] = None
          ) -> tuple[state_lib.TrainState, dict]:
  """Trains one stage as `loop_config` says, resuming from `workdir`.

  Args:
    state: the starting state (`create_state`, possibly with params of an
      earlier stage); ignored when a checkpoint of this stage exists.
    step_fn: jitted (state, batch) -> (state, metrics), e.g.
      `steps.make_cross_step(...)`; it donates the state.
    pipe: the stage's `TrainPipeline` (batch_size per process).
    loop_config: the stage's length, intervals, selection and limits.
    mesh: the data mesh.
    workdir: the run's folder; this stage writes under workdir/<stage>.
    eval_fn: state -> metrics (e.g. `evaluate.make_eval_fn`); run after
      every `eval_every_epochs`-th epoch and after the last one.
    epoch_start_fn: optional hook (state, epoch) -> None or a dict with
      "pairs" [M, 2], "labeled" [M] (the epoch's pairing, for pseudo-pair
      pipelines) and/or "metrics" {name: float} to log; called at the start
      of every epoch this run starts (not for an epoch resumed mid-way,
      whose pairing the checkpoint holds).

  Returns:
    (state, summary): the state after the last step taken; summary = {
    "stage", "step", "epochs_done", "finished" (all epochs trained),
    "train" (last logged train metrics), "eval" (last eval metrics),
    "selected" ({"step", "metric", "eval"}: the checkpoint in best/, or
    None), "best" ({"step", "R@1"}: the highest R@1 seen, telemetry),
    "skipped_steps" (steps this run skipped for a non-finite loss)}.

  Raises:
    DivergedError: `max_skipped_steps` non-finite steps in a row, or a
      checkpoint with non-finite params (both set aside for the rerun).
    ValueError: an epoch whose length differs from `steps_per_epoch`, or a
      starting state not at step 0 without a checkpoint.
  """
  c = loop_config
  stage, num_epochs, steps_per_epoch = (c.stage, c.num_epochs,
                                        c.steps_per_epoch)
  max_skipped_steps, select_metric = c.max_skipped_steps, c.select_metric
  main = parallel.is_main_process()
  ckpt_dir = run_dir.checkpoints_dir(workdir, stage)
  total = c.total_steps

  mngr = checkpoint_manager(ckpt_dir, c.keep_checkpoints)
  best_mngr = checkpoint_manager(run_dir.best_dir(workdir, stage), 1)
  it = None
  latest = mngr.latest_step()
  # A run resumed at an epoch's end starts the next epoch again.
  at_boundary = latest is not None and latest % steps_per_epoch == 0
  drop_rewritten_records(workdir, stage, latest,
                         ("epoch_start",) if at_boundary else ())
  if latest is not None:
    it = _placeholder_iterator(pipe)
    restored = mngr.restore(latest, args=ocp.args.Composite(
        **{k: ocp.args.StandardRestore(state_lib.abstract_state(v))
           for k, v in _split(state).items()},
        data=grain.checkpoint.CheckpointRestore(it),
        selected=ocp.args.JsonRestore()))
    _check_restored(stage, mngr, ckpt_dir, latest, restored["params"])
    state = state.replace(params=restored["params"], **restored["train"])
    if state.average is not None:
      state = state.replace(average=restored[AVERAGE])
  # The checkpoint holds the selection (which evaluation best/ must hold);
  # best/ is saved after it, so a kill in between is repaired here.
  selected = (restored.get("selected") or None) if latest is not None else None
  stale = [s for s in best_mngr.all_steps()
           if selected is None or s > selected["step"]]
  for s in stale:
    best_mngr.delete(s)
  if selected is not None and best_mngr.latest_step() != selected["step"]:
    _save_best(best_mngr, selected["step"],
               state_lib.model_params(state))
  if main and selected is not None:
    run_dir.write_selected(workdir, stage, selected)
  best, last_eval, last_train = _resumed_records(workdir, stage, latest)

  step = int(jax.device_get(state.step))
  if latest is None and step != 0:
    raise ValueError(
        f"train({stage!r}): the starting state is at step {step}, not 0. "
        f"Start a stage from a fresh `create_state` (its own optimizer and "
        f"schedule) and copy the earlier stage's params into it.")
  last_saved = latest
  summary = {"stage": stage, "train": last_train, "eval": last_eval,
             "best": best, "selected": selected, "skipped_steps": 0}
  history = collections.deque(maxlen=_HISTORY)
  skipped_run = 0
  log = StageLog(run_dir.stage_dir(workdir, stage), desc=stage, total=total,
                 initial=step, progress=c.progress)
  pending = []
  images = 0

  def flush(epoch):
    nonlocal pending, skipped_run
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending = []
    for at, m in fetched:
      history.append((at, float(m.get("loss", 0.0)),
                      float(m.get("grad_norm", 0.0))))
      skipped_run = skipped_run + 1 if float(m.get("skipped", 0.0)) else 0
      if skipped_run >= max_skipped_steps:
        raise _diverged(stage, mngr, ckpt_dir, list(history), skipped_run,
                        at, bool(_all_finite(state.params)))
    # Params never become non-finite through a step (it skips such an
    # update), but a state that is so would be evaluated and saved next.
    if skipped_run and not bool(_all_finite(state.params)):
      raise _diverged(stage, mngr, ckpt_dir, list(history), skipped_run,
                      step, False)
    metrics = log.write(step, epoch, _mean(fetched), images, {"loss": "loss"})
    summary["train"] = metrics
    if metrics["skipped"]:
      summary["skipped_steps"] += int(metrics["skipped"])
      logging.warning(
          "Stage %s: %d of the steps to %d had a non-finite loss or gradient "
          "norm and were skipped (%d so far).", stage, metrics["skipped"],
          step, summary["skipped_steps"])

  def save(epoch):
    nonlocal last_saved
    flush(epoch)
    if last_saved != step:
      mngr.save(step, args=ocp.args.Composite(
          **{k: ocp.args.StandardSave(v) for k, v in _split(state).items()},
          data=grain.checkpoint.CheckpointSave(it),
          selected=ocp.args.JsonSave(selected or {})), force=True)
      last_saved = step
      run_dir.fault_point("checkpoint", step, mngr.wait_until_finished)

  preempted = False
  try:
    epoch = step // steps_per_epoch
    while step < total:
      if step % steps_per_epoch == 0:
        plan = dict((epoch_start_fn and epoch_start_fn(state, epoch)) or {})
        if plan.get("metrics"):
          log.writer.write(step, epoch, "epoch_start", plan["metrics"])
          # The round's labels on the bar (the log has every statistic).
          if "num_labels" in plan["metrics"]:
            log.postfix = {"round": epoch,
                           "labels": int(plan["metrics"]["num_labels"])}
        pairs = {k: plan[k] for k in ("pairs", "labeled") if k in plan}
        if it is None:
          it = pipe.iterator(epoch, **pairs)
        else:
          it.set_epoch(epoch, **pairs)
        log.restart(step)
      elif it.epoch != epoch:
        raise ValueError(f"Checkpoint {ckpt_dir}/{latest} holds data epoch "
                         f"{it.epoch} at step {step}, which is epoch {epoch} "
                         f"with {steps_per_epoch} steps per epoch: the "
                         f"dataset or batch size changed. Use a new workdir.")
      if it.steps_per_epoch != steps_per_epoch:
        raise ValueError(f"Epoch {epoch} of stage {stage!r} has "
                         f"{it.steps_per_epoch} steps, the schedule "
                         f"{steps_per_epoch}: every epoch must have the same "
                         f"length (fill pseudo-pair epochs to it).")
      epoch_end = (epoch + 1) * steps_per_epoch
      while step < epoch_end:
        batch = next(it)
        if run_dir.fault_requested("nan_batch", step + 1):
          batch = dict(batch, ground=np.full_like(batch["ground"], np.nan,
                                                  np.float32))
        if run_dir.fault_requested("nan_params", step + 1):
          state = state.replace(params=jax.tree.map(lambda x: x * np.nan,
                                                    state.params))
        images = sum(v.shape[0] for v in batch.values()
                     if np.ndim(v) == 4) * jax.process_count()
        state, metrics = step_fn(state, parallel.to_global(batch, mesh))
        step += 1
        pending.append((step, metrics))
        log.bar.update(1)
        if run_dir.fault_requested("sigterm", step):
          os.kill(os.getpid(), signal.SIGTERM)
        # Asked once per step on every process (the sync point counts the
        # calls). At an epoch's last step the stop waits for its
        # evaluation and save, which a resumed run would not redo.
        preempted = parallel.preemption_point()
        if preempted and step != epoch_end:
          save(epoch)
          raise parallel.Preempted(preempted_message(stage, step, ckpt_dir))
        if step % c.log_every_steps == 0:
          flush(epoch)
        if step % c.ckpt_every_steps == 0 and step != epoch_end:
          save(epoch)
      flush(epoch)
      epoch += 1
      if eval_fn is not None and (
          epoch == num_epochs
          or (c.eval_every_epochs and epoch % c.eval_every_epochs == 0)):
        result = {k: float(v) for k, v in eval_fn(state).items()}
        if run_dir.fault_requested("disagree"):  # This process's own view.
          result = {k: -v for k, v in result.items()}
        summary["eval"] = result
        log.writer.write(step, epoch, "eval", result)
        if select_metric is not None and select_metric not in result:
          raise KeyError(f"eval_fn returned {sorted(result)}, without "
                         f"select_metric {select_metric!r}.")
        if "R@1" in result and (best is None or result["R@1"] > best["R@1"]):
          best = {"step": step, "R@1": result["R@1"]}
          summary["best"] = best
        better = (select_metric is None or selected is None
                  or result[select_metric] > selected["eval"][select_metric])
        # One decision for all processes, or one would save alone and hang.
        if parallel.from_main_process(np.bool_(better)):
          selected = {"step": step, "metric": select_metric or "final",
                      "eval": result}
          summary["selected"] = selected
        # Commit order: the checkpoint (holding the selection), then best/,
        # then selected.json; a rerun repairs a kill between any two.
        save(epoch - 1)
        if selected is not None and selected["step"] == step:
          mngr.wait_until_finished()
          run_dir.fault_point("before_best", step)
          _save_best(best_mngr, step, state_lib.model_params(state))
          run_dir.fault_point("before_selected", step)
          if main:
            run_dir.write_selected(workdir, stage, selected)
      else:
        save(epoch - 1)
      if preempted:
        raise parallel.Preempted(preempted_message(stage, step, ckpt_dir))
  finally:
    log.close()
    for m in (mngr, best_mngr):
      m.wait_until_finished()
      m.close()
    if it is not None:
      it.close()
  summary.update(step=step, epochs_done=step // steps_per_epoch,
                 finished=step >= total)
  return state, summary
