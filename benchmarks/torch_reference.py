"""The paper's two-tower model and loss in PyTorch/timm, for the benchmarks.

Shared by `encoder_step.py` and `train_step.py`: timm ConvNeXt backbones
(`forward_features`) with the authors' SAFA head (8 spatial weightings),
L2-normalised descriptors, and symmetric InfoNCE with label smoothing and a
learnable logit scale (initial 1 / 0.07), optimised by `torch.optim.AdamW`
over all parameters. Images are NCHW float32.

torch and timm are needed only here (developer machines:
`pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31`);
`available()` says whether they import.
"""

import numpy as np


def available() -> bool:
  """Whether torch and timm import."""
  try:
    import timm  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def two_tower(variant, ground_hw, satellite_hw, drop_path_rate):
  """(towers, logit_scale): two timm ConvNeXt + SAFA towers in train mode.

  Args:
    variant: timm ConvNeXt size ("atto" ... "large").
    ground_hw, satellite_hw: (H, W) of each tower's images (SAFA's weights
      depend on the feature map, H/32 x W/32).
    drop_path_rate: stochastic depth of both backbones.
  """
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class SAFA(torch.nn.Module):
    """The authors' spatial-aware aggregation."""

    def __init__(self, hw, num=8):
      super().__init__()
      self.w1 = torch.nn.Parameter(torch.randn(hw, hw // 2, num) * 0.005)
      self.b1 = torch.nn.Parameter(torch.full((1, hw // 2, num), 0.1))
      self.w2 = torch.nn.Parameter(torch.randn(hw // 2, hw, num) * 0.005)
      self.b2 = torch.nn.Parameter(torch.full((1, hw, num), 0.1))

    def forward(self, x):
      b, c = x.shape[:2]
      x = x.reshape(b, c, -1)
      mask = x.max(1)[0]
      mask = torch.einsum("bi,ijd->bjd", mask, self.w1) + self.b1
      mask = torch.einsum("bjd,jid->bid", mask, self.w2) + self.b2
      return torch.einsum("bci,bid->bcd", x, mask).reshape(b, -1)

  class Tower(torch.nn.Module):

    def __init__(self, hw):
      super().__init__()
      self.backbone = timm.create_model(
          f"convnext_{variant}", pretrained=False, num_classes=0,
          drop_path_rate=drop_path_rate)
      self.head = SAFA((hw[0] // 32) * (hw[1] // 32))

    def forward(self, x):
      return F.normalize(self.head(self.backbone.forward_features(x)), dim=-1)

  towers = torch.nn.ModuleList([Tower(ground_hw), Tower(satellite_hw)])
  logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07)))
  return towers.train(), logit_scale


def info_nce(zq, zr, logit_scale, label_smoothing):
  """Symmetric InfoNCE of [B, D] unit descriptors; row i pairs with i."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  logits = logit_scale.exp() * zq @ zr.T
  labels = torch.arange(len(zq))
  return 0.5 * (
      F.cross_entropy(logits, labels, label_smoothing=label_smoothing) +
      F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing))


def adamw(towers, logit_scale, lr=1e-4, weight_decay=0.01):
  """AdamW over every parameter, the logit scale included (the authors')."""
  import torch  # pylint: disable=g-import-not-at-top
  params = list(towers.parameters()) + [logit_scale]
  return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_step(towers, logit_scale, opt, ground, satellite, label_smoothing):
  """One forward + backward + AdamW update on NCHW float batches."""
  opt.zero_grad(set_to_none=True)
  loss = info_nce(towers[0](ground), towers[1](satellite), logit_scale,
                  label_smoothing)
  loss.backward()
  opt.step()
