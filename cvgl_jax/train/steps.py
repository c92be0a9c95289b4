"""Pure jitted training steps: (state, batch) -> (state, metrics).

Each factory closes over the model, the optimizer, the mesh and the static
augmentation settings, and returns one jitted function that donates the
state. Inside a step, on device and in this order: a key
`fold_in(state.rng, state.step)`, the random augmentations
(`cvgl_jax.data.augment`, one key per example), ImageNet normalisation to
the model's dtype, the towers (drop path active), the InfoNCE loss over the
GLOBAL batch (`info_nce(..., mesh=mesh)`), its gradient and the AdamW
update.

Batches are global arrays sharded on the mesh's `data` axis
(`parallel.to_global`): uint8 images {"ground": [B, Hg, Wg, 3],
"satellite": [B, Hs, Ws, 3]} and, for the partial-label step, "labeled"
[B] bool. Other entries (e.g. "ground_index") are dropped before the
jitted function, so one compiled step serves any pipeline that has its
entries. Random numbers come from threefry keys split over the global
batch, which JAX makes independent of how the batch is sharded, so a step
on 8 devices computes what it computes on 1 (up to the order of float
sums).

With `grad_cache_chunk` = K > 0 the gradient is taken in chunks of K rows
of the global batch (`cvgl_jax.train.grad_cache`): the same loss over the
same global batch -- every negative, across every device -- with the
activation memory of a batch of K, for one more forward pass per image. K
divides the global batch and is a multiple of the device count; 0 (the
default) takes the gradient in one pass.

Metrics (float32 scalars, replicated): loss, lr (the rate of this update),
logit_scale (exp(t)), grad_norm (global L2 norm of the gradients), skipped
(1 when a non-finite loss or gradient norm left the state unchanged), and the
loss's own terms (loss_q2r, accuracy_q2r, ... ; for the intra-view step
prefixed "ground/" and "satellite/").

Kinds (docs/METHOD.md):
  intra-view (stage 1): two views of each ground image through the query
    tower and of each satellite image through the reference tower;
    loss = InfoNCE(g1, g2) + InfoNCE(s1, s2), smoothing 0.1.
  cross-view (stage 2 with fakes, smoothing 0.3; supervised on true pairs,
    smoothing 0.1): the paired augmentation, loss = InfoNCE(zq, zr).
  partial-label (stage 3): as cross-view with `valid = batch["labeled"]`,
    the extra "no match" class; smoothing 0.1.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cvgl_jax import parallel
from cvgl_jax.data import augment
from cvgl_jax.train import grad_cache
from cvgl_jax.train import losses
from cvgl_jax.train import state as state_lib

StepFn = Callable[[state_lib.TrainState, dict], tuple[state_lib.TrainState,
                                                      dict]]


def _keys(st: state_lib.TrainState, n: int):
  return jax.random.split(jax.random.fold_in(st.rng, st.step), n)


def _update(st, tx, grads, metrics):
  """Applies the gradients; returns the new state and the full metrics.

  A step whose loss or gradient norm is not finite is skipped: params and
  optimizer state stay as they were (`skipped` = 1), so one bad batch
  cannot poison the state (nor the moving average, which then averages the
  unchanged params); the step counter still advances, keeping the
  data position. (Not `optax.apply_if_finite`: it lets the update through
  after `max_consecutive_errors`, and its state would change the optimizer
  tree every checkpoint holds. The loop stops a run that keeps skipping.)
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, st.opt_state, st.params)
  params = optax.apply_updates(st.params, updates)
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, grad_norm=grad_norm,
                 skipped=1.0 - finite.astype(jnp.float32),
                 lr=jnp.asarray(state_lib.learning_rate(opt_state),
                                jnp.float32))
  new = st.replace(params=keep(params, st.params),
                   opt_state=keep(opt_state, st.opt_state), step=st.step + 1)
  if st.average is not None:
    new = new.replace(average=state_lib.averaged(st.average, new.params,
                                                 st.average_decay))
  return new, metrics


def _jit(step, mesh, keys):
  """jit(step) donating the state; called with only the batch's `keys`, so
  extra entries (indices, labels another step needs) neither recompile nor
  reach the device program."""
  repl = parallel.replicated(mesh)
  jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(repl, repl))

  def run(st, batch):
    missing = [k for k in keys if k not in batch]
    if missing:
      raise KeyError(f"This training step needs batch entries {keys}; the "
                     f"batch has {sorted(batch)} (missing {missing}).")
    return jitted(st, {k: batch[k] for k in keys})
  run.jitted = jitted  # For lowering without running (benchmarks/memory.py).
  return run


def _gradients(embed, loss_fn, params, views, key, grad_cache_chunk):
  """(grads, metrics) of loss_fn(params, embed(params, views, key)): in one
  pass, or in chunks of `grad_cache_chunk` rows (`grad_cache`)."""
  if not grad_cache_chunk:
    return jax.grad(lambda p: loss_fn(p, embed(p, views, key)),
                    has_aux=True)(params)
  return grad_cache.gradients(embed, loss_fn, params, views, key,
                              chunk=grad_cache_chunk)


def _check_options(label_smoothing, grad_cache_chunk, mesh):
  """Raises ValueError for a smoothing outside [0, 1) or a chunk that does
  not spread over the mesh's devices (the batch is checked when traced)."""
  n = mesh.devices.size
  if grad_cache_chunk < 0 or grad_cache_chunk % n:
    raise ValueError(f"grad_cache_chunk={grad_cache_chunk} must be 0 (off) "
                     f"or a positive multiple of the mesh's {n} devices.")
  _check_smoothing(label_smoothing)


def _check_smoothing(label_smoothing):
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must lie in [0, 1), got "
                     f"{label_smoothing!r}.")


def make_intra_step(model: nn.Module, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *, label_smoothing: float = 0.1,
                    ground_aug: augment.ViewConfig = augment.ground_view(),
                    satellite_aug: augment.ViewConfig = (
                        augment.satellite_view()),
                    satellite_aug2: augment.ViewConfig = (
                        augment.satellite_second_view()),
                    grad_cache_chunk: int = 0) -> StepFn:
  """Stage 1 step (intra-view); batch {"ground", "satellite"} uint8.

  Both ground views use `ground_aug`; the satellite views use
  `satellite_aug` and `satellite_aug2` (the second also warped harder).
  `grad_cache_chunk`: see the module docstring.
  """
  _check_options(label_smoothing, grad_cache_chunk, mesh)
  dtype = model.dtype

  def embed_views(module, g1, g2, s1, s2):
    return (module.embed_ground(g1, True), module.embed_ground(g2, True),
            module.embed_satellite(s1, True), module.embed_satellite(s2, True))

  def embed(params, views, key):
    return model.apply({"params": params}, *views, method=embed_views,
                       rngs={"dropout": key})

  def loss_fn(params, embeddings):
    g1, g2, s1, s2 = embeddings
    t = params["logit_scale"]
    loss_g, m_g = losses.info_nce(g1, g2, t, label_smoothing, mesh=mesh)
    loss_s, m_s = losses.info_nce(s1, s2, t, label_smoothing, mesh=mesh)
    metrics = {f"ground/{k}": v for k, v in m_g.items() if k != "logit_scale"}
    metrics.update(
        {f"satellite/{k}": v for k, v in m_s.items() if k != "logit_scale"})
    loss = loss_g + loss_s
    metrics.update(loss=loss, logit_scale=m_g["logit_scale"])
    return loss, metrics

  def step(st, batch):
    k_g1, k_g2, k_s1, k_s2, k_drop = _keys(st, 5)
    g, s = batch["ground"], batch["satellite"]
    views = [augment.augment_batch(k_g1, g, ground_aug),
             augment.augment_batch(k_g2, g, ground_aug),
             augment.augment_batch(k_s1, s, satellite_aug),
             augment.augment_batch(k_s2, s, satellite_aug2)]
    views = tuple(augment.normalize(v, dtype) for v in views)
    grads, metrics = _gradients(embed, loss_fn, st.params, views, k_drop,
                                grad_cache_chunk)
    return _update(st, tx, grads, metrics)

  return _jit(step, mesh, ("ground", "satellite"))


def _pair_step(model, tx, mesh, label_smoothing, ground_aug, satellite_aug,
               paired_aug, partial, grad_cache_chunk):
  _check_options(label_smoothing, grad_cache_chunk, mesh)
  dtype = model.dtype

  def embed(params, views, key):
    zq, zr, _ = model.apply({"params": params}, *views, train=True,
                            rngs={"dropout": key})
    return zq, zr

  def step(st, batch):
    k_aug, k_drop = _keys(st, 2)
    g, s = augment.augment_pairs(k_aug, batch["ground"], batch["satellite"],
                                 ground_aug, satellite_aug, paired_aug)
    views = (augment.normalize(g, dtype), augment.normalize(s, dtype))
    valid = batch["labeled"].astype(bool) if partial else None

    def loss_fn(params, embeddings):
      zq, zr = embeddings
      return losses.info_nce(zq, zr, params["logit_scale"], label_smoothing,
                             valid, mesh=mesh)

    grads, metrics = _gradients(embed, loss_fn, st.params, views, k_drop,
                                grad_cache_chunk)
    return _update(st, tx, grads, metrics)

  keys = ("ground", "satellite") + (("labeled",) if partial else ())
  return _jit(step, mesh, keys)


def make_cross_step(model: nn.Module, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *, label_smoothing: float,
                    ground_aug: augment.ViewConfig = augment.ground_view(),
                    satellite_aug: augment.ViewConfig = (
                        augment.satellite_view()),
                    paired_aug: augment.PairedConfig = augment.PairedConfig(),
                    grad_cache_chunk: int = 0) -> StepFn:
  """Cross-view step; batch {"ground", "satellite"} uint8, row i a pair.

  label_smoothing: 0.3 for stage 2 (fake satellite images), 0.1 for the
  supervised stage on true pairs.
  """
  return _pair_step(model, tx, mesh, label_smoothing, ground_aug,
                    satellite_aug, paired_aug, partial=False,
                    grad_cache_chunk=grad_cache_chunk)


def make_partial_step(model: nn.Module, tx: optax.GradientTransformation,
                      mesh: jax.sharding.Mesh, *,
                      label_smoothing: float = 0.1,
                      ground_aug: augment.ViewConfig = augment.ground_view(),
                      satellite_aug: augment.ViewConfig = (
                          augment.satellite_view()),
                      paired_aug: augment.PairedConfig = (
                          augment.PairedConfig()),
                      grad_cache_chunk: int = 0) -> StepFn:
  """Stage 3 step; batch {"ground", "satellite", "labeled" [B] bool}:
  unlabelled rows and columns target the "no match" class."""
  return _pair_step(model, tx, mesh, label_smoothing, ground_aug,
                    satellite_aug, paired_aug, partial=True,
                    grad_cache_chunk=grad_cache_chunk)

