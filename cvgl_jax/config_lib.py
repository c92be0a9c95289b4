"""The run configuration: every key with its default, and validation.

A config file in `configs/` starts from `default_config()` and changes what
its experiment needs (big_vision style: a Python file whose `get_config()`
returns a ConfigDict). `validate(config)` runs before any compute and
raises `ConfigError` naming the key and the fix for: unknown keys (typos),
values of the wrong type, unknown stages, missing data roots and missing
weight files.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import ml_collections

from cvgl_jax import cpu
from cvgl_jax import data
from cvgl_jax import pretrain as pretrain_lib
from cvgl_jax.data.synthetic import config as synthetic_config

STAGES = ("pretrain", "cfp", "translate", "intra", "cross_fake",
          "supervised", "pseudo_label", "retrain")
TRAINING_STAGES = ("intra", "cross_fake", "supervised", "pseudo_label",
                   "retrain")
DATASETS = ("cvusa", "cvact", "vigor")
SELECT = ("label_free", "final")
# Domain A of the translation (`translate.source`).
TRANSLATE_SOURCES = ("g2a", "panorama")


class ConfigError(ValueError):
  """The config cannot drive a run; the message names the key."""

  @classmethod
  def of(cls, what: str, errors: list[str]) -> "ConfigError":
    """One problem: one line; several: one line each under `what`."""
    if len(errors) == 1:
      return cls(f"{what}: {errors[0]}")
    return cls(f"{what} ({len(errors)} problems):\n  " + "\n  ".join(errors))


PLATFORMS = ("any", "accelerator", "gpu", "tpu", "cpu")


def platform_problem(platform: str, backend: str) -> str:
  """Why JAX's default backend `backend` ("cpu", "gpu", "tpu") does not
  give what `config.platform` asks, or ""."""
  if platform == "any" or platform == backend or (
      platform == "accelerator" and backend in ("gpu", "tpu")):
    return ""
  want = "a GPU or TPU" if platform == "accelerator" else f"a {platform}"
  return (f"config.platform={platform!r} but JAX found only {backend} "
          f"devices. Install JAX for {want} (pip install 'cvgl_jax[cuda12]' "
          f"or 'cvgl_jax[tpu]'), check JAX_PLATFORMS and the device "
          f"drivers, or pass --config.platform=any to run here anyway.")


def default_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with the paper's values (docs/METHOD.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("cfp", "translate", "intra", "cross_fake", "pseudo_label")
  # What the run needs JAX to find: "any", "accelerator" (GPU or TPU),
  # "gpu", "tpu" or "cpu". A run that needs an accelerator and finds only
  # the CPU (jax without its cuda12 / tpu extra) stops before any work.
  c.platform = "any"
  # JAX's persistent compilation cache: "auto" ($JAX_COMPILATION_CACHE_DIR,
  # else <cvgl_jax cache>/jax), a folder, or "" for none. A resumed or
  # repeated run then skips most compiles.
  c.compilation_cache_dir = "auto"
  # The pictures written at the end of a run (cvgl_jax/report.py): queries
  # in retrieval_examples.png; 0 leaves that picture out, and with it a
  # last pass embedding the eval split.
  c.report = ml_collections.ConfigDict()
  c.report.num_examples = 6

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "cvusa"        # cvusa | cvact | vigor
  c.data.root = ""                # the unpacked dataset (docs/FORMATS.md)
  c.data.train_split = "train"
  c.data.eval_split = "val"       # cvact: val | test; vigor: test
  c.data.vigor_mode = "same_area"  # same_area | cross_area
  c.data.max_missing_fraction = 0.01
  # Image files found unusable before any stage (truncated, unreadable, or
  # of another size than the rest of their side): "error" | "skip" them.
  c.data.on_bad_image = "error"
  # A file of another size than most: "error" (counted as bad) | "resize".
  c.data.odd_image_size = "error"
  c.data.ground_size = (384, 384)   # (H, W) after resizing; VIGOR 384x768
  c.data.satellite_size = (384, 384)
  # Host decode threads per process; 0: from the cores this process may
  # use and its local devices (`pipeline.decode_threads`).
  c.data.num_threads = 0

  # A synthetic world generated under the workdir when `enabled`; then
  # data.root is ignored (the demo and the tests need nothing else).
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.enabled = False
  c.synthetic.layout = "cvusa"
  c.synthetic.num_pairs = 400
  c.synthetic.seed = 0
  c.synthetic.map_cells = 1024
  c.synthetic.pairs_per_world = 200
  c.synthetic.sat_px = 128
  c.synthetic.pano_width = 256
  c.synthetic.cvusa_width = 308
  # Generator settings of the target world (the pretraining stand-in's
  # source world keeps these defaults, as ImageNet does not follow the
  # target): block side (min, max) in metres, the city's density; the
  # strength of the satellite tiles' own colour field (capture change).
  c.synthetic.block_m = (45.0, 95.0)
  c.synthetic.sat_appearance = 0.3

  c.model = ml_collections.ConfigDict()
  c.model.variant = "base"        # atto ... large, or "custom"
  c.model.depths = (3, 3, 27, 3)  # only for variant="custom"
  c.model.dims = (128, 256, 512, 1024)
  c.model.head = "safa"           # safa | gap
  c.model.share_weights = False   # True: Sample4Geo's shared encoder
  c.model.num_safa_heads = 8
  c.model.drop_path_rate = 0.2
  c.model.dtype = "float32"       # float32 | bfloat16 (params stay f32)
  c.model.remat = False
  # auto | conv | native | shifts (DepthwiseConv); auto: native C++ on CPU
  c.model.depthwise_impl = "auto"
  c.model.pretrained = ""         # local timm/official ConvNeXt file

  # The stand-in for ImageNet weights (`cvgl_jax/pretrain.py`), made by
  # the `pretrain` stage on a disjoint synthetic source world.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.objective = "instance"  # instance (no pairs) | pairs (upper ref.)
  c.pretrain.world_seed = 1000    # the source world; != synthetic.seed
  c.pretrain.num_pairs = 2000
  c.pretrain.epochs = 10
  # paper: the paper's (strong) augmentation presets, which instance
  # discrimination needs to learn more than colour; run: the run's own.
  c.pretrain.augment = "paper"
  # Finished stand-ins, by fingerprint; "": ~/.cache/cvgl_jax/pretrain.
  c.pretrain.cache_dir = ""

  c.cfp = ml_collections.ConfigDict()
  c.cfp.out_size = 750            # CVUSA 750, CVACT 1200
  c.cfp.fov_deg = 175.0           # CVUSA 175, CVACT 170
  c.cfp.placement = "cvusa"       # cvusa (band crops) | full (2:1 panoramas)
  c.cfp.batch_size = 16
  c.cfp.wrap = False              # interpolate across the seam

  c.translate = translate_defaults()

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128        # global, across all devices and hosts
  c.train.lr = 1e-4
  c.train.weight_decay = 0.01     # torch AdamW's default, as the authors
  c.train.eval_every_epochs = 4
  c.train.eval_batch_size = 128
  c.train.checkpoint_every_steps = 1000
  c.train.log_every_steps = 50
  # Steps in a row skipped for a non-finite loss that end a stage as
  # diverged (a single bad batch is skipped and the run goes on).
  c.train.max_skipped_steps = 10
  # Gradient cache (`cvgl_jax/train/grad_cache.py`): take each step's
  # gradient in chunks of this many rows of the global batch -- the same
  # InfoNCE over the whole batch, with the activation memory of a batch of
  # this size, for ~1.3x the time. 0: off. Divides train.batch_size; a
  # multiple of the device count.
  c.train.grad_cache_chunk = 0
  # Which checkpoint a stage hands on (to the next stage, the report and
  # the export): "final" -- the last evaluation; "label_free" -- the one
  # with the most mutual nearest pairs above the margin `pseudo_label.tau`
  # among the eval split's two piles, a criterion that reads no pairing
  # label (on the benchmark it tracks R@1 but is coarser: BUILD_NOTES.md).
  # R@1 on the labelled eval split is telemetry, never used to choose.
  c.train.select = "final"

  # Training augmentations (docs/METHOD.md's, for ImageNet-pretrained towers on
  # real photos). Each probability applies to both views; the view-specific
  # structure (grid ratios, the satellite warps) stays. A from-scratch model
  # on a small world learns far faster with them weaker (BUILD_NOTES.md).
  c.augment = ml_collections.ConfigDict()
  c.augment.dropout_p = 0.5       # grid or coarse dropout
  c.augment.jitter_p = 0.8        # colour jitter (brightness/contrast/...)
  c.augment.jitter = 1.0          # scales brightness/contrast/sat. 0.4, hue 0.1
  c.augment.grayscale_p = 0.2
  c.augment.blur_p = 0.5
  c.augment.warp_p = 0.5          # satellite shift/scale (and intra rotation)
  c.augment.paired_flip_p = 0.5   # cross-view stages: flip both views
  c.augment.paired_rotate_p = 0.5  # rotate the tile, roll the panorama

  c.intra = ml_collections.ConfigDict()
  c.intra.epochs = 12
  c.intra.label_smoothing = 0.1

  c.cross_fake = ml_collections.ConfigDict()
  c.cross_fake.epochs = 28
  c.cross_fake.label_smoothing = 0.3
  c.cross_fake.fake_folder = "g2a_sat"  # g2a: the BEV itself ("w/o translation")

  c.supervised = ml_collections.ConfigDict()
  c.supervised.epochs = 40
  c.supervised.label_smoothing = 0.1

  c.pseudo_label = ml_collections.ConfigDict()
  c.pseudo_label.epochs = 40
  c.pseudo_label.warmup_epochs = 6  # GT pairs only (when gt_ratio > 0)
  c.pseudo_label.tau = 0.05       # CVUSA 0.05, CVACT 0.025, VIGOR 0.035
  c.pseudo_label.gt_ratio = 0.0   # labelled fraction (semi-supervised)
  # Below this labelled fraction an epoch trains the labelled pairs alone;
  # above it every ground image trains, unlabelled ones against the "no
  # match" logit. The authors use 0.4; at 1.0 (ours) every epoch trains the
  # labelled pairs alone: the switch collapses recall (BUILD_NOTES.md).
  c.pseudo_label.labeled_ratio = 1.0
  c.pseudo_label.label_smoothing = 0.1
  c.pseudo_label.mutual = True    # the three switches: paper's ablations
  c.pseudo_label.margin_filter = True
  c.pseudo_label.curriculum = True
  c.pseudo_label.knn_backend = "auto"  # auto | exact | scann
  c.pseudo_label.lr = 0.0         # peak rate of the stage; 0: train.lr
  # The authors load stage 2's AdamW moments into stage 3 (its schedule
  # restarts); False starts from fresh moments.
  c.pseudo_label.carry_optimizer = True
  # A mean teacher: the stage keeps an exponential moving average of its
  # params with this time constant, in epochs (rounds), and pseudo-labels,
  # evaluates and hands on the average instead of the last step's params.
  # 0: off (the authors').
  c.pseudo_label.ema_epochs = 0.0
  # What a round compares (cvgl_jax/pseudo/views.py): the mean similarity
  # over 1, 2, 4 or 8 paired flips/quarter turns, averaged (fake_view) with
  # that of each ground's own fake tile to the tiles. Label-free; they make
  # the first rounds precise where the paper's single view is not
  # (docs/pseudo_labels.md). The paper: paired_views=1, fake_view=False.
  # Cost per round: each train image decoded once, 2 x paired_views
  # (+ 1 with the fake) forward passes per pair instead of 2.
  c.pseudo_label.paired_views = 8
  c.pseudo_label.fake_view = True

  # Ours, after the paper's stage 3 (not in its pipeline; add "retrain" to
  # config.stages): the params stage 3 handed on label the training split
  # once, by the rule of its last round, and the model `start_from` handed
  # on (the cold start) trains again on those labels with stage 3's recipe
  # (rate, carried moments, labelled fraction). The curriculum's model saw
  # its full label set only in the last rounds, at the end of its cosine;
  # trained again on it from the cold start it ends higher
  # (docs/pseudo_labels.md).
  c.retrain = ml_collections.ConfigDict()
  c.retrain.epochs = 40
  c.retrain.label_smoothing = 0.1
  c.retrain.start_from = "cross_fake"

  return c


# Per-dataset settings of docs/METHOD.md (and, for VIGOR's CFP, ours: the paper
# gives none; BUILD_NOTES.md).
DATASET_SETTINGS = {
    "cvusa": dict(ground_size=(384, 384), satellite_size=(384, 384),
                  eval_split="val", out_size=750, fov_deg=175.0,
                  placement="cvusa", tau=0.05),
    "cvact": dict(ground_size=(384, 384), satellite_size=(384, 384),
                  eval_split="val", out_size=1200, fov_deg=170.0,
                  placement="full", tau=0.025),
    "vigor": dict(ground_size=(384, 768), satellite_size=(384, 384),
                  eval_split="test", out_size=640, fov_deg=170.0,
                  placement="full", tau=0.035),
}


def for_dataset(dataset: str, root: str = "") -> ml_collections.ConfigDict:
  """`default_config()` with the data and CFP settings of `dataset`."""
  if dataset not in DATASET_SETTINGS:
    raise ConfigError(f"Unknown dataset {dataset!r}; choose one of "
                      f"{sorted(DATASET_SETTINGS)}.")
  s = DATASET_SETTINGS[dataset]
  c = default_config()
  c.data.dataset = dataset
  c.data.root = root
  c.data.ground_size = s["ground_size"]
  c.data.satellite_size = s["satellite_size"]
  c.data.eval_split = s["eval_split"]
  c.cfp.out_size = s["out_size"]
  c.cfp.fov_deg = s["fov_deg"]
  c.cfp.placement = s["placement"]
  c.pseudo_label.tau = s["tau"]
  return c


def paradigm(dataset: str, gt_percent: float = 0.0
             ) -> ml_collections.ConfigDict:
  """The paper's pipeline on `dataset` with `gt_percent` % of the training
  pairs labelled (0: unsupervised; 1-30: semi-supervised)."""
  if not 0 <= gt_percent <= 100:
    raise ConfigError(f"gt_percent must lie in [0, 100], got {gt_percent}.")
  config = for_dataset(dataset)
  config.stages = ("cfp", "translate", "intra", "cross_fake", "pseudo_label")
  config.pseudo_label.gt_ratio = gt_percent / 100
  config.platform = "accelerator"  # Days on a CPU: say so at once.
  return config


SUPERVISED_MODELS = ("paper", "sample4geo")


def supervised(dataset: str, model: str = "paper") -> ml_collections.ConfigDict:
  """The 100 %-labels run on `dataset`'s true pairs.

  Args:
    dataset: cvusa | cvact | vigor.
    model: "paper" (two ConvNeXt towers with SAFA: the paradigm's 100 % row)
      or "sample4geo" (one shared ConvNeXt with global average pooling, the
      supervised anchor; its head accepts any image size, so VIGOR's
      different ground and satellite sizes can share it).
  """
  if model not in SUPERVISED_MODELS:
    raise ConfigError(f"The supervised config takes one of "
                      f"{SUPERVISED_MODELS}, got {model!r}.")
  config = for_dataset(dataset)
  config.stages = ("supervised",)
  config.platform = "accelerator"
  if model == "sample4geo":
    config.model.head = "gap"
    config.model.share_weights = True
  return config


def synthetic_demo() -> ml_collections.ConfigDict:
  """The whole paradigm at 0 % labels on a synthetic world sized for a
  2-core laptop: the demo (`configs/synthetic_unsup.py`) and the base of
  the synthetic benchmark (`configs/synthetic_benchmark.py`)."""
  config = for_dataset("cvusa")
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
  # The cold start stops improving after 4 CycleGAN epochs on this world
  # (R@1 after 2 / 4 / 8: 28.1 / 33.1 / 32.5 at seed 0, 20.0 / 27.5 / 23.8
  # at seed 1; benchmarks/translate_epochs.py, BUILD_NOTES.md).
  t.n_epochs, t.n_epochs_decay = 2, 2
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
  config.retrain.label_smoothing = 0.5
  return config


def translate_defaults() -> ml_collections.ConfigDict:
  """Defaults of the authors' CycleGAN run (UCVGL `CFP/CycleGAN` options),
  but for the number of epochs (see below).

  The authors' `base_options.py` resizes both domains to `load_size` = 360
  and takes random `crop_size` = 320 crops (plus random horizontal flips);
  at test time it resizes to `crop_size` and does not crop, so the written
  fakes are `crop_size` square.
  """
  config = ml_collections.ConfigDict()
  # Domain A: "g2a" (the BEV projections, the paper) or "panorama" (the
  # ground images themselves, squashed square: the paper's "without BEV"
  # ablation). The fakes go to `g2a_sat/` either way.
  config.source = "g2a"
  config.ngf = 64
  config.ndf = 64
  config.n_blocks = 9
  config.n_layers_d = 3
  config.load_size = 360
  config.crop_size = 320
  config.flip = True
  config.batch_size = 1
  # The authors' options train 100 + 100 epochs (two days on CVUSA on two
  # RTX 4090s, UCVGL issue #4, where they say ~20 suffice). Measured on
  # the synthetic world, the cold start stops improving after 4 epochs
  # (2,560 steps); 10 + 10 keeps a wide margin at a tenth of the time
  # (BUILD_NOTES.md). The authors' schedule: n_epochs = n_epochs_decay =
  # 100.
  config.n_epochs = 10
  config.n_epochs_decay = 10
  config.lr = 2e-4
  config.beta1 = 0.5
  config.beta2 = 0.999
  config.lambda_cycle = 10.0
  config.lambda_identity = 0.5
  config.pool_size = 50
  config.init_gain = 0.02
  # How the generator's two upsampling layers are computed (the same map;
  # `cvgl_jax.cpu.upsample`): "auto" is a sub-pixel convolution on the CPU
  # and XLA's transposed convolution elsewhere.
  config.upsample_impl = "auto"
  config.seed = 0
  # Bookkeeping of the stage (translate_stage.py).
  config.ckpt_every_steps = 2000
  config.keep_checkpoints = 2
  config.log_every_steps = 100
  config.translate_batch_size = 8
  config.num_threads = 4
  return config


# Keys of the translate section that count things (>= 1) or weigh them
# (>= 0).
_TRANSLATE_COUNTS = ("ngf", "ndf", "n_blocks", "n_layers_d", "load_size",
                     "crop_size", "batch_size", "ckpt_every_steps",
                     "keep_checkpoints", "log_every_steps",
                     "translate_batch_size", "num_threads")
_TRANSLATE_WEIGHTS = ("n_epochs", "n_epochs_decay", "pool_size",
                      "lambda_cycle", "lambda_identity")


def translate_problems(t: ml_collections.ConfigDict,
                       prefix: str = "config.translate.") -> list[str]:
  """What is wrong with the values of a translate section `t` whose keys
  and kinds are right (`_check_tree`), one sentence each."""
  errors = []
  if t.source not in TRANSLATE_SOURCES:
    errors.append(f"{prefix}source={t.source!r}; choose one of "
                  f"{TRANSLATE_SOURCES}")
  errors += [f"{prefix}{key}={t[key]} must be >= 1"
             for key in _TRANSLATE_COUNTS if t[key] < 1]
  errors += [f"{prefix}{key}={t[key]} must be >= 0"
             for key in _TRANSLATE_WEIGHTS if t[key] < 0]
  if t.n_epochs + t.n_epochs_decay < 1:
    errors.append(f"{prefix}n_epochs + n_epochs_decay must be >= 1")
  if t.crop_size % 4:
    errors.append(f"{prefix}crop_size={t.crop_size} must be a multiple of "
                  "4 (the generator halves it twice)")
  if t.crop_size > t.load_size:
    errors.append(f"{prefix}crop_size={t.crop_size} must not exceed "
                  f"load_size={t.load_size}")
  if not t.lr > 0:
    errors.append(f"{prefix}lr={t.lr} must be > 0")
  if t.upsample_impl not in cpu.UPSAMPLE_IMPLS:
    errors.append(f"{prefix}upsample_impl={t.upsample_impl!r}; choose one "
                  f"of {', '.join(cpu.UPSAMPLE_IMPLS)}")
  return errors


def section_problems(section: ml_collections.ConfigDict,
                     defaults: ml_collections.ConfigDict,
                     prefix: str) -> list[str]:
  """Unknown keys (with the closest known one), missing keys and values of
  the wrong kind in `section` against `defaults`; `prefix` names the
  section in the messages (e.g. "translate.")."""
  errors: list[str] = []
  _check_tree(section, defaults, prefix, errors)
  errors += [f"config.{prefix}{key} is missing; start from the defaults"
             for key in defaults.keys() if key not in section]
  return errors


def _check_tree(config, defaults, prefix: str, errors: list[str]) -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults.keys()), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      errors.append(f"unknown key config.{name}{hint}; known keys here: "
                    f"{sorted(defaults.keys())}")
      continue
    value, default = config[key], defaults[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        errors.append(f"config.{name} must be a section (ConfigDict), got "
                      f"{value!r}")
      else:
        _check_tree(value, default, name + ".", errors)
    elif not _same_kind(value, default):
      errors.append(f"config.{name}={value!r} should be a "
                    f"{type(default).__name__} like the default {default!r}")


def _same_kind(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def retrain_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of the `retrain` stage's place in `config.stages`: the
  pseudo-label stage (its teacher) and `retrain.start_from` (a training
  stage) must run before it."""
  stages = list(config.stages)
  if "retrain" not in stages:
    return []
  errors, earlier = [], stages[:stages.index("retrain")]
  if "pseudo_label" not in earlier:
    errors.append("config.stages runs 'retrain' without 'pseudo_label' "
                  "before it: the retrain stage learns the labels of "
                  "stage 3's final model; add 'pseudo_label' before it")
  start = config.retrain.start_from
  choices = [s for s in earlier
             if s in TRAINING_STAGES and s != "pseudo_label"]
  if start not in choices:
    errors.append(f"config.retrain.start_from={start!r} must be a training "
                  f"stage run before stage 3 (one of {choices}; the cold "
                  "start: 'cross_fake')")
  return errors


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every problem; cheap (no data is read)."""
  errors: list[str] = []
  _check_tree(config, default_config(), "", errors)
  if errors:
    raise ConfigError.of("Invalid config", errors)
  errors.extend(pretrain_lib.validate(config))
  if config.train.select not in SELECT:
    errors.append(f"config.train.select={config.train.select!r}; choose one "
                  f"of {SELECT}")
  if config.report.num_examples < 0:
    errors.append(f"config.report.num_examples={config.report.num_examples} "
                  "must be >= 0 (0: no retrieval examples picture)")
  if config.pseudo_label.lr < 0:
    errors.append(f"config.pseudo_label.lr={config.pseudo_label.lr} must be "
                  ">= 0 (0: config.train.lr)")
  if config.platform not in PLATFORMS:
    errors.append(f"config.platform={config.platform!r}; choose one of "
                  f"{PLATFORMS}")
  for stage in config.stages:
    if stage not in STAGES:
      close = difflib.get_close_matches(str(stage), STAGES, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      errors.append(f"config.stages names {stage!r}{hint}; stages are "
                    f"{STAGES}")
  if len(set(config.stages)) != len(config.stages):
    errors.append(f"config.stages repeats a stage: {tuple(config.stages)}")
  errors.extend(retrain_problems(config))
  d = config.data
  if d.dataset not in DATASETS:
    errors.append(f"config.data.dataset={d.dataset!r}; choose one of "
                  f"{DATASETS}")
  if config.synthetic.enabled:
    if config.synthetic.layout not in DATASETS:
      errors.append(f"config.synthetic.layout={config.synthetic.layout!r}; "
                    f"choose one of {DATASETS}")
    try:
      synthetic_config.SyntheticConfig.from_run_config(
          config.synthetic).validate()
    except (ValueError, TypeError) as e:
      errors.append(f"config.synthetic: {e}")
  elif not d.root:
    errors.append("config.data.root is empty: set it to the unpacked "
                  "dataset (--config.data.root=/path), or enable "
                  "config.synthetic")
  elif not os.path.isdir(d.root):
    errors.append(f"config.data.root={d.root!r} is not a directory")
  if d.num_threads < 0:
    errors.append(f"config.data.num_threads={d.num_threads} must be >= 0 "
                  "(0: from the cores and devices)")
  for key, choices in (("on_bad_image", data.ON_BAD_IMAGE),
                       ("odd_image_size", data.ODD_IMAGE_SIZE)):
    if d[key] not in choices:
      errors.append(f"config.data.{key}={d[key]!r}; choose one of "
                    f"{choices}")
  for key in ("ground_size", "satellite_size"):
    size = d[key]
    if len(size) != 2 or min(size) < 32:
      errors.append(f"config.data.{key}={tuple(size)} must be (H, W), each "
                    ">= 32")
  m = config.model
  if m.pretrained and not os.path.isfile(m.pretrained):
    errors.append(f"config.model.pretrained={m.pretrained!r} does not exist;"
                  " give a local .safetensors/.pth file or '' for random "
                  "init")
  if m.head not in ("safa", "gap"):
    errors.append(f"config.model.head={m.head!r}; choose 'safa' or 'gap'")
  if m.depthwise_impl not in cpu.DEPTHWISE_IMPLS:
    errors.append(f"config.model.depthwise_impl={m.depthwise_impl!r}; "
                  f"choose one of {', '.join(cpu.DEPTHWISE_IMPLS)}")
  elif m.depthwise_impl == "native" and m.dtype != "float32":
    errors.append(f"config.model.depthwise_impl='native' runs in float32 "
                  f"only, but config.model.dtype={m.dtype!r}; use 'auto'")
  if m.dtype not in ("float32", "bfloat16"):
    errors.append(f"config.model.dtype={m.dtype!r}; choose 'float32' or "
                  "'bfloat16'")
  t = config.train
  if not t.lr > 0:
    errors.append(f"config.train.lr={t.lr} must be > 0")
  if t.weight_decay < 0:
    errors.append(f"config.train.weight_decay={t.weight_decay} must be >= 0")
  for key in ("batch_size", "eval_batch_size", "eval_every_epochs",
              "checkpoint_every_steps", "log_every_steps",
              "max_skipped_steps"):
    if t[key] < 1:
      errors.append(f"config.train.{key}={t[key]} must be >= 1")
  if t.grad_cache_chunk:
    chunk = t.grad_cache_chunk
    if chunk < 0 or t.batch_size % chunk:
      errors.append(f"config.train.grad_cache_chunk={chunk} must divide "
                    f"config.train.batch_size={t.batch_size} (0 turns the "
                    "gradient cache off)")
  for stage in TRAINING_STAGES:
    if config[stage].epochs < 1:
      errors.append(f"config.{stage}.epochs must be >= 1")
    if not 0 <= config[stage].label_smoothing < 1:
      errors.append(f"config.{stage}.label_smoothing must be in [0, 1)")
  if config.cross_fake.fake_folder not in ("g2a_sat", "g2a"):
    errors.append(f"config.cross_fake.fake_folder="
                  f"{config.cross_fake.fake_folder!r}; choose 'g2a_sat' (the "
                  "translated BEV) or 'g2a' (the BEV)")
  errors.extend(translate_problems(config.translate))
  a = config.augment
  for key in ("dropout_p", "jitter_p", "grayscale_p", "blur_p", "warp_p",
              "paired_flip_p", "paired_rotate_p"):
    if not 0 <= a[key] <= 1:
      errors.append(f"config.augment.{key}={a[key]} must be a probability "
                    "in [0, 1]")
  if not 0 <= a.jitter <= 2.5:
    errors.append(f"config.augment.jitter={a.jitter} must be in [0, 2.5] "
                  "(brightness, contrast and saturation factors stay >= 0)")
  p = config.pseudo_label
  for key in ("gt_ratio", "labeled_ratio"):
    if not 0 <= p[key] <= 1:
      errors.append(f"config.pseudo_label.{key}={p[key]} must be in [0, 1]")
  if not 0 <= p.warmup_epochs < p.epochs:
    errors.append(f"config.pseudo_label.warmup_epochs={p.warmup_epochs} "
                  f"must be in [0, epochs={p.epochs})")
  if p.tau < 0:
    errors.append(f"config.pseudo_label.tau={p.tau} must be >= 0")
  if p.ema_epochs < 0:
    errors.append(f"config.pseudo_label.ema_epochs={p.ema_epochs} must be "
                  ">= 0 (0: no moving average)")
  if p.knn_backend not in ("auto", "exact", "scann"):
    errors.append(f"config.pseudo_label.knn_backend={p.knn_backend!r}; "
                  "choose auto, exact or scann")
  if p.paired_views not in (1, 2, 4, 8):
    errors.append(f"config.pseudo_label.paired_views={p.paired_views}; "
                  "choose 1 (the paper's), 2, 4 or 8")
  elif p.paired_views >= 4:
    sat, ground = config.data.satellite_size, config.data.ground_size
    if sat[0] != sat[1] or ground[1] % 4:
      errors.append(f"config.pseudo_label.paired_views={p.paired_views} "
                    f"turns tiles by quarter turns: it needs square tiles "
                    f"(data.satellite_size={tuple(sat)}) and a panorama "
                    f"width divisible by 4 (data.ground_size="
                    f"{tuple(ground)}); use 1 or 2")
  if errors:
    raise ConfigError.of("Invalid config", errors)
