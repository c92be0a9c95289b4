r"""VIGOR, the paper's paradigm with 0 % labels (or a few: semi-supervised).

  python -m cvgl_jax.main --config=configs/vigor_unsup.py \
      --config.data.root=/data/VIGOR \
      --config.model.pretrained=/w/convnext_base.safetensors \
      --workdir=/runs/vigor_unsup
  python -m cvgl_jax.main --config=configs/vigor_unsup.py:10 ...   # 10 % GT

Argument: the percentage of labelled training pairs (default 0; the paper
reports 1, 5, 10, 20 and 30). Stages: CFP, CycleGAN translation, the
intra-view and cross-view cold start, then pseudo-label rounds. Paper
settings (docs/METHOD.md): ConvNeXt-B + SAFA, separate towers, drop path 0.2,
AdamW 1e-4 with per-epoch cosine, global batch 128.
"""

from cvgl_jax import config_lib


def get_config(arg="0"):
  return config_lib.paradigm("vigor", float(arg))
