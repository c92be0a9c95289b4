r"""The synthetic benchmark: the paper's table rows on one fixed world.

  python -m cvgl_jax.main --config=configs/synthetic_benchmark.py:ours_0 \
      --workdir=runs/bench/ours_0

Argument: the row. Every row starts from the demo config
(`configs/synthetic_unsup.py`: an 800-pair synthetic CVUSA-layout world,
640 train / 160 val pairs, a small from-scratch ConvNeXt + SAFA) and
changes only what its name says:

  supervised       the true pairs, 100 % labels, as many steps as the
                   paradigm's three training stages together
  ours_0           the paradigm, 0 % labels (the demo)
  ours_10          the paradigm with 10 % of the training pairs labelled
  no_bev           CycleGAN on the panoramas themselves (no projection)
  no_translation   stage 2 pairs each panorama with its BEV (no CycleGAN)
  no_intra         no intra-view stage
  no_mutual        pseudo labels without mutual matching
  no_threshold     pseudo labels without the margin filter
  no_curriculum    the margin threshold fixed at tau (no cosine schedule)

A row name may end in `@P`: the same row with P % of the training pairs
labelled (e.g. `no_mutual@10`), since a component of the pseudo-label
stage can only matter once the cold start gives pseudo labels better than
chance.

`benchmarks/synthetic_table.py` runs the rows and writes the table.
"""

import importlib.util
import os

ROWS = ("supervised", "ours_0", "ours_10", "no_bev", "no_translation",
        "no_intra", "no_mutual", "no_threshold", "no_curriculum")


def _demo_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "synthetic_unsup.py")
  spec = importlib.util.spec_from_file_location("synthetic_unsup", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg="ours_0"):
  arg, _, percent = arg.partition("@")
  if arg not in ROWS:
    raise ValueError(f"synthetic_benchmark: unknown row {arg!r}; rows are "
                     f"{ROWS}.")
  config = _demo_config()
  p = config.pseudo_label
  if percent:
    p.gt_ratio = float(percent) / 100
  if arg == "supervised":
    config.stages = ("supervised",)
    config.supervised.epochs = (config.intra.epochs + config.cross_fake.epochs
                                + p.epochs)
  elif arg == "ours_10":
    p.gt_ratio = 0.1
  elif arg == "no_bev":
    config.stages = ("translate", "intra", "cross_fake", "pseudo_label")
    config.translate.source = "panorama"
  elif arg == "no_translation":
    config.stages = ("cfp", "intra", "cross_fake", "pseudo_label")
    config.cross_fake.fake_folder = "g2a"
  elif arg == "no_intra":
    config.stages = ("cfp", "translate", "cross_fake", "pseudo_label")
  elif arg == "no_mutual":
    p.mutual = False
  elif arg == "no_threshold":
    p.margin_filter = False
  elif arg == "no_curriculum":
    p.curriculum = False
  return config
