"""InfoNCE losses: symmetric, label-smoothed, optionally partial-label.

The loss is the authors' (and Sample4Geo's): for L2-normalised query
embeddings q [B, D] and reference embeddings r [B, D], where q[i] and r[i]
are a positive pair,

  S = exp(t) * q @ r.T                                   [B, B]
  loss = 0.5 * CE(S, targets) + 0.5 * CE(S.T, targets)

CE is PyTorch's `CrossEntropyLoss(label_smoothing=s)`: per row, the target
distribution over C classes is (1 - s) * one_hot(target) + s / C, and rows
are averaged.

Partial labels (docs/METHOD.md, stage 3.5). `valid[i]` says whether pair i is a
(pseudo) label. The logit matrix gets one extra class, a constant-zero "no
match" logit, appended to every row of S (for q -> r) and to every row of
S.T (for r -> q), so both terms have C = B + 1 classes:
  - labelled row i (q[i] -> r): target i, its partner r[i];
  - unlabelled row i: target B, "no match";
  - labelled column j (r[j] -> q): target j;
  - unlabelled column j: target B, "no match".
Smoothing spreads s / (B + 1) over all B + 1 classes, the "no match" class
included, for labelled and unlabelled rows alike. Every row and column,
labelled or not, counts in the mean with weight 1 / B. Passing `valid`
always adds the extra class, even when every entry is True; `valid=None`
gives the plain B-class loss. This is what the authors' `InfoNCELoss` does
with and without its `GT` argument.

Negatives are the global batch. With `mesh=None` the loss is computed on
the arrays as given (one device, or replicated inputs). With a mesh, q, r
and `valid` are sharded on `axis_name` and the loss runs in `jax.shard_map`:
each device all-gathers q and r and computes its own rows of S and of S.T
against the whole batch, [B / n, B] each, never the whole [B, B] matrix;
partial sums are `psum`-ed. Take `jax.grad` outside this function: the
transpose of `all_gather` is a reduce-scatter, so the gradients are those
of the single-device loss on the global batch. This works for meshes with
Explicit axes (`jax.make_mesh`'s default) and Auto axes alike.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def _smoothed_ce_rows(logits, targets, label_smoothing):
  """Per-row cross-entropy with PyTorch's label smoothing.

  Args:
    logits: [b, C] float32.
    targets: [b] int, class index of each row.
    label_smoothing: s in [0, 1]; the target is (1 - s) one-hot + s / C.

  Returns:
    (loss [b], correct [b] bool: argmax equals the target).
  """
  num_classes = logits.shape[-1]
  labels = optax.smooth_labels(
      jax.nn.one_hot(targets, num_classes, dtype=logits.dtype),
      label_smoothing)
  loss = optax.softmax_cross_entropy(logits, labels)
  correct = jnp.argmax(logits, axis=-1) == targets
  return loss, correct


def _partial_sums(q_rows, r_rows, q_all, r_all, row_offset, log_scale,
                  label_smoothing, valid_rows):
  """Sums of the loss terms over a block of rows of S and of S.T.

  Args:
    q_rows: [b, D], queries whose rows of S this block computes.
    r_rows: [b, D], references whose rows of S.T (columns of S) it computes;
      the same batch positions as `q_rows`.
    q_all: [B, D], every query of the global batch.
    r_all: [B, D], every reference of the global batch.
    row_offset: int scalar, global index of the block's first position.
    log_scale: float scalar t; logits are exp(t) * cosine.
    label_smoothing: s.
    valid_rows: [b] bool or None: whether each position's pair is labelled.

  Returns:
    dict of float32 scalar sums over the b positions: loss_q2r, loss_r2q,
    correct_q2r, correct_r2q.
  """
  scale = jnp.exp(log_scale.astype(jnp.float32))
  q_rows, r_rows, q_all, r_all = (
      x.astype(jnp.float32) for x in (q_rows, r_rows, q_all, r_all))
  # HIGHEST keeps float32 matmuls exact on accelerators that default to
  # reduced-precision passes (TF32, bf16x3).
  hp = jax.lax.Precision.HIGHEST
  s_rows = scale * jnp.matmul(q_rows, r_all.T, precision=hp)  # [b, B]
  st_rows = scale * jnp.matmul(r_rows, q_all.T, precision=hp)  # [b, B]
  b, big_b = s_rows.shape
  targets = row_offset + jnp.arange(b)
  if valid_rows is not None:
    no_match = jnp.zeros((b, 1), s_rows.dtype)
    s_rows = jnp.concatenate([s_rows, no_match], axis=1)
    st_rows = jnp.concatenate([st_rows, no_match], axis=1)
    targets = jnp.where(valid_rows, targets, big_b)
  loss_q, corr_q = _smoothed_ce_rows(s_rows, targets, label_smoothing)
  loss_r, corr_r = _smoothed_ce_rows(st_rows, targets, label_smoothing)
  f32 = jnp.float32
  return {
      "loss_q2r": jnp.sum(loss_q),
      "loss_r2q": jnp.sum(loss_r),
      "correct_q2r": jnp.sum(corr_q.astype(f32)),
      "correct_r2q": jnp.sum(corr_r.astype(f32)),
  }


def _finish(sums, batch_size, log_scale, valid):
  """Turns global sums into the loss and its metrics."""
  metrics = {
      "loss_q2r": sums["loss_q2r"] / batch_size,
      "loss_r2q": sums["loss_r2q"] / batch_size,
      "accuracy_q2r": sums["correct_q2r"] / batch_size,
      "accuracy_r2q": sums["correct_r2q"] / batch_size,
      "logit_scale": jnp.exp(log_scale.astype(jnp.float32)),
  }
  if valid is not None:
    metrics["labelled_fraction"] = sums["labelled"] / batch_size
  loss = 0.5 * metrics["loss_q2r"] + 0.5 * metrics["loss_r2q"]
  metrics["loss"] = loss
  return loss, metrics


def info_nce(q: jax.Array,
             r: jax.Array,
             logit_scale: jax.Array,
             label_smoothing: float = 0.0,
             valid: Optional[jax.Array] = None,
             *,
             mesh: Optional[jax.sharding.Mesh] = None,
             axis_name: str = "data"):
  """Symmetric InfoNCE over the global batch (see the module docstring).

  Args:
    q: [B, D] query embeddings, L2-normalised (not re-normalised here).
    r: [B, D] reference embeddings, L2-normalised; r[i] pairs with q[i].
    logit_scale: float scalar t, the LOG of the logit multiplier: logits are
      exp(t) * cosine similarity (t is learnt, initialised to log(1/0.07)).
    label_smoothing: s in [0, 1), PyTorch semantics over C classes.
    valid: optional [B] bool, True where pair i is a (pseudo) label; turns
      on the partial-label form with the extra "no match" class.
    mesh: the device mesh when q, r and valid are sharded over `axis_name`
      (B must be divisible by its size); None computes on the arrays as
      given.
    axis_name: the batch axis of `mesh`.

  Returns:
    (loss, metrics): loss a float32 scalar; metrics a dict of float32
    scalars: loss, loss_q2r, loss_r2q, accuracy_q2r / accuracy_r2q (fraction
    of rows / columns whose arg-max is their target, "no match" included),
    logit_scale (exp(t)) and, with `valid`, labelled_fraction.

  Raises:
    ValueError: on shapes that do not fit together or a batch that does not
      divide over the mesh.
  """
  if q.ndim != 2 or q.shape != r.shape:
    raise ValueError(
        f"info_nce: q and r must both be [B, D]; got q {q.shape}, "
        f"r {r.shape}.")
  batch_size = q.shape[0]
  if jnp.ndim(logit_scale) != 0:
    raise ValueError(
        f"info_nce: logit_scale must be a scalar; got shape "
        f"{jnp.shape(logit_scale)}.")
  if isinstance(label_smoothing, (int, float)) and not (
      0.0 <= label_smoothing < 1.0):
    raise ValueError(
        f"info_nce: label_smoothing must be in [0, 1); got {label_smoothing}.")
  if valid is not None and valid.shape != (batch_size,):
    raise ValueError(
        f"info_nce: valid must be [B] = [{batch_size}]; got {valid.shape}.")
  log_scale = jnp.asarray(logit_scale)

  if mesh is None:
    sums = _partial_sums(q, r, q, r, 0, log_scale, label_smoothing, valid)
    if valid is not None:
      sums["labelled"] = jnp.sum(valid.astype(jnp.float32))
    return _finish(sums, batch_size, log_scale, valid)

  if axis_name not in mesh.axis_names:
    raise ValueError(
        f"info_nce: axis_name {axis_name!r} is not an axis of the mesh "
        f"{mesh.axis_names}.")
  num_shards = mesh.shape[axis_name]
  if batch_size % num_shards:
    raise ValueError(
        f"info_nce: global batch {batch_size} is not divisible by the "
        f"{num_shards} devices of mesh axis {axis_name!r}.")
  batch_spec = jax.P(axis_name)

  def local(q_loc, r_loc, t, *maybe_valid):
    valid_loc = maybe_valid[0] if maybe_valid else None
    q_all = jax.lax.all_gather(q_loc, axis_name, tiled=True)
    r_all = jax.lax.all_gather(r_loc, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * q_loc.shape[0]
    sums = _partial_sums(q_loc, r_loc, q_all, r_all, offset, t,
                         label_smoothing, valid_loc)
    if valid_loc is not None:
      sums["labelled"] = jnp.sum(valid_loc.astype(jnp.float32))
    return jax.lax.psum(sums, axis_name)

  args = (q, r, log_scale) + (() if valid is None else (valid,))
  specs = (batch_spec, batch_spec, jax.P()) + (
      () if valid is None else (batch_spec,))
  sums = jax.shard_map(
      local, mesh=mesh, in_specs=specs, out_specs=jax.P())(*args)
  return _finish(sums, batch_size, log_scale, valid)
