// Kernel gradient of a k x k depthwise convolution (stride 1, 'SAME' zero
// padding) as a plain C++ loop, called from JAX through XLA's FFI.
//
// Benchmark-only: `benchmarks/depthwise.py --cxx` compiles it with g++ and
// times it against our XLA kernel gradient, to measure what a hand-written
// CPU kernel would be worth (BUILD_NOTES.md). It is not part of the package.
//
// dk[i, j, c] = sum_{b, h, w} x[b, h + i - k/2, w + j - k/2, c] dy[b, h, w, c]
// x, dy: [B, H, W, C] float32, C a multiple of 8; dk: [k * k, C] float32.
// For each block of 8 channels and each kernel row i, the k row taps are
// accumulated in registers over the whole batch; two threads split the
// channel blocks.

#include <cstdint>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxK = 7;

void KernelGradRange(const float* x, const float* dy, float* dk, int64_t b_n,
                     int64_t h_n, int64_t w_n, int64_t c_n, int k,
                     int64_t c_begin, int64_t c_end) {
  const int pad = k / 2;
  for (int64_t cb = c_begin; cb < c_end; cb += 8) {
    for (int i = 0; i < k; ++i) {
      float acc[kMaxK][8] = {};
      for (int64_t b = 0; b < b_n; ++b) {
        for (int64_t h = 0; h < h_n; ++h) {
          const int64_t hx = h + i - pad;
          if (hx < 0 || hx >= h_n) continue;
          const float* x_row = x + (b * h_n + hx) * w_n * c_n + cb;
          const float* dy_row = dy + (b * h_n + h) * w_n * c_n + cb;
          for (int64_t w = 0; w < w_n; ++w) {
            const float* g = dy_row + w * c_n;
            for (int j = 0; j < k; ++j) {
              const int64_t wx = w + j - pad;
              if (wx < 0 || wx >= w_n) continue;
              const float* v = x_row + wx * c_n;
              for (int l = 0; l < 8; ++l) acc[j][l] += v[l] * g[l];
            }
          }
        }
      }
      for (int j = 0; j < k; ++j) {
        for (int l = 0; l < 8; ++l) dk[(i * k + j) * c_n + cb + l] = acc[j][l];
      }
    }
  }
}

ffi::Error KernelGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk) {
  const auto dims = x.dimensions();
  const auto out_dims = dk->dimensions();
  bool same = dims.size() == 4 && dy.dimensions().size() == 4;
  for (size_t d = 0; same && d < 4; ++d) same = dy.dimensions()[d] == dims[d];
  if (!same || out_dims.size() != 2 || out_dims[1] != dims[3] ||
      dims[3] % 8 != 0) {
    return ffi::Error::InvalidArgument(
        "depthwise_kernel_grad: x and dy must be [B, H, W, C] with C a "
        "multiple of 8, dk [k * k, C]");
  }
  int k = 1;
  while (k * k < out_dims[0]) ++k;
  if (k * k != out_dims[0] || k % 2 == 0 || k > kMaxK) {
    return ffi::Error::InvalidArgument(
        "depthwise_kernel_grad: dk's first dim must be k * k, k odd <= 7");
  }
  const int64_t c_n = dims[3];
  const int64_t split = (c_n / 16) * 8;
  std::thread second(KernelGradRange, x.typed_data(), dy.typed_data(),
                     dk->typed_data(), dims[0], dims[1], dims[2], c_n, k,
                     split, c_n);
  KernelGradRange(x.typed_data(), dy.typed_data(), dk->typed_data(), dims[0],
                  dims[1], dims[2], c_n, k, 0, split);
  second.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseKernelGrad, KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
