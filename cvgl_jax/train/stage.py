"""How an encoder stage trains: where it starts, its optimizer, its loop.

Every training stage (intra, cross_fake, supervised, pseudo_label) starts
from the params the training stage before it in `config.stages` handed on
(that stage's selected checkpoint, `config.train.select`), else from a
pretrained ConvNeXt file (the user's `model.pretrained`, or the stand-in
the `pretrain` stage wrote), else from scratch; `train.loop` then runs its
epochs with the stage's step and evaluation.
"""

from __future__ import annotations

from typing import Callable, Optional

from absl import logging
import jax
import ml_collections

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax.data import augment
from cvgl_jax.data import pipeline
from cvgl_jax.train import loop
from cvgl_jax.train import state as state_lib


def previous_training_stage(config: ml_collections.ConfigDict,
                            stage: str) -> Optional[str]:
  """The training stage run before `stage` in `config.stages`, if any."""
  order = list(config.stages)
  earlier = order[:order.index(stage)]
  for name in reversed(earlier):
    if name in config_lib.TRAINING_STAGES:
      return name
  return None


def pretrained_file(config: ml_collections.ConfigDict,
                    workdir: str) -> Optional[str]:
  """The ConvNeXt file a first training stage loads: the user's
  `config.model.pretrained`, or the stand-in of the `pretrain` stage."""
  if config.model.pretrained:
    return config.model.pretrained
  if "pretrain" in config.stages:
    return run_dir.read_done(workdir, "pretrain")["pretrained"]
  return None


def train(config: ml_collections.ConfigDict, workdir: str,
          mesh: jax.sharding.Mesh, stage: str, model,
          pipe: pipeline.TrainPipeline, make_step: Callable,
          eval_fn: Callable, *, select_metric: Optional[str] = None,
          epoch_rows: Optional[int] = None,
          epoch_start_fn: Optional[Callable] = None, first_epoch: int = 0,
          lr: Optional[float] = None, carry_optimizer: bool = False,
          ema_epochs: float = 0.0, start_from: Optional[str] = None
          ) -> dict:
  """Trains `stage` of `model` (a TwoTower) on `pipe`; returns the loop's
  summary.

  Args:
    make_step: a `train.steps` factory (intra, cross or partial-label).
    eval_fn: the loop's evaluation (`evaluate.make_eval_fn` of `model`).
    select_metric: the key of `eval_fn`'s results whose best checkpoint the
      stage hands on (a label-free score), or None for its final params.
    epoch_rows: rows of every epoch, for the schedule, when the pipeline's
      rows are handed to it per epoch (pseudo pairs) by `epoch_start_fn`,
      the loop's epoch-start hook.
    first_epoch: the cosine schedule starts at this epoch of
      `config[stage].epochs` (the stage trains the rest).
    lr: the peak rate (default `config.train.lr`).
    carry_optimizer: load the AdamW moments of the stage it starts from.
    ema_epochs: > 0 keeps a moving average of the params with this time
      constant (in epochs), which the stage then evaluates and hands on
      (`state_lib.with_average`).
    start_from: the training stage whose handed-on params the stage starts
      from (default: the one before it in `config.stages`).
  """
  c = config
  spe = (pipe.steps_per_epoch() if epoch_rows is None
         else pipe.steps_for_rows(epoch_rows))
  tx = state_lib.create_optimizer(lr or c.train.lr, c.train.weight_decay,
                                  spe, c[stage].epochs, first_epoch)
  previous = start_from or previous_training_stage(c, stage)
  state = state_lib.create_state(
      model, tx, ground_size=c.data.ground_size,
      satellite_size=c.data.satellite_size, seed=c.seed, mesh=mesh,
      pretrained=None if previous else pretrained_file(c, workdir))
  if previous:
    logging.info("Stage %s starts from the params %s handed on", stage,
                 previous)
    state = state.replace(params=loop.restore_params(
        run_dir.best_dir(workdir, previous), state.params))
    if carry_optimizer:
      source = loop.restore_opt_state(
          run_dir.checkpoints_dir(workdir, previous), state.opt_state)
      state = state.replace(
          opt_state=state_lib.with_moments_of(state.opt_state, source))
  state = state_lib.with_average(state, ema_epochs, spe)
  step_fn = make_step(model, tx, mesh,
                      label_smoothing=c[stage].label_smoothing,
                      grad_cache_chunk=c.train.grad_cache_chunk,
                      **augment.from_config(c.augment, stage == "intra"))
  loop_config = loop.LoopConfig.from_config(
      c.train, stage=stage, num_epochs=c[stage].epochs - first_epoch,
      steps_per_epoch=spe, select_metric=select_metric,
      progress=parallel.is_main_process())
  _, summary = loop.train(state, step_fn, pipe, loop_config, mesh=mesh,
                          workdir=workdir, eval_fn=eval_fn,
                          epoch_start_fn=epoch_start_fn)
  return summary
