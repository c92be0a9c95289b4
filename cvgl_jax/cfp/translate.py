"""CycleGAN for the CFP image translation: BEV images -> "fake satellite".

The translation half of CFP (see docs/METHOD.md) is an unpaired CycleGAN (Zhu et
al., 2017) trained between the geometric bird's-eye views (domain A) and the
satellite tiles (domain B). The architecture, losses and update order follow
the official pytorch-CycleGAN-and-pix2pix code that the authors ran
(`CFP/CycleGAN` in liguopeng0923/UCVGL):

- generators: ResNet, c7s1-ngf, d2ngf, d4ngf, n_blocks x R4ngf, u2ngf,
  ungf, c7s1-3, reflection padding, tanh; no dropout (`--no_dropout`);
- discriminators: 70x70 PatchGAN (C64-C128-C256-C512, 4x4 convolutions,
  leaky ReLU 0.2, no norm on the first layer);
- norm: instance norm without affine parameters and without running
  statistics (`nn.InstanceNorm2d(affine=False, track_running_stats=False)`),
  which is why every convolution keeps its bias (`use_bias = norm is
  InstanceNorm2d` there);
- init: weights N(0, 0.02), biases 0;
- losses: least-squares GAN, cycle L1 weight 10 per direction, identity L1
  weight `lambda_identity * lambda_cycle` (= 5);
- Adam(2e-4, b1=0.5, b2=0.999), one optimizer for both generators, one for
  both discriminators; learning rate constant for `n_epochs`, then linear
  decay over `n_epochs_decay`;
- one step: forward both generators, update the generators, then update the
  discriminators on real images and on fakes from a 50-image history pool
  (the fakes are those of this step's forward pass, before the G update).

Naming: `g_ab` maps A (BEV) -> B (satellite), `g_ba` the reverse; `d_a`
judges domain A images, `d_b` domain B images; `pool_a` holds fake A images
(for `d_a`), `pool_b` fake B images. Images on device are float32 NHWC in
[-1, 1]; batches arrive as uint8 and are scaled here, as torchvision's
`ToTensor` + `Normalize(0.5, 0.5)` do.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


def _conv_init(gain: float):
  return nn.initializers.normal(stddev=gain)


def _instance_norm(x: jax.Array) -> jax.Array:
  # Per image and channel over H, W; biased variance, eps as in PyTorch.
  return nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False)(x)


def _reflect(x: jax.Array, p: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")


class ResnetBlock(nn.Module):
  """x + [reflect-pad, conv3x3, IN, ReLU, reflect-pad, conv3x3, IN](x)."""

  features: int
  init_gain: float = 0.02

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, self.features, (3, 3), padding="VALID",
                             kernel_init=_conv_init(self.init_gain))
    y = nn.relu(_instance_norm(conv()(_reflect(x, 1))))
    y = _instance_norm(conv()(_reflect(y, 1)))
    return x + y


class Upsample2x(nn.Module):
  """PyTorch `ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`:
  [N, H, W, in] -> [N, 2H, 2W, features].

  The kernel is [3, 3, in, features] in `nn.ConvTranspose`'s layout (its
  params, under the same names). `conv`, if given, computes the same map
  another way (`cvgl_jax.cpu.upsample`); None: XLA's transposed conv.
  """

  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  conv: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    if self.conv is None:
      # Dilated input, padding (k - 1 - p, k - 1 - p + output_padding).
      y = jax.lax.conv_transpose(x, kernel, (2, 2), ((1, 2), (1, 2)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      y = self.conv(x, kernel)
    return y + bias


class ResnetGenerator(nn.Module):
  """ResNet generator: [N, H, W, 3] in [-1, 1] -> [N, H, W, out] in [-1, 1].

  H and W must be multiples of 4 (two stride-2 stages). `upsample_conv`:
  see `Upsample2x.conv`.
  """

  ngf: int = 64
  n_blocks: int = 9
  out_channels: int = 3
  init_gain: float = 0.02
  upsample_conv: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None

  @nn.compact
  def __call__(self, x):
    init = _conv_init(self.init_gain)
    x = nn.Conv(self.ngf, (7, 7), padding="VALID", kernel_init=init)(
        _reflect(x, 3))
    x = nn.relu(_instance_norm(x))
    for i in range(2):
      x = nn.Conv(self.ngf * 2 ** (i + 1), (3, 3), strides=(2, 2),
                  padding=((1, 1), (1, 1)), kernel_init=init)(x)
      x = nn.relu(_instance_norm(x))
    for _ in range(self.n_blocks):
      x = ResnetBlock(self.ngf * 4, self.init_gain)(x)
    for i in range(2):
      x = Upsample2x(self.ngf * 2 ** (1 - i), init, self.upsample_conv,
                     name=f"ConvTranspose_{i}")(x)
      x = nn.relu(_instance_norm(x))
    x = nn.Conv(self.out_channels, (7, 7), padding="VALID", kernel_init=init)(
        _reflect(x, 3))
    return jnp.tanh(x)


class PatchDiscriminator(nn.Module):
  """PatchGAN: [N, H, W, 3] -> [N, h, w, 1] real/fake scores (logits).

  With `n_layers` = 3 each output sees a 70x70 input patch; a 256x256 input
  gives 30x30 scores.
  """

  ndf: int = 64
  n_layers: int = 3
  init_gain: float = 0.02

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(4, 4),
                             padding=((1, 1), (1, 1)),
                             kernel_init=_conv_init(self.init_gain))
    x = nn.leaky_relu(conv(self.ndf, strides=(2, 2))(x), 0.2)
    for n in range(1, self.n_layers):
      x = conv(self.ndf * min(2 ** n, 8), strides=(2, 2))(x)
      x = nn.leaky_relu(_instance_norm(x), 0.2)
    x = conv(self.ndf * min(2 ** self.n_layers, 8), strides=(1, 1))(x)
    x = nn.leaky_relu(_instance_norm(x), 0.2)
    return conv(1, strides=(1, 1))(x)


def init_weights(shapes, key: jax.Array, gain: float = 0.02):
  """The official `init_weights('normal')`: kernels N(0, gain), biases 0.

  Args:
    shapes: a params pytree of arrays or `jax.ShapeDtypeStruct`s.
    key: PRNG key.
    gain: the standard deviation of the kernels.

  Returns:
    A params pytree of float32 arrays.
  """
  # One normal draw sliced into every kernel: the same distribution as one
  # draw per kernel, and much cheaper for XLA to compile than dozens of
  # separate threefry calls.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  is_kernel = ["kernel" in jax.tree_util.keystr(p) for p, _ in leaves]
  sizes = [math.prod(x.shape) for (_, x), k in zip(leaves, is_kernel) if k]
  flat = gain * jax.random.normal(key, (sum(sizes),), jnp.float32)
  chunks = iter(jnp.split(flat, np.cumsum(sizes)[:-1]))
  out = [next(chunks).reshape(x.shape) if k else jnp.zeros(x.shape,
                                                            jnp.float32)
         for (_, x), k in zip(leaves, is_kernel)]
  return jax.tree_util.tree_unflatten(treedef, out)


def _official_layers(prefix: str, names: list[str]) -> list[str]:
  # The official networks are nn.Sequential: their convolutions, in
  # order, are the state dict's `<prefix>.<i>[.conv_block.<j>].weight`.
  index = lambda n: [int(t) for t in n[len(prefix) + 1:].split(".")
                     if t.isdigit()]
  return sorted({n[:-len(".weight")] for n in names
                 if n.startswith(prefix + ".") and n.endswith(".weight")},
                key=index)


def from_official(state_dict, n_blocks: int, n_layers_d: int
                  ) -> tuple[dict, dict]:
  """(params_g, params_d) from a pytorch-CycleGAN state, as `init` lays out.

  Args:
    state_dict: {name: array} under the official names: `netG_A.*`,
      `netG_B.*`, `netD_A.*`, `netD_B.*` (the four `state_dict()`s of
      `CycleGANModel`, prefixed). Official `G_A` maps A -> B and `D_A`
      judges B images: they become our `g_ab` and `d_b`.
    n_blocks, n_layers_d: the architecture (residual blocks, PatchGAN
      layers), which the names alone do not fix.

  Returns:
    ({"g_ab", "g_ba"}, {"d_a", "d_b"}) float32 params.
  """
  names = list(state_dict)
  g_modules = (["Conv_0", "Conv_1", "Conv_2"] +
               [f"ResnetBlock_{i}/Conv_{j}" for i in range(n_blocks)
                for j in range(2)] +
               ["ConvTranspose_0", "ConvTranspose_1", "Conv_3"])
  d_modules = [f"Conv_{i}" for i in range(n_layers_d + 2)]

  def convert(prefix, modules):
    layers = _official_layers(prefix, names)
    if len(layers) != len(modules):
      raise ValueError(f"{prefix}: {len(layers)} convolutions in the state "
                       f"dict, the architecture has {len(modules)}.")
    params = {}
    for layer, module in zip(layers, modules):
      w = np.asarray(state_dict[layer + ".weight"], np.float32)
      if module.startswith("ConvTranspose"):
        # torch [in, out, kh, kw], the gradient of a conv; flax applies
        # its [kh, kw, in, out] kernel unflipped on the dilated input.
        kernel = w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
      else:
        kernel = w.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> HWIO
      leaf = params
      for part in module.split("/"):
        leaf = leaf.setdefault(part, {})
      leaf["kernel"] = jnp.asarray(np.ascontiguousarray(kernel))
      leaf["bias"] = jnp.asarray(state_dict[layer + ".bias"], jnp.float32)
    return params

  return ({"g_ab": convert("netG_A", g_modules),
           "g_ba": convert("netG_B", g_modules)},
          {"d_a": convert("netD_B", d_modules),
           "d_b": convert("netD_A", d_modules)})


# ----------------------------------------------------------------------------
# Image history pool (Shrivastava et al., 2017), as the official ImagePool.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class ImagePool:
  """A fixed-size store of past fakes.

  Attributes:
    images: [P, H, W, C] float32; only the first `count` rows are valid.
    count: int32 scalar, how many rows are filled (<= P).
  """

  images: jax.Array
  count: jax.Array

  @classmethod
  def create(cls, size: int, image_shape) -> "ImagePool":
    return cls(images=jnp.zeros((size, *image_shape), jnp.float32),
               count=jnp.zeros((), jnp.int32))


def pool_query(pool: ImagePool, images: jax.Array, key: jax.Array):
  """The official `ImagePool.query`, pure and jittable.

  Images are taken one after the other: while the pool is not full, each is
  stored and returned as is; once full, with probability 1/2 a uniformly
  chosen stored image is returned and replaced by the new one, otherwise the
  new image is returned and the pool is unchanged.

  Args:
    pool: the pool; a pool of size 0 returns `images` unchanged.
    images: [N, H, W, C] new fakes.
    key: a jax PRNG key.

  Returns:
    (new pool, [N, H, W, C] images for the discriminator).
  """
  size = pool.images.shape[0]
  if size == 0:
    return pool, images

  def one(pool, inputs):
    image, k = inputs
    k_swap, k_idx = jax.random.split(k)
    filling = pool.count < size
    swap = jnp.logical_and(~filling, jax.random.uniform(k_swap) > 0.5)
    slot = jnp.where(filling, pool.count,
                     jax.random.randint(k_idx, (), 0, size))
    old = pool.images[slot]
    stored = jnp.where(jnp.logical_or(filling, swap),
                       pool.images.at[slot].set(image), pool.images)
    out = jnp.where(swap, old, image)
    count = pool.count + filling.astype(jnp.int32)
    return ImagePool(images=stored, count=count), out

  keys = jax.random.split(key, images.shape[0])
  pool, out = jax.lax.scan(one, pool, (images.astype(jnp.float32), keys))
  return pool, out


# ----------------------------------------------------------------------------
# Losses, optimizer, state and the train step.
# ----------------------------------------------------------------------------


def lsgan_loss(scores: jax.Array, target_is_real: bool) -> jax.Array:
  """Least-squares GAN loss: mean((D(x) - t)^2), t = 1 real / 0 fake."""
  target = 1.0 if target_is_real else 0.0
  return jnp.mean(jnp.square(scores - target))


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(x - y))


def learning_rate(config, step: jax.Array, steps_per_epoch: jax.Array):
  """Learning rate of a step: `lr` for `n_epochs`, then linear decay.

  Epoch e (0-based) trains at `lr * (1 - max(0, e + 1 - n_epochs) /
  (n_epochs_decay + 1))`, the official 'linear' policy: 1 for the first
  n_epochs epochs, then n_epochs_decay epochs stepping towards 0.
  `steps_per_epoch` may be traced, so one compiled step serves any data
  size.
  """
  epoch = step // steps_per_epoch
  decay = jnp.maximum(0, epoch + 1 - config.n_epochs)
  return config.lr * (1.0 - decay / float(config.n_epochs_decay + 1))


def _adam(config) -> optax.GradientTransformation:
  # Adam without its learning rate, which `train_step` applies (see
  # `learning_rate`): the same updates as optax.adam with a schedule.
  return optax.scale_by_adam(b1=config.beta1, b2=config.beta2)


@flax.struct.dataclass
class TranslateState:
  """Everything training needs to continue exactly; a plain pytree.

  Attributes:
    step: int32 scalar, steps done.
    steps_per_epoch: int32 scalar, fixed by the data; drives the schedule.
    params_g: {"g_ab": ..., "g_ba": ...} generator params.
    params_d: {"d_a": ..., "d_b": ...} discriminator params.
    opt_g: Adam state of the generators.
    opt_d: Adam state of the discriminators.
    pool_a: pool of fake A (BEV-style) images, fed to `d_a`.
    pool_b: pool of fake B (satellite-style) images, fed to `d_b`.
    rng: uint32[2] base key; step keys are `fold_in(rng, step)`.
  """

  step: jax.Array
  steps_per_epoch: jax.Array
  params_g: Any
  params_d: Any
  opt_g: Any
  opt_d: Any
  pool_a: ImagePool
  pool_b: ImagePool
  rng: jax.Array


class CycleGAN:
  """The four networks of a config and the pure functions that use them."""

  def __init__(self, config):
    # Imported here, not at the top: the networks above do not depend on
    # the CPU seam; the CycleGAN that builds them picks the upsampling.
    from cvgl_jax.cpu import upsample  # pylint: disable=g-import-not-at-top
    self.config = config
    self.generator = ResnetGenerator(
        config.ngf, config.n_blocks, 3, config.init_gain,
        upsample.for_impl(config.upsample_impl))
    self.discriminator = PatchDiscriminator(config.ndf, config.n_layers_d,
                                            config.init_gain)
    self.tx = _adam(config)

  def init(self, key: jax.Array, steps_per_epoch: int) -> TranslateState:
    """A fresh state for images of `crop_size`.

    Args:
      key: uint32[2] PRNG key.
      steps_per_epoch: training steps in one epoch (for the schedule).
    """
    return self._jit_init(key, jnp.asarray(steps_per_epoch, jnp.int32))

  @functools.cached_property
  def _jit_init(self):
    return jax.jit(self._init)

  def _init(self, key, steps_per_epoch):
    size = self.config.crop_size
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    k = jax.random.split(key, 5)
    gain = self.config.init_gain
    shapes_g = jax.eval_shape(self.generator.init, k[0], x)["params"]
    shapes_d = jax.eval_shape(self.discriminator.init, k[0], x)["params"]
    params_g = {"g_ab": init_weights(shapes_g, k[0], gain),
                "g_ba": init_weights(shapes_g, k[1], gain)}
    params_d = {"d_a": init_weights(shapes_d, k[2], gain),
                "d_b": init_weights(shapes_d, k[3], gain)}
    # Two pools with their own buffers: the state is donated.
    pool = lambda: ImagePool.create(self.config.pool_size, (size, size, 3))
    return TranslateState(
        step=jnp.zeros((), jnp.int32),
        steps_per_epoch=steps_per_epoch,
        params_g=params_g, params_d=params_d,
        opt_g=self.tx.init(params_g), opt_d=self.tx.init(params_d),
        pool_a=pool(), pool_b=pool(), rng=k[4])

  def translate(self, params_g_ab, images: jax.Array) -> jax.Array:
    """A -> B: [N, H, W, 3] uint8 BEVs -> [N, H, W, 3] float32 in [-1, 1]."""
    return self.generator.apply({"params": params_g_ab}, to_float(images))

  def generator_loss(self, params_g, params_d, real_a, real_b):
    """Official `backward_G`: total loss and (metrics, fake_a, fake_b).

    Instance norm works per image, so a generator applied to two batches
    concatenated gives exactly the two separate results; we use that to run
    each generator twice per step instead of three times.
    """
    c = self.config
    g = lambda name, x: self.generator.apply({"params": params_g[name]}, x)
    d = lambda name, x: self.discriminator.apply({"params": params_d[name]},
                                                 x)
    n = real_a.shape[0]
    fake_b, idt_b = jnp.split(g("g_ab", jnp.concatenate([real_a, real_b])),
                              [n])
    fake_a, idt_a = jnp.split(g("g_ba", jnp.concatenate([real_b, real_a])),
                              [n])
    rec_a = g("g_ba", fake_b)
    rec_b = g("g_ab", fake_a)
    w_idt = c.lambda_identity * c.lambda_cycle
    metrics = {
        "g_gan_ab": lsgan_loss(d("d_b", fake_b), True),
        "g_gan_ba": lsgan_loss(d("d_a", fake_a), True),
        "cycle_a": c.lambda_cycle * l1_loss(rec_a, real_a),
        "cycle_b": c.lambda_cycle * l1_loss(rec_b, real_b),
        "idt_a": w_idt * l1_loss(idt_a, real_a),
        "idt_b": w_idt * l1_loss(idt_b, real_b),
    }
    total = sum(metrics.values())
    metrics["g_total"] = total
    return total, (metrics, fake_a, fake_b)

  def discriminator_loss(self, params_d, real_a, real_b, fake_a, fake_b):
    """Official `backward_D_A` + `backward_D_B` on (pooled) fakes."""
    d = lambda name, x: self.discriminator.apply({"params": params_d[name]},
                                                 x)
    n = real_a.shape[0]
    real_a_s, fake_a_s = jnp.split(d("d_a", jnp.concatenate([real_a, fake_a])),
                                   [n])
    real_b_s, fake_b_s = jnp.split(d("d_b", jnp.concatenate([real_b, fake_b])),
                                   [n])
    loss_a = 0.5 * (lsgan_loss(real_a_s, True) + lsgan_loss(fake_a_s, False))
    loss_b = 0.5 * (lsgan_loss(real_b_s, True) + lsgan_loss(fake_b_s, False))
    return loss_a + loss_b, {"d_a": loss_a, "d_b": loss_b}

  def train_step(self, state: TranslateState, batch, key: jax.Array):
    """One CycleGAN step: G update, then D update on pooled fakes.

    Args:
      state: the current state (donated by `jit_train_step`).
      batch: {"a": [N, S, S, 3] uint8 BEVs, "b": [N, S, S, 3] uint8
        satellite images}.
      key: PRNG key of this step (drives the image pools).

    Returns:
      (new state, metrics: dict of float32 scalars, incl. "lr").
    """
    real_a, real_b = to_float(batch["a"]), to_float(batch["b"])
    grad_g, (metrics, fake_a, fake_b) = jax.grad(
        self.generator_loss, has_aux=True)(state.params_g, state.params_d,
                                           real_a, real_b)
    lr = learning_rate(self.config, state.step, state.steps_per_epoch)
    descend = lambda u: jax.tree.map(lambda x: -lr * x, u)
    updates, opt_g = self.tx.update(grad_g, state.opt_g, state.params_g)
    params_g = optax.apply_updates(state.params_g, descend(updates))

    key_a, key_b = jax.random.split(key)
    fake_a = jax.lax.stop_gradient(fake_a)
    fake_b = jax.lax.stop_gradient(fake_b)
    pool_a, fake_a = pool_query(state.pool_a, fake_a, key_a)
    pool_b, fake_b = pool_query(state.pool_b, fake_b, key_b)
    grad_d, d_metrics = jax.grad(self.discriminator_loss, has_aux=True)(
        state.params_d, real_a, real_b, fake_a, fake_b)
    updates, opt_d = self.tx.update(grad_d, state.opt_d, state.params_d)
    params_d = optax.apply_updates(state.params_d, descend(updates))

    metrics.update(d_metrics)
    metrics["lr"] = jnp.asarray(lr, jnp.float32)
    new_state = state.replace(
        step=state.step + 1, params_g=params_g, params_d=params_d,
        opt_g=opt_g, opt_d=opt_d, pool_a=pool_a, pool_b=pool_b)
    return new_state, metrics

  @functools.cached_property
  def jit_train_step(self):
    """(state, batch) -> `train_step` with the key fold_in(state.rng,
    state.step), jitted with the state donated. The key is made on the
    devices, so the step takes only global arrays (a multi-process mesh
    accepts no host key)."""
    return jax.jit(
        lambda state, batch: self.train_step(
            state, batch, jax.random.fold_in(state.rng, state.step)),
        donate_argnums=(0,))

  @functools.cached_property
  def jit_translate(self):
    """(params of g_ab, uint8 [N, S, S, 3]) -> uint8 fake satellite images."""
    return jax.jit(lambda p, x: to_uint8(self.translate(p, x)))


# What the compiled functions of a CycleGAN depend on.
_MODEL_KEYS = ("ngf", "ndf", "n_blocks", "n_layers_d", "crop_size",
               "n_epochs", "n_epochs_decay", "lr", "beta1", "beta2",
               "lambda_cycle", "lambda_identity", "pool_size", "init_gain",
               "upsample_impl")


@functools.lru_cache(maxsize=8)
def _cached_model(key):
  return CycleGAN(ml_collections.ConfigDict(dict(key)))


def get_model(config) -> CycleGAN:
  """The CycleGAN of a config, shared so its jitted steps compile once."""
  return _cached_model(tuple((k, config[k]) for k in _MODEL_KEYS))


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
  """float32 [-1, 1] -> uint8, rounded."""
  return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(
      jnp.uint8)
