r"""The fault-injection suite's file stages: CFP and a tiny CycleGAN.

  python -m cvgl_jax.main --config=tests/faults/tiny_translate.py:WORLD \
      --workdir=DIR

WORLD is the suite's synthetic CVUSA-layout root. Two epochs of the
smallest CycleGAN, a checkpoint every 8 steps: the translation's commit
boundaries are reached in seconds.
"""

from cvgl_jax import config_lib


def get_config(world=""):
  config = config_lib.for_dataset("cvusa", world)
  config.stages = ("cfp", "translate")
  config.data.num_threads = 2
  config.cfp.out_size = 64
  config.cfp.fov_deg = 172.0
  t = config.translate
  t.ngf, t.ndf, t.n_blocks, t.n_layers_d = 4, 4, 1, 1
  t.load_size, t.crop_size = 36, 32
  t.n_epochs, t.n_epochs_decay = 1, 1
  t.ckpt_every_steps = 8
  t.log_every_steps = 4
  t.num_threads = 2
  return config
