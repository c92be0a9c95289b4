"""A stand-in for the ImageNet weights the paper starts from.

The paper's towers start from ImageNet-pretrained ConvNeXts; no such file
can be downloaded here, and a from-scratch tower makes a cold start whose
pseudo labels are mostly wrong (BUILD_NOTES.md, "Pretraining stand-in").
The `pretrain` stage makes generic visual features WITHOUT any
ground-satellite pairing label of the target world:

  1. a source world is generated from its own seed
     (`config.pretrain.world_seed`, distinct from the target's: no scene is
     shared, since every world of a dataset is drawn from the dataset seed);
  2. one shared ConvNeXt with a global-average-pool head trains on its
     single images (`objective="instance"`: two augmented views of one
     image are a positive pair, for ground panoramas and satellite tiles
     alike -- instance discrimination, no pairs), or, as an upper reference
     only, on its true ground-satellite pairs (`objective="pairs"`: not the
     paper's setting, which never sees pairs);
  3. the backbone is written as a timm-named `.safetensors` file, the
     format `config.model.pretrained` reads, so later stages load the
     stand-in through the same code path as a user's ImageNet checkpoint.

The file is cached (`cache_dir()`, keyed by a hash of everything that
shapes it), so a demo or a table of runs makes it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import ml_collections

from cvgl_jax import cache


OBJECTIVES = ("instance", "pairs")
AUGMENT = ("paper", "run")
STANDIN_FILE = "standin.safetensors"
# The source world's generator settings (`config.synthetic` keys): the
# defaults of the target world's, fixed.
SOURCE_WORLD_STYLE = {"block_m": (45.0, 95.0), "sat_appearance": 0.3}


def source_config(config: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """The config of the run that trains the stand-in on the source world.

  Same backbone, image sizes, batch and learning rate as the target run;
  the paper's augmentation presets (`pretrain.augment="paper"`) or the
  run's own; one shared tower with a GAP head (it must see ground and
  satellite images alike, whatever their sizes); the source world's seed
  (also the training seed) and size; one training stage of
  `config.pretrain.epochs` epochs.
  """
  p = config.pretrain
  c = ml_collections.ConfigDict(config.to_dict())
  c.stages = ("intra",) if p.objective == "instance" else ("supervised",)
  # The stand-in does not depend on the target run's seed: runs that
  # differ only in their seed share one.
  c.seed = p.world_seed
  c.synthetic.enabled = True
  c.synthetic.seed = p.world_seed
  c.synthetic.num_pairs = p.num_pairs
  # The source world keeps the default generator settings whatever the
  # target's: a stand-in, like ImageNet, does not follow the target world.
  for key, value in SOURCE_WORLD_STYLE.items():
    c.synthetic[key] = value
  if p.augment == "paper":
    from cvgl_jax import config_lib  # pylint: disable=g-import-not-at-top
    c.augment = config_lib.default_config().augment
  c.model.head = "gap"
  c.model.share_weights = True
  c.model.pretrained = ""
  stage = c.stages[0]
  c[stage].epochs = p.epochs
  c.train.eval_every_epochs = p.epochs  # Telemetry at the end only.
  return c


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of every setting that shapes the stand-in's weights."""
  c = source_config(config)
  shaping = {k: c[k].to_dict() for k in (
      "synthetic", "model", "augment", "train", "intra", "supervised",
      "data", "pretrain")}
  shaping["pretrain"].pop("cache_dir")
  for key in SOURCE_WORLD_STYLE:  # Constant: the hash predates these keys.
    shaping["synthetic"].pop(key, None)
  shaping.update(seed=c.seed, stages=list(c.stages))
  for key in ("root", "num_threads", "dataset", "train_split",
              "eval_split", "on_bad_image", "odd_image_size"):
    shaping["data"].pop(key, None)
  for key in ("eval_every_epochs", "eval_batch_size",
              "checkpoint_every_steps", "log_every_steps",
              "max_skipped_steps"):
    shaping["train"].pop(key, None)
  if not shaping["train"].get("grad_cache_chunk"):  # Off: the old hash.
    shaping["train"].pop("grad_cache_chunk", None)
  text = json.dumps(shaping, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Where finished stand-ins are kept: `config.pretrain.cache_dir`, else
  `<cvgl_jax cache>/pretrain` ($CVGL_JAX_CACHE_DIR, else
  $XDG_CACHE_HOME/cvgl_jax or ~/.cache/cvgl_jax)."""
  if config.pretrain.cache_dir:
    return pathlib.Path(config.pretrain.cache_dir)
  return cache.cache_dirs()[0] / "pretrain"


def cached_file(config: ml_collections.ConfigDict) -> pathlib.Path:
  """The cache entry of this config's stand-in (it may not exist yet)."""
  return cache_dir(config) / f"{fingerprint(config)}.safetensors"


def validate(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of `config.pretrain` when the stage is run (else none)."""
  if "pretrain" not in config.stages:
    return []
  p, errors = config.pretrain, []
  if p.objective not in OBJECTIVES:
    errors.append(f"config.pretrain.objective={p.objective!r}; choose one "
                  f"of {OBJECTIVES}")
  if p.augment not in AUGMENT:
    errors.append(f"config.pretrain.augment={p.augment!r}; choose one of "
                  f"{AUGMENT}")
  if config.model.pretrained:
    errors.append("config.stages runs 'pretrain' but config.model.pretrained"
                  f"={config.model.pretrained!r} is set: use one or the "
                  "other")
  if config.synthetic.enabled and p.world_seed == config.synthetic.seed:
    errors.append(f"config.pretrain.world_seed={p.world_seed} equals "
                  "config.synthetic.seed: the source world must be "
                  "disjoint from the target world; choose another seed")
  if p.num_pairs < 20:
    errors.append(f"config.pretrain.num_pairs={p.num_pairs} must be >= 20")
  if p.epochs < 1:
    errors.append(f"config.pretrain.epochs={p.epochs} must be >= 1")
  if list(config.stages).index("pretrain") != 0:
    errors.append("config.stages: 'pretrain' must come first")
  return errors


def standin_path(workdir: str) -> str:
  """The stand-in a run uses: `workdir/pretrain/standin.safetensors`."""
  return os.path.join(workdir, "pretrain", STANDIN_FILE)
