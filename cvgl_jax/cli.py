"""What every command-line entry point shares: a console a person reads,
joining a multi-process job and reporting a user's mistake.

`setup_console` (first thing in every `main`): the console shows cvgl_jax's
own messages and every library's warnings, as `HH:MM:SS message`; the
libraries' INFO chatter (orbax's per-save lines, JAX's backend probing,
grain) is held back for the run's log file, and `--verbosity=1` brings
everything back in absl's full format. `log_to_file` then writes every
record, the held-back ones first, to a file (a run's `workdir/log.txt`).

`define_job_flags` defines the flags by which a process joins a job
(`--distributed`, `--coordinator_address`, `--num_processes`,
`--process_id`, `--local_device_ids`); `join_job` reads them and calls
`parallel.initialize` before anything touches a device. `cvgl_jax.main`,
`cvgl_jax.export` and `cvgl_jax.report` take them alike, so a bundle or
report can be made on the workers of a pod (where one process alone
cannot start the accelerators of a multi-host slice) with the command
that trained there.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
from logging import handlers as std_handlers
import os
import re
import sys
import time
from typing import Iterator, NoReturn

from absl import app
from absl import flags
from absl import logging
import jax

from cvgl_jax import parallel


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Records kept from start-up until a log file is opened (a run's start
# holds a few hundred; more is a sign nobody opens one).
_BUFFER_RECORDS = 20_000


class _OursOrWarnings(std_logging.Filter):
  """cvgl_jax's records, and everyone's warnings and errors."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or os.path.abspath(record.pathname).startswith(_PACKAGE))


class _ConsoleFormatter(std_logging.Formatter):
  """`HH:MM:SS message`, `HH:MM:SS warning: message` from WARNING on."""

  def format(self, record: std_logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = ("" if record.levelno < std_logging.WARNING
             else f"{record.levelname.lower()}: ")
    return f"{stamp} {level}{text}"


def setup_console() -> None:
  """Quiets the console as the module says (unless --verbosity >= 1) and
  starts keeping every record for `log_to_file`. Call after absl parsed
  the flags (first thing in `main`)."""
  handler = logging.get_absl_handler().python_handler
  if flags.FLAGS.verbosity < 1:
    handler.addFilter(_OursOrWarnings())
    handler.setFormatter(_ConsoleFormatter())
  root = std_logging.getLogger()
  if not any(isinstance(h, _Buffer) for h in root.handlers):
    root.addHandler(_Buffer())


class _Buffer(std_handlers.MemoryHandler):
  """Holds records until `log_to_file` writes them (never flushes alone)."""

  def __init__(self):
    super().__init__(_BUFFER_RECORDS, flushLevel=std_logging.CRITICAL + 1)

  def shouldFlush(self, record) -> bool:  # noqa: N802 (logging's name)
    del record
    return False

  def emit(self, record) -> None:
    if len(self.buffer) < self.capacity:
      self.buffer.append(record)


@contextlib.contextmanager
def log_to_file(path: str) -> Iterator[None]:
  """Appends every log record (absl's full format, every library's INFO)
  to `path` while the context lasts, starting with those `setup_console`
  kept since start-up."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  handler = std_logging.FileHandler(path, encoding="utf-8")
  handler.setFormatter(logging.PythonFormatter())
  root = std_logging.getLogger()
  for buffer in [h for h in root.handlers if isinstance(h, _Buffer)]:
    for record in buffer.buffer:
      handler.handle(record)
    buffer.buffer.clear()
    root.removeHandler(buffer)
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)
    handler.close()


_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull",
               "--helpxml")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake as one line and exit status 2
  (absl: two lines, status 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    user_error(f"{e} (--help lists the flags)")
  except (KeyError, AttributeError) as e:
    # ml_collections: an override names a key the config does not have
    # (its message, nested once per level: "'lrr'\nDid you mean "lr"...").
    text = str(e)
    if "get_config" in text:
      _config_file_error("config", "it defines no get_config()")
    keys = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    close = re.findall(r'Did you mean \\?"([^"\\]+)\\?"', text)
    overrides = [a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.")]
    given = next((a for a in overrides for k in keys[:1]
                  if k in a.split(".")), "a --config override")
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    user_error(f"{given}: the config has no key {keys[0] if keys else text!r}"
               f"{hint}")
  except (OSError, SyntaxError) as e:
    _config_file_error("config", e)


def run(main) -> None:
  """`absl.app.run(main)` with the conventions of our entry points:
  `--help` exits 0 (absl: 1), a flag mistake is one line with exit
  status 2."""
  helping = any(a.split("=")[0] in _HELP_FLAGS for a in sys.argv[1:])
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit as e:
    if helping and e.code == 1:
      sys.exit(0)
    raise


def config_value(name: str = "config"):
  """The ConfigDict of a `config_flags.DEFINE_config_file` flag; a file that
  cannot be loaded (missing, a Python error, no `get_config`) is a user
  error naming the file."""
  try:
    config = flags.FLAGS[name].value
    config.keys()  # A file that failed to load fails on first use.
    return config
  except (OSError, SyntaxError, AttributeError, TypeError, ValueError) as e:
    _config_file_error(name, e)


def _config_file_error(name: str, error) -> NoReturn:
  given = next((a.split("=", 1)[1] for a in sys.argv[1:]
                if a.startswith(f"--{name}=")), "")
  if isinstance(error, BaseException):
    cause = error.__cause__ or error
    if isinstance(cause, SyntaxError):
      error = f"{cause.msg} at line {cause.lineno}"
    else:
      lines = [line.strip() for line in str(cause).splitlines()
               if line.strip()]
      error = lines[-1] if lines else type(cause).__name__
  user_error(f"--{name}={given}: cannot load this config file: {error}")


def define_job_flags() -> None:
  """Defines the multi-process flags (once per program)."""
  flags.DEFINE_string(
      "coordinator_address", None,
      "Multi-process runs without a detected cluster: host:port of process "
      "0's coordinator (with --num_processes and --process_id).")
  flags.DEFINE_integer("num_processes", None,
                       "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None,
                       "This process's index in [0, num_processes).")
  flags.DEFINE_list(
      "local_device_ids", None,
      "Accelerators this process uses, e.g. 0,1,2,3 for one SLURM task per "
      "node owning four GPUs (JAX's SLURM detection alone gives one per "
      "task).")
  flags.DEFINE_enum(
      "distributed", "auto", ["auto", "on", "off"],
      "auto: join a multi-process run when the flags above are given or the "
      "environment is a SLURM step / Open MPI job with several tasks; on: "
      "always call jax.distributed.initialize() (Cloud TPU VM pods); off: "
      "one process.")


def user_error(error) -> NoReturn:
  """A user's mistake: one line `error: ...`, no traceback, exit status 2."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(2)


def join_job() -> None:
  """Joins the job the flags of `define_job_flags` describe (a no-op for a
  single process); a contradiction among them is a user error."""
  f = flags.FLAGS
  mode = f.distributed
  if mode == "off" and (f.coordinator_address or f.num_processes is not None
                        or f.process_id is not None):
    user_error("--distributed=off contradicts --coordinator_address / "
               "--num_processes / --process_id.")
  try:
    parallel.initialize(
        f.coordinator_address, f.num_processes, f.process_id,
        f.local_device_ids,
        auto={"auto": None, "on": True, "off": False}[mode])
  except ValueError as e:
    user_error(e)
  logging.info("JAX process %d of %d, devices %s", jax.process_index(),
               jax.process_count(), jax.devices())
