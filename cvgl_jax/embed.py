"""Embedding images with a trained TwoTower: the one path every caller takes.

`make_embed_fn` jits one tower (no random augmentation; optionally a paired
flip / quarter turn first) into (params, uint8 images sharded on `data`)
-> replicated [B, D] float32 unit embeddings. `embed_split` runs an
evaluation pipeline (`cvgl_jax.data.pipeline.evaluation`: each process
reads its own block of the pile, padded batches with a mask and the
image's index) through such a function on the mesh; embeddings come back
replicated, so every process assembles the whole [N, D] array, each image
exactly once.

Evaluation (`cvgl_jax.evaluate`), the pseudo-label rounds
(`cvgl_jax.pseudo.views`), the export (`cvgl_jax.export`), the report
(`cvgl_jax.report`) and a bundle's query embedding (`cvgl_jax.bundle`)
all embed through here.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from cvgl_jax import parallel
from cvgl_jax.data import augment
from cvgl_jax.data import pipeline as pipeline_lib

# (params, images [B, H, W, 3] uint8 sharded on `data`) -> [B, D] float32.
EmbedFn = Callable[[dict, jax.Array], jax.Array]


def make_embed_fn(model: nn.Module, mesh: jax.sharding.Mesh,
                  which: str, view: tuple[bool, int] = (False, 0)
                  ) -> EmbedFn:
  """Jitted (params, images) -> embeddings, no random augmentation.

  Args:
    model: a TwoTower.
    mesh: the data mesh.
    which: "ground" (query tower) or "satellite" (reference tower).
    view: (flip, k quarter turns) of the paired geometry
      (`augment.view_panoramas` / `view_tiles`) applied first; a ground
      and a satellite embedded with the same view keep their pairing.

  Returns:
    fn(params, images [B, H, W, 3] uint8 sharded on `data`) -> [B, D]
    float32 unit embeddings, replicated (every process can read them all).
  """
  methods = {"ground": "embed_ground", "satellite": "embed_satellite"}
  if which not in methods:
    raise ValueError(f"make_embed_fn: which must be 'ground' or 'satellite',"
                     f" got {which!r}.")
  method = methods[which]
  dtype = model.dtype
  flip, k = bool(view[0]), int(view[1])
  turn = augment.view_panoramas if which == "ground" else augment.view_tiles

  def embed(params, images):
    if flip or k % 4:
      images = turn(images, flip, k)
    x = augment.normalize(images, dtype)
    z = model.apply({"params": params}, x, False, method=method)
    return z.astype(jnp.float32)

  return jax.jit(embed, out_shardings=parallel.replicated(mesh))


def make_embed_fns(model: nn.Module, mesh: jax.sharding.Mesh
                   ) -> tuple[EmbedFn, EmbedFn]:
  """(ground, satellite) `make_embed_fn`s of a model, new ones (each
  compiles on its first call)."""
  return (make_embed_fn(model, mesh, "ground"),
          make_embed_fn(model, mesh, "satellite"))


@functools.lru_cache(maxsize=8)
def embed_fns(model: nn.Module, mesh: jax.sharding.Mesh
              ) -> tuple[EmbedFn, EmbedFn]:
  """`make_embed_fns`, cached per (model, mesh), so that repeated exports
  and reports of one model compile once."""
  return make_embed_fns(model, mesh)


def embed_split(embed_fn: EmbedFn, params, paths: Sequence[str], *,
                size: Sequence[int], batch_size: int,
                mesh: jax.sharding.Mesh, num_threads: int = 8,
                progress: bool = False, desc: str = "embed") -> np.ndarray:
  """Embeds every image of `paths` once, across all processes.

  Args:
    embed_fn: from `make_embed_fn` (uint8 images sharded on `data`
      -> replicated [B, D] float32).
    params: the model params (replicated).
    paths: [N] image files (e.g. `index.ground_paths`), the same list on
      every process.
    size: (H, W) the images are resized to.
    batch_size: images per process per batch; batch_size * process_count
      must divide over the mesh's devices.
    mesh: the data mesh.
    num_threads: decoding threads.
    progress: tqdm bar on process 0.
    desc: the bar's label.

  Returns:
    [N, D] float32 numpy, row i the embedding of paths[i], on every process.
  """
  parallel.check_batch_size(batch_size * jax.process_count(), mesh,
                            "eval batch_size x process count")
  pipe = pipeline_lib.evaluation(paths, size=size, batch_size=batch_size,
                                 num_threads=num_threads)
  n = len(pipe.paths)
  out, seen = None, np.zeros(n, np.int64)
  bar = tqdm.tqdm(total=pipe.num_batches, desc=desc, unit="batch",
                  disable=not (progress and parallel.is_main_process()))
  def store(job):
    nonlocal out
    emb, index, mask = (np.asarray(x) for x in job)
    if out is None:
      out = np.zeros((n, emb.shape[1]), np.float32)
    out[index[mask]] = emb[mask]
    np.add.at(seen, index[mask], 1)
    bar.update(1)

  # One batch in flight: a batch is dispatched before the previous one's
  # embeddings are fetched, so the device never waits for the host's copy.
  pending = None
  for batch in pipe:
    batch = parallel.to_global(batch, mesh)
    job = (embed_fn(params, batch["image"]),
           *parallel.replicate((batch["index"], batch["mask"]), mesh))
    if pending is not None:
      store(pending)
    pending = job
  if pending is not None:
    store(pending)
  bar.close()
  if not (seen == 1).all():
    bad = np.flatnonzero(seen != 1)
    raise RuntimeError(f"embed_split: {bad.size} of {n} images were embedded "
                       f"{seen[bad[0]]} times instead of once (first: "
                       f"{paths[bad[0]]}).")
  return out
