r"""The demo: the whole paradigm at 0 % labels on a synthetic world, on a CPU.

  python -m cvgl_jax.main --config=configs/synthetic_unsup.py --workdir=/tmp/demo

Generates a small synthetic CVUSA-layout world under the workdir (unless
present), then runs every stage: `pretrain` (the stand-in for ImageNet
weights, trained on a disjoint source world without pairs; cached in
~/.cache/cvgl_jax/pretrain, so made once), CFP (BEV projection), the
CycleGAN translation to satellite style, the intra-view and cross-view
cold start of a small ConvNeXt, and the pseudo-label rounds (epochs 6-39
of 40, as the paper), evaluating R@1/5/10/1 % on the world's validation
split. Nothing else is needed: no dataset, no pretrained weights. Sizes
are chosen for a 2-core laptop; every key can be overridden on the
command line (`--config.synthetic.num_pairs=2000`, ...).
"""

from cvgl_jax import config_lib


def get_config():
  config = config_lib.for_dataset("cvusa")
  config.stages = ("pretrain", "cfp", "translate", "intra", "cross_fake",
                   "pseudo_label")

  config.synthetic.enabled = True
  config.synthetic.layout = "cvusa"
  config.synthetic.num_pairs = 800
  config.synthetic.map_cells = 1024
  config.synthetic.pairs_per_world = 50
  config.synthetic.sat_px = 128
  config.synthetic.cvusa_width = 308     # 308 x 56 band crops

  config.data.ground_size = (32, 128)
  config.data.satellite_size = (64, 64)
  config.data.num_threads = 4

  config.cfp.out_size = 64
  config.cfp.batch_size = 32
  # The BEV must cover what the tile covers. CVUSA's 175 deg suits its
  # tiles; for 64 m tiles seen from 1.8-2.8 m, 175 deg reaches ~50 m and
  # 172 deg ~35 m. Raw BEV-vs-tile NCC on this world: R@1 2.8 % at 175 deg,
  # 13.1 % at 172 deg (320 tiles; BUILD_NOTES.md).
  config.cfp.fov_deg = 172.0

  t = config.translate
  t.ngf, t.ndf, t.n_blocks, t.n_layers_d = 8, 8, 2, 2
  t.load_size, t.crop_size = 72, 64
  t.n_epochs, t.n_epochs_decay = 1, 1
  t.ckpt_every_steps = 500
  t.log_every_steps = 50

  config.model.variant = "custom"
  config.model.depths = (1, 1, 2, 1)
  config.model.dims = (32, 64, 96, 128)
  config.model.drop_path_rate = 0.0

  # A from-scratch model on 640 training pairs learns nothing in a few
  # hundred steps under the paper's augmentations (BUILD_NOTES.md): keep
  # the geometric ones, soften the photometric ones, drop the dropout.
  a = config.augment
  a.dropout_p, a.blur_p, a.grayscale_p = 0.0, 0.0, 0.0
  a.jitter_p, a.jitter = 0.5, 0.5

  config.train.batch_size = 32
  config.train.eval_batch_size = 64
  config.train.lr = 1e-3
  config.train.eval_every_epochs = 2
  config.train.checkpoint_every_steps = 200
  config.train.log_every_steps = 5

  config.intra.epochs = 2
  # From scratch on the CycleGAN's fakes, the cross-view stage sits near
  # chance for ~7 epochs, then learns within a few. With 10 epochs the
  # cosine schedule had decayed the learning rate before that: R@1 3.1 %;
  # with 20: 23.1 % (BUILD_NOTES.md). The paper's stages are 12/28/40.
  config.cross_fake.epochs = 20
  # Stage 3 in the paper's proportions: 40 epochs, the first 6 a warm-up
  # on the true pairs (none at 0 %: the rounds are epochs 6-39, as the
  # authors'), one pass over the training grounds per round.
  config.pseudo_label.epochs = 40
  config.pseudo_label.warmup_epochs = 6
  # The pseudo labels are noisy (precision 60-80 %), and a small model
  # memorises the wrong ones under the paper's smoothing of 0.1: admitted
  # pairs settle at 57 % precision, R@1 55.0 on the benchmark world.
  # Smoothing 0.3 gives 64 % / 61.6, 0.5 gives 75 % / 70.8 (BUILD_NOTES.md).
  config.pseudo_label.label_smoothing = 0.5
  return config
