"""CPU-only speed work, behind one seam.

Nothing here changes what the model computes; each piece exists because
XLA:CPU was measured slow at it (BUILD_NOTES.md, benchmarks/), and none of
it runs on GPU or TPU:

  depthwise   the ConvNeXt 7x7 depthwise convolution: a compiled C++ kernel
              (XLA FFI) and a pure-XLA shifted sum, chosen by
              `depthwise.for_impl` ("auto" is XLA's grouped
              convolution on every other backend);
  upsample    the CycleGAN generator's stride-2 transposed convolution as
              a sub-pixel convolution (`upsample.for_impl`; "auto" keeps
              XLA's transposed convolution on every other backend);
  hostmem     `python -m cvgl_jax.main` re-executes itself once with
              glibc's huge-page malloc tunable (a Linux CPU host setting).

The models do not import this package: `cvgl_jax.models.encoder.Tower`
hands `convnext.ConvNeXt` the function `depthwise.for_impl` returns (None,
XLA's grouped convolution, off the CPU), and `cfp.translate.CycleGAN`
hands its generator the one `upsample.for_impl` returns.

This file imports nothing, so that config validation can name the choices
(`DEPTHWISE_IMPLS`) without loading JAX.
"""

# `config.model.depthwise_impl`'s choices (`depthwise.for_impl`).
DEPTHWISE_IMPLS = ("auto", "conv", "native", "shifts")
# `config.translate.upsample_impl`'s choices (`upsample.for_impl`).
UPSAMPLE_IMPLS = ("auto", "transpose", "subpixel")
