"""Test set-up: 8 simulated CPU devices so the multi-device paths run in CI,
programs compiled for speed of compiling."""

import os

import processes  # tests/: the XLA flags every test process uses

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", processes.xla_flags(devices=8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# (A persistent compilation cache for the session made the suite slower:
# writing every program costs more than the few it serves twice.)


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
  """The tiny demo (every stage, 37.5 % labels, each epoch evaluated), run
  once per session for test_main and test_export: (config, workdir,
  results)."""
  from cvgl_jax import main as main_lib
  from test_main import demo_run_config
  config = demo_run_config()
  workdir = str(tmp_path_factory.mktemp("demo") / "run")
  return config, workdir, main_lib.run(config, workdir)


# The test files that share the session's demo run: one pytest-xdist work
# unit, so that one worker builds it (~80 s) instead of each worker that
# draws one of these files (`--dist loadfile` groups by file only).
DEMO_RUN_FILES = ("tests/test_main.py", "tests/test_paradigm.py",
                  "tests/test_export.py")


def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadFileScheduling  # pylint: disable=g-import-not-at-top

  class DemoRunFilesTogether(LoadFileScheduling):
    """`--dist loadfile`, with the demo run's files one work unit."""

    def _split_scope(self, nodeid):
      scope = super()._split_scope(nodeid)
      return "demo_run" if scope in DEMO_RUN_FILES else scope

  if config.getoption("dist") == "loadfile":
    return DemoRunFilesTogether(config, log)
  return None
