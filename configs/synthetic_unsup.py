r"""The demo: the whole paradigm at 0 % labels on a synthetic world, on a CPU.

  python -m cvgl_jax.main --config=configs/synthetic_unsup.py --workdir=/tmp/demo

Generates a small synthetic CVUSA-layout world under the workdir (unless
present), then runs every stage: `pretrain` (the stand-in for ImageNet
weights, trained on a disjoint source world without pairs; cached in
~/.cache/cvgl_jax/pretrain, so made once), CFP (BEV projection), the
CycleGAN translation to satellite style, the intra-view and cross-view
cold start of a small ConvNeXt, and the pseudo-label rounds (epochs 6-39
of 40, as the paper), evaluating R@1/5/10/1 % on the world's validation
split. Nothing else is needed: no dataset, no pretrained weights. Sizes
are chosen for a 2-core laptop; every key can be overridden on the
command line (`--config.synthetic.num_pairs=2000`, ...).
"""

from cvgl_jax import config_lib


def get_config():
  return config_lib.synthetic_demo()
