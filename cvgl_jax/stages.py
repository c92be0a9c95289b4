"""The paper's stages as thin compositions of the library.

  pretrain     the stand-in for ImageNet weights, from a disjoint source
               world (pretrain.py)
  cfp          panoramas -> BEV images `g2a/` (cfp/project.py)
  translate    CycleGAN BEV -> satellite style, fakes `g2a_sat/`
               (cfp/translate_stage.py)
  intra        stage 1: intra-view self-supervision (two views of one image)
  cross_fake   stage 2: ground image + its own fake satellite image
  supervised   true pairs (the 100 %-labels row, Sample4Geo's baseline)
  pseudo_label stage 3: at every epoch start, embed the training piles,
               refine pseudo labels (mutual matching, margin, curriculum),
               add the labelled fraction's true pairs, train with the
               partial-label InfoNCE
  retrain      ours, after stage 3: its final model labels the piles once;
               the cold start trains again on those labels

Every stage works under `workdir/<stage>/` (`run_dir` owns the layout)
and ends with a `DONE` file holding its results (JSON), written by
`main`, which skips stages that have one. A training stage starts from
the params the training stage before it in `config.stages` handed on
(intra -> cross_fake), or from the pretrained ConvNeXt file, or from
scratch (`train/stage.py`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from cvgl_jax import config_lib
from cvgl_jax import evaluate
from cvgl_jax import parallel
from cvgl_jax import preflight
from cvgl_jax import pretrain as pretrain_lib
from cvgl_jax import records
from cvgl_jax import run_dir
from cvgl_jax import trained as trained_lib
from cvgl_jax.cfp import project
from cvgl_jax.cfp import translate_stage
from cvgl_jax.data import pipeline
from cvgl_jax.data import splits
from cvgl_jax.data.synthetic import config as synthetic_config
from cvgl_jax.data.synthetic import layouts
from cvgl_jax.data.index import PairIndex
from cvgl_jax.models import encoder
from cvgl_jax.models import weights
from cvgl_jax.pseudo import pairing
from cvgl_jax.pseudo import rounds as rounds_lib
from cvgl_jax.pseudo import views as views_lib
from cvgl_jax.train import loop
from cvgl_jax.train import stage as stage_lib
from cvgl_jax.train import state as state_lib
from cvgl_jax.train import steps

@dataclasses.dataclass
class Run:
  """What every stage needs: the config, the workdir, the data, the mesh."""
  config: ml_collections.ConfigDict
  workdir: str
  train: PairIndex
  eval: PairIndex
  mesh: jax.sharding.Mesh
  # "file: problem" of the image files left out (data.on_bad_image="skip").
  skipped_images: tuple[str, ...] = ()

  def stage_dir(self, stage: str) -> str:
    return run_dir.stage_dir(self.workdir, stage)


def synthetic_world(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Generates the config's synthetic world under workdir unless present
  (`splits.world_root`); returns its folder.

  The world is written to a temporary folder and renamed when complete, so
  an interrupted generation is redone rather than used half-written.
  """
  s = config.synthetic
  root = splits.world_root(workdir)
  cfg = synthetic_config.SyntheticConfig.from_run_config(s).validate()
  # Only process 0 looks and writes; every process passes the barrier, so
  # none can read before the rename, whatever each saw on the disk.
  if parallel.is_main_process() and not os.path.isdir(root):
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    logging.info("Generating a synthetic %s world of %d pairs in %s",
                 s.layout, s.num_pairs, root)
    layouts.write_dataset(s.layout, partial, cfg, s.num_pairs, s.seed)
    os.replace(partial, root)
  parallel.sync("synthetic_world")
  return root


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Checks a validated config (`config_lib.validate`) against the job
  (`preflight.check`), reads (or generates) the data, builds the mesh."""
  mesh = parallel.make_mesh()
  preflight.check(config, mesh)
  if config.synthetic.enabled:
    synthetic_world(config, workdir)
  dropped = []
  train, evaluation = splits.read_splits(config, workdir, dropped=dropped)
  problem = views_lib.missing_fakes(config, train)
  if problem:
    raise config_lib.ConfigError(problem)
  return Run(config, workdir, train, evaluation, mesh, tuple(dropped))


def run_pretrain(run: Run) -> dict:
  """The stand-in for ImageNet weights (`cvgl_jax/pretrain.py`): trains a
  shared ConvNeXt on a disjoint source world (cached by fingerprint) and
  writes it as `workdir/pretrain/standin.safetensors`."""
  c = run.config
  out = pretrain_lib.standin_path(run.workdir)
  cached = pretrain_lib.cached_file(c)
  result = {"pretrained": out, "fingerprint": pretrain_lib.fingerprint(c),
            "objective": c.pretrain.objective}
  if cached.is_file():
    logging.info("Pretraining stand-in found in the cache: %s", cached)
    if parallel.is_main_process():
      os.makedirs(os.path.dirname(out), exist_ok=True)
      shutil.copyfile(cached, out + ".tmp")
      os.replace(out + ".tmp", out)
    parallel.sync("pretrain:copied")
    return dict(result, cached=True)
  source = pretrain_lib.source_config(c)
  source_dir = run_dir.stage_dir(run.workdir, "pretrain")
  source_run = setup(source, source_dir)
  stage = source.stages[0]
  summary = STAGES[stage](source_run)
  model = encoder.from_config(source.model)
  like = state_lib.create_state(
      model, state_lib.create_optimizer(1.0, 0.0, 1, 1),
      ground_size=c.data.ground_size, satellite_size=c.data.satellite_size,
      seed=c.seed, mesh=run.mesh).params
  params = loop.restore_params(
      run_dir.checkpoints_dir(source_dir, stage), like)
  tower = jax.tree.map(np.asarray, params["query"])
  if parallel.is_main_process():
    weights.save_timm(tower["backbone"], out, tower["head"].get("norm"))
    try:
      cached.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(out, f"{cached}.tmp{os.getpid()}")
      os.replace(f"{cached}.tmp{os.getpid()}", cached)
    except OSError as e:
      logging.warning("Could not cache the stand-in in %s: %s", cached, e)
  parallel.sync("pretrain:written")
  return dict(result, cached=False, source_eval=summary.get("eval", {}),
              source_train=summary.get("train", {}))


def run_cfp(run: Run) -> dict:
  """Projects every training panorama to a BEV image (`root/g2a/`)."""
  return project.run_stage(run.train, run.config.cfp)


def run_translate(run: Run) -> dict:
  """Trains the CycleGAN and writes the fake satellite images."""
  return translate_stage.translate(run.train, run.workdir,
                                   run.config.translate,
                                   progress=parallel.is_main_process())


def _train(run: Run, stage: str, pipe: pipeline.TrainPipeline,
           make_step: Callable, make_epoch_start: Optional[Callable] = None,
           **options) -> dict:
  """Trains `stage` (`train.stage.train`), evaluated on the eval split;
  `make_epoch_start(model)` gives the loop's epoch-start hook."""
  c = run.config
  model = encoder.from_config(c.model)
  eval_fn = evaluate.make_eval_fn(
      model, run.eval, ground_size=c.data.ground_size,
      satellite_size=c.data.satellite_size,
      batch_size=parallel.process_batch_size(
          c.train.eval_batch_size, run.mesh, "train.eval_batch_size"),
      mesh=run.mesh, num_threads=c.data.num_threads,
      label_free_tau=c.pseudo_label.tau)
  select = {"label_free": evaluate.LABEL_FREE, "final": None}
  return stage_lib.train(
      c, run.workdir, run.mesh, stage, model, pipe, make_step, eval_fn,
      select_metric=select[c.train.select],
      epoch_start_fn=make_epoch_start(model) if make_epoch_start else None,
      **options)


def _pipe_options(run: Run) -> dict:
  c = run.config
  return dict(ground_size=c.data.ground_size,
              satellite_size=c.data.satellite_size,
              batch_size=parallel.process_batch_size(
                  c.train.batch_size, run.mesh, "train.batch_size"),
              seed=c.seed, num_threads=c.data.num_threads)


def run_intra(run: Run) -> dict:
  """Stage 1: two augmented views of each ground and each satellite image."""
  pipe = pipeline.intra_view(run.train, **_pipe_options(run))
  return _train(run, "intra", pipe, steps.make_intra_step)


def run_cross_fake(run: Run) -> dict:
  """Stage 2: each panorama with its own fake satellite image (g2a_sat,
  or its BEV itself: `config.cross_fake.fake_folder`)."""
  pipe = pipeline.cross_view(run.train,
                             fake_folder=run.config.cross_fake.fake_folder,
                             **_pipe_options(run))
  return _train(run, "cross_fake", pipe, steps.make_cross_step)


def run_supervised(run: Run) -> dict:
  """True pairs of the training split (every panorama with its tile)."""
  positive = np.asarray(run.train.positive)
  known = np.flatnonzero(positive >= 0)
  if not len(known):
    raise ValueError(f"The supervised stage needs true pairs, but "
                     f"{run.train.name!r} has no known positives.")
  pairs = np.stack([known, positive[known]], axis=1).astype(np.int64)
  pipe = pipeline.pseudo_pairs(run.train, **_pipe_options(run))
  return _train(
      run, "supervised", pipe, steps.make_cross_step, epoch_rows=len(pairs),
      make_epoch_start=lambda model: lambda state, epoch: {"pairs": pairs})


def _pseudo_label_stage(run: Run, stage: str, teacher=None,
                        **options) -> dict:
  """Trains `stage` on pseudo pairs of the train split (`pseudo.rounds`)
  plus the labelled fraction's true pairs; adds its label table."""
  c, p = run.config, run.config.pseudo_label
  index = run.train
  problem = views_lib.missing_fakes(c, index, written=True)
  if problem:
    raise config_lib.ConfigError(problem)
  gt_pairs = pairing.gt_subset(index.positive, p.gt_ratio, c.seed)
  views = views_lib.PairingViews(
      paired_views=p.paired_views,
      fake_folder=c.cross_fake.fake_folder if p.fake_view else None)
  embed_options = dict(batch_size=parallel.process_batch_size(
                           c.train.eval_batch_size, run.mesh,
                           "train.eval_batch_size"), mesh=run.mesh,
                       num_threads=c.data.num_threads,
                       ground_size=c.data.ground_size,
                       satellite_size=c.data.satellite_size)

  def make_epoch_start(model):
    embedders = views_lib.make_embedders(model, run.mesh, views)
    embed = lambda params: views_lib.pairing_embeddings(
        embedders, params, index, views, **embed_options)
    return rounds_lib.make_epoch_start(c, index, gt_pairs, embed, teacher)

  summary = _train(
      run, stage, pipeline.pseudo_pairs(index, **_pipe_options(run)),
      steps.make_partial_step,
      # One row per ground image (`pairing.epoch_rows`).
      epoch_rows=index.num_ground, make_epoch_start=make_epoch_start,
      first_epoch=rounds_lib.first_epoch(gt_pairs, p.warmup_epochs, teacher),
      lr=p.lr or None, carry_optimizer=p.carry_optimizer, **options)
  rounds = records.round_table(run_dir.read_records(run.workdir, stage))
  summary["rounds"] = rounds
  summary["last_round"] = rounds[-1] if rounds else {}
  return summary


def run_pseudo_label(run: Run) -> dict:
  """Stage 3: rounds of pseudo labelling and partial-label training
  (`pseudo.rounds`: each epoch's pairs from the model of its start)."""
  return _pseudo_label_stage(run, "pseudo_label",
                             ema_epochs=run.config.pseudo_label.ema_epochs)


def run_retrain(run: Run) -> dict:
  """Ours: stage 3's final model labels the train split once (the rule
  of its last round); the cold start (`retrain.start_from`) trains again
  on those labels and the labelled fraction's true pairs."""
  teacher = trained_lib.load_trained(run.workdir, stage="pseudo_label",
                                     mesh=run.mesh)
  return _pseudo_label_stage(run, "retrain", teacher=teacher.params,
                             start_from=run.config.retrain.start_from)


STAGES: dict[str, Callable[[Run], dict]] = {
    "pretrain": run_pretrain,
    "cfp": run_cfp,
    "translate": run_translate,
    "intra": run_intra,
    "cross_fake": run_cross_fake,
    "supervised": run_supervised,
    "pseudo_label": run_pseudo_label,
    "retrain": run_retrain,
}
