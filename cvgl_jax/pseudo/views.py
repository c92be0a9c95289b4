"""What a pseudo-label round compares: label-free views of the train split.

The paper compares each ground's embedding with each satellite's, once
(`PairingViews()`: one view, no fake). Two label-free additions make the
first rounds far more precise (docs/pseudo_labels.md has the measurements):

  * paired views: S_v = g_v . s_v for the ground and satellite images seen
    under the same flip and quarter turn (`augment.paired_geometry`), a
    true pair staying a pair in each; their mean replaces S;
  * the fake view: F = f . s, the satellite tower's embedding f of each
    ground's own fake tile (CFP + translation, made from the ground image
    alone: what the cold start trains on) against the real tiles.

The combined similarity (mean_v S_v + F) / 2 (or mean_v S_v alone) is an
inner product of concatenated, rescaled embeddings, so that mutual matching,
the margin (in cosine units, compared with tau as before) and both
nearest-neighbour backends run unchanged:

  without the fake:  ground    = [g_1 .. g_V] / sqrt(V)
                     satellite = [s_1 .. s_V] / sqrt(V)
  with the fake:     ground    = [g_1 .. g_V] / sqrt(2V) ++ f / sqrt(2)
                     satellite = [s_1 .. s_V] / sqrt(2V) ++ s_1 / sqrt(2)

(s_1: the plain view.) Each row stays a unit vector: [N, D (V + 1)] with the
fake, [N, D V] without, float32. Each image is decoded once per round; the
views are taken on the device.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cvgl_jax import embed as embed_lib
from cvgl_jax import parallel
from cvgl_jax.data import derived
from cvgl_jax.data.index import PairIndex

# (flip, quarter turns) of each paired view, by number of views.
VIEWS = {
    1: ((False, 0),),
    2: ((False, 0), (True, 0)),
    4: tuple((False, k) for k in range(4)),
    8: tuple((flip, k) for flip in (False, True) for k in range(4)),
}


@dataclasses.dataclass(frozen=True)
class PairingViews:
  """Which views a round compares.

  Attributes:
    paired_views: 1 (the paper's), 2 (+ flip), 4 (quarter turns) or 8.
    fake_folder: the folder of each ground's fake tile under the dataset
      root (`config.cross_fake.fake_folder`), or None for no fake view.
  """
  paired_views: int = 1
  fake_folder: Optional[str] = None

  def __post_init__(self):
    if self.paired_views not in VIEWS:
      raise ValueError(f"paired_views={self.paired_views}; choose one of "
                       f"{sorted(VIEWS)}.")


# The stage that writes each fake folder (`config.cross_fake.fake_folder`).
FAKE_WRITER = {"g2a_sat": "translate", "g2a": "cfp"}


def missing_fakes(config: ml_collections.ConfigDict, train: PairIndex, *,
                  written: bool = False) -> str:
  """A line naming what is missing when `pseudo_label.fake_view` needs each
  ground's fake tile and some are not on disk; "" if nothing is. The same
  answer on every process (`derived.first_missing`); call on all of them.

  Before any stage (`written=False`) only fakes that no stage of the run
  writes are checked; at the pseudo-label stage (`written=True`) all are.
  """
  folder = config.cross_fake.fake_folder
  writer = FAKE_WRITER.get(folder, "")
  if not ("pseudo_label" in config.stages and config.pseudo_label.fake_view):
    return ""
  if not written and writer in config.stages:
    return ""
  fakes = train.derived_paths(folder)
  first = derived.first_missing(fakes)
  if first == len(fakes):
    return ""
  missing = sum(not os.path.exists(f) for f in fakes[first:])
  return (f"config.pseudo_label.fake_view=True compares each ground's fake "
          f"tile, but {missing} of {len(fakes)} are missing (first: "
          f"{fakes[first]}): "
          + (f"run the stage {writer!r} first" if writer else
             "write them there first")
          + ", or set config.pseudo_label.fake_view=False.")


@dataclasses.dataclass(frozen=True)
class Embedders:
  """Jitted (params, uint8 images sharded on `data`) -> replicated rows.

  Attributes:
    ground: [B, H, W, 3] panoramas -> [B, D * V] their paired views' blocks.
    satellite: tiles -> [B, D * (V + fake)]: the views' blocks (and the
      plain view again, for the fake's block).
    fake: fake tiles -> [B, D] (the fake's block), or None.
  """
  ground: embed_lib.EmbedFn
  satellite: embed_lib.EmbedFn
  fake: Optional[embed_lib.EmbedFn]


def make_embedders(model, mesh: jax.sharding.Mesh, views: PairingViews
                   ) -> Embedders:
  """The round's embedding functions: every view of a batch in one call, so
  that each image is decoded once per round whatever the views."""
  turns = VIEWS[views.paired_views]
  fake = views.fake_folder is not None
  # Weights that keep rows unit and make the inner product the mean of the
  # views' cosines (with the fake: averaged again with the fake's).
  w_view = np.float32(1 / np.sqrt(len(turns) * (2 if fake else 1)))
  w_fake = np.float32(1 / np.sqrt(2))
  single = {(tower, turn): embed_lib.make_embed_fn(model, mesh, tower, turn)
            for tower in ("ground", "satellite") for turn in turns}

  def ground(params, images):
    return jnp.concatenate([single["ground", turn](params, images) * w_view
                            for turn in turns], axis=1)

  def satellite(params, images):
    views = [single["satellite", turn](params, images) for turn in turns]
    out = [v * w_view for v in views]
    if fake:  # turns[0] is the plain view: the fake's partner.
      out.append(views[0] * w_fake)
    return jnp.concatenate(out, axis=1)

  replicated = parallel.replicated(mesh)
  fake_fn = None
  if fake:
    plain = single["satellite", (False, 0)]
    fake_fn = jax.jit(lambda params, images: plain(params, images) * w_fake,
                      out_shardings=replicated)
  return Embedders(jax.jit(ground, out_shardings=replicated),
                   jax.jit(satellite, out_shardings=replicated), fake_fn)


def pairing_embeddings(embedders: Embedders, params, index: PairIndex,
                       views: PairingViews, *, ground_size: Sequence[int],
                       satellite_size: Sequence[int], **embed_options
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The ground and satellite piles of `index` as the round compares them.

  Args:
    embedders: from `make_embedders(model, mesh, views)`.
    params: the model's params (replicated).
    index: the train split.
    views: the `PairingViews` the embedders were made for.
    ground_size, satellite_size: (H, W) the images are resized to.
    **embed_options: batch_size, mesh, num_threads of
      `embed.embed_split`.

  Returns:
    ([Ng, D'] ground, [Ns, D'] satellite) float32 unit rows whose inner
    products are the combined similarity of the module docstring.
  """
  ground = embed_lib.embed_split(embedders.ground, params,
                                 index.ground_paths, size=ground_size,
                                 **embed_options)
  satellite = embed_lib.embed_split(embedders.satellite, params,
                                    index.satellite_paths,
                                    size=satellite_size, **embed_options)
  if embedders.fake is not None:
    fake = embed_lib.embed_split(
        embedders.fake, params, index.derived_paths(views.fake_folder),
        size=satellite_size, **embed_options)
    ground = np.concatenate([ground, fake], axis=1)
  return ground, satellite
