"""Mixed precision and rematerialisation in the training step.

`config.model.dtype = "bfloat16"` computes the towers in bfloat16 while the
params, the gradients' update and the AdamW state stay float32;
`config.model.remat = True` recomputes each backbone block in the backward
pass (its gradients equal those without: test_models.py). Here a tiny
two-tower ConvNeXt (two stages of one block, SAFA head) takes the same
cross-view steps on one batch of learnable pairs in float32 and in
bfloat16 (on one device, augmentation off: compiling the two steps is what
these tests spend).
"""

import re

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax.data import augment
from cvgl_jax.models import convnext
from cvgl_jax.models import encoder
from cvgl_jax.train import state as state_lib
from cvgl_jax.train import steps

B, G_SIZE, S_SIZE = 8, (32, 64), (32, 32)
STEPS = 4
LR = 1e-3


def _model(dtype=jnp.float32):
  return encoder.TwoTower(variant=convnext.Variant((1, 1), (8, 16), False),
                          head="safa", dtype=dtype, drop_path_rate=0.0,
                          depthwise_impl="conv")


def _batch():
  """B places: a panorama of a random colour pattern and, as its satellite
  image, the middle of that pattern (so the pairs can be learnt)."""
  rng = np.random.default_rng(0)
  ground, satellite = [], []
  for _ in range(B):
    pattern = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
    ground.append(cv2.resize(pattern, G_SIZE[::-1],
                             interpolation=cv2.INTER_NEAREST))
    satellite.append(cv2.resize(pattern[:, 2:6], S_SIZE[::-1],
                                interpolation=cv2.INTER_NEAREST))
  return {"ground": np.stack(ground), "satellite": np.stack(satellite)}


def _train(model, num_steps, mesh):
  """(initial params, final state, [per-step metrics]) of `num_steps` steps
  on the one batch."""
  tx = state_lib.create_optimizer(LR, 0.01, steps_per_epoch=num_steps,
                                  num_epochs=1)
  state = state_lib.create_state(model, tx, ground_size=G_SIZE,
                                 satellite_size=S_SIZE, seed=0, mesh=mesh)
  start = jax.tree.map(np.asarray, state.params)
  step = steps.make_cross_step(
      model, tx, mesh, label_smoothing=0.1,
      ground_aug=augment.no_view_augmentation(),
      satellite_aug=augment.no_view_augmentation(),
      paired_aug=augment.PairedConfig(flip_p=0.0, rotate_p=0.0))
  batch = parallel.to_global(_batch(), mesh)
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return start, state, history


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def runs(mesh):
  return {"float32": _train(_model(), STEPS, mesh),
          "bfloat16": _train(_model(jnp.bfloat16), STEPS, mesh)}


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_bf16_keeps_params_and_optimizer_state_in_float32(runs):
  _, state, _ = runs["bfloat16"]
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats), sorted(
      {str(x.dtype) for x in floats})


def test_bf16_computes_activations_in_bfloat16(runs):
  start = runs["bfloat16"][0]
  model = _model(jnp.bfloat16)
  batch = _batch()
  g = augment.normalize(batch["ground"], jnp.bfloat16)
  s = augment.normalize(batch["satellite"], jnp.bfloat16)
  # Shapes and dtypes of every module's output, traced without running.
  (zq, zr, _), variables = jax.eval_shape(
      lambda p: model.apply({"params": p}, g, s, capture_intermediates=True,
                            mutable=["intermediates"]), start)
  acts = {jax.tree_util.keystr(path): x.dtype for path, x in
          jax.tree_util.tree_leaves_with_path(variables["intermediates"])}
  # Inside the blocks (the memory of large batches): bfloat16.
  branches = {k: v for k, v in acts.items()
              if re.search(r"_block\d+'\]\['conv_dw'\]\['__call__'\]", k)}
  assert len(branches) == 4, sorted(acts)  # 2 towers x 2 stages x 1 block.
  assert set(branches.values()) == {jnp.dtype(jnp.bfloat16)}, branches
  # What flows from block to block, the residual stream: float32, as
  # PyTorch AMP keeps it (a bfloat16 sum rounds each block's contribution).
  blocks = {k: v for k, v in acts.items()
            if re.search(r"\['stage\d+_block\d+'\]\['__call__'\]\[0\]$", k)}
  assert len(blocks) == 4, sorted(acts)
  assert set(blocks.values()) == {jnp.dtype(jnp.float32)}, blocks
  # The unit embeddings (and so the loss) come back in float32.
  assert zq.dtype == zr.dtype == jnp.float32


def test_bf16_training_tracks_float32(runs):
  start32, state32, hist32 = runs["float32"]
  start16, state16, hist16 = runs["bfloat16"]
  # Same initial params: the dtype changes the computation only.
  np.testing.assert_array_equal(_flat(start16), _flat(start32))
  loss32 = np.array([m["loss"] for m in hist32])
  loss16 = np.array([m["loss"] for m in hist16])
  # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4 %): the loss
  # (4.6 at the start) differs by a few hundredths (measured: at most
  # 0.03), a small fraction of the 2.2 that the 4 steps take off it.
  np.testing.assert_allclose(loss16, loss32, atol=0.1)
  assert loss32[-1] < loss32[0] - 1.0 and loss16[-1] < loss16[0] - 1.0
  # The parameters move the same way: the updates of the two runs point in
  # nearly the same direction (1 = identical; unrelated updates ~0).
  d32 = _flat(jax.device_get(state32.params)) - _flat(start32)
  d16 = _flat(jax.device_get(state16.params)) - _flat(start16)
  cosine = d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16))
  assert cosine > 0.9, cosine


def test_config_switches_reach_the_model():
  config = config_lib.for_dataset("cvusa")
  config.model.dtype, config.model.remat = "bfloat16", True
  model = encoder.from_config(config.model)
  assert model.dtype == jnp.bfloat16 and model.remat
  # That remat leaves values and gradients unchanged is tested where it
  # acts, on the backbone's blocks (test_models.py::
  # test_remat_gives_same_values_and_gradients).
