r"""Runs the stages of a config in order, skipping those already finished.

  python -m cvgl_jax.main --config=configs/synthetic_unsup.py --workdir=DIR
  python -m cvgl_jax.main --config=configs/cvusa_unsup.py \
      --config.data.root=/data/CVUSA --workdir=DIR

A stage that finished has `DIR/<stage>/DONE`; an interrupted stage resumes
from its last checkpoint. The config is validated before anything runs and
saved as `DIR/config.json`.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run.")


def run(config, workdir: str) -> dict:
  """Runs `config.stages` under `workdir`; returns {stage: results}."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  if parallel.is_main_process():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  results = {}
  pending = [s for s in config.stages
             if stages.read_done(workdir, s) is None]
  for stage in config.stages:
    if stage not in pending:
      results[stage] = stages.read_done(workdir, stage)
      logging.info("Stage %s: already done, skipped.", stage)
  if not pending:
    return results
  ctx = stages.setup(config, workdir)
  for stage in pending:
    logging.info("Stage %s: starting.", stage)
    start = time.time()
    result = stages.STAGES[stage](ctx)
    result = dict(result, seconds=round(time.time() - start, 1))
    stages.write_done(workdir, stage, result)
    results[stage] = result
    logging.info("Stage %s: done in %.0f s: %s", stage, result["seconds"],
                 json.dumps(result, default=str)[:500])
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("JAX process %d of %d, devices %s", jax.process_index(),
               jax.process_count(), jax.devices())
  results = run(_CONFIG.value, _WORKDIR.value)
  if parallel.is_main_process():
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
