"""Tests of the ConvNeXt backbone, the heads and the two-tower encoder."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax.cpu import depthwise
from cvgl_jax.models import convnext
from cvgl_jax.models import encoder
from cvgl_jax.models import heads

TINY = convnext.Variant((1, 1, 2, 1), (8, 16, 24, 32), conv_mlp=False)
# On CPU "auto" is the native C++ kernel (tests/test_cpu_depthwise.py), which
# compiles like XLA's grouped conv and ~2x faster than the shifted sum.
DW = "auto"
DW_FN = depthwise.for_impl(DW)  # what encoder.Tower hands ConvNeXt


def _images(key, n, h, w):
  return jax.random.normal(jax.random.key(key), (n, h, w, 3), jnp.float32)


def _random_params(module, *inputs, seed=0):
  """Params of `module`'s structure: norm scales 1, everything else 0, plus
  N(0, 0.2) noise everywhere (layer scale at 1e-6 would hide every block).
  Drawn on the host from `jax.eval_shape`, which compiles nothing; an init
  compiles the PRNG for every parameter (~15 s per test for a tiny
  ConvNeXt on this CPU)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    start = float(path[-1].key == "scale")
    return jnp.asarray(start + 0.2 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(module, params, *inputs, rngs=None, **static):
  """`module.apply` as one jitted program, compiled once per module and
  static arguments: eager, each operation compiles its own (~40 ms each
  here)."""
  return _jitted_apply(module, tuple(sorted(static.items())))(
      params, inputs, rngs)


@functools.lru_cache(maxsize=None)
def _jitted_apply(module, static):
  return jax.jit(lambda params, inputs, rngs: module.apply(
      params, *inputs, rngs=rngs, **dict(static)))


def test_backbone_output_shape_and_stride():
  model = convnext.ConvNeXt(TINY.depths, TINY.dims, depthwise=DW_FN)
  x = _images(0, 2, 64, 96)
  params = _random_params(model, x)
  assert _apply(model, params, x).shape == (2, 2, 3, 32)


def test_stage0_has_no_downsample_and_names_match_timm_structure():
  model = convnext.ConvNeXt(TINY.depths, TINY.dims, depthwise=DW_FN)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  assert "stage0_downsample_conv" not in shapes
  assert shapes["stage1_downsample_conv"]["kernel"].shape == (2, 2, 8, 16)
  block = shapes["stage2_block1"]
  assert block["conv_dw"]["kernel"].shape == (7, 7, 1, 24)
  assert block["fc1"]["kernel"].shape == (24, 96)
  assert block["gamma"].shape == (24,)


def test_gelu_is_exact_erf():
  x = jnp.linspace(-4.0, 4.0, 101)
  exact = 0.5 * x * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))
  np.testing.assert_allclose(convnext.gelu(x), exact, atol=1e-6)
  assert np.abs(convnext.gelu(x) - jax.nn.gelu(x)).max() > 1e-4


def test_stochastic_depth_only_in_training():
  model = convnext.ConvNeXt(TINY.depths, TINY.dims, drop_path_rate=0.5,
                            depthwise=DW_FN)
  x = _images(1, 4, 32, 32)
  params = _random_params(model, x)
  no_drop = convnext.ConvNeXt(TINY.depths, TINY.dims, depthwise=DW_FN)
  ref = _apply(no_drop, params, x)
  for seed in (1, 2):
    out = _apply(model, params, x, train=False,
                      rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(out, ref)
  train_a = _apply(model, params, x, train=True,
                        rngs={"dropout": jax.random.key(1)})
  train_b = _apply(model, params, x, train=True,
                        rngs={"dropout": jax.random.key(2)})
  assert float(jnp.abs(train_a - ref).max()) > 1e-3
  assert float(jnp.abs(train_a - train_b).max()) > 1e-3


def test_drop_path_drops_whole_examples_and_keeps_expectation():
  layer = convnext.DropPath(0.25)
  x = jnp.ones((4000, 3, 3, 2))
  y = _apply(layer, {}, x, deterministic=False,
                  rngs={"dropout": jax.random.key(0)})
  per_example = np.asarray(y).reshape(4000, -1)
  assert np.all((per_example == 0).all(1) | (per_example == 1 / 0.75).all(1))
  assert abs(per_example.mean() - 1.0) < 0.05


def test_remat_gives_same_values_and_gradients():
  x = _images(2, 2, 32, 32)
  plain = convnext.ConvNeXt(TINY.depths, TINY.dims, depthwise=DW_FN)
  remat = convnext.ConvNeXt(TINY.depths, TINY.dims, remat=True,
                           depthwise=DW_FN)
  params = _random_params(plain, x)

  def loss(model, p):
    return jnp.sum(_apply(model, p, x, train=True) ** 2)

  np.testing.assert_allclose(_apply(plain, params, x), _apply(remat, params, x),
                             rtol=1e-6, atol=1e-6)
  g1 = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  g2 = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5), g1, g2)


def test_bf16_forward_tracks_f32_with_f32_params():
  x = _images(3, 2, 64, 64)
  model32 = encoder.Tower(TINY, head="safa", depthwise_impl=DW)
  model16 = encoder.Tower(TINY, head="safa", dtype=jnp.bfloat16,
                          depthwise_impl=DW)
  params = _random_params(model32, x, seed=3)
  params16 = jax.eval_shape(model16.init, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  z32 = _apply(model32, params, x)
  z16 = _apply(model16, params, x)
  assert z16.dtype == jnp.float32
  cosine = np.asarray(jnp.sum(z32 * z16, axis=-1))
  assert np.all(cosine > 0.99), cosine
  assert float(jnp.abs(z32 - z16).max()) > 0  # bf16 really ran.


def test_safa_shape_and_definition():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  head = heads.SAFA(num_heads=8)
  params = _random_params(head, x)
  out = _apply(head, params, x)
  assert out.shape == (2, 8 * 5)
  p = jax.tree.map(np.asarray, params["params"])
  feats = np.asarray(x).reshape(2, 12, 5)
  s = feats.max(-1)
  w = np.einsum("bi,ijd->bjd", s, p["w1"]) + p["b1"]
  w = np.einsum("bjd,jid->bid", w, p["w2"]) + p["b2"]
  ref = np.einsum("bic,bid->bcd", feats, w).reshape(2, -1)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_safa_rejects_other_image_size_naming_both():
  model = encoder.Tower(TINY, head="safa", depthwise_impl=DW)
  params = _random_params(model, jnp.zeros((1, 128, 128, 3)))
  with pytest.raises(ValueError, match=r"16 positions.*128x128.*got 3x3 = "
                     r"9 positions from 96x96 images"):
    _apply(model, params, jnp.zeros((1, 96, 96, 3)))


def test_gap_head_is_mean_then_layernorm():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 6))
  head = heads.GlobalAveragePool(convnext.LN_EPS)
  params = head.init(jax.random.key(1), x)  # No PRNG: scale 1, bias 0.
  m = np.asarray(x).mean((1, 2))
  ref = (m - m.mean(-1, keepdims=True)) / np.sqrt(m.var(-1, keepdims=True)
                                                  + 1e-6)
  np.testing.assert_allclose(_apply(head, params, x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("share", [False, True])
def test_two_tower_embeddings_weights_and_logit_scale(share):
  model = encoder.TwoTower(variant=TINY, head="gap", share_weights=share,
                           depthwise_impl=DW)
  g, s = _images(0, 3, 32, 64), _images(1, 3, 32, 32)
  params = _random_params(model, g, s)["params"]
  assert ("reference" in params) is (not share)
  # Only the scalar is initialised (the towers' init would compile the PRNG).
  scale = model.init(jax.random.key(0), method=lambda m: m.logit_scale)
  np.testing.assert_allclose(scale["params"]["logit_scale"], np.log(1 / 0.07),
                             rtol=1e-6)
  zq, zr, t = _apply(model, {"params": params}, g, s)
  assert zq.shape == zr.shape == (3, 32)
  np.testing.assert_allclose(jnp.linalg.norm(zq, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(zr, axis=-1), 1.0, rtol=1e-5)
  # Shared weights: the same image gives the same embedding in both towers.
  zq2, zr2, _ = _apply(model, {"params": params}, s, s)
  assert np.allclose(zq2, zr2, atol=1e-6) is share
  assert t.shape == ()


def test_from_config_builds_custom_and_rejects_bad_values():
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(
      variant="custom", depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], head="gap",
      dtype="bfloat16"))
  model = encoder.from_config(cfg)
  assert model.variant.depths == (1, 1, 1, 1) and model.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="dtype"):
    encoder.from_config(ml_collections.ConfigDict(dict(variant="tiny",
                                                       dtype="float16")))
  with pytest.raises(ValueError, match="Unknown ConvNeXt variant 'huge'"):
    encoder.from_config(ml_collections.ConfigDict(dict(variant="huge")))


def test_a_key_the_config_lacks_takes_config_libs_default():
  # One source of defaults: what from_config does not get is TwoTower's
  # default, which must be config_lib's (drop path once differed).
  import ml_collections  # pylint: disable=g-import-not-at-top
  from cvgl_jax import config_lib  # pylint: disable=g-import-not-at-top
  defaults = config_lib.default_config().model
  model = encoder.from_config(ml_collections.ConfigDict(dict(variant="base")))
  for key in ("variant", "head", "share_weights", "num_safa_heads",
              "drop_path_rate", "remat", "depthwise_impl", "dtype"):
    want = jnp.dtype(defaults[key]) if key == "dtype" else defaults[key]
    assert getattr(model, key) == want, key


def test_two_models_of_one_config_compare_equal():
  # embed.embed_fns caches per model: the depthwise function the encoder
  # hands ConvNeXt (cpu.depthwise.for_impl) must not make two builds of one
  # config differ, or every export and report would compile again.
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(variant="custom", depths=[1, 1],
                                       dims=[8, 16], depthwise_impl="auto"))
  a, b = encoder.from_config(cfg), encoder.from_config(cfg)
  assert a == b and hash(a) == hash(b)
  x = jnp.zeros((1, 32, 32, 3))
  tower = lambda m: m.bind(m.init(jax.random.key(0), x, x)).query.backbone
  assert tower(a).depthwise is tower(b).depthwise


def test_depthwise_implementations_agree_with_grouped_conv():
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 6))
  ref = nn.Conv(6, (7, 7), padding=3, feature_group_count=6)
  params = _random_params(ref, x)
  expected = _apply(ref, params, x)
  for impl in ("conv", "shifts"):
    layer = convnext.DepthwiseConv(6, 7, conv=depthwise.for_impl(impl))
    assert jax.tree.map(jnp.shape, jax.eval_shape(
        layer.init, jax.random.key(1), x)) == (
        jax.tree.map(jnp.shape, params))
    np.testing.assert_allclose(_apply(layer, params, x), expected, rtol=1e-5,
                               atol=1e-5)
    square = lambda m: jax.jit(jax.grad(
        lambda p: jnp.sum(_apply(m, p, x) ** 2)))
    grad, ref_grad = square(layer)(params), square(ref)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-4),
                 grad, ref_grad)
  with pytest.raises(ValueError, match="'fft'"):
    depthwise.for_impl("fft")


@pytest.mark.parametrize("k", [3, 7])
def test_depthwise_shifts_gradients_equal_grouped_conv(k):
  # The hand-written backward (flipped-kernel input gradient, per-example
  # kernel-gradient scan) against autodiff of XLA's grouped convolution.
  kx, kk, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (3, 5, 9, 4))
  kernel = jax.random.normal(kk, (k, k, 4))
  dy = jax.random.normal(kg, (3, 5, 9, 4))

  def grouped(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel[:, :, None, :], (1, 1), [(k // 2, k // 2)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)

  y, vjp = jax.vjp(depthwise.depthwise_shifts, x, kernel)
  y_ref, vjp_ref = jax.vjp(grouped, x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  # Under jit and remat (as ConvNeXt(remat=True) runs it) as well.
  loss = lambda f: lambda x, kr: jnp.sum(jax.checkpoint(f)(x, kr) * dy)
  got = jax.jit(jax.grad(loss(depthwise.depthwise_shifts), (0, 1)))(x, kernel)
  for g, w in zip(got, jax.jit(jax.grad(loss(grouped), (0, 1)))(x, kernel)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_depthwise_shifts_bfloat16_gradients_accumulate_in_float32():
  # The kernel gradient sums B*H*W products per tap; summed in bfloat16
  # (8 bits of mantissa) it would drift far from the float32 result.
  kx, kk, kg = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(kx, (4, 16, 32, 8))
  kernel = jax.random.normal(kk, (7, 7, 8))
  dy = jax.random.normal(kg, (4, 16, 32, 8))
  lo = [a.astype(jnp.bfloat16) for a in (x, kernel, dy)]
  _, vjp16 = jax.vjp(depthwise.depthwise_shifts, lo[0], lo[1])
  dx16, dk16 = vjp16(lo[2])
  assert dx16.dtype == dk16.dtype == jnp.bfloat16
  # The reference sees the same rounded inputs.
  _, vjp_ref = jax.vjp(depthwise.depthwise_shifts,
                       *[a.astype(jnp.float32) for a in lo[:2]])
  dk_ref = vjp_ref(lo[2].astype(jnp.float32))[1]
  np.testing.assert_allclose(dk16.astype(jnp.float32), dk_ref, rtol=1e-2,
                             atol=1e-2 * float(jnp.abs(dk_ref).max()))


@pytest.mark.parametrize("patch", [2, 4])
def test_patch_conv_equals_strided_conv_with_gradients(patch):
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 5))
  ref = nn.Conv(7, (patch, patch), strides=patch, padding="VALID")
  params = _random_params(ref, x)
  layer = convnext.PatchConv(7, patch)
  assert jax.tree.map(jnp.shape, jax.eval_shape(
      layer.init, jax.random.key(1), x)) == (
      jax.tree.map(jnp.shape, params))
  np.testing.assert_allclose(_apply(layer, params, x), _apply(ref, params, x),
                             rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  got = jax.jit(jax.grad(loss(layer), (0, 1)))(params, x)
  want = jax.jit(jax.grad(loss(ref), (0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), got, want)
  with pytest.raises(ValueError, match="9x12 is not a multiple"):
    _apply(layer, params, jnp.zeros((1, 9, 12, 5)))


def test_layer_norm_equals_flax_with_gradients():
  # Off-centre input, as the one-pass variance must survive a mean >> std.
  x = 3.0 + jax.random.normal(jax.random.key(0), (2, 3, 5, 16))
  ref = nn.LayerNorm(epsilon=convnext.LN_EPS)
  params = _random_params(ref, x)
  layer = convnext.LayerNorm()
  np.testing.assert_allclose(_apply(layer, params, x), _apply(ref, params, x),
                             rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(3.0 * m.apply(p, x)))
  got = jax.jit(jax.grad(loss(layer), (0, 1)))(params, x)
  want = jax.jit(jax.grad(loss(ref), (0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4), got, want)


def test_block_with_folded_affine_equals_timm_order():
  # Block folds the norm's scale/bias into fc1 and gamma into fc2; the
  # reference applies them in timm's order with flax layers.
  dim = 8
  x = jax.random.normal(jax.random.key(0), (2, 6, 7, dim))
  block = convnext.Block(dim, depthwise=DW_FN)
  params = _random_params(block, x)["params"]

  def reference(p, x):
    y = nn.Conv(dim, (7, 7), padding=3, feature_group_count=dim).apply(
        {"params": p["conv_dw"]}, x)
    y = nn.LayerNorm(epsilon=convnext.LN_EPS).apply({"params": p["norm"]}, y)
    y = nn.Dense(4 * dim).apply({"params": p["fc1"]}, y)
    y = nn.Dense(dim).apply({"params": p["fc2"]}, convnext.gelu(y))
    return x + y * p["gamma"]

  def ours(p, x):
    return _apply(block, {"params": p}, x)

  np.testing.assert_allclose(ours(params, x), reference(params, x),
                             rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  got = jax.jit(jax.grad(loss(ours), (0, 1)))(params, x)
  want = jax.jit(jax.grad(loss(reference), (0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4), got, want)
