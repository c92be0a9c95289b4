"""Train state and optimizer: AdamW with the paper's per-epoch cosine.

The state is a pytree of arrays only (params, optimizer state, step, rng),
so an orbax checkpoint is the state itself and a jitted step can donate it.
Randomness is derived, never carried: step s uses
`jax.random.fold_in(state.rng, s)`.

Learning rate (docs/METHOD.md; the authors' `adjust_learning_rate`, called once
per epoch): lr_e = lr * (1 + cos(pi * e / E)) / 2 with e the 0-based epoch,
constant within the epoch. The rate is injected into the optimizer state
(`optax.inject_hyperparams`), so the checkpoint holds it and the step can
report it. Weight decay is decoupled (AdamW) and applies to every
parameter, the logit scale included, as the authors' `torch.optim.AdamW`
(default weight_decay 0.01) over all parameters.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvgl_jax import parallel
from cvgl_jax.models import weights


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    params: the model's param tree (float32).
    opt_state: the optax state of `create_optimizer`'s transformation.
    step: int32 scalar, number of updates done.
    rng: uint32 [2] raw PRNG key; step s uses fold_in(rng, s).
    average: None, or the exponential moving average of params after each
      update (`with_average`): then the model the stage evaluates,
      pseudo-labels with and hands on (`model_params`).
    average_decay: the average's weight on its old value per step (static).
  """
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  average: Any = None
  average_decay: float = flax.struct.field(pytree_node=False, default=0.0)


def with_average(state: TrainState, epochs: float,
                 steps_per_epoch: int) -> TrainState:
  """`state` keeping an exponential moving average of its params, starting
  at its params, with a time constant of `epochs` epochs (decay per step
  1 - 1 / (epochs * steps_per_epoch)); `epochs` = 0 returns it unchanged.

  A mean teacher: each pseudo-label round and evaluation reads the
  average, whose weights drift less from round to round than the last
  step's under noisy labels (BUILD_NOTES.md)."""
  if epochs < 0 or steps_per_epoch <= 0:
    raise ValueError(f"with_average: epochs ({epochs}) must be >= 0 and "
                     f"steps_per_epoch ({steps_per_epoch}) > 0.")
  if not epochs:
    return state
  decay = 1.0 - 1.0 / max(1.0, epochs * steps_per_epoch)
  return state.replace(average=jax.tree.map(jnp.copy, state.params),
                       average_decay=decay)


def model_params(state: TrainState) -> Any:
  """The params a stage evaluates, pseudo-labels with and hands on: the
  moving average when the state keeps one, else the params."""
  return state.params if state.average is None else state.average


def averaged(average, params, decay: float):
  """One step of the moving average: decay * average + (1 - decay) * params."""
  return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, average,
                      params)


def cosine_per_epoch(lr: float, steps_per_epoch: int, num_epochs: int,
                     first_epoch: int = 0) -> Callable[[jax.Array], jax.Array]:
  """step -> lr * (1 + cos(pi * e / E)) / 2 with
  e = first_epoch + step // steps_per_epoch.

  Args:
    lr: peak (epoch 0) learning rate.
    steps_per_epoch: optimizer steps per epoch (> 0).
    num_epochs: E, the epochs of the schedule (> 0).
    first_epoch: the schedule's epoch at step 0 (the authors' stage 3 at
      0 % labels counts its 6 empty warm-up epochs: it starts at epoch 6).
  """
  if steps_per_epoch <= 0 or num_epochs <= 0:
    raise ValueError(f"cosine_per_epoch: steps_per_epoch ({steps_per_epoch})"
                     f" and num_epochs ({num_epochs}) must be positive.")

  def schedule(step):
    epoch = first_epoch + jnp.asarray(step) // steps_per_epoch
    return lr * 0.5 * (1.0 + jnp.cos(math.pi * epoch / num_epochs))
  return schedule


def create_optimizer(lr: float, weight_decay: float, steps_per_epoch: int,
                     num_epochs: int,
                     first_epoch: int = 0) -> optax.GradientTransformation:
  """AdamW (optax defaults b1 0.9, b2 0.999, eps 1e-8, as torch) with the
  per-epoch cosine (`cosine_per_epoch`); `learning_rate(opt_state)` reads
  the current rate."""
  if lr <= 0 or weight_decay < 0:
    raise ValueError(f"create_optimizer: lr ({lr}) must be > 0 and "
                     f"weight_decay ({weight_decay}) >= 0.")
  return optax.inject_hyperparams(optax.adamw)(
      learning_rate=cosine_per_epoch(lr, steps_per_epoch, num_epochs,
                                     first_epoch),
      weight_decay=weight_decay)


def with_moments_of(opt_state, source):
  """`opt_state` (a fresh `create_optimizer` state: its schedule starts
  again) with the AdamW moments and count of `source`, the state of an
  earlier stage's optimizer -- what the authors do between stages 2 and 3
  (torch's `optimizer.load_state_dict`, then their own per-epoch rate)."""
  return opt_state._replace(inner_state=source.inner_state)


def learning_rate(opt_state) -> jax.Array:
  """The rate the last update used (the schedule at its step), from the
  state of a `create_optimizer` transformation."""
  return opt_state.hyperparams["learning_rate"]


def create_state(model: nn.Module, tx: optax.GradientTransformation, *,
                 ground_size: Sequence[int], satellite_size: Sequence[int],
                 seed: int, mesh: jax.sharding.Mesh,
                 pretrained: Optional[str] = None) -> TrainState:
  """A fresh TrainState, created directly in the replicated sharding.

  Args:
    model: a `TwoTower` (`cvgl_jax.models.encoder`).
    tx: from `create_optimizer`.
    ground_size: (H, W) of the ground images the model will see (the SAFA
      head's params depend on the feature map size).
    satellite_size: (H, W) of the satellite images.
    seed: initialises params and the training rng.
    mesh: the data mesh.
    pretrained: optional ImageNet ConvNeXt checkpoint file (timm or
      official naming) loaded into both backbones
      (`cvgl_jax.models.weights.load_pretrained`).

  Returns:
    TrainState with replicated params and optimizer state, step 0.
  """
  shapes = {}
  for name, size in (("ground_size", ground_size),
                     ("satellite_size", satellite_size)):
    if len(size) != 2 or any(int(v) <= 0 for v in size):
      raise ValueError(f"create_state: {name} must be (height, width) > 0, "
                       f"got {size!r}.")
    shapes[name] = (1, int(size[0]), int(size[1]), 3)
  init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  params = _init_fn(model, shapes["ground_size"], shapes["satellite_size"],
                    mesh)(init_key)
  if pretrained:
    host = jax.tree.map(np.asarray, params)
    params = parallel.put_replicated(
        weights.load_pretrained(host, pretrained), mesh)
  opt_state = jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(
      params)
  return TrainState(
      params=params, opt_state=opt_state,
      step=parallel.put_replicated(np.int32(0), mesh),
      rng=parallel.put_replicated(np.asarray(rng), mesh))


@functools.lru_cache(maxsize=16)
def _init_fn(model, ground_shape, satellite_shape, mesh):
  """Jitted key -> params, cached: a stage and its restarts compile once."""

  def init(key):
    ground = jnp.zeros(ground_shape, jnp.float32)
    satellite = jnp.zeros(satellite_shape, jnp.float32)
    return model.init(key, ground, satellite)["params"]

  # Created by a jit with out_shardings, so params appear on every device
  # at once instead of on device 0 first.
  return jax.jit(init, out_shardings=parallel.replicated(mesh))


def abstract_state(state: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target for orbax."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
