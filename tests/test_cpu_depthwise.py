"""Tests of the compiled C++ depthwise convolution (`cvgl_jax.cpu.depthwise`)."""

import os
import pathlib
import stat
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvgl_jax import config_lib
from cvgl_jax.models import convnext
from cvgl_jax.cpu import depthwise


def _grouped(x, kernel):
  k = kernel.shape[0]
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], (1, 1), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


def _inputs(seed, shape, k):
  kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kx, shape), jax.random.normal(kk, (k, k, shape[3])),
          jax.random.normal(kg, shape))


def test_builds_here():
  # CI and the dev machine have a C++ compiler: the kernel must build, or
  # every other test here would pass on the fallback without running it.
  assert depthwise.available()


# Widths below, at and above the register tile (4 pixels) plus the padding,
# so the edge and interior paths of both C++ loops run; H = 1 leaves most
# kernel rows outside the image.
@pytest.mark.parametrize("k,shape", [
    (7, (3, 5, 9, 16)), (7, (2, 1, 3, 8)), (3, (2, 6, 4, 24)),
    (5, (1, 7, 13, 8)), (1, (2, 3, 5, 8)), (7, (2, 12, 17, 40))])
def test_values_and_gradients_equal_grouped_conv(k, shape):
  x, kernel, dy = _inputs(k + shape[2], shape, k)
  y, vjp = jax.vjp(depthwise.depthwise_native, x, kernel)
  y_ref, vjp_ref = jax.vjp(_grouped, x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_under_jit_and_remat_and_deterministic():
  x, kernel, dy = _inputs(0, (4, 8, 16, 16), 7)
  loss = lambda f: lambda x, kr: jnp.sum(jax.checkpoint(f)(x, kr) * dy)
  grad = jax.jit(jax.grad(loss(depthwise.depthwise_native), (0, 1)))
  got = grad(x, kernel)
  for g, w in zip(got, jax.grad(loss(_grouped), (0, 1))(x, kernel)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
  # Every output element is summed by one thread in a fixed order.
  again = grad(x, kernel)
  for a, b in zip(got, again):
    np.testing.assert_array_equal(a, b)


def test_batch_sharded_runs_per_shard_without_gathering():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  assert mesh.size == 8
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x, kernel, dy = _inputs(1, (16, 6, 10, 16), 7)

  def fwd_bwd(x, kernel, dy):
    y, vjp = jax.vjp(depthwise.depthwise_native, x, kernel)
    return (y,) + vjp(dy)

  step = jax.jit(fwd_bwd)
  xs, dys = jax.device_put(x, shard), jax.device_put(dy, shard)
  y, dx, dk = step(xs, kernel, dys)
  for got, want in zip((y, dx, dk), fwd_bwd(x, kernel, dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert y.sharding.spec[0] == "data" and dx.sharding.spec[0] == "data"
  hlo = step.lower(xs, kernel, dys).compile().as_text()
  # Each device convolves its own 2 examples: the only collective is the
  # all-reduce that sums the per-example kernel gradients.
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  assert "all-reduce" in hlo
  assert "f32[2,6,10,16]" in hlo


def test_rejects_what_the_kernel_does_not_handle():
  x = jnp.zeros((2, 5, 5, 6))
  with pytest.raises(ValueError, match=r"multiple of 8.*\(2, 5, 5, 6\)"):
    depthwise.depthwise_native(x, jnp.zeros((7, 7, 6)))
  with pytest.raises(ValueError, match="float32"):
    depthwise.depthwise_native(jnp.zeros((2, 5, 5, 8), jnp.bfloat16),
                                   jnp.zeros((7, 7, 8), jnp.bfloat16))
  with pytest.raises(ValueError, match="k odd"):
    depthwise.depthwise_native(jnp.zeros((1, 4, 4, 8)),
                                   jnp.zeros((4, 4, 8)))


def test_layer_auto_uses_native_where_it_applies():
  def impl_used(channels, dtype=jnp.float32):
    x = jnp.ones((1, 6, 6, channels))
    layer = convnext.DepthwiseConv(channels, 7, dtype=dtype,
                                   conv=depthwise.for_impl("auto"))
    params = layer.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(lambda p: layer.apply(p, x))(params))
    return "custom_partitioning" in jaxpr
  assert impl_used(16)
  assert not impl_used(6)  # C % 8 != 0: the shifted sum
  assert not impl_used(16, jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 16))
  ref = nn.Conv(16, (7, 7), padding=3, feature_group_count=16)
  params = ref.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)
  layer = convnext.DepthwiseConv(16, 7, conv=depthwise.for_impl("native"))
  np.testing.assert_allclose(layer.apply(params, x), ref.apply(params, x),
                             rtol=1e-5, atol=1e-5)


def test_library_is_cached_and_keyed_on_source(tmp_path, monkeypatch):
  monkeypatch.setenv("CVGL_JAX_CACHE_DIR", str(tmp_path))
  path = depthwise.build()
  assert path.parent == tmp_path and path.exists()
  mtime = path.stat().st_mtime_ns
  assert depthwise.build() == path
  assert path.stat().st_mtime_ns == mtime  # not rebuilt
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp left
  edited = tmp_path / "edited.cc"
  edited.write_text(depthwise.SOURCE.read_text() + "\n// edit\n")
  monkeypatch.setattr(depthwise, "SOURCE", edited)
  assert depthwise.library_name(depthwise.compiler()) != path.name


def test_read_only_cache_falls_back_to_the_temporary_folder(tmp_path,
                                                            monkeypatch):
  # A regular file where the cache folder should be: mkdir fails for root
  # too (chmod would not stop root).
  (tmp_path / "home").write_text("not a folder")
  monkeypatch.delenv("CVGL_JAX_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  path = depthwise.build()
  assert path.parent.parent == tmp_path / "tmp" and path.exists()
  # An explicit folder is the only one tried, and a failure names it.
  monkeypatch.setenv("CVGL_JAX_CACHE_DIR", str(tmp_path / "home" / "x"))
  with pytest.raises(depthwise.NativeBuildError,
                     match=r"CVGL_JAX_CACHE_DIR.*home/x"):
    depthwise.build()


def test_failed_build_names_the_compiler_and_its_output(tmp_path,
                                                        monkeypatch):
  fake = tmp_path / "fake-cxx"
  fake.write_text("#!/bin/sh\n"
                  "if [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                  "echo 'fatal: no such header' >&2; exit 1\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("CVGL_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", str(fake))
  with pytest.raises(depthwise.NativeBuildError,
                     match=r"(?s)fake-cxx.*fatal: no such header"):
    depthwise.build()
  assert not list((tmp_path / "cache").iterdir())  # no half-written file
  monkeypatch.setenv("CXX", str(tmp_path / "missing-cxx"))
  with pytest.raises(depthwise.NativeBuildError, match="missing-cxx"):
    depthwise.build()


def test_without_the_kernel_auto_falls_back_to_shifts(tmp_path):
  # A fresh process: `available()` is decided once per process.
  code = ("import jax, jax.numpy as jnp\n"
          "from cvgl_jax.cpu import depthwise\n"
          "from cvgl_jax.models import convnext\n"
          "x = jnp.ones((1, 6, 6, 16))\n"
          "layer = convnext.DepthwiseConv(16, 7, conv=depthwise.for_impl("
          "'auto'))\n"
          "p = layer.init(jax.random.key(0), x)\n"
          "print(depthwise.available(),\n"
          "      'custom_partitioning' in str(jax.make_jaxpr(\n"
          "          lambda p: layer.apply(p, x))(p)))\n")
  root = pathlib.Path(__file__).parents[1]
  for env, want in (({"CVGL_JAX_NATIVE": "0"}, "False False"),
                    ({"CXX": str(tmp_path / "missing-cxx"),
                      "CVGL_JAX_CACHE_DIR": str(tmp_path)}, "False False")):
    run = subprocess.run([sys.executable, "-c", code], cwd=root,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[-2] == want
    if "CXX" in env:
      assert "missing-cxx" in run.stderr  # the one warning says why


def test_config_validation_of_native():
  config = config_lib.default_config()
  config.model.depthwise_impl = "native"
  config.model.dtype = "bfloat16"
  with pytest.raises(ValueError, match="runs in float32 only"):
    config_lib.validate(config)
  config.model.depthwise_impl = "cuda"
  with pytest.raises(ValueError, match="auto, conv, native, shifts"):
    config_lib.validate(config)
