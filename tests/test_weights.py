"""The ConvNeXt converter against timm's own outputs (tests/golden/)."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from cvgl_jax.models import convnext
from cvgl_jax.models import encoder
from cvgl_jax.models import heads
from cvgl_jax.models import weights

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _golden(name):
  return os.path.join(GOLDEN, name)


@pytest.fixture(scope="module")
def golden_io():
  with np.load(_golden("convnext_golden_io.npz")) as f:
    return dict(f)


def _model_config(key):
  with open(_golden("convnext_golden_config.json")) as f:
    cfg = json.load(f)["models"][key]
  return convnext.Variant(tuple(cfg["depths"]), tuple(cfg["dims"]),
                          cfg["conv_mlp"])


def _shapes(module, x):
  return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def _relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("key,file", [
    ("conv_mlp", "convnext_conv_mlp.safetensors"),
    ("linear_mlp", "convnext_linear_mlp.safetensors"),
    ("conv_mlp", "convnext_conv_mlp_official.safetensors"),
    ("linear_mlp", "convnext_linear_mlp_official.safetensors"),
])
def test_converted_backbone_reproduces_timm(golden_io, key, file):
  variant = _model_config(key)
  x = golden_io["input_nchw"].transpose(0, 2, 3, 1)
  backbone = convnext.ConvNeXt(variant.depths, variant.dims,
                               drop_path_rate=0.1)
  pool = heads.GlobalAveragePool(convnext.LN_EPS)
  sd = weights.read_state_dict(_golden(file))
  ref_features = golden_io[f"{key}/features_nchw"].transpose(0, 2, 3, 1)
  params, head_norm = weights.convert_convnext(
      sd, _shapes(backbone, x), _shapes(pool, ref_features)["norm"])

  @jax.jit
  def forward(params, head_norm, x):
    features = backbone.apply({"params": params}, x)
    return features, pool.apply({"params": {"norm": head_norm}}, features)

  features, pre_logits = forward(params, head_norm, x)
  assert _relative_error(features, ref_features) < 1e-4
  np.testing.assert_allclose(features, ref_features, rtol=1e-4,
                             atol=1e-4 * np.abs(ref_features).max())
  assert _relative_error(pre_logits, golden_io[f"{key}/pre_logits"]) < 1e-4


def test_torch_checkpoint_in_official_naming(golden_io):
  pytest.importorskip("torch", reason="reading a .pth needs PyTorch, which "
                      "cvgl_jax does not depend on: pip install torch to run "
                      "this test")
  a = weights.read_state_dict(_golden("convnext_conv_mlp_official.pth"))
  b = weights.read_state_dict(_golden("convnext_conv_mlp_official.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_torch_file_without_torch_says_how_to_fix(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"needs PyTorch.*\.safetensors"):
    weights.read_state_dict(_golden("convnext_conv_mlp_official.pth"))


def test_official_names_map_to_timm_names():
  official = weights.read_state_dict(
      _golden("convnext_linear_mlp_official.safetensors"))
  timm = weights.read_state_dict(_golden("convnext_linear_mlp.safetensors"))
  assert weights.is_official_naming(official)
  assert not weights.is_official_naming(timm)
  converted = weights.official_to_timm(official)
  assert converted.keys() == timm.keys()


def test_mismatches_are_listed_all_at_once(tmp_path):
  sd = weights.read_state_dict(_golden("convnext_linear_mlp.safetensors"))
  del sd["stages.2.blocks.1.gamma"]
  sd["stages.1.blocks.0.norm.weight"] = np.ones(7, np.float32)
  sd["stages.3.blocks.5.conv_dw.weight"] = np.ones((48, 1, 7, 7), np.float32)
  path = str(tmp_path / "broken.safetensors")
  save_file(sd, path)
  variant = _model_config("linear_mlp")
  model = encoder.TwoTower(variant=variant, head="safa")
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)),
                          jnp.zeros((1, 64, 64, 3)))["params"]
  with pytest.raises(weights.CheckpointMismatchError) as e:
    weights.load_pretrained(params, path)
  msg = str(e.value)
  assert "broken.safetensors" in msg
  assert "1 missing keys" in msg and "stages.2.blocks.1.gamma" in msg
  assert "1 wrong shapes" in msg
  assert "stages.1.blocks.0.norm.weight: checkpoint (7,)" in msg
  assert "1 unexpected keys" in msg and "stages.3.blocks.5.conv_dw" in msg
  assert "head.fc" not in msg  # The classifier is dropped silently.


def test_wrong_variant_names_the_checkpoint_shape():
  sd = weights.read_state_dict(_golden("convnext_conv_mlp.safetensors"))
  model = convnext.convnext("atto")
  with pytest.raises(weights.CheckpointMismatchError,
                     match=r"depths \(1, 1, 2, 1\), dims \(16, 24, 32, 48\)"):
    weights.convert_convnext(sd, _shapes(model, jnp.zeros((1, 32, 32, 3))))


def test_load_pretrained_fills_both_towers_and_keeps_heads(tmp_path):
  variant = _model_config("conv_mlp")
  model = encoder.TwoTower(variant=variant, head="gap")
  g, s = jnp.zeros((1, 32, 64, 3)), jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), g, s)["params"]
  loaded = weights.load_pretrained(params, _golden(
      "convnext_conv_mlp.safetensors"))
  sd = weights.read_state_dict(_golden("convnext_conv_mlp.safetensors"))
  for tower in ("query", "reference"):
    np.testing.assert_array_equal(
        loaded[tower]["backbone"]["stage0_block0"]["gamma"],
        sd["stages.0.blocks.0.gamma"])
    np.testing.assert_array_equal(loaded[tower]["head"]["norm"]["scale"],
                                  sd["head.norm.weight"])
  assert loaded["logit_scale"] is params["logit_scale"]
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape),
               loaded, params)


def test_missing_file_and_unknown_suffix(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    weights.read_state_dict(str(tmp_path / "nope.safetensors"))
  other = tmp_path / "w.npz"
  shutil.copy(_golden("convnext_golden_io.npz"), other)
  with pytest.raises(ValueError, match=r"w\.npz.*\.safetensors"):
    weights.read_state_dict(str(other))


def test_parameter_counts_equal_timm():
  with open(_golden("convnext_param_counts.json")) as f:
    counts = json.load(f)
  for name in convnext.VARIANTS:
    entry = counts[f"convnext_{name}"]
    assert convnext.num_params(name) == entry["backbone"], name
    norm = jax.eval_shape(
        heads.GlobalAveragePool(convnext.LN_EPS).init, jax.random.key(0),
        jnp.zeros((1, 1, 1, convnext.VARIANTS[name].dims[-1])))
    head = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(norm))
    assert head == entry["head_norm"], name


def test_save_timm_writes_what_timm_wrote(tmp_path):
  # The golden file is timm's own (linear MLP variant); loading it and
  # writing it back must give timm's names, layouts and values.
  variant = _model_config("linear_mlp")
  model = encoder.TwoTower(variant=variant, head="gap", share_weights=True)
  g = jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), g, g)["params"]
  golden = _golden("convnext_linear_mlp.safetensors")
  loaded = weights.load_pretrained(params, golden)
  out = str(tmp_path / "standin.safetensors")
  weights.save_timm(loaded["query"]["backbone"], out,
                    loaded["query"]["head"]["norm"])
  written = weights.read_state_dict(out)
  timm = weights.read_state_dict(golden)
  expected = {k: v for k, v in timm.items()
              if not k.startswith(("head.fc.", "head.pre_logits."))}
  assert sorted(written) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(written[k], v, err_msg=k)
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
