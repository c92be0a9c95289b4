"""The ConvNeXt depthwise convolution on the CPU: two faster forms of XLA's.

`for_impl(impl)` is the function `encoder.Tower` hands the model's
`convnext.DepthwiseConv` (None: XLA's grouped convolution, the choice on
GPU and TPU): "shifts" (`depthwise_shifts`, a sum of k*k shifted copies
that XLA:CPU fuses into one loop, with a hand-written gradient), "native"
(`depthwise_native`, a compiled C++ kernel) or, for "auto" on the CPU, the
kernel where it applies and the shifted sum elsewhere.

`depthwise_native(x, kernel)` computes what `depthwise_shifts`
does -- a k x k depthwise cross-correlation, stride 1, 'SAME' zero padding,
x [B, H, W, C] float32 (C a multiple of 8), kernel [k, k, C] (k odd, <= 7)
-> [B, H, W, C] -- with the forward pass, the input gradient and the kernel
gradient in `depthwise.cc`. At ConvNeXt-T's stage shapes its forward +
backward is 2.4-4x faster than the shifted sum and 1.5-3x faster than
PyTorch's oneDNN kernel (`benchmarks/depthwise.py`, BUILD_NOTES.md).

The C++ source ships with the package and is compiled on first use with the
system's C++ compiler (`$CXX`, else `c++`, else `g++`; ~3 s) for this CPU
(`-march=native`) into the user's cache folder (`cvgl_jax.cache`). The
library's file name hashes the source, the compiler, the flags, jaxlib's
version and the CPU's feature flags, so a shared home folder on a mixed cluster keeps one
library per CPU kind, and a new version never loads a stale build.
`available()` says whether the kernel can be used; without a compiler it
logs why once and `DepthwiseConv(impl="auto")` keeps the shifted sum.
`CVGL_JAX_NATIVE=0` turns the kernel off.

Both FFI calls are independent across the batch (the kernel gradient is
returned per example and summed in JAX), and each carries a
`custom_partitioning` rule saying so: on a mesh that shards the batch, XLA
runs them on each device's shard instead of gathering the batch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import Callable, Optional

from absl import logging
import jax
from jax.experimental import custom_partitioning as cp
import jax.numpy as jnp
import jaxlib

from cvgl_jax import cache
from cvgl_jax import cpu

SOURCE = pathlib.Path(__file__).with_name("depthwise.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wall")
LANES = 8
MAX_KERNEL = 7
_FORWARD = "cvgl_jax_depthwise_conv_forward"
_KERNEL_GRAD = "cvgl_jax_depthwise_conv_kernel_grad"


class NativeBuildError(RuntimeError):
  """The C++ kernel could not be compiled or loaded; the message says why."""


def enabled() -> bool:
  """False when `CVGL_JAX_NATIVE` is 0/false/no/off."""
  return os.environ.get("CVGL_JAX_NATIVE", "1").strip().lower() not in (
      "0", "false", "no", "off")


def compiler() -> str:
  """The C++ compiler: $CXX, else `c++` or `g++` on PATH."""
  if os.environ.get("CXX"):
    return os.environ["CXX"]
  for name in ("c++", "g++"):
    if shutil.which(name):
      return name
  raise NativeBuildError(
      "No C++ compiler found (set $CXX or install g++/clang++) to build "
      f"{SOURCE.name}.")


def _cpu_features() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _compiler_identity(cxx: str) -> str:
  try:
    run = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                         check=True, timeout=60)
  except (OSError, subprocess.SubprocessError) as e:
    raise NativeBuildError(
        f"C++ compiler {cxx!r} (from $CXX or PATH) does not run: {e}") from e
  return run.stdout


def library_name(cxx: str) -> str:
  """The library's file name for `cxx`, this source, jaxlib and CPU."""
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), _compiler_identity(cxx).encode(),
               " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
               platform.machine().encode(), _cpu_features().encode()):
    key.update(part)
    key.update(b"\0")
  return f"depthwise_cpu-{key.hexdigest()[:16]}.so"


def _compile(cxx: str, folder: pathlib.Path, name: str) -> pathlib.Path:
  """Compiles SOURCE to folder/name; raises OSError if the folder is not
  writable, NativeBuildError if the compiler fails."""
  folder.mkdir(parents=True, exist_ok=True)
  # A private temporary name, then an atomic rename: processes that build
  # at the same time (several per host) never load a half-written file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o",
         tmp]
  try:
    try:
      run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
      raise NativeBuildError(f"Compiling {SOURCE} with {cxx!r} failed: {e}"
                             ) from e
    if run.returncode != 0:
      raise NativeBuildError(
          f"Compiling {SOURCE} failed ({' '.join(cmd)}):\n"
          f"{run.stderr[-2000:]}")
    os.replace(tmp, folder / name)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return folder / name


def build() -> pathlib.Path:
  """Compiles the kernel unless a cache folder has it; returns its path.

  Raises NativeBuildError naming the compiler, the command and its output,
  or the cache folders that could not be written.
  """
  cxx = compiler()
  name = library_name(cxx)
  folders = cache.cache_dirs()
  for folder in folders:
    if (folder / name).exists():
      return folder / name
  unwritable = []
  for folder in folders:
    try:
      return _compile(cxx, folder, name)
    except OSError as e:
      unwritable.append(f"{folder}: {e}")
  raise NativeBuildError("No cache folder can hold the compiled kernel (set "
                         "$CVGL_JAX_CACHE_DIR): " + "; ".join(unwritable))


@functools.cache
def load() -> None:
  """Builds (or finds) the library and registers its FFI targets; once."""
  if not enabled():
    raise NativeBuildError("The native depthwise kernel is turned off "
                           "(CVGL_JAX_NATIVE=0).")
  path = build()
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
  except OSError as e:
    raise NativeBuildError(f"Cannot load {path} (delete it to rebuild): {e}"
                           ) from e
  jax.ffi.register_ffi_target(
      _FORWARD, jax.ffi.pycapsule(lib.DepthwiseConvForward), platform="cpu")
  jax.ffi.register_ffi_target(
      _KERNEL_GRAD, jax.ffi.pycapsule(lib.DepthwiseConvKernelGrad),
      platform="cpu")


@functools.cache
def available() -> bool:
  """Whether `depthwise_native` can run here (builds it on first call)."""
  try:
    load()
  except NativeBuildError as e:
    if enabled():
      logging.warning("Native CPU depthwise kernel unavailable, using the "
                      "slower shifted sum (set CVGL_JAX_NATIVE=0 to skip "
                      "this build): %s", e)
    return False
  return True


def supports(x_shape, dtype, kernel_size: int) -> bool:
  """Whether the kernel handles this input: float32, C % 8 == 0, k odd <= 7."""
  return (len(x_shape) == 4 and x_shape[-1] % LANES == 0
          and jnp.dtype(dtype) == jnp.float32 and kernel_size % 2 == 1
          and kernel_size <= MAX_KERNEL)


def _batch_sharded(sharding, ndim: int):
  """`sharding` with every dimension but the first replicated."""
  spec = tuple(sharding.spec)[:1] or (None,)
  return jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*spec, *[None] * (ndim - 1)))


def _batch_parallel(fn, rule: str, second_batched: bool, static_argnums=()):
  """`fn(a, b, *static)`, independent across the batch of `a` (and of `b`
  when `second_batched`), as a `custom_partitioning` op: the result and the
  batched operands keep `a`'s batch sharding, everything else is
  gathered. `rule` is its Shardy rule, "b" the batch factor."""
  wrapped = cp.custom_partitioning(fn, static_argnums=static_argnums)

  def shardings(arg_shapes, result_shape):
    a, b = arg_shapes
    first = _batch_sharded(a.sharding, len(a.shape))
    second = (_batch_sharded(a.sharding, len(b.shape)) if second_batched
              else jax.sharding.NamedSharding(a.sharding.mesh,
                                              jax.sharding.PartitionSpec()))
    return (first, second), _batch_sharded(a.sharding,
                                           len(result_shape.shape))

  def infer(*args):
    *_, arg_shapes, result_shape = args
    return shardings(arg_shapes, result_shape)[1]

  def partition(*args):
    *static, mesh, arg_shapes, result_shape = args
    operands, result = shardings(arg_shapes, result_shape)
    return mesh, lambda a, b: fn(a, b, *static), result, operands

  # Shardy wants the special factors in order of first appearance.
  factors = rule.replace(",", " ").replace("->", " ").split()
  gathered = tuple(dict.fromkeys(f for f in factors if f != "b"))
  wrapped.def_partition(
      partition, infer_sharding_from_operands=infer, sharding_rule=rule,
      need_replication_factors=gathered)
  return wrapped


def _forward_call(x, kernel):
  load()
  return jax.ffi.ffi_call(_FORWARD, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method="sequential")(x, kernel)


def _kernel_grad_call(x, dy, k: int):
  load()
  shape = (x.shape[0], k * k, x.shape[3])
  return jax.ffi.ffi_call(_KERNEL_GRAD, jax.ShapeDtypeStruct(shape, x.dtype),
                          vmap_method="sequential")(x, dy)


_forward = _batch_parallel(_forward_call, "b h w c, i j c -> b h w c",
                           second_batched=False)
_kernel_grad = _batch_parallel(_kernel_grad_call, "b h w c, b h w c -> b t c",
                               second_batched=True, static_argnums=(2,))


def _check(x, kernel):
  k = kernel.shape[0]
  if not supports(x.shape, x.dtype, k) or kernel.shape != (k, k, x.shape[3]):
    raise ValueError(
        f"depthwise_native needs x [B, H, W, C] float32 with C a multiple of "
        f"{LANES} and kernel [k, k, C] with k odd <= {MAX_KERNEL}; got x "
        f"{x.shape} {x.dtype}, kernel {kernel.shape}.")


@jax.custom_vjp
def depthwise_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise k x k cross-correlation, stride 1, 'SAME' zero padding.

  Args:
    x: [B, H, W, C] float32, C a multiple of 8.
    kernel: [k, k, C] float32, k odd, at most 7.

  Returns:
    [B, H, W, C], equal to `depthwise_shifts(x, kernel)` and to
    XLA's grouped convolution. The input gradient is the forward kernel
    applied to the output gradient with the kernel flipped; the kernel
    gradient is computed per example in C++ and summed over the batch here.
  """
  _check(x, kernel)
  return _forward(x, kernel)


def _native_fwd(x, kernel):
  _check(x, kernel)
  return _forward(x, kernel), (x, kernel)


def _native_bwd(res, dy):
  x, kernel = res
  k = kernel.shape[0]
  dx = _forward(dy, kernel[::-1, ::-1])
  dk = _kernel_grad(x, dy, k).sum(axis=0)
  return dx, dk.reshape(kernel.shape)


depthwise_native.defvjp(_native_fwd, _native_bwd)


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum_ij pad(x)[:, i:i+H, j:j+W, :] * kernel[i, j]; one XLA loop fusion."""
  k = kernel.shape[0]
  pad = k // 2
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return sum(xp[:, i:i + h, j:j + w, :] * kernel[i, j]
             for i in range(k) for j in range(k))


@jax.custom_vjp
def depthwise_shifts(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise k x k cross-correlation, stride 1, 'SAME' zero padding.

  Args:
    x: [B, H, W, C].
    kernel: [k, k, C], k odd.

  Returns:
    [B, H, W, C], equal to `lax.conv_general_dilated(...,
    feature_group_count=C)` with kernel[:, :, None, :].

  The gradient is written by hand: autodiff of the shifted sum gives the
  kernel gradient as k*k separate reductions over the whole batch, each
  streaming both [B, H, W, C] tensors through memory (XLA:CPU fuses none
  of them). Here the input gradient is the same shifted sum of the output
  gradient with the kernel flipped, and the kernel gradient is accumulated
  one example at a time (`lax.scan`), so an example's input and output
  gradient stay in cache for all k*k taps: about 3x faster on CPU. The taps
  are one variadic reduction (a single fused pass computing all of them):
  the whole forward + backward another 1.08-1.43x faster at ConvNeXt-T's
  stage 0-2 shapes (`benchmarks/depthwise.py`).
  """
  return _shifted_sum(x, kernel)


def _depthwise_fwd(x, kernel):
  return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_bwd(res, dy):
  x, kernel = res
  k = kernel.shape[0]
  pad = k // 2
  h, w = x.shape[1:3]
  dx = _shifted_sum(dy, kernel[::-1, ::-1])
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def add_example(acc, example):
    xe, dye = example
    products = [(xe[i:i + h, j:j + w, :] * dye).astype(jnp.float32)
                for i in range(k) for j in range(k)]
    # One variadic reduction: XLA:CPU fuses all k*k products into a single
    # pass over the example, where k*k separate sums each wrote and re-read
    # their product.
    taps = jax.lax.reduce(products, [jnp.float32(0)] * len(products),
                          lambda a, b: [u + v for u, v in zip(a, b)], (0, 1))
    return acc + jnp.stack(taps), None

  acc = jnp.zeros((k * k, x.shape[-1]), jnp.float32)
  dk, _ = jax.lax.scan(add_example, acc, (xp, dy))
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


depthwise_shifts.defvjp(_depthwise_fwd, _depthwise_bwd)


def resolve_impl(impl: str, x_shape, dtype, kernel_size: int) -> str:
  """The implementation that `impl` means for an input of x_shape/dtype on
  the default backend ("auto" -> "native", "shifts" or "conv"; anything
  else unchanged). May build the C++ kernel (once)."""
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "conv"
  native = supports(x_shape, dtype, kernel_size) and available()
  return "native" if native else "shifts"


def _cpu_auto(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """"auto" on the CPU: the C++ kernel where it applies and can be built,
  else the shifted sum (decided per shape, at trace time)."""
  impl = resolve_impl("auto", x.shape, x.dtype, kernel.shape[0])
  return (depthwise_native if impl == "native" else depthwise_shifts)(x, kernel)


_CONVS = {"auto": _cpu_auto, "native": depthwise_native,
          "shifts": depthwise_shifts}


def for_impl(impl: str) -> Optional[Callable[[jax.Array, jax.Array],
                                             jax.Array]]:
  """The depthwise convolution that `impl` means on the default backend, as
  `convnext.DepthwiseConv(conv=...)` takes it.

  Args:
    impl: one of `cvgl_jax.cpu.DEPTHWISE_IMPLS`.

  Returns:
    None for XLA's grouped convolution ("conv"; "auto" off the CPU), else a
    function (x [B, H, W, C], kernel [k, k, C]) -> [B, H, W, C]. Module-level
    functions, so two models built from one config compare equal.

  Raises:
    ValueError: an unknown `impl`, or "native" off the CPU.
  """
  if impl not in cpu.DEPTHWISE_IMPLS:
    raise ValueError(f"DepthwiseConv impl must be one of "
                     f"{cpu.DEPTHWISE_IMPLS}, got {impl!r}.")
  backend = jax.default_backend()
  if impl == "conv" or (impl == "auto" and backend != "cpu"):
    return None
  if impl == "native" and backend != "cpu":
    raise ValueError(f"DepthwiseConv impl='native' is the CPU kernel; on "
                     f"{backend} use 'auto' or 'conv'.")
  return _CONVS[impl]
