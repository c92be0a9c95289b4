"""Writes the PyTorch/timm ConvNeXt reference fixtures in tests/golden/.

The Flax ConvNeXt and its timm/official checkpoint converter are tested
against these files; the tests only read them (numpy + safetensors), so CI
needs neither torch nor timm. This script is NOT run in CI.

How to run (a throwaway venv, never a project dependency; timm imports
torchvision, and the only torchvision wheel here that loads is the one that
pairs with torch 2.14.1):

  python3 -m venv /work/torchvenv
  /work/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
  /work/torchvenv/bin/pip install timm==1.0.31 safetensors numpy
  cd /work/main && /work/torchvenv/bin/python \
      tests/golden/make_convnext_golden.py [--out_dir tests/golden]

It writes, into --out_dir (default: this file's folder):
  convnext_conv_mlp.safetensors            timm names, conv_mlp=True model.
  convnext_linear_mlp.safetensors          timm names, conv_mlp=False model.
  convnext_{conv,linear}_mlp_official.pth  facebookresearch/ConvNeXt names,
                                           torch.save({'model': state_dict}).
  convnext_{conv,linear}_mlp_official.safetensors  the same dict.
  convnext_golden_io.npz                   input batch and timm outputs.
  convnext_golden_config.json              model configs and seeds.
  convnext_param_counts.json               parameter counts of the full-size
                                           timm variants (meta device).

Every output is byte-identical from run to run on one machine (fixed seeds,
one torch thread, zip entries with a fixed date). Float outputs may differ
in the last bits on another CPU; the fixtures are committed, not rebuilt.
"""

import argparse
import io
import json
import os
import re
import zipfile

import numpy as np
import safetensors.torch
import timm
import timm.models.convnext
import torch
import torchvision

SEED = 20260125
INPUT_SEED = 7
# (height, width): non-square so that a swapped H/W axis cannot pass.
INPUT_HW = (64, 96)
BATCH = 2

# Small models: both MLP flavours of timm's ConvNeXt, stem_type='patch'.
MODEL_CONFIGS = {
    'conv_mlp': dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48),
                     conv_mlp=True, num_classes=10, drop_path_rate=0.1),
    'linear_mlp': dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48),
                       conv_mlp=False, num_classes=10, drop_path_rate=0.1),
}

FULL_VARIANTS = ('convnext_atto', 'convnext_femto', 'convnext_pico',
                 'convnext_nano', 'convnext_tiny', 'convnext_small',
                 'convnext_base', 'convnext_large')

# A fixed zip date so that the .npz bytes do not depend on the clock.
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def randomise_(model, gen):
  """Re-draws every parameter of a timm ConvNeXt in place.

  timm's init (layer scale 1e-6, norms 1/0, zero biases, weights with std
  0.02) would let a wrong block, a missing norm affine or a dropped bias hide
  in the residual stream. Here:
    * conv / linear weights ~ N(0, 1 / fan_in), so activations stay O(1);
    * conv / linear biases ~ 0.3 * N(0, 1);
    * norm weights ~ 1 + 0.3 * N(0, 1), norm biases ~ 0.3 * N(0, 1);
    * layer-scale gamma ~ U[0.5, 1.5] with a random sign.

  Args:
    model: a timm.models.convnext.ConvNeXt.
    gen: torch.Generator (CPU) that fixes the draws.
  """
  with torch.no_grad():
    for name, p in model.named_parameters():
      shape = p.shape
      if name.endswith('gamma'):
        mag = 0.5 + torch.rand(shape, generator=gen)
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        p.copy_(mag * sign)
      elif name.endswith('.weight') and p.ndim == 1:  # A norm's scale.
        p.copy_(1.0 + 0.3 * torch.randn(shape, generator=gen))
      elif name.endswith('.bias'):
        p.copy_(0.3 * torch.randn(shape, generator=gen))
      elif name.endswith('.weight'):
        # [out, in/groups, kh, kw] or [out, in]: fan_in is all but dim 0.
        fan_in = int(np.prod(shape[1:]))
        p.copy_(torch.randn(shape, generator=gen) / np.sqrt(fan_in))
      else:
        raise ValueError(f'unexpected parameter {name!r} {tuple(shape)}')


def timm_to_official(state_dict):
  """Inverts timm's convnext.checkpoint_filter_fn.

  Maps timm keys back to facebookresearch/ConvNeXt keys: the official Block
  keeps pwconv1/pwconv2 as nn.Linear ([out, in] weights) and all LayerNorms
  as 1-D weight/bias, so 1x1-conv fc weights [out, in, 1, 1] are squeezed.

  Args:
    state_dict: timm ConvNeXt state_dict (stem_type='patch', no GRN).

  Returns:
    A new dict with official names; tensors are contiguous copies.
  """
  out = {}
  for k, v in state_dict.items():
    o = k
    o = o.replace('stem.', 'downsample_layers.0.')
    o = re.sub(r'^stages\.(\d+)\.downsample\.(\d+)\.',
               r'downsample_layers.\1.\2.', o)
    o = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', o)
    o = o.replace('.conv_dw.', '.dwconv.')
    o = o.replace('.mlp.fc1.', '.pwconv1.').replace('.mlp.fc2.', '.pwconv2.')
    if o.startswith('head.norm.'):
      o = 'norm.' + o[len('head.norm.'):]
    elif o.startswith('head.fc.'):
      o = 'head.' + o[len('head.fc.'):]
    if '.pwconv' in o and v.ndim == 4:
      if v.shape[2:] != (1, 1):
        raise ValueError(f'{k}: expected a 1x1 conv, got {tuple(v.shape)}')
      v = v.reshape(v.shape[:2])
    if o in out:
      raise ValueError(f'two timm keys map to official key {o!r}')
    out[o] = v.clone().contiguous()
  return out


def check_inverse(official, timm_sd, model):
  """Asserts that timm's own filter maps `official` back to `timm_sd`."""
  for wrapped in (official, {'model': official}):
    back = timm.models.convnext.checkpoint_filter_fn(dict(wrapped), model)
    if set(back) != set(timm_sd):
      raise AssertionError(
          f'key mismatch: {sorted(set(back) ^ set(timm_sd))}')
    for k, v in timm_sd.items():
      if back[k].shape != v.shape or back[k].dtype != v.dtype:
        raise AssertionError(f'{k}: {back[k].shape} vs {v.shape}')
      if not torch.equal(back[k], v):
        raise AssertionError(f'{k}: values differ')


def _zip_write(zf, name, data):
  info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
  info.compress_type = zipfile.ZIP_DEFLATED
  info.external_attr = 0o644 << 16
  zf.writestr(info, data)


def save_npz(path, arrays):
  """Like np.savez_compressed, with fixed zip dates (byte-reproducible)."""
  with zipfile.ZipFile(path, 'w') as zf:
    for key in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]),
                                allow_pickle=False)
      _zip_write(zf, key + '.npy', buf.getvalue())


def build(cfg, gen):
  model = timm.models.convnext.ConvNeXt(**cfg)
  randomise_(model, gen)
  return model.eval()


def write_json(path, obj):
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


def param_counts():
  """Parameter counts of the full-size timm variants, built on meta."""
  counts = {}
  for name in FULL_VARIANTS:
    with torch.device('meta'):
      m = timm.create_model(name, pretrained=False, num_classes=0)
    named = dict(m.named_parameters())
    total = sum(p.numel() for p in named.values())
    backbone = sum(p.numel() for k, p in named.items()
                   if not k.startswith('head.'))
    head_norm = sum(p.numel() for k, p in named.items()
                    if k.startswith('head.norm.'))
    if total != backbone + head_norm:
      raise AssertionError(f'{name}: head has more than head.norm')
    counts[name] = dict(
        total=total, backbone=backbone, head_norm=head_norm,
        depths=list(m.stages[i].blocks.__len__() for i in range(4)),
        dims=[m.stages[i].blocks[0].conv_dw.out_channels for i in range(4)],
        conv_mlp=isinstance(m.stages[0].blocks[0].mlp.fc1, torch.nn.Conv2d))
  return counts


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out_dir',
                      default=os.path.dirname(os.path.abspath(__file__)))
  out_dir = parser.parse_args().out_dir
  os.makedirs(out_dir, exist_ok=True)
  torch.set_num_threads(1)  # Same reduction order on every run.
  gen = torch.Generator().manual_seed(SEED)

  x = torch.randn((BATCH, 3) + INPUT_HW,
                  generator=torch.Generator().manual_seed(INPUT_SEED))
  io_arrays = {'input_nchw': x.numpy()}
  configs = {}
  for key, cfg in MODEL_CONFIGS.items():
    torch.manual_seed(SEED)  # timm's own init, overwritten by randomise_.
    model = build(cfg, gen)
    sd = {k: v.detach().clone().contiguous()
          for k, v in model.state_dict().items()}
    if any(v.dtype != torch.float32 for v in sd.values()):
      raise AssertionError('expected float32 parameters only')
    # One metadata key only: safetensors writes a multi-key metadata dict
    # in random (hash) order, which would make the bytes differ per run.
    meta = {'convnext_golden': json.dumps(
        dict(naming='timm', config=cfg), sort_keys=True)}
    safetensors.torch.save_file(
        sd, os.path.join(out_dir, f'convnext_{key}.safetensors'), meta)

    official = timm_to_official(sd)
    check_inverse(official, sd, model)
    # torch.save writes zip entries with fixed dates: reproducible as is.
    torch.save({'model': official},
               os.path.join(out_dir, f'convnext_{key}_official.pth'))
    safetensors.torch.save_file(
        official,
        os.path.join(out_dir, f'convnext_{key}_official.safetensors'),
        {'convnext_golden': json.dumps(
            dict(naming='facebookresearch', config=cfg), sort_keys=True)})

    with torch.no_grad():
      feats = model.forward_features(x)
      pre = model.forward_head(feats, pre_logits=True)
      logits = model.forward_head(feats)
    io_arrays[f'{key}/features_nchw'] = feats.numpy()
    io_arrays[f'{key}/pre_logits'] = pre.numpy()
    io_arrays[f'{key}/logits'] = logits.numpy()
    configs[key] = dict(
        cfg, stem_type='patch', ls_init_value='randomised', act='gelu_exact',
        norm_eps=1e-6, num_params=sum(v.numel() for v in sd.values()),
        features_shape=list(feats.shape), pre_logits_shape=list(pre.shape))

  save_npz(os.path.join(out_dir, 'convnext_golden_io.npz'), io_arrays)
  write_json(os.path.join(out_dir, 'convnext_golden_config.json'), dict(
      models=configs, seed=SEED, input_seed=INPUT_SEED,
      input_shape_nchw=list(x.shape),
      input='standard normal, NCHW float32 (not an image; no mean/std)',
      npz_keys=sorted(io_arrays),
      versions=dict(torch=torch.__version__, timm=timm.__version__,
                    torchvision=torchvision.__version__,
                    numpy=np.__version__)))
  write_json(os.path.join(out_dir, 'convnext_param_counts.json'),
             param_counts())
  print('wrote fixtures to', out_dir)


if __name__ == '__main__':
  main()
