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

  ground    = [g_1 .. g_V] / sqrt(V)          (+ [f] / sqrt(2), the g_v by 1/sqrt(2V))
  satellite = [s_1 .. s_V] / sqrt(V)          (+ [s_1] / sqrt(2), likewise)

Each row stays a unit vector: [N, D * (V + fake)] float32.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from cvgl_jax import evaluate
from cvgl_jax.data.index import PairIndex
from cvgl_jax.train import steps

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


def make_embedders(model, mesh: jax.sharding.Mesh, views: PairingViews
                   ) -> dict[tuple[str, tuple[bool, int]], evaluate.EmbedFn]:
  """{(tower, view): jitted embed fn} for every view `views` needs."""
  return {(tower, view): steps.make_embed_fn(model, mesh, tower, view)
          for view in VIEWS[views.paired_views]
          for tower in ("ground", "satellite")}


def pairing_embeddings(embedders, params, index: PairIndex,
                       views: PairingViews, *, ground_size: Sequence[int],
                       satellite_size: Sequence[int], **embed_options
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The ground and satellite piles of `index` as the round compares them.

  Args:
    embedders: from `make_embedders(model, mesh, views)`.
    params: the model's params (replicated).
    index: the train split.
    views: a `PairingViews`.
    ground_size, satellite_size: (H, W) the images are resized to.
    **embed_options: batch_size, mesh, num_threads of
      `evaluate.embed_split`.

  Returns:
    ([Ng, D'] ground, [Ns, D'] satellite) float32 unit rows whose inner
    products are the combined similarity of the module docstring.
  """
  grounds, satellites = [], []
  for view in VIEWS[views.paired_views]:
    grounds.append(evaluate.embed_split(
        embedders["ground", view], params, index.ground_paths,
        size=ground_size, **embed_options))
    satellites.append(evaluate.embed_split(
        embedders["satellite", view], params, index.satellite_paths,
        size=satellite_size, **embed_options))
  weight = np.float32(1 / np.sqrt(len(grounds)))
  if views.fake_folder is not None:
    fakes = evaluate.embed_split(
        embedders["satellite", (False, 0)], params,
        index.derived_paths(views.fake_folder), size=satellite_size,
        **embed_options)
    weight = weight / np.float32(np.sqrt(2))
    half = np.float32(1 / np.sqrt(2))
    return (np.concatenate([g * weight for g in grounds] + [fakes * half], 1),
            np.concatenate([s * weight for s in satellites]
                           + [satellites[0] * half], 1))
  return (np.concatenate([g * weight for g in grounds], 1),
          np.concatenate([s * weight for s in satellites], 1))
