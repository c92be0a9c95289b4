r"""CVACT, 100 % labels: supervised training on the true pairs.

  python -m cvgl_jax.main --config=configs/cvact_supervised.py \
      --config.data.root=/data/CVACT --workdir=/runs/cvact_sup
  python -m cvgl_jax.main --config=configs/cvact_supervised.py:sample4geo ...

Argument: "paper" (default: two ConvNeXt towers with SAFA, the paradigm's
100 %-labels row) or "sample4geo" (one shared ConvNeXt with global average
pooling, the supervised anchor); see `config_lib.supervised`.
"""

from cvgl_jax import config_lib


def get_config(arg="paper"):
  return config_lib.supervised("cvact", arg)
