"""The gradient cache (`cvgl_jax.train.grad_cache`): the chunked gradient is
the plain step's, on 8 simulated devices with negatives across all of
them, and its second pass replays the first pass's randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax import parallel
from cvgl_jax.data import augment
from cvgl_jax.models import convnext
from cvgl_jax.models import encoder
from cvgl_jax.train import grad_cache
from cvgl_jax.train import losses
from cvgl_jax.train import state as state_lib
from cvgl_jax.train import steps

G_SIZE, S_SIZE = (32, 64), (32, 32)
BATCH, CHUNK = 32, 8  # 4 chunks, each one row per simulated device.
NO_AUG = augment.no_view_augmentation()


def _model(**kwargs):
  return encoder.TwoTower(variant=convnext.Variant((1, 1), (8, 16), False),
                          head="gap", **kwargs)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"ground": rng.integers(0, 256, (BATCH, *G_SIZE, 3), np.uint8),
          "satellite": rng.integers(0, 256, (BATCH, *S_SIZE, 3), np.uint8),
          "labeled": rng.random(BATCH) < 0.6}


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.parametrize("kind", ["partial", "intra"])
def test_cached_step_equals_the_plain_step(kind):
  """Same loss, metrics, AdamW moments (0.1 x grad after one step) and
  params as the one-pass step, for the partial-label step (random paired
  flips and rotations on) and the intra-view step (four tower passes)."""
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  model, mesh = _model(drop_path_rate=0.0), parallel.make_mesh()
  tx = state_lib.create_optimizer(1e-3, 0.01, 2, 4)
  if kind == "partial":
    make = lambda chunk: steps.make_partial_step(
        model, tx, mesh, label_smoothing=0.1, ground_aug=NO_AUG,
        satellite_aug=NO_AUG,
        paired_aug=augment.PairedConfig(flip_p=0.5, rotate_p=0.5),
        grad_cache_chunk=chunk)
  else:
    make = lambda chunk: steps.make_intra_step(
        model, tx, mesh, ground_aug=NO_AUG, satellite_aug=NO_AUG,
        satellite_aug2=NO_AUG, grad_cache_chunk=chunk)
  batch = parallel.to_global(_batch(), mesh)
  results = []
  for chunk in (0, CHUNK):
    state = state_lib.create_state(model, tx, ground_size=G_SIZE,
                                   satellite_size=S_SIZE, seed=0, mesh=mesh)
    new, metrics = make(chunk)(state, batch)
    results.append((_host(new.params), _host(new.opt_state.inner_state[0].mu),
                    _host(metrics)))
  (params0, mu0, m0), (params1, mu1, m1) = results
  assert sorted(m0) == sorted(m1)
  for k in m0:
    np.testing.assert_allclose(m1[k], m0[k], rtol=2e-5, atol=1e-7,
                               err_msg=k)
  assert m0["grad_norm"] > 1.0 and m0["skipped"] == 0
  for a, b in zip(jax.tree.leaves(mu0), jax.tree.leaves(mu1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())
  for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(params1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_second_pass_replays_the_first_passes_masks():
  """With drop path on (and remat), the cached gradient is autodiff's
  through the same chunked forward: chunk c keeps its key fold_in(key, c)
  in both passes. Another key gives another gradient, so a replay with
  other masks would fail this."""
  model = _model(drop_path_rate=0.5, remat=True)
  batch = _batch(1)
  views = (augment.normalize(batch["ground"][:16]),
           augment.normalize(batch["satellite"][:16]))
  valid = jnp.asarray(batch["labeled"][:16])
  params = model.init(jax.random.PRNGKey(0), views[0][:1],
                      views[1][:1])["params"]
  chunk, num_chunks = 4, 4

  def embed(p, x, key):
    zq, zr, _ = model.apply({"params": p}, *x, train=True,
                            rngs={"dropout": key})
    return zq, zr

  def loss(p, embeddings):
    return losses.info_nce(*embeddings, p["logit_scale"], 0.1, valid)

  def autodiff(key):
    def total(p):
      parts = [embed(p, tuple(v[c::num_chunks] for v in views),
                     jax.random.fold_in(key, c)) for c in range(num_chunks)]
      # Row r of the batch is row r // C of chunk r % C.
      zq, zr = (jnp.stack([part[i] for part in parts], 1).reshape(16, -1)
                for i in range(2))
      return loss(p, (zq, zr))
    return jax.grad(total, has_aux=True)(params)

  key = jax.random.PRNGKey(7)
  cached, metrics = jax.jit(lambda p: grad_cache.gradients(
      embed, loss, p, views, key, chunk=chunk))(params)
  expected, expected_metrics = jax.jit(autodiff)(key)
  other, _ = jax.jit(autodiff)(jax.random.PRNGKey(8))
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"],
                             rtol=1e-5)
  flat = lambda tree: np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(tree)])
  cached, expected, other = flat(cached), flat(expected), flat(other)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(cached, expected, atol=1e-4 * scale)
  assert np.abs(other - expected).max() > 0.05 * scale


def test_chunk_problems_name_the_key_and_a_fix():
  assert grad_cache.chunk_problem(0, 12, 8) == ""
  assert grad_cache.chunk_problem(16, 128, 8) == ""
  assert "must divide the global batch 128" in grad_cache.chunk_problem(
      48, 128, 8)
  assert "multiple of the 8 devices" in grad_cache.chunk_problem(4, 128, 8)
  with pytest.raises(ValueError, match="multiple of the mesh's 8 devices"):
    steps.make_cross_step(_model(), state_lib.create_optimizer(1e-3, 0.0, 1, 1),
                          parallel.make_mesh(), label_smoothing=0.1,
                          grad_cache_chunk=4)
