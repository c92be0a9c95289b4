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
  from test_main import tiny_demo_config
  config = tiny_demo_config()
  config.train.eval_every_epochs = 1
  p = config.pseudo_label
  p.epochs, p.warmup_epochs, p.gt_ratio, p.tau = 2, 1, 0.375, 0.0
  p.knn_backend = "exact"
  # Every paired view and the fake view: the round table's hand count
  # (test_paradigm) recomputes what they compare.
  p.paired_views, p.fake_view = 8, True
  config.train.select = "label_free"  # The path with more to check.
  workdir = str(tmp_path_factory.mktemp("demo") / "run")
  return config, workdir, main_lib.run(config, workdir)
