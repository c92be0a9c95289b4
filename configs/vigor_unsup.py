r"""VIGOR, 0 % labels: CFP, CycleGAN, intra-view and cross-view cold start.

  python -m cvgl_jax.main --config=configs/vigor_unsup.py \
      --config.data.root=/data/VIGOR --config.model.pretrained=/w/convnext_base.safetensors \
      --workdir=/runs/vigor_unsup

Paper settings (METHOD.md): ConvNeXt-B + SAFA, separate towers, drop path
0.2, AdamW 1e-4 with per-epoch cosine, global batch 128.
"""

from cvgl_jax import config_lib


def get_config():
  config = config_lib.for_dataset("vigor")
  config.stages = ("cfp", "translate", "intra", "cross_fake")
  return config
