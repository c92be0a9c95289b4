"""What a config asks of this job's devices and files, checked before any
stage runs: CFP and the translation take hours on real data, so a batch
that does not split over the devices or a `model.pretrained` file of
another variant must stop the run before them, not after."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax.cpu import depthwise
from cvgl_jax.models import encoder
from cvgl_jax.models import weights
from cvgl_jax.train import grad_cache


def check(config: ml_collections.ConfigDict,
          mesh: jax.sharding.Mesh) -> None:
  """Checks a validated config (`config_lib.validate`) against the job: the
  batch sizes split over the devices and processes, the gradient cache's
  chunk over the devices, the translation's batch over the devices, the
  user's `model.pretrained` file fits `model` (shapes only; no device
  work), and `model.depthwise_impl="native"` can be built here.

  Raises:
    config_lib.ConfigError naming every problem and the fix.
  """
  errors = []
  if set(config.stages) & set(config_lib.TRAINING_STAGES):
    for key in ("batch_size", "eval_batch_size"):
      try:
        parallel.check_batch_size(config.train[key], mesh, f"train.{key}")
      except ValueError as e:
        errors.append(f"config.{e}")
    problem = grad_cache.chunk_problem(config.train.grad_cache_chunk,
                                       config.train.batch_size,
                                       mesh.devices.size)
    if problem:
      errors.append(f"config.{problem}")
  if "translate" in config.stages:
    try:
      parallel.devices_for_batch(config.translate.batch_size,
                                 "translate.batch_size")
    except ValueError as e:
      errors.append(f"config.{e}")
  if config.model.depthwise_impl == "native":
    try:
      depthwise.load()
    except depthwise.NativeBuildError as e:
      errors.append(f"config.model.depthwise_impl='native' cannot be built "
                    f"here ({e}); use 'auto', which falls back to 'shifts'")
  path = config.model.pretrained
  if path:
    model = encoder.from_config(config.model)
    shapes = jax.eval_shape(
        model.init, jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, *config.data.ground_size, 3), np.float32),
        jax.ShapeDtypeStruct((1, *config.data.satellite_size, 3),
                             np.float32))["params"]
    try:
      weights.load_pretrained(shapes, path)
    except (weights.CheckpointMismatchError, OSError, ValueError) as e:
      errors.append(f"config.model.pretrained={path!r}: {e}")
  if errors:
    raise config_lib.ConfigError.of("Invalid config for this job", errors)
