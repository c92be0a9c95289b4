"""CPU-only speed work, behind one seam.

Nothing here changes what the model computes; each piece exists because
XLA:CPU was measured slow at it (BUILD_NOTES.md, benchmarks/), and none of
it runs on GPU or TPU:

  depthwise   the ConvNeXt 7x7 depthwise convolution: a compiled C++ kernel
              (XLA FFI) and a pure-XLA shifted sum, chosen by
              `depthwise.resolve_impl` ("auto" is XLA's grouped
              convolution on every other backend);
  hostmem     `python -m cvgl_jax.main` re-executes itself once with
              glibc's huge-page malloc tunable (a Linux CPU host setting).

The model (`cvgl_jax.models.convnext.DepthwiseConv`) calls
`depthwise.depthwise_conv` only when the resolved implementation is not
"conv".

This file imports nothing, so that config validation can name the choices
(`DEPTHWISE_IMPLS`) without loading JAX.
"""

# `convnext.DepthwiseConv`'s implementations (`depthwise.resolve_impl`).
DEPTHWISE_IMPLS = ("auto", "conv", "native", "shifts")
