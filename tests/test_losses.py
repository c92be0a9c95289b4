"""Tests of the InfoNCE losses against a NumPy reference, on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax.train import losses


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_logsumexp(z):
  m = z.max(axis=1, keepdims=True)
  return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _np_ce(z, targets, s):
  """PyTorch CrossEntropyLoss(label_smoothing=s), mean over rows; float64.

  Written as PyTorch documents it, (1 - s) * NLL + s * mean_c(-log p_c),
  and returns the gradient w.r.t. z as well: (softmax(z) - y) / rows.
  """
  n, c = z.shape
  logp = z - _np_logsumexp(z)[:, None]
  nll = -logp[np.arange(n), targets]
  uniform = -logp.mean(axis=1)
  loss = np.mean((1 - s) * nll + s * uniform)
  y = np.full((n, c), s / c)
  y[np.arange(n), targets] += 1 - s
  return loss, (np.exp(logp) - y) / n


def _np_info_nce(q, r, t, s, valid=None):
  """Reference loss and its hand-derived gradients w.r.t. q, r and t."""
  q, r = q.astype(np.float64), r.astype(np.float64)
  b = q.shape[0]
  scale = np.exp(t)
  sim = scale * q @ r.T
  targets = np.arange(b)
  if valid is None:
    z_q, z_r = sim, sim.T
  else:
    zeros = np.zeros((b, 1))
    z_q = np.concatenate([sim, zeros], axis=1)
    z_r = np.concatenate([sim.T, zeros], axis=1)
    targets = np.where(valid, targets, b)
  loss_q, dz_q = _np_ce(z_q, targets, s)
  loss_r, dz_r = _np_ce(z_r, targets, s)
  dsim = 0.5 * dz_q[:, :b] + 0.5 * dz_r[:, :b].T
  grads = (scale * dsim @ r, scale * dsim.T @ q, np.sum(dsim * sim))
  return 0.5 * loss_q + 0.5 * loss_r, grads


@pytest.fixture(name="batch")
def _batch():
  rng = np.random.default_rng(0)
  b, d = 16, 8
  q = _unit(rng, (b, d)).astype(np.float32)
  r = _unit(rng, (b, d)).astype(np.float32)
  # Make half the pairs similar so that the loss is not near-uniform.
  near = q[:8] + 0.3 * rng.normal(size=(8, d))
  r[:8] = near / np.linalg.norm(near, axis=1, keepdims=True)
  valid = rng.random(b) < 0.6
  return q, r, np.float32(np.log(1 / 0.07)), valid


def _value_and_grad(mesh=None, smoothing=0.1, with_valid=True):
  def loss_fn(q, r, t, valid):
    return losses.info_nce(q, r, t, smoothing, valid if with_valid else None,
                           mesh=mesh)
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2),
                                    has_aux=True))


def test_numpy_reference_gradients_match_finite_differences(batch):
  q, r, t, valid = batch
  q, r, t = q[:5].astype(np.float64), r[:5].astype(np.float64), 0.5
  valid = valid[:5]
  _, (gq, gr, gt) = _np_info_nce(q, r, t, 0.2, valid)
  eps = 1e-6
  for arr, grad in ((q, gq), (r, gr)):
    for idx in [(0, 0), (2, 3), (4, 7)]:
      plus, minus = arr.copy(), arr.copy()
      plus[idx] += eps
      minus[idx] -= eps
      args_p = (plus, r) if arr is q else (q, plus)
      args_m = (minus, r) if arr is q else (q, minus)
      fd = (_np_info_nce(*args_p, t, 0.2, valid)[0]
            - _np_info_nce(*args_m, t, 0.2, valid)[0]) / (2 * eps)
      np.testing.assert_allclose(grad[idx], fd, rtol=1e-5, atol=1e-8)
  fd_t = (_np_info_nce(q, r, t + eps, 0.2, valid)[0]
          - _np_info_nce(q, r, t - eps, 0.2, valid)[0]) / (2 * eps)
  np.testing.assert_allclose(gt, fd_t, rtol=1e-5)


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_matches_numpy_values_and_gradients(batch, with_valid, smoothing):
  q, r, t, valid = batch
  (loss, metrics), grads = _value_and_grad(
      smoothing=smoothing, with_valid=with_valid)(q, r, t, valid)
  ref_loss, ref_grads = _np_info_nce(q, r, float(t), smoothing,
                                     valid if with_valid else None)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["logit_scale"], 1 / 0.07, rtol=1e-6)


def test_partial_labels_closed_form():
  # q = r = identity, t = 0: S = I. Pair 0 labelled, pair 1 not.
  # Row 0: logits [1, 0, 0], target 0 -> log(e + 2) - 1.
  # Row 1: logits [0, 1, 0], target "no match" (2) -> log(e + 2).
  # Columns are the same by symmetry.
  eye = jnp.eye(2)
  loss, metrics = losses.info_nce(eye, eye, 0.0, 0.0,
                                  jnp.array([True, False]))
  np.testing.assert_allclose(loss, np.log(np.e + 2) - 0.5, rtol=1e-6)
  # Row 1's arg-max is its partner (1 > 0), not "no match": 1 of 2 right.
  np.testing.assert_allclose(metrics["accuracy_q2r"], 0.5)
  np.testing.assert_allclose(metrics["labelled_fraction"], 0.5)
  # With smoothing s, each row adds s * (lse - mean logit - (lse - target)).
  s = 0.3
  loss_s, _ = losses.info_nce(eye, eye, 0.0, s, jnp.array([True, False]))
  lse = np.log(np.e + 2)
  row0 = (1 - s) * (lse - 1) + s * (lse - 1 / 3)
  row1 = (1 - s) * lse + s * (lse - 1 / 3)
  np.testing.assert_allclose(loss_s, (row0 + row1) / 2, rtol=1e-6)


def test_all_valid_still_adds_the_no_match_class(batch):
  q, r, t, _ = batch
  plain, _ = losses.info_nce(q, r, t, 0.1)
  all_valid, _ = losses.info_nce(q, r, t, 0.1, np.ones(16, bool))
  want, _ = _np_info_nce(q, r, float(t), 0.1, np.ones(16, bool))
  np.testing.assert_allclose(all_valid, want, rtol=1e-5)
  assert abs(float(plain) - float(all_valid)) > 1e-4


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("with_valid", [False, True])
def test_sharded_equals_single_device(batch, axis_type, with_valid):
  q, r, t, valid = batch
  types = {"explicit": jax.sharding.AxisType.Explicit,
           "auto": jax.sharding.AxisType.Auto}
  mesh = jax.make_mesh((8,), ("data",), axis_types=(types[axis_type],))
  shard = jax.NamedSharding(mesh, jax.P("data"))
  args = (jax.device_put(q, shard), jax.device_put(r, shard),
          jax.device_put(t, jax.NamedSharding(mesh, jax.P())),
          jax.device_put(valid, shard))
  (loss8, metrics8), grads8 = _value_and_grad(
      mesh=mesh, with_valid=with_valid)(*args)
  (loss1, metrics1), grads1 = _value_and_grad(
      with_valid=with_valid)(q, r, t, valid)
  assert len(grads8[0].sharding.device_set) == 8
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  for key in metrics1:
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-6)
  for got, want in zip(grads8, grads1):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_sharded_negatives_are_global(batch):
  q, r, t, valid = batch
  mesh = jax.make_mesh((8,), ("data",))
  shard = jax.NamedSharding(mesh, jax.P("data"))
  loss8, _ = jax.jit(lambda *a: losses.info_nce(*a, mesh=mesh))(
      jax.device_put(q, shard), jax.device_put(r, shard), t, 0.1,
      jax.device_put(valid, shard))
  per_shard = [losses.info_nce(q[i:i + 2], r[i:i + 2], t, 0.1,
                               valid[i:i + 2])[0] for i in range(0, 16, 2)]
  global_ref, _ = _np_info_nce(q, r, float(t), 0.1, valid)
  np.testing.assert_allclose(loss8, global_ref, rtol=1e-5)
  # Local negatives (2 per shard) give a much smaller loss than 16 global.
  assert float(loss8) > float(np.mean(per_shard)) + 0.5


def test_bad_inputs_fail_with_clear_messages(batch):
  q, r, t, valid = batch
  mesh = jax.make_mesh((8,), ("data",))
  with pytest.raises(ValueError, match="not divisible"):
    losses.info_nce(q[:12], r[:12], t, mesh=mesh)
  with pytest.raises(ValueError, match="q and r"):
    losses.info_nce(q, r[:8], t)
  with pytest.raises(ValueError, match="valid must be"):
    losses.info_nce(q, r, t, 0.1, valid[:8])
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.info_nce(q, r, t, 1.5)
  with pytest.raises(ValueError, match="axis_name"):
    losses.info_nce(q, r, t, mesh=mesh, axis_name="batch")
