"""Gradient-cached contrastive training (GradCache, Gao et al. 2021).

InfoNCE with in-batch negatives wants a large batch, and a plain step keeps
every image's activations for the backward pass: its memory grows with the
batch. The loss, though, couples the images only through their embeddings
[B, D], a few kilobytes each. So the gradient of a batch of B rows can be
taken in chunks of K rows with the memory of a batch of K:

  1. embed the batch chunk by chunk, keeping only the embeddings (no
     activations are saved: nothing is differentiated yet);
  2. take the loss over the whole batch -- negatives gathered across every
     device as in the plain step -- and its gradient with respect to the
     embeddings (and to the parameters the loss reads directly, the logit
     scale);
  3. embed each chunk again, now with its VJP, pull the chunk's embedding
     gradient back to the parameters and add up the chunks.

The result is the gradient of the same loss: the chain rule split at the
embeddings, summed in another order (float tolerance). The second pass
costs one more forward per image, ~1.3x the plain step's time.

Randomness inside the towers (drop path) is drawn per chunk with the key
`fold_in(key, chunk)`, the same in both passes, so step 3 differentiates
exactly what step 1 computed; the masks are distributed as the plain
step's but are not the same draws (a plain step draws them over the whole
batch). Augmentation happens before the towers, on the whole batch, and is
unchanged.

Chunks interleave: chunk c holds rows c, c + C, c + 2C, ... of the global
batch (C = B / K chunks). The batch is sharded in contiguous blocks over
the mesh's devices, so with K a multiple of the device count every chunk
spreads evenly over all devices and no row moves between devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# embed(params, inputs, key) -> embeddings: `inputs` a pytree of [b, ...]
# arrays, the embeddings a pytree of [b, D] arrays.
EmbedFn = Callable[[Any, Any, jax.Array], Any]
# loss(params, embeddings) -> (scalar loss, metrics) over the whole batch.
LossFn = Callable[[Any, Any], tuple[jax.Array, dict]]


def chunk_problem(chunk: int, global_batch: int, num_devices: int,
                  name: str = "train.grad_cache_chunk") -> str:
  """Why `chunk` cannot split `global_batch` over `num_devices` ("" when it
  can). 0 turns the cache off and always fits."""
  if chunk == 0:
    return ""
  if chunk < 0 or global_batch % chunk:
    return (f"{name}={chunk} must divide the global batch {global_batch} "
            f"(0 turns the gradient cache off)")
  if chunk % num_devices:
    return (f"{name}={chunk} must be a multiple of the {num_devices} devices "
            f"(each chunk is spread over all of them); choose e.g. "
            f"{num_devices * max(1, round(chunk / num_devices))}")
  return ""


def _split(x: jax.Array, num_chunks: int) -> jax.Array:
  """[B, ...] -> [C, B / C, ...], chunk c = rows c, c + C, c + 2C, ..."""
  rows = x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:])
  return jnp.swapaxes(rows, 0, 1)


def _merge(x: jax.Array) -> jax.Array:
  """The inverse of `_split`: [C, K, ...] -> [C * K, ...] in batch order."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def gradients(embed: EmbedFn, loss: LossFn, params: Any, inputs: Any,
              key: jax.Array, *, chunk: int) -> tuple[Any, dict]:
  """The gradient of `loss(params, embed(params, inputs))` in chunks.

  Args:
    embed: the towers; called on chunks of `chunk` rows (per-row: no row's
      embedding may depend on another row, as in the two-tower model).
    loss: the loss of the whole batch's embeddings.
    params: the parameter tree.
    inputs: pytree of [B, ...] arrays, sharded on the batch axis.
    key: the towers' randomness; chunk c uses `fold_in(key, c)`.
    chunk: K, rows embedded at once; divides B.

  Returns:
    (gradient with respect to `params`, the loss's metrics).
  """
  batch = jax.tree.leaves(inputs)[0].shape[0]
  if chunk <= 0 or batch % chunk:
    raise ValueError(f"grad_cache: chunk {chunk} must divide the batch "
                     f"{batch}.")
  num_chunks = batch // chunk
  chunks = jax.tree.map(lambda x: _split(x, num_chunks), inputs)
  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(
      jnp.arange(num_chunks))

  def forward(carry, chunk_and_key):
    x, k = chunk_and_key
    return carry, embed(params, x, k)
  _, embedded = jax.lax.scan(forward, None, (chunks, keys))
  embeddings = jax.tree.map(_merge, embedded)

  (_, metrics), (direct, cotangents) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(params, embeddings)
  cotangents = jax.tree.map(lambda g: _split(g, num_chunks), cotangents)

  def backward(total, chunk_key_cotangent):
    x, k, g = chunk_key_cotangent
    _, pull_back = jax.vjp(lambda p: embed(p, x, k), params)
    (grad,) = pull_back(g)
    return jax.tree.map(jnp.add, total, grad), None
  grads, _ = jax.lax.scan(backward, direct, (chunks, keys, cotangents))
  return grads, metrics
