"""ImageNet-pretrained ConvNeXt checkpoints -> our Flax params.

Reads the files users already have, never downloads:
- timm `.safetensors` (e.g. `model.safetensors` of `convnext_base.fb_in22k`),
- `.pth` / `.pt` / `.bin` files in timm naming or in the official
  facebookresearch/ConvNeXt naming (`downsample_layers.N`,
  `stages.N.M.dwconv`, `pwconv1`, ...); torch is imported only for these.

timm stores the block MLP (`mlp.fc1`, `mlp.fc2`) as 1x1 convolutions in
atto ... nano and as linear layers from tiny up; both load into the same
Dense layers. Stage 0 has no downsample. The classifier (`head.fc`,
`head.pre_logits`) is dropped; `head.norm` loads into the global-average-
pool head when the model has one. Every missing key, unexpected key and
wrong shape is reported in one error.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_PREFIXES = ("module.", "visual.trunk.")


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not fit the model."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into {name: float32 array} in its own naming.

  Args:
    path: a `.safetensors` file, or a torch `.pth`/`.pt`/`.bin` (a state dict,
      or a dict holding one under "model", "state_dict" or "model_ema").

  Raises:
    FileNotFoundError, ValueError (unknown suffix, not a state dict),
    ImportError (a torch file without torch installed).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Pretrained weights file {path!r} does not "
                            "exist (config.model.pretrained).")
  if path.endswith(".safetensors"):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(path, framework="numpy") as f:
      sd = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  elif path.endswith(TORCH_SUFFIXES):
    sd = _read_torch(path)
  else:
    raise ValueError(f"Cannot read weights {path!r}: expected a "
                     f".safetensors file or a torch file {TORCH_SUFFIXES}.")
  for prefix in _PREFIXES:
    if sd and all(k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items()}
  return sd


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading {path!r} needs PyTorch, which is not installed. Install "
        "it (CPU build is enough: `pip install torch`), or convert the file "
        "to .safetensors once where torch is available: "
        "`safetensors.torch.save_file(torch.load(p)['model'], 'x.safetensors')`"
    ) from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("model", "state_dict", "model_ema"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping) or not all(
      hasattr(v, "numpy") for v in obj.values()):
    raise ValueError(f"{path!r} does not hold a state dict of tensors.")
  return {k: v.detach().float().cpu().numpy() for k, v in obj.items()}


def is_official_naming(sd: Mapping[str, Any]) -> bool:
  return any(k.startswith("downsample_layers.") or
             re.match(r"stages\.\d+\.\d+\.", k) for k in sd)


def official_to_timm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames facebookresearch/ConvNeXt keys to timm's, as timm's
  `checkpoint_filter_fn` does."""
  out = {}
  for k, v in sd.items():
    k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
    k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
    k = re.sub(r"^downsample_layers\.(\d+)\.(\d+)\.",
               r"stages.\1.downsample.\2.", k)
    k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv", ".mlp.fc")
    if k.startswith("head."):
      k = "head.fc." + k[len("head."):]
    elif k.startswith("norm."):
      k = "head.norm." + k[len("norm."):]
    out[k] = v
  return out


def _timm_key(path: tuple[str, ...]) -> str:
  """Flax backbone param path -> timm state-dict key."""
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  top = path[0]
  if top == "stem_conv":
    return f"stem.0.{leaf[path[1]]}"
  if top == "stem_norm":
    return f"stem.1.{leaf[path[1]]}"
  m = re.fullmatch(r"stage(\d+)_downsample_(norm|conv)", top)
  if m:
    idx = 0 if m.group(2) == "norm" else 1
    return f"stages.{m.group(1)}.downsample.{idx}.{leaf[path[1]]}"
  m = re.fullmatch(r"stage(\d+)_block(\d+)", top)
  if m:
    prefix = f"stages.{m.group(1)}.blocks.{m.group(2)}."
    if path[1] == "gamma":
      return prefix + "gamma"
    name = {"conv_dw": "conv_dw", "norm": "norm", "fc1": "mlp.fc1",
            "fc2": "mlp.fc2"}[path[1]]
    return f"{prefix}{name}.{leaf[path[2]]}"
  raise KeyError(f"No timm name for param {'/'.join(path)}.")


def _to_flax(value: np.ndarray, target_ndim: int, leaf: str) -> np.ndarray:
  """Torch layout -> Flax layout for one array."""
  if leaf == "kernel" and value.ndim == 4 and target_ndim == 4:
    return value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
  if leaf == "kernel" and target_ndim == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]  # timm's conv-MLP stores fc as 1x1 convs.
    if value.ndim == 2:
      return value.T  # [out, in] -> [in, out]
  return value


def _to_torch(value: np.ndarray, leaf: str) -> np.ndarray:
  """Flax layout -> timm's torch layout for one array (`_to_flax`'s inverse
  for the linear-MLP variants)."""
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # [kh, kw, I, O] -> [O, I, kh, kw]
  if leaf == "kernel" and value.ndim == 2:
    return value.T  # [in, out] -> [out, in]
  return value


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes `tensors` as a `.safetensors` file: under a temporary name, then
  renamed (a crash leaves no half file), with the mode the user's umask
  gives a new file (the safetensors writer makes it 0600: unreadable to
  the group that shares a bundle or a stand-in)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  st_numpy.save_file({k: np.array(v, order="C") for k, v in tensors.items()},
                     tmp)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, path)


def save_timm(backbone: Mapping[str, Any], path: str,
              head_norm: Optional[Mapping[str, Any]] = None) -> None:
  """Writes a backbone as a timm-named `.safetensors` file.

  The file is what `load_pretrained` reads (a user's ImageNet checkpoint
  and one we train go through the same code path). Written to a temporary
  name and renamed, so a crash leaves no half file (`save_safetensors`).

  Args:
    backbone: our `ConvNeXt` param tree (one tower's "backbone").
    path: the `.safetensors` file to write.
    head_norm: optional GAP-head norm params, stored as timm's `head.norm`.
  """
  sd = {_timm_key(p): _to_torch(np.asarray(v, np.float32), p[-1])
        for p, v in _flatten(backbone).items()}
  if head_norm is not None:
    names = {"scale": "weight", "bias": "bias"}
    sd.update({f"head.norm.{names[p[-1]]}": np.asarray(v, np.float32)
               for p, v in _flatten(head_norm).items()})
  save_safetensors(sd, path)


def _flatten(tree: Mapping[str, Any], prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def describe_checkpoint(sd: Mapping[str, np.ndarray]) -> str:
  """'depths (3, 3, 9, 3), dims (96, 192, 384, 768)' of a timm-named dict."""
  depths = collections.Counter()
  dims = {}
  for k, v in sd.items():
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight$", k)
    if m:
      depths[int(m.group(1))] += 1
      dims[int(m.group(1))] = v.shape[0]
  if not depths:
    return "no ConvNeXt stages found"
  n = max(depths) + 1
  return (f"depths {tuple(depths[i] for i in range(n))}, "
          f"dims {tuple(dims.get(i) for i in range(n))}")


def convert_convnext(sd: Mapping[str, np.ndarray], backbone_shapes,
                     head_norm_shapes=None, source: str = "checkpoint"):
  """Converts a ConvNeXt state dict to Flax params of the given shapes.

  Args:
    sd: {name: array} in timm or official naming (see `read_state_dict`).
    backbone_shapes: param tree of our `ConvNeXt` (arrays or
      ShapeDtypeStructs) whose shapes the result must have.
    head_norm_shapes: the `GlobalAveragePool` norm's param tree to fill from
      `head.norm`, or None when the model's head has no such norm.
    source: the file name, for messages.

  Returns:
    (backbone params, head-norm params or None), float32 numpy arrays.

  Raises:
    CheckpointMismatchError listing every missing key, unexpected key and
    wrong shape at once.
  """
  if is_official_naming(sd):
    sd = official_to_timm(sd)
  used, missing, wrong = set(), [], []

  def fill(shapes, key_fn):
    flat = {}
    for path, target in _flatten(shapes).items():
      key = key_fn(path)
      if key not in sd:
        missing.append(f"{key} (for {'/'.join(path)}, shape "
                       f"{tuple(target.shape)})")
        continue
      used.add(key)
      value = _to_flax(np.asarray(sd[key], np.float32), len(target.shape),
                       path[-1])
      if value.shape != tuple(target.shape):
        wrong.append(f"{key}: checkpoint {tuple(sd[key].shape)}, model "
                     f"needs {tuple(target.shape)} (as {'/'.join(path)})")
        continue
      flat[path] = value
    return _unflatten(flat)

  backbone = fill(backbone_shapes, _timm_key)
  head_norm = None
  if head_norm_shapes is not None:
    head_norm = fill(head_norm_shapes, lambda p: "head.norm." + {
        "scale": "weight", "bias": "bias"}[p[-1]])
  ignored = ("head.fc.", "head.pre_logits.", "head.norm.")
  unexpected = sorted(k for k in sd if k not in used
                      and not k.startswith(ignored))
  if missing or wrong or unexpected:
    lines = [f"ConvNeXt weights in {source} do not fit the model "
             f"(checkpoint: {describe_checkpoint(sd)}):"]
    for title, items in (("missing keys", missing),
                         ("wrong shapes", wrong),
                         ("unexpected keys", unexpected)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {x}" for x in items)
    lines.append("Check config.model.variant against the checkpoint.")
    raise CheckpointMismatchError("\n".join(lines))
  return backbone, head_norm


def load_pretrained(params: Mapping[str, Any], path: str,
                    towers: Optional[tuple[str, ...]] = None) -> dict:
  """Returns `params` of a TwoTower with its backbones loaded from `path`.

  Args:
    params: the model's param tree ({"query": {"backbone", "head"},
      "reference": ..., "logit_scale"}); only shapes of the backbones (and
      of a GAP head's norm) are read.
    path: checkpoint file (see `read_state_dict`).
    towers: which towers to load (default: every tower in `params`).

  Returns:
    A new param tree; loaded leaves are float32 numpy arrays, every other
    leaf is the one given.
  """
  sd = read_state_dict(path)
  towers = towers or tuple(t for t in ("query", "reference") if t in params)
  out = dict(params)
  for tower in towers:
    if tower not in params:
      raise KeyError(f"The model has no {tower!r} tower; it has "
                     f"{sorted(k for k in params if k != 'logit_scale')}.")
    head = params[tower].get("head", {})
    head_norm_shapes = head.get("norm") if "norm" in head else None
    backbone, head_norm = convert_convnext(
        sd, params[tower]["backbone"], head_norm_shapes, source=path)
    new_tower = dict(params[tower], backbone=backbone)
    if head_norm is not None:
      new_tower["head"] = dict(head, norm=head_norm)
    out[tower] = new_tower
  tensors = len(_flatten(out[towers[0]]["backbone"]))
  logging.info("Loaded %d ConvNeXt tensors (every one of the backbone's) "
               "from %s into the %s tower(s).", tensors, path,
               " and ".join(towers))
  return out
