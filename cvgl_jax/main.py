r"""Runs the stages of a config in order, skipping those already finished.

  python -m cvgl_jax.main --config=configs/synthetic_unsup.py --workdir=DIR
  python -m cvgl_jax.main --config=configs/cvusa_unsup.py \
      --config.data.root=/data/CVUSA --workdir=DIR

A stage that finished has `DIR/<stage>/DONE`; an interrupted stage resumes
from its last checkpoint. The config is validated before anything runs and
saved as `DIR/config.json`; a rerun with a config that differs in keys
that change results is refused (listing them) unless
`--force_config_change`. One run at a time holds `DIR/LOCK`: a second is
refused, naming the holder (`cvgl_jax/run_dir.py`).

Several processes (hosts, or one per GPU) run the same command and form one
run (`launch/`): inside a SLURM step or Open MPI JAX finds its peers by
itself; on a Cloud TPU VM pod add `--distributed=on`; elsewhere give
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` to
process I. DIR must be one folder every process sees (a shared file
system): process 0 writes the files there, every process joins the
checkpoints.

On a Linux CPU host with glibc >= 2.35 the command re-executes itself once,
at start, with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (huge pages for
XLA:CPU's per-step temporaries, `cvgl_jax/cpu/hostmem.py`); set the
tunable yourself (e.g. to 0) to opt out.
"""

from cvgl_jax.cpu import hostmem

if __name__ == "__main__":
  # Before jax and the rest are imported: the re-executed process imports
  # them anyway, and importing them twice cost ~2.5 s per command.
  hostmem.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import glob
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from cvgl_jax import cache
from cvgl_jax import cli
from cvgl_jax import config_lib
from cvgl_jax import parallel
from cvgl_jax import records
from cvgl_jax import report
from cvgl_jax import run_dir
from cvgl_jax import stages
from cvgl_jax.data import readers
from cvgl_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run.")
_FORCE_CONFIG_CHANGE = flags.DEFINE_bool(
    "force_config_change", False,
    "Resume a workdir with a config that differs from its config.json in "
    "keys that change results; the change is recorded in the workdir.")
cli.define_job_flags()
flags.adopt_module_key_flags(cli)  # --help lists them.


def run(config, workdir: str, *, force_config_change: bool = False) -> dict:
  """Runs `config.stages` under `workdir`; returns {stage: results}.

  Raises:
    config_lib.ConfigError: the config is invalid (`config_lib.validate`).
    run_dir.RunDirError: the workdir is in use by another run, or was run
      with another config (and not `force_config_change`).
  """
  config_lib.validate(config)
  return _run_validated(config, workdir, force_config_change)


def _run_validated(config, workdir: str, force_config_change: bool) -> dict:
  """`run` after `config_lib.validate`, which the command line calls
  earlier (before the processes join) and not again."""
  main = parallel.is_main_process()
  with contextlib.ExitStack() as stack:
    refused = ""
    if main:
      try:
        stack.enter_context(run_dir.locked(workdir))
        stack.enter_context(cli.log_to_file(run_dir.log_file(workdir)))
        run_dir.save_config(workdir, config, force=force_config_change,
                            defaults=config_lib.default_config())
      except run_dir.RunDirError as e:
        refused = str(e)
    # Every process stops when process 0 (the lock's holder) refuses.
    if not parallel.from_main_process(np.bool_(not refused)):
      raise run_dir.RunDirError(refused or f"Process 0 refused {workdir}; "
                                f"its log says why.")
    return _run_stages(config, workdir)


def _run_stages(config, workdir: str) -> dict:
  results = {}
  pending = [s for s in config.stages
             if run_dir.read_done(workdir, s) is None]
  # Every process has read the DONE files before any stage can write one.
  parallel.sync("main:pending")
  for stage in config.stages:
    if stage not in pending:
      results[stage] = run_dir.read_done(workdir, stage)
      logging.info("Stage %s: already done, skipped.", stage)
  if not pending:
    return results
  ctx = stages.setup(config, workdir)
  if ctx.skipped_images:
    results["skipped_images"] = list(ctx.skipped_images)
  for stage in pending:
    logging.info("Stage %s: starting.", stage)
    start = time.time()
    result = stages.STAGES[stage](ctx)
    result = dict(result, seconds=round(time.time() - start, 1))
    run_dir.fault_point(f"{stage}.before_done")
    if parallel.is_main_process():
      run_dir.write_done(workdir, stage, result)
    parallel.sync(f"main:{stage}:done")
    results[stage] = result
    logging.info("Stage %s: done in %s%s.", stage,
                 _duration(result["seconds"]), _key_numbers(result))
  # Every process joins: the retrieval examples embed the eval split.
  report.write_report(workdir, num_examples=config.report.num_examples)
  return results


def _duration(seconds: float) -> str:
  return (f"{seconds:.0f} s" if seconds < 120 else
          f"{seconds / 60:.1f} min")


def _key_numbers(result: dict) -> str:
  """A stage's headline, e.g. ": R@1 35.2 (best 36.0 at step 1200),
  1240 steps" or ": 640 of 640 written" ("" when it has none)."""
  parts = []
  if "R@1" in result.get("eval", {}):
    text = f"R@1 {result['eval']['R@1']:.1f}"
    best = result.get("best") or {}
    if "R@1" in best:
      text += f" (best {best['R@1']:.1f} at step {best['step']})"
    parts.append(text)
  if "step" in result:
    parts.append(f"{result['step']} steps")
  elif "steps" in result:
    parts.append(f"{result['steps']} steps")
  if "written" in result:
    total = result.get("total")
    parts.append(f"{result['written']} written"
                 + (f" of {total}" if total is not None else ""))
  if result.get("cached"):
    parts.append("from the cache")
  return ": " + ", ".join(parts) if parts else ""


def recall_table(results: dict) -> str:
  """The evaluation of each finished training stage as a Markdown table:
  the last epoch's R@1/5/10/1 % (hit rate for VIGOR), the best R@1 seen
  (telemetry: it reads labels), the checkpoint the stage hands on (chosen
  by `config.train.select`, without labels) with its R@1, and for
  pseudo_label the last round's labels and their precision; then the
  pseudo-label stage's round table."""
  lines = ["| stage | R@1 | R@5 | R@10 | R@1 % | best R@1 (step) | handed on:"
           " R@1 (step) | pseudo labels (precision) | minutes |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  rounds = None
  for stage, result in results.items():
    if not result or "eval" not in result:
      continue
    e, best = result["eval"], result.get("best") or {}
    cells = [f"{e[k]:.1f}" if k in e else "-"
             for k in ("R@1", "R@5", "R@10", "R@1%")]
    if "hit_rate" in e:
      cells[0] += f" (hit {e['hit_rate']:.1f})"
    best_cell = (f"{best['R@1']:.1f} ({best['step']})" if "R@1" in best
                 else "-")
    selected = result.get("selected") or {}
    chosen = selected.get("eval", {})
    chosen_cell = (f"{chosen['R@1']:.1f} ({selected['step']})"
                   if "R@1" in chosen else "-")
    labels = "-"
    last = result.get("last_round") or {}
    if "num_labels" in last:
      labels = f"{last['num_labels']:.0f}"
      precision = last.get("margin/precision")
      if precision is not None and precision == precision:
        labels += f" ({100 * precision:.1f} %)"
    rounds = result.get("rounds") or rounds
    lines.append(f"| {stage} | {' | '.join(cells)} | {best_cell} | "
                 f"{chosen_cell} | {labels} | "
                 f"{result.get('seconds', 0) / 60:.1f} |")
  timed = {stage: r["seconds"] for stage, r in results.items()
           if isinstance(r, dict) and "seconds" in r}
  others = [f"{stage} {seconds / 60:.1f}" for stage, seconds in timed.items()
            if "eval" not in results[stage]]
  if timed:
    lines.append(f"\nMinutes: {'; '.join(others) + '; ' if others else ''}"
                 f"all stages {sum(timed.values()) / 60:.1f}.")
  chance = next((r["eval"]["num_references"] for r in results.values()
                 if r and "eval" in r), None)
  if chance:
    lines.append(f"\nChance R@1: {100 / chance:.2f} % ({chance:.0f} "
                 "references).")
  skipped = results.get("skipped_images")
  if skipped:
    lines.append(f"\nLeft out {len(skipped)} unusable image files "
                 f"(config.data.on_bad_image='skip'); results.json lists "
                 f"them.")
  if rounds:
    lines.append("\nPseudo-label rounds (precision and correct pairs read "
                 "the truth: telemetry, never training):\n"
                 + records.format_round_table(rounds))
  return "\n".join(lines)


def _where(results: dict, workdir: str) -> str:
  """Where the run's pictures and log are, and how to make its bundle."""
  folder = os.path.join(workdir, run_dir.REPORT)
  pictures = sorted(glob.glob(os.path.join(folder, "*.png")))
  lines = ["Pictures:"] + [f"  {path}" for path in pictures]
  if len(lines) == 1:
    lines = ["Pictures: none (no evaluation recorded)."]
  lines.append(f"Full log: {run_dir.log_file(workdir)}")
  if any(s in results for s in config_lib.TRAINING_STAGES):
    lines.append(f"Retrieval bundle: python -m cvgl_jax.export "
                 f"--workdir={workdir} --out={os.path.join(workdir, 'bundle')}")
  return "\n".join(lines)


def repeated_overrides(args: list[str]) -> list[str]:
  """The `--config.KEY` overrides given more than once. (absl appends a
  repeated tuple-valued override to the first: (64, 256) then (32, 128)
  became (64, 256, 32, 128).)"""
  keys = [a[2:].partition("=")[0] for a in args if a.startswith("--config.")]
  return sorted({k for k in keys if keys.count(k) > 1})


def _use_compilation_cache(setting: str) -> None:
  """JAX's persistent compilation cache per `config.compilation_cache_dir`."""
  if not setting:
    return
  folder = setting
  if setting == "auto":
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        cache.cache_dirs()[0] / "jax")
  jax.config.update("jax_compilation_cache_dir", folder)


def main(argv):
  cli.setup_console()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  repeated = repeated_overrides(sys.argv[1:])
  if repeated:
    cli.user_error(f"{', '.join('--' + k for k in repeated)} given more "
                   f"than once; give each override once.")
  # A bad config fails here, before any process waits for its peers.
  config = cli.config_value()
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    cli.user_error(e)
  cli.join_job()
  problem = config_lib.platform_problem(config.platform,
                                        jax.default_backend())
  if problem:
    cli.user_error(problem)
  _use_compilation_cache(config.compilation_cache_dir)
  parallel.watch_for_preemption()
  try:
    results = _run_validated(config, _WORKDIR.value,
                             _FORCE_CONFIG_CHANGE.value)
  except (run_dir.RunDirError, config_lib.ConfigError,
          readers.DatasetError) as e:
    cli.user_error(e)
  except parallel.Preempted as e:
    print(f"Pre-empted: {e}", file=sys.stderr, flush=True)
    sys.exit(0)
  except loop.DivergedError as e:
    # Not a bug and not a mistake: the message says what was kept and what
    # to change; the traceback is in the log (--verbosity=1).
    logging.debug("Diverged.", exc_info=True)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    full = run_dir.disk_full_error(e)
    if full is None:
      raise
    logging.debug("Disk full.", exc_info=True)  # Shown with --verbosity=1.
    print(f"error: {run_dir.disk_full_message(full, _WORKDIR.value)}",
          file=sys.stderr, flush=True)
    # Not sys.exit: the checkpointer's threads, cut off mid-write, would
    # print their tracebacks again at interpreter shutdown. The lock is
    # released and every finished file is whole (atomic writes).
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
  if parallel.is_main_process():
    path = os.path.join(_WORKDIR.value, run_dir.RESULTS)
    run_dir.write_json(path, results)
    print(f"\nResults of {_WORKDIR.value} (all numbers in {path}):\n"
          f"{recall_table(results)}\n\n{_where(results, _WORKDIR.value)}",
          flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
