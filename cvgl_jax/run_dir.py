"""The run directory: the one owner of a workdir's layout and bookkeeping.

  workdir/
    config.json              the run's config; a rerun must match it
    config_changes.jsonl     changes accepted with --force_config_change
    LOCK                     {"host", "pid", "started"} of the running job
    log.txt                  every log record of every run (appended)
    results.json             {stage: DONE results} of the last finished run
    <stage>/DONE             the stage's results (JSON): it finished
    <stage>/metrics.jsonl    {"step", "epoch", "kind", ...} per line
    <stage>/tensorboard/     the same scalars as event files
    <stage>/checkpoints/N/   orbax: the latest training state (step N)
    <stage>/best/N/          orbax: the params the stage hands on
    <stage>/selected.json    which step best/ holds, why, its evaluation
    synthetic_world/         the generated world (synthetic configs)
    report/                  the pictures

Other modules ask this one for paths and markers rather than joining
strings. Every file here is written atomically (a temporary name in the
same folder, then `os.replace`), so a kill leaves the old version or the
new one, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import signal
import socket
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from absl import logging
import ml_collections
import orbax.checkpoint as ocp

CONFIG = "config.json"
CONFIG_CHANGES = "config_changes.jsonl"
LOCK = "LOCK"
LOG = "log.txt"
RESULTS = "results.json"
DONE = "DONE"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"
SELECTED = "selected.json"
REPORT = "report"
SYNTHETIC_WORLD = "synthetic_world"

# Config keys a resumed run may change without --force_config_change: they
# decide how often the run logs, saves or reads, never what it computes.
RESUME_SAFE_KEYS = (
    "train.log_every_steps", "train.checkpoint_every_steps",
    "translate.log_every_steps", "translate.ckpt_every_steps",
    "data.num_threads", "pretrain.cache_dir", "stages",
    "train.max_skipped_steps", "platform", "compilation_cache_dir",
    "report.num_examples",
)


class RunDirError(RuntimeError):
  """The workdir cannot be used as asked; the message says why and what to
  do. A user's situation, not a bug: `main` prints it as one line."""


# The checkpoint folders of a training stage, by the name users give them.
CHECKPOINT_KINDS = {"best": BEST, "latest": CHECKPOINTS}


# ------------------------------------------------------------------ paths --


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def checkpoints_dir(workdir: str, stage: str) -> str:
  """Orbax folder of `stage`'s latest training states."""
  return os.path.join(workdir, stage, CHECKPOINTS)


def best_dir(workdir: str, stage: str) -> str:
  """Orbax folder of the params `stage` hands on."""
  return os.path.join(workdir, stage, BEST)


def log_file(workdir: str) -> str:
  """The run's full log (every library's records; the console shows
  fewer)."""
  return os.path.join(workdir, LOG)


def metrics_file(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, METRICS)


def config_file(workdir: str) -> str:
  return os.path.join(workdir, CONFIG)


def write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` atomically (same-folder temporary + rename)."""
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(value, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _read_json(path: str) -> Optional[Any]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise RunDirError(f"{path} is not valid JSON ({e}); it was not written "
                        f"by cvgl_jax (whose writes are atomic). Move it "
                        f"away and rerun.") from None


# ----------------------------------------------------------- done markers --


def read_done(workdir: str, stage: str) -> Optional[dict]:
  """The results a finished stage recorded, or None if it has not finished."""
  return _read_json(os.path.join(workdir, stage, DONE))


def write_done(workdir: str, stage: str, result: Mapping) -> None:
  """Marks `stage` finished with its results (call on process 0 only)."""
  write_json(os.path.join(workdir, stage, DONE), dict(result))


# ---------------------------------------------------------------- records --


def read_records(workdir: str, stage: str) -> list[dict]:
  """The records of `workdir/<stage>/metrics.jsonl`, in step order.

  Should a (kind, step, epoch) appear twice (a resume before records were
  truncated on resume), the later record wins. A last line cut short by a
  kill is skipped; any other line that is not JSON is an error naming it.
  """
  path = metrics_file(workdir, stage)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  latest = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines) and not line.endswith("\n"):
        logging.warning("%s: skipped its last line, cut short.", path)
        continue
      raise RunDirError(f"{path}:{number}: not a JSON record ({e}).") from e
    latest[(record.get("kind"), record.get("step"),
            record.get("epoch"))] = record
  return sorted(latest.values(), key=lambda r: (r["step"], r["epoch"]))


def truncate_records(workdir: str, stage: str, last_step: Optional[int],
                     kinds_at_last_step: Sequence[str] = ()) -> int:
  """Drops the records a resumed run writes again: those after
  `last_step` (the checkpoint it resumes from; None: every record), those
  of `kinds_at_last_step` at it (an epoch start the run repeats), and a
  last line cut short. Returns how many lines were dropped."""
  path = metrics_file(workdir, stage)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    step = int(record.get("step", 0))
    if last_step is None or step > last_step or (
        step == last_step and record.get("kind") in kinds_at_last_step):
      continue
    kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return len(lines) - len(kept)


# ------------------------------------------------------ selected checkpoint --


def write_selected(workdir: str, stage: str, record: Mapping) -> None:
  write_json(os.path.join(workdir, stage, SELECTED), dict(record))


def eval_record(workdir: str, stage: str, step: int) -> dict:
  """The metrics of `stage`'s evaluation at `step`, or {}."""
  found = {}
  for record in read_records(workdir, stage):
    if record.get("kind") == "eval" and record.get("step") == step:
      found = {k: v for k, v in record.items()
               if k not in ("kind", "step", "epoch")}
  return found


# ------------------------------------------------------------------ lock --


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _lock_holder(lock: dict) -> str:
  return (f"host {lock.get('host')}, pid {lock.get('pid')}, started "
          f"{lock.get('started')}")


@contextlib.contextmanager
def locked(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds `workdir/LOCK` for the block: a second run on the same workdir
  is refused (RunDirError naming the holder); a lock left by a killed run
  (a dead pid on this host) is taken over with a warning. A lock held from
  another host is never taken over: if that job is gone, delete the file.
  `enabled=False` (processes other than 0: the coordinator holds the lock
  for the whole job) does nothing."""
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.now().isoformat(timespec="seconds")}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        holder = _read_json(path) or {}
      except RunDirError:
        holder = {}
      if (holder.get("host") == me["host"]
          and not _pid_alive(int(holder.get("pid", -1)))):
        logging.warning("%s was left by a run that is gone (%s); taking "
                        "it over.", path, _lock_holder(holder))
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      raise RunDirError(
          f"{workdir} is in use by another run ({_lock_holder(holder)}); "
          f"wait for it to end, or use another --workdir. If that job is "
          f"gone, delete {path}.") from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  else:
    raise RunDirError(f"Could not take {path}: another run took it at the "
                      f"same time.")
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      if (_read_json(path) or {}).get("pid") == me["pid"]:
        os.remove(path)


# ---------------------------------------------------------------- config --


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def config_changes(saved: Mapping, config: Mapping,
                   defaults: Optional[Mapping] = None) -> dict[str, tuple]:
  """{key: (saved value, new value)} for every key whose value differs.

  A key the saved config lacks (written by a version without it) is no
  change when its new value is its value in `defaults`: a key is added
  with a default that keeps what the code did before.
  """
  a, b = _flatten(saved), _flatten(json.loads(json.dumps(config)))
  d = _flatten(json.loads(json.dumps(defaults))) if defaults else {}
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)
          and not (k not in a and k in d and b.get(k) == d[k])}


def read_config(workdir: str, defaults: Optional[Mapping] = None
                ) -> ml_collections.ConfigDict:
  """The run's config from `workdir/config.json`.

  With `defaults` (e.g. `config_lib.default_config().to_dict()`), keys the
  saved config lacks -- a run made before they existed -- take their
  default, which keeps what the code did then.
  """
  saved = _read_json(config_file(workdir))
  if saved is None:
    raise RunDirError(
        f"{config_file(workdir)} not found: {workdir!r} is not a cvgl_jax "
        f"run folder (python -m cvgl_jax.main --workdir=... writes it).")

  def merged(default, value):
    if isinstance(default, Mapping) and isinstance(value, Mapping):
      out = {k: json.loads(json.dumps(v)) for k, v in default.items()}
      for k, v in value.items():
        out[k] = merged(default.get(k), v)
      return out
    return value
  return ml_collections.ConfigDict(merged(defaults, saved) if defaults
                                   else saved)


def save_config(workdir: str, config: ml_collections.ConfigDict, *,
                force: bool = False,
                safe_keys: Sequence[str] = RESUME_SAFE_KEYS,
                defaults: Optional[ml_collections.ConfigDict] = None) -> dict:
  """Writes config.json, or checks a rerun's config against it.

  A first run writes it. A rerun whose config differs only in
  `safe_keys` rewrites it. Other differences are refused (RunDirError
  listing them) unless `force`, which rewrites it and appends the change
  to config_changes.jsonl. Keys the saved config lacks count only when
  they differ from `defaults` (`config_changes`). Returns the changes
  found {key: (old, new)}. Call on process 0 only.
  """
  new = json.loads(config.to_json())
  saved = _read_json(config_file(workdir))
  if saved is None:
    write_json(config_file(workdir), new)
    return {}
  changes = config_changes(saved, new,
                           defaults and json.loads(defaults.to_json()))
  unsafe = {k: v for k, v in changes.items() if k not in safe_keys}
  if unsafe and not force:
    listed = "; ".join(f"{k}: {old!r} -> {value!r}"
                       for k, (old, value) in list(unsafe.items())[:6])
    more = f" (and {len(unsafe) - 6} more)" if len(unsafe) > 6 else ""
    raise RunDirError(
        f"The config differs from the one {workdir} was run with: {listed}"
        f"{more}. Rerun with the saved config ({config_file(workdir)}), use "
        f"a new --workdir, or pass --force_config_change to continue with "
        f"the new values (the change is recorded in {CONFIG_CHANGES}).")
  if unsafe:
    path = os.path.join(workdir, CONFIG_CHANGES)
    with open(path, "a") as f:
      f.write(json.dumps({
          "time": datetime.datetime.now().isoformat(timespec="seconds"),
          "changes": {k: list(v) for k, v in unsafe.items()},
          "done": sorted(s for s in os.listdir(workdir)
                         if os.path.exists(os.path.join(workdir, s, DONE)))},
          default=str) + "\n")
    logging.warning("Config changed on resume (recorded in %s): %s", path,
                    sorted(unsafe))
  if changes:
    write_json(config_file(workdir), new)
  return changes


# ------------------------------------------------------------- disk full --

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Orbax writes through tensorstore, whose errors are ValueErrors carrying
# the OS error as text (EFBIG reads "OUT_OF_RANGE: Error writing").
_FULL_TEXT = {"No space left on device": errno.ENOSPC,
              "Disk quota exceeded": errno.EDQUOT,
              "File too large": errno.EFBIG,
              "RESOURCE_EXHAUSTED: Error writing": errno.ENOSPC,
              "OUT_OF_RANGE: Error writing": errno.EFBIG}


def disk_full_error(error: BaseException) -> Optional[OSError]:
  """The "no space" OSError behind `error` (itself, or a cause or context
  of it: orbax and thread pools wrap the writer's error), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _FULL:
      return error
    text = str(error)
    for marker, number in _FULL_TEXT.items():
      if marker in text:
        found = re.search(r'local file "([^"]+)"', text)
        return OSError(number, os.strerror(number),
                       found.group(1) if found else None)
    error = error.__cause__ or error.__context__
  return None


def disk_full_message(error: OSError, workdir: str) -> str:
  where = error.filename or workdir
  return (f"no space left writing {where} ({os.strerror(error.errno)}). "
          f"Nothing saved before it is lost: free space and rerun the same "
          f"command; it resumes from the last checkpoint.")


# ----------------------------------------------------------- fault points --

FAULT_ENV = "CVGL_JAX_FAULT"


def fault_requested(name: str, step: Optional[int] = None) -> bool:
  """Whether CVGL_JAX_FAULT asks for fault `name` here (`name`, or
  `name@step` at that step; several comma-separated): the fault-injection
  tests' switch, e.g. a kill (`fault_point`) or a NaN fed to the training
  step (the loop)."""
  for spec in os.environ.get(FAULT_ENV, "").split(","):
    point, _, at = spec.partition("@")
    if point == name and (not at or (step is not None and int(at) == step)):
      return True
  return False


# The `list_late` fault: this process lists a file stage's outputs this
# many seconds after the others (which have written theirs by then).
LIST_LATE_S = 5.0


def fault_point(name: str, step: Optional[int] = None,
                before: Optional[Callable[[], Any]] = None) -> None:
  """A commit boundary the fault-injection tests kill the run at.

  When the environment variable CVGL_JAX_FAULT is `name` or `name@step`,
  this process calls `before` (e.g. to let an asynchronous save finish)
  and then SIGKILLs itself: no `finally`, no flush, as a pre-emption or an
  out-of-memory kill. Costs one environment lookup otherwise.
  """
  if not fault_requested(name, step):
    return
  if before is not None:
    before()
  logging.flush()
  os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------ trained stages --


def checkpoint_step(directory: str) -> Optional[int]:
  """The latest finalized step of an orbax checkpoint folder, or None."""
  if not os.path.isdir(directory):
    return None
  found = ocp.utils.checkpoint_steps(os.path.abspath(directory))
  return max(found) if found else None


def trained_checkpoint(workdir: str, stage: str,
                       kind: str = "best") -> tuple[str, str, int]:
  """(kind, folder, step) of a training stage's checkpoint.

  "best" (what the stage hands on) falls back to "latest" when the stage
  saved no best params (it never evaluated); "latest" is the last saved
  training state.

  Raises:
    RunDirError: unknown kind, or the stage has no checkpoint.
  """
  if kind not in CHECKPOINT_KINDS:
    raise RunDirError(f"checkpoint={kind!r}; choose one of "
                      f"{sorted(CHECKPOINT_KINDS)}.")
  for found in (["best", "latest"] if kind == "best" else ["latest"]):
    folder = os.path.join(stage_dir(workdir, stage), CHECKPOINT_KINDS[found])
    step = checkpoint_step(folder)
    if step is not None:
      if found != kind:
        logging.warning("Stage %s has no best checkpoint (it never "
                        "evaluated); using its latest, step %d.", stage, step)
      return found, folder, step
  raise RunDirError(f"Stage {stage!r} has no checkpoint under "
                    f"{stage_dir(workdir, stage)}: train it first.")


def last_trained_stage(workdir: str, stages: Sequence[str]) -> str:
  """The last of `stages` (training stages, in run order) that saved a
  checkpoint.

  Raises:
    RunDirError: none did.
  """
  for stage in reversed(list(stages)):
    if any(checkpoint_step(os.path.join(stage_dir(workdir, stage), folder))
           is not None for folder in CHECKPOINT_KINDS.values()):
      return stage
  raise RunDirError(f"No training stage of {tuple(stages)} has a "
                    f"checkpoint under {workdir}: run training first.")
