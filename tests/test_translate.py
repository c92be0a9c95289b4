"""Tests of the CFP CycleGAN (cfp/translate.py) and its stage.

Every training here shares one tiny config (8 filters, 2 residual blocks,
32 x 32 crops), so the train step compiles once per test process.
"""

import json
import os
import re

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax.cfp import project
from cvgl_jax.cfp import translate as tr
from cvgl_jax.cfp import translate_stage as ts
from cvgl_jax.cpu import upsample
from cvgl_jax.data import cvusa
from cvgl_jax.data import image_io
from cvgl_jax.data.synthetic import config as synthetic_config
from cvgl_jax.data.synthetic import layouts

# A 160 m synthetic world with 64 px satellite tiles (as test_synthetic).
SMALL_WORLD = synthetic_config.SyntheticConfig(
    map_cells=640, block_m=(30.0, 50.0), sat_px=64, tile_m=32.0,
    pano_width=128, cvusa_width=256, min_separation_m=3.0)


def tiny_config(**overrides):
  config = config_lib.translate_defaults()
  config.ngf = 8
  config.ndf = 8
  config.n_blocks = 2
  config.n_layers_d = 2
  config.load_size = 36
  config.crop_size = 32
  config.pool_size = 8
  config.n_epochs = 1
  config.n_epochs_decay = 1
  config.log_every_steps = 4
  config.num_threads = 2
  config.update(overrides)
  return config


def _write_rgb(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  return path


def _noise_images(folder, n, seed, size=40):
  rng = np.random.default_rng(seed)
  return [_write_rgb(os.path.join(folder, f"{i:03d}.png"),
                     rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
          for i in range(n)]


def _colour_distance(paths, reference_paths, size=32, bins=8):
  """Total variation between two sets' joint RGB colour histograms.

  Pixels of every image (resized to `size`) fall in `bins`^3 colour cells;
  the distance is half the L1 distance of the two normalised histograms, in
  [0, 1]. Unlike per-channel statistics it separates colourful noise from
  the few colours a satellite tile has.
  """
  def histogram(ps):
    x = np.stack([image_io.resize(image_io.read_rgb(p), (size, size)) for p in ps])
    x = x.reshape(-1, 3).astype(np.int64) // (256 // bins)
    h = np.bincount((x[:, 0] * bins + x[:, 1]) * bins + x[:, 2],
                    minlength=bins ** 3)
    return h / h.sum()
  return 0.5 * np.abs(histogram(paths) - histogram(reference_paths)).sum()


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_default_networks_are_the_official_ones():
  # pytorch-CycleGAN prints 11.378 M parameters for resnet_9blocks and
  # 2.765 M for the basic (70x70) PatchGAN; the exact counts follow from
  # the layer list (c7s1-64 ... c7s1-3; C64-C128-C256-C512-C1, all biased).
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  key = jax.random.PRNGKey(0)
  g, d = tr.ResnetGenerator(), tr.PatchDiscriminator()
  g_params = jax.eval_shape(g.init, key, x)
  d_params = jax.eval_shape(d.init, key, x)
  assert _count(g_params) == 11_378_179
  assert _count(d_params) == 2_764_737
  assert jax.eval_shape(g.apply, g_params, x).shape == (1, 256, 256, 3)
  # 256 -> 128 -> 64 -> 32 -> 31 -> 30: a 30 x 30 grid of 70 x 70 patches.
  assert jax.eval_shape(d.apply, d_params, x).shape == (1, 30, 30, 1)


def test_tiny_networks_shapes_range_and_init():
  config = tiny_config()
  model = tr.get_model(config)
  state = model.init(jax.random.PRNGKey(0), steps_per_epoch=3)
  images = np.random.default_rng(0).integers(0, 256, (2, 36, 44, 3),
                                              dtype=np.uint8)
  fake = jax.jit(model.translate)(state.params_g["g_ab"], images)
  assert fake.shape == (2, 36, 44, 3)
  assert float(jnp.abs(fake).max()) <= 1.0
  scores = jax.jit(model.discriminator.apply)(
      {"params": state.params_d["d_a"]}, tr.to_float(images))
  assert scores.shape == (2, 7, 9, 1)  # 36x44 -> 18x22 -> 9x11 -> 8x10 -> 7x9
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(state.params_g)
             if "kernel" in jax.tree_util.keystr(p)]
  biases = [x for p, x in jax.tree_util.tree_leaves_with_path(state.params_g)
            if "bias" in jax.tree_util.keystr(p)]
  all_k = np.concatenate([np.ravel(k) for k in kernels])
  assert abs(all_k.std() - 0.02) < 0.002 and abs(all_k.mean()) < 0.002
  assert all(not np.any(b) for b in biases)
  # Instance norm carries no parameters (affine=False).
  assert not any("InstanceNorm" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(state))


def test_image_pool_follows_the_official_rules():
  query = jax.jit(tr.pool_query)
  images = lambda ids: jnp.asarray(ids, jnp.float32).reshape(-1, 1, 1, 1)
  ids = lambda x: [int(v) for v in np.asarray(x).ravel()]

  empty = tr.ImagePool.create(0, (1, 1, 1))
  _, out = tr.pool_query(empty, images([1, 2]), jax.random.PRNGKey(0))
  assert ids(out) == [1, 2]

  pool = tr.ImagePool.create(4, (1, 1, 1))
  pool, out = query(pool, images([1, 2, 3]), jax.random.PRNGKey(1))
  assert ids(out) == [1, 2, 3] and int(pool.count) == 3
  assert ids(pool.images)[:3] == [1, 2, 3]

  pool, out = tr.pool_query(pool, images([4]), jax.random.PRNGKey(2))
  assert ids(out) == [4] and ids(pool.images) == [1, 2, 3, 4]

  # Once full, each new image is returned as is or swapped with a stored
  # one: nothing is lost or duplicated between pool and output.
  swaps, slots_hit = 0, set()
  for step in range(60):
    new = list(range(10 + 10 * step, 20 + 10 * step))
    before = ids(pool.images)
    pool, out = query(pool, images(new), jax.random.PRNGKey(100 + step))
    after, out = ids(pool.images), ids(out)
    assert sorted(before + new) == sorted(after + out)
    assert int(pool.count) == 4
    swaps += sum(o != n for o, n in zip(out, new))
    slots_hit |= {i for i in range(4) if before[i] != after[i]}
  # 600 draws with p = 1/2: 6 sigma is +-73.
  assert abs(swaps - 300) < 73
  assert slots_hit == {0, 1, 2, 3}


def test_learning_rate_is_constant_then_linear():
  config = tiny_config(n_epochs=2, n_epochs_decay=3, lr=1.0)
  steps = jnp.arange(25)
  lr = np.asarray(tr.learning_rate(config, steps, jnp.int32(5)))
  expected = np.repeat([1.0, 1.0, 0.75, 0.5, 0.25], 5)
  np.testing.assert_allclose(lr, expected, rtol=1e-6)


def test_config_and_inputs_are_checked_before_training(tmp_path):
  good = _noise_images(str(tmp_path / "a"), 3, 0)
  work = str(tmp_path / "work")
  with pytest.raises(ValueError, match="crop_size"):
    ts.train_translation(good, good, work, tiny_config(crop_size=30))
  config = tiny_config()
  config.unknown_knob = 1
  with pytest.raises(ValueError, match="unknown_knob"):
    ts.train_translation(good, good, work, config)
  missing = str(tmp_path / "nowhere" / "x.png")
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nowhere"))):
    ts.train_translation(good, [missing], work, tiny_config())
  with pytest.raises(ValueError, match="No satellite images"):
    ts.train_translation(good, [], work, tiny_config())
  corrupt = str(tmp_path / "a" / "corrupt.png")
  with open(corrupt, "wb") as f:
    f.write(b"\x89PNG not really")
  with pytest.raises(ValueError, match="corrupt.png"):
    ts.train_translation(good + [corrupt], good, work, tiny_config())
  assert not os.path.exists(os.path.join(work, "checkpoints"))


def test_divergence_stops_with_the_losses_named():
  ts.check_finite({"g_total": 1.0, "d_a": 0.5}, 7)
  with pytest.raises(FloatingPointError, match=r"step 7.*d_a.*nan"):
    ts.check_finite({"g_total": 1.0, "d_a": float("nan")}, 7)
  with pytest.raises(FloatingPointError, match="g_total"):
    ts.check_finite({"g_total": float("inf")}, 3)


def test_resume_continues_exactly(tmp_path):
  a = _noise_images(str(tmp_path / "a"), 6, 1)
  b = _noise_images(str(tmp_path / "b"), 5, 2)
  config = tiny_config(ckpt_every_steps=4)  # 6 steps an epoch, 12 in all
  whole = ts.train_translation(a, b, str(tmp_path / "whole"), config,
                               progress=False)
  assert int(whole.step) == 12

  parts = str(tmp_path / "parts")
  first = ts.train_translation(a, b, parts, config, max_steps=5,
                               progress=False)
  assert int(first.step) == 5
  resumed = ts.train_translation(a, b, parts, config, progress=False)
  assert int(resumed.step) == 12
  for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  logged = [json.loads(line)["step"]
            for line in open(os.path.join(parts, "metrics.jsonl"))]
  assert logged == [1, 4, 5, 6, 8, 12]  # no step was taken twice

  # A finished run resumes to its end and trains no further.
  again = ts.train_translation(a, b, parts, config, progress=False)
  assert int(again.step) == 12
  np.testing.assert_array_equal(
      np.asarray(jax.tree.leaves(again.params_g)[0]),
      np.asarray(jax.tree.leaves(whole.params_g)[0]))
  # Different data cannot silently continue this run.
  with pytest.raises(ValueError, match="steps per epoch"):
    ts.train_translation(a[:3], b[:3], parts, config, progress=False)
  with pytest.raises(ValueError, match="does not fit this config"):
    ts.train_translation(a, b, parts, tiny_config(ngf=4), progress=False)


def _cancelled_by_instance_norm(key: str, discriminator: bool,
                                n_layers_d: int) -> bool:
  """Whether the param at `key` (a keystr) is the bias of a convolution
  that instance norm follows, which subtracts it: its true gradient is 0,
  and Adam scales the float noise in its place to steps of +-lr. Not so:
  the generator's last conv (Conv_3), the discriminator's first and last."""
  if not key.endswith("['bias']"):
    return False
  if discriminator:
    return not ("['Conv_0']" in key or f"['Conv_{n_layers_d + 1}']" in key)
  return "['Conv_3']" not in key


def test_devices_for_batch_takes_the_most_that_divide_it():
  n = jax.device_count()  # 8 simulated CPU devices (conftest)
  assert n == 8
  assert parallel.devices_for_batch(1) == jax.devices()[:1]
  assert parallel.devices_for_batch(8) == jax.devices()
  assert parallel.devices_for_batch(16) == jax.devices()
  assert len(parallel.devices_for_batch(12)) == 6
  with pytest.raises(ValueError, match="translate.batch_size: the global "
                     "batch 0"):
    parallel.devices_for_batch(0, "translate.batch_size")


def test_a_batch_split_over_devices_trains_as_on_one(tmp_path, monkeypatch):
  """Batch 8 over 8 devices against the same batch on one device: the same
  losses at every step and the same parameters, to float rounding (the
  cross-device sums add in another order). A split that normalised, pooled
  or averaged per device would differ by orders of magnitude more."""
  a = _noise_images(str(tmp_path / "a"), 16, 5)
  b = _noise_images(str(tmp_path / "b"), 12, 6)
  config = tiny_config(batch_size=8, log_every_steps=1, pool_size=4, ngf=4,
                       ndf=4, n_blocks=1, n_layers_d=1)
  split = ts.train_translation(a, b, str(tmp_path / "split"), config,
                               progress=False)
  assert len(split.params_g["g_ab"]["Conv_0"]["kernel"].sharding.device_set
             ) == 8
  monkeypatch.setattr(parallel, "devices_for_batch",
                      lambda batch, name: jax.devices()[:1])
  one = ts.train_translation(a, b, str(tmp_path / "one"), config,
                             progress=False)
  assert int(split.step) == int(one.step) == 4
  losses = lambda d: [json.loads(line) for line in open(
      os.path.join(d, "metrics.jsonl"))]
  for x, y in zip(losses(str(tmp_path / "split")),
                  losses(str(tmp_path / "one")), strict=True):
    for key in ("g_total", "g_gan_ab", "cycle_a", "d_a", "d_b"):
      np.testing.assert_allclose(x[key], y[key], rtol=2e-5, err_msg=key)
  # Parameters agree to a small fraction of the 4 steps' movement (lr 2e-4
  # each) -- except the biases that instance norm cancels.
  params = lambda s: {"g": s.params_g, "d": s.params_d}
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params(split)),
                          jax.tree.leaves(params(one))):
    name = jax.tree_util.keystr(path)
    if _cancelled_by_instance_norm(name, name.startswith("['d']"),
                                   config.n_layers_d):
      continue
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4,
                               err_msg=name)


def test_translate_split_is_atomic_and_skips_done(tmp_path):
  config = tiny_config()
  state = tr.get_model(config).init(jax.random.PRNGKey(3), 1)
  bevs = _noise_images(str(tmp_path / "g2a"), 5, 4, size=48)
  outs = [str(tmp_path / "g2a_sat" / f"{i}.png") for i in range(5)]
  params = state.params_g["g_ab"]
  assert ts.translate_split(bevs, outs, params, config, progress=False) == 5
  assert sorted(os.listdir(tmp_path / "g2a_sat")) == [f"{i}.png"
                                                      for i in range(5)]
  expected = np.asarray(tr.get_model(config).jit_translate(
      params, np.stack([image_io.resize(image_io.read_rgb(p), (32, 32))
                for p in bevs])))
  for out, want in zip(outs, expected):
    np.testing.assert_array_equal(image_io.read_rgb(out), want)

  mtimes = [os.stat(p).st_mtime_ns for p in outs]
  assert ts.translate_split(bevs, outs, params, config, progress=False) == 0
  os.remove(outs[2])
  assert ts.translate_split(bevs, outs, params, config, progress=False) == 1
  assert [os.stat(p).st_mtime_ns for i, p in enumerate(outs)
          if i != 2] == mtimes[:2] + mtimes[3:]
  os.remove(outs[0])
  os.remove(bevs[0])
  with pytest.raises(ValueError, match="000.png"):
    ts.translate_split(bevs, outs, params, config, progress=False)


def _world_train_split(tmp_path, num_pairs, seed):
  """A small synthetic CVUSA world under tmp_path: its training split."""
  root = str(tmp_path / "cvusa")
  layouts.write_dataset("cvusa", root, SMALL_WORLD, num_pairs, seed=seed,
                        progress=False)
  return cvusa.read(root, "train")


def test_stage_moves_bevs_toward_the_satellite_domain(tmp_path):
  """Synthetic world -> BEVs (cfp) -> CycleGAN -> fakes closer to tiles."""
  index = _world_train_split(tmp_path, 60, seed=5)
  with pytest.raises(ValueError, match="run the cfp stage first"):
    ts.translate(index, str(tmp_path / "work"), tiny_config())
  project.project_split(index, 40, 175.0, placement="cvusa", progress=False)

  n = len(index.ground_ids)
  # lr 1e-3 instead of 2e-4: a tiny net must get somewhere in 3 epochs.
  config = tiny_config(n_epochs=2, n_epochs_decay=1, lr=1e-3,
                       log_every_steps=n // 2)
  result = ts.translate(index, str(tmp_path / "work"), config,
                        progress=False)
  assert result == {"steps": 3 * n, "written": n, "total": n}
  stage = tmp_path / "work" / "translate"

  # The cycle and identity losses fall (the GAN terms are a game).
  log = [json.loads(line) for line in open(stage / "metrics.jsonl")]
  recon = lambda m: m["cycle_a"] + m["cycle_b"] + m["idt_a"] + m["idt_b"]
  assert log[0]["step"] == 1
  assert np.mean([recon(m) for m in log[-2:]]) < 0.6 * recon(log[0])
  assert all(np.isfinite(m["d_a"]) and np.isfinite(m["d_b"]) for m in log)

  # The effect: the fakes' colours are much closer to the real tiles' than
  # the BEVs' are, and than an untrained generator's output.
  bevs = index.derived_paths("g2a")
  untrained = [str(tmp_path / "untrained" / f"{i}.png") for i in range(n)]
  state0 = tr.get_model(config).init(jax.random.PRNGKey(config.seed), 1)
  ts.translate_split(bevs, untrained, state0.params_g["g_ab"], config,
                     progress=False)
  tiles = index.satellite_paths
  d_bev = _colour_distance(bevs, tiles)
  d_fake = _colour_distance(index.derived_paths("g2a_sat"), tiles)
  d_untrained = _colour_distance(untrained, tiles)
  print(f"colour distance to tiles: BEV {d_bev:.3f}, untrained "
        f"{d_untrained:.3f}, translated {d_fake:.3f}")
  assert d_fake < 0.8 * min(d_bev, d_untrained)


def test_without_bev_the_panoramas_are_translated(tmp_path):
  """The "w/o BEV" ablation: domain A is the panoramas; no g2a/ needed."""
  index = _world_train_split(tmp_path, 12, seed=6)
  with pytest.raises(ValueError, match="source='bev'"):
    ts.translate(index, str(tmp_path / "w0"), tiny_config(source="bev"))
  result = ts.translate(index, str(tmp_path / "work"),
                        tiny_config(source="panorama"), progress=False)
  n = len(index.ground_ids)
  assert result == {"steps": 2 * n, "written": n, "total": n}
  assert not os.path.exists(os.path.join(index.root, "g2a"))
  fakes = [image_io.read_rgb(p) for p in index.derived_paths("g2a_sat")]
  assert all(f.shape == (32, 32, 3) for f in fakes)


def test_subpixel_upsampling_is_the_transposed_convolution():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 4)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  params = {"params": {"kernel": kernel, "bias": bias}}
  plain = tr.Upsample2x(4)
  subpixel = tr.Upsample2x(4, conv=upsample.conv_transpose_subpixel)
  want = plain.apply(params, x)
  assert want.shape == (2, 10, 14, 4)
  np.testing.assert_allclose(subpixel.apply(params, x), want, atol=2e-5)
  # What the official layer computes, tap by tap: output row 2i + 1 sums
  # kernel rows 0 and 2 at input rows i and i + 1 (the last row only one).
  out = jnp.einsum("nhwc,cd->nhwd", x, kernel[1, 1]) + bias
  np.testing.assert_allclose(want[:, ::2, ::2], out, atol=2e-5)
  loss = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))),
                            argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(loss(subpixel)),
                  jax.tree.leaves(loss(plain))):
    np.testing.assert_allclose(a, b, atol=5e-5)
  assert upsample.for_impl("auto") is upsample.conv_transpose_subpixel
  assert upsample.for_impl("transpose") is None


def test_two_steps_equal_the_official_pytorch_cyclegan():
  # tests/golden/make_cyclegan_golden.py: the official networks, losses,
  # update order and Adam in PyTorch (benchmarks/torch_cyclegan.py), two
  # steps of batch 2 from non-zero biases, history pool off. With the CPU's
  # sub-pixel upsampling; the test above equates it with XLA's transposed
  # convolution (the other backends'), values and gradients.
  golden = np.load(os.path.join(os.path.dirname(__file__), "golden",
                                "cyclegan_golden.npz"))
  c = json.loads(str(golden["config"]))
  config = tiny_config(ngf=c["ngf"], ndf=c["ndf"], n_blocks=c["n_blocks"],
                       n_layers_d=c["n_layers_d"], crop_size=c["size"],
                       load_size=c["size"], pool_size=c["pool_size"],
                       upsample_impl="subpixel")
  model = tr.get_model(config)
  official = lambda when: {k.split("/", 1)[1]: golden[k] for k in golden
                           if k.startswith(when + "/")}
  params_g, params_d = tr.from_official(official("init"), c["n_blocks"],
                                        c["n_layers_d"])
  state = model.init(jax.random.PRNGKey(0), steps_per_epoch=100)
  assert (jax.tree.structure(params_g) ==
          jax.tree.structure(state.params_g))
  state = state.replace(params_g=params_g, params_d=params_d,
                        opt_g=model.tx.init(params_g),
                        opt_d=model.tx.init(params_d))
  step = jax.jit(model.train_step)
  # Official names -> ours: G_A is g_ab, D_A judges B (our d_b).
  ours = {"D_A": "d_b", "G_A": "g_gan_ab", "cycle_A": "cycle_a",
          "idt_A": "idt_b", "D_B": "d_a", "G_B": "g_gan_ba",
          "cycle_B": "cycle_b", "idt_B": "idt_a"}
  for i in range(c["steps"]):
    state, metrics = step(state, {"a": golden[f"a_{i}"],
                                  "b": golden[f"b_{i}"]},
                          jax.random.PRNGKey(i))
    got = [float(metrics[ours[name]]) for name in
           ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B",
            "idt_B")]
    np.testing.assert_allclose(got, golden[f"losses_{i}"], rtol=2e-5)
  want_g, want_d = tr.from_official(official("final"), c["n_blocks"],
                                    c["n_layers_d"])
  init_g, _ = tr.from_official(official("init"), c["n_blocks"],
                               c["n_layers_d"])
  # Biases that instance norm cancels move by +-lr steps of noise whose
  # signs differ between frameworks; every other parameter must agree.
  skipped = total = 0
  for got, want, is_d in ((state.params_g, want_g, False),
                          (state.params_d, want_d, True)):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree.leaves(want)):
      key = jax.tree_util.keystr(path)
      total += x.size
      if _cancelled_by_instance_norm(key, is_d, c["n_layers_d"]):
        assert np.abs(x - y).max() <= 4 * config.lr * 1.01, key
        skipped += x.size
        continue
      # Two Adam steps of lr 2e-4 move each weight by up to 4e-4; the
      # two frameworks agree to float rounding of that.
      np.testing.assert_allclose(x, y, atol=2e-6, rtol=0, err_msg=key)
  assert 0 < skipped < 0.01 * total
  # And the steps did move them (a test of a no-op would pass above).
  moved = max(float(jnp.abs(x - y).max()) for x, y in
              zip(jax.tree.leaves(want_g), jax.tree.leaves(init_g)))
  assert moved > 1e-4
