r"""CVACT, 100 % labels: supervised training on the true pairs.

  python -m cvgl_jax.main --config=configs/cvact_supervised.py \
      --config.data.root=/data/CVACT --workdir=/runs/cvact_sup
  python -m cvgl_jax.main --config=configs/cvact_supervised.py:sample4geo ...

Argument: "paper" (default: the paradigm's model, two ConvNeXt towers with
SAFA, the 100 %-labels row) or "sample4geo" (one shared ConvNeXt with global
average pooling, the supervised anchor).
"""

from cvgl_jax import config_lib


def get_config(arg="paper"):
  if arg not in ("paper", "sample4geo"):
    raise config_lib.ConfigError(
        f"configs/cvact_supervised.py takes 'paper' or 'sample4geo', got "
        f"{arg!r}.")
  config = config_lib.for_dataset("cvact")
  config.stages = ("supervised",)
  if arg == "sample4geo":
    config.model.head = "gap"
    config.model.share_weights = True
  return config
