"""The trained model of a workdir: its config and a checkpoint's params.

`load_trained` restores what a finished (or interrupted) run trained: the
run's config (`read_config`, keys added since the run at their defaults),
the TwoTower it describes (`encoder.model_spec` / `encoder.build_model`, the
spec a bundle records) and the params of a training stage's best or latest
checkpoint, replicated on a mesh. The export (`cvgl_jax.export`), the
report (`cvgl_jax.report`) and the benchmarks that re-embed a run read a
run's model through here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import ml_collections

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax import run_dir
from cvgl_jax.models import encoder
from cvgl_jax.train import loop


class NoTrainedModel(ValueError):
  """The workdir has no trained checkpoint as asked; the message says why."""


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config (`run_dir.read_config`, keys added since the run at
  their defaults), or FileNotFoundError."""
  try:
    return run_dir.read_config(workdir,
                               config_lib.default_config().to_dict())
  except run_dir.RunDirError as e:
    raise FileNotFoundError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Trained:
  """Params of one checkpoint of a run.

  Attributes:
    config: the run's config.
    stage: the training stage, e.g. "pseudo_label".
    checkpoint: "best" or "latest" (what was found).
    step: the checkpoint's training step.
    spec: `encoder.model_spec(config)`.
    model: the TwoTower.
    params: the param tree, replicated on `mesh`.
    mesh: the data mesh the params live on.
  """
  config: ml_collections.ConfigDict
  stage: str
  checkpoint: str
  step: int
  spec: dict
  model: encoder.TwoTower
  params: Any
  mesh: jax.sharding.Mesh


def load_trained(workdir: str, *, stage: Optional[str] = None,
                 checkpoint: str = "best",
                 mesh: Optional[jax.sharding.Mesh] = None) -> Trained:
  """Restores a stage's params (default: the last trained stage's best).

  Args:
    workdir: the run's folder.
    stage: a training stage of the run; None picks the last one that
      saved a checkpoint.
    checkpoint: "best" (falls back to "latest") or "latest".
    mesh: where the params go, replicated; default all devices.

  Raises:
    FileNotFoundError: the workdir has no config.json.
    NoTrainedModel: `stage` is not a training stage, or has no such
      checkpoint (no stage has one, when `stage` is None).
  """
  config = read_config(workdir)
  if stage is None:
    try:
      stage = run_dir.last_trained_stage(
          workdir, [s for s in config.stages
                    if s in config_lib.TRAINING_STAGES])
    except run_dir.RunDirError as e:
      raise NoTrainedModel(str(e)) from e
  elif stage not in config_lib.TRAINING_STAGES:
    raise NoTrainedModel(f"stage={stage!r} is not a training stage; choose "
                         f"one of {config_lib.TRAINING_STAGES}.")
  try:
    kind, folder, step = run_dir.trained_checkpoint(workdir, stage,
                                                    checkpoint)
  except run_dir.RunDirError as e:
    raise NoTrainedModel(str(e)) from e
  mesh = parallel.make_mesh() if mesh is None else mesh
  spec = encoder.model_spec(config)
  model = encoder.build_model(spec)
  sharding = parallel.replicated(mesh)
  like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      encoder.abstract_params(model, spec))
  params = loop.restore_params(folder, like, step)
  return Trained(config, stage, kind, step, spec, model, params, mesh)
