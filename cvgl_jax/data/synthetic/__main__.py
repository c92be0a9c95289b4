r"""Renders a synthetic dataset in a public layout.

  python -m cvgl_jax.data.synthetic --layout=cvusa --out=/tmp/cvusa_syn \
      --num_pairs=2000 --seed=0 --sat_px=256 --cvusa_width=616

Every field of `SyntheticConfig` is a flag of the same name (e.g.
--map_cells, --tile_m, --gps_sigma_m, --noseparate_sun, --block_m=45,95);
--no_nuisances turns all nuisances off. Prints pairs/s when done.
"""

import dataclasses
import re
import time

from absl import app
from absl import flags

from cvgl_jax.data.synthetic import config as config_lib
from cvgl_jax.data.synthetic import layouts

_LAYOUT = flags.DEFINE_enum("layout", "cvusa", list(layouts.LAYOUTS),
                            "On-disk layout to write.")
_OUT = flags.DEFINE_string("out", None, "Dataset root to create (must not "
                           "exist or be empty).", required=True)
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", 1000, "Panoramas to render.",
                                  lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "The dataset's seed.")
_NO_NUISANCES = flags.DEFINE_bool("no_nuisances", False, "Exact poses and "
                                  "appearance (overrides the nuisance flags).")



def _field_help() -> dict:
  """{field: its description} from SyntheticConfig's docstring."""
  out, names = {}, []
  for line in config_lib.SyntheticConfig.__doc__.splitlines():
    entry = re.match(r"^    ([a-z_0-9, ]+): (.*)$", line)
    if entry:
      names = [n.strip() for n in entry.group(1).split(",")]
      for n in names:
        out[n] = entry.group(2)
    elif re.match(r"^      \S", line):
      for n in names:
        out[n] += " " + line.strip()
    else:
      names = []
  return out


_DEFAULTS = config_lib.SyntheticConfig()
_HELP = _field_help()
_FIELDS = {}
for _f in dataclasses.fields(config_lib.SyntheticConfig):
  _value = getattr(_DEFAULTS, _f.name)
  _help = _HELP[_f.name]
  if isinstance(_value, bool):
    _FIELDS[_f.name] = flags.DEFINE_bool(_f.name, _value, _help)
  elif isinstance(_value, int):
    _FIELDS[_f.name] = flags.DEFINE_integer(_f.name, _value, _help)
  elif isinstance(_value, float):
    _FIELDS[_f.name] = flags.DEFINE_float(_f.name, _value, _help)
  else:
    _FIELDS[_f.name] = flags.DEFINE_list(
        _f.name, [str(v) for v in _value], _help)


def _config() -> config_lib.SyntheticConfig:
  values = {}
  for name, holder in _FIELDS.items():
    value = holder.value
    if isinstance(value, list):
      try:
        value = tuple(float(v) for v in value)
      except ValueError as e:
        raise app.UsageError(f"--{name}={','.join(value)}: expected numbers."
                             ) from e
    values[name] = value
  cfg = config_lib.SyntheticConfig(**values)
  if _NO_NUISANCES.value:
    cfg = cfg.without_nuisances()
  try:
    return cfg.validate()
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  del argv
  cfg = _config()
  start = time.perf_counter()
  layouts.write_dataset(_LAYOUT.value, _OUT.value, cfg, _NUM_PAIRS.value,
                        _SEED.value)
  seconds = time.perf_counter() - start
  print(f"Wrote {_NUM_PAIRS.value} {_LAYOUT.value} pairs to {_OUT.value} in "
        f"{seconds:.1f} s ({_NUM_PAIRS.value / seconds:.2f} pairs/s).")


if __name__ == "__main__":
  app.run(main)
