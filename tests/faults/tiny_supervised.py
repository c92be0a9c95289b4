r"""The fault-injection suite's run: one tiny training stage on a world.

  python -m cvgl_jax.main --config=tests/faults/tiny_supervised.py:WORLD \
      --workdir=DIR

WORLD is a synthetic CVUSA-layout dataset root (the suite's). Three
epochs of 2 steps, evaluated after each, a checkpoint after every step:
every commit boundary of a training stage is reached in seconds.
"""

from cvgl_jax import config_lib


def get_config(world=""):
  config = config_lib.for_dataset("cvusa", world)
  config.stages = ("supervised",)
  config.data.ground_size = (32, 128)
  config.data.satellite_size = (64, 64)
  config.data.num_threads = 2
  config.model.variant = "custom"
  config.model.depths, config.model.dims = (1, 1), (8, 16)
  config.model.drop_path_rate = 0.0
  config.train.batch_size = 16
  config.train.eval_batch_size = 16
  config.train.lr = 1e-3
  config.train.eval_every_epochs = 1
  config.train.checkpoint_every_steps = 1
  config.train.log_every_steps = 1
  config.supervised.epochs = 3
  # The report's recall picture only: the examples picture embeds the eval
  # split once more, seconds in each of the suite's many runs.
  config.report.num_examples = 0
  return config
