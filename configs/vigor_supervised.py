r"""VIGOR, 100 % labels: supervised training on the true pairs.

  python -m cvgl_jax.main --config=configs/vigor_supervised.py \
      --config.data.root=/data/VIGOR --workdir=/runs/vigor_sup
  python -m cvgl_jax.main --config=configs/vigor_supervised.py:sample4geo ...

Argument: "paper" (default: the paradigm's model, two ConvNeXt towers with
SAFA, the 100 %-labels row) or "sample4geo" (one shared ConvNeXt with global
average pooling, the supervised anchor). VIGOR: ground and satellite sizes differ, so
Sample4Geo-style weight sharing uses the GAP head, whose size is free.
"""

from cvgl_jax import config_lib


def get_config(arg="paper"):
  if arg not in ("paper", "sample4geo"):
    raise config_lib.ConfigError(
        f"configs/vigor_supervised.py takes 'paper' or 'sample4geo', got "
        f"{arg!r}.")
  config = config_lib.for_dataset("vigor")
  config.stages = ("supervised",)
  if arg == "sample4geo":
    config.model.head = "gap"
    config.model.share_weights = True
  return config
