// Depthwise k x k convolution (stride 1, 'SAME' zero padding) on the CPU,
// as two XLA FFI handlers; `cvgl_jax/cpu/depthwise.py` compiles this
// file on first use and calls it from `DepthwiseConv(impl="native")`.
//
//   DepthwiseConvForward(x [B, H, W, C], kernel [k, k, C]) -> y [B, H, W, C]
//     y[b, h, w, c] = sum_ij x[b, h + i - k/2, w + j - k/2, c] kernel[i, j, c]
//     (the input gradient is this with the kernel flipped and dy as x);
//   DepthwiseConvKernelGrad(x [B, H, W, C], dy [B, H, W, C])
//       -> dk [B, k * k, C], one kernel gradient per example
//     dk[b, i * k + j, c] = sum_hw x[b, h + i - k/2, w + j - k/2, c]
//                                  dy[b, h, w, c].
// Per-example kernel gradients keep both handlers independent across the
// batch, so SPMD partitioning splits them along it and the caller sums.
//
// float32, C a multiple of 8, k odd and at most 7; the channels are the
// vector lanes (GCC/Clang vector extensions: AVX2 registers under
// -march=native on x86, two SSE/NEON registers elsewhere). The work is split
// into units (output rows; examples x channel blocks) that XLA's intra-op
// thread pool and the calling thread claim from a shared counter. Each
// output element is computed by one thread in a fixed order, so results do
// not depend on the number of threads.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;
constexpr int kMaxK = 7;
constexpr int kTile = 4;  // output pixels per register tile (forward)

typedef float v8 __attribute__((vector_size(kLanes * sizeof(float))));

inline v8 Load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// Runs fn(0), ..., fn(n - 1) on the calling thread and up to
// num_threads - 1 tasks of XLA's intra-op pool. The caller only waits for
// units another thread has already claimed, so it cannot deadlock on a busy
// pool; a task that starts after all units are claimed returns at once.
class ParallelFor {
 public:
  static void Run(ffi::ThreadPool& pool, int64_t n,
                  const std::function<void(int64_t)>& fn) {
    auto state = std::make_shared<ParallelFor>(n, &fn);
    const int64_t helpers =
        std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
    for (int64_t t = 0; t < helpers; ++t) {
      pool.Schedule([state] { state->Work(); });
    }
    state->Work();
    std::unique_lock<std::mutex> lock(state->mu_);
    state->cv_.wait(lock, [&] { return state->done_.load() == n; });
  }

  ParallelFor(int64_t n, const std::function<void(int64_t)>* fn)
      : n_(n), fn_(fn) {}

 private:
  void Work() {
    int64_t finished = 0;
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) {
      (*fn_)(i);
      ++finished;
    }
    if (finished > 0 && done_.fetch_add(finished) + finished == n_) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
  }

  const int64_t n_;
  const std::function<void(int64_t)>* fn_;
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

struct Shape {
  int64_t b, h, w, c;
  int k;
};

// y[b, h, w0 : w0 + kTile, cb : cb + 8] for one register tile. kEdge: some
// taps fall outside [0, W) and are skipped; tile pixels past W are not
// stored.
template <bool kEdge>
inline void ForwardTile(const float* x, const float* kernel, float* y,
                        const Shape& s, int64_t b, int64_t h, int64_t w0,
                        int64_t cb) {
  const int pad = s.k / 2;
  v8 acc[kTile] = {};
  for (int i = 0; i < s.k; ++i) {
    const int64_t hx = h + i - pad;
    if (hx < 0 || hx >= s.h) continue;
    const float* row = x + ((b * s.h + hx) * s.w) * s.c + cb;
    for (int j = 0; j < s.k; ++j) {
      const v8 kv = Load(kernel + (i * s.k + j) * s.c + cb);
      for (int t = 0; t < kTile; ++t) {
        const int64_t wx = w0 + t + j - pad;
        if (kEdge && (wx < 0 || wx >= s.w)) continue;
        acc[t] += Load(row + wx * s.c) * kv;
      }
    }
  }
  float* out = y + ((b * s.h + h) * s.w + w0) * s.c + cb;
  for (int t = 0; t < kTile; ++t) {
    if (kEdge && w0 + t >= s.w) break;
    Store(out + t * s.c, acc[t]);
  }
}

void ForwardRow(const float* x, const float* kernel, float* y, const Shape& s,
                int64_t row) {
  const int64_t b = row / s.h, h = row % s.h;
  const int pad = s.k / 2;
  for (int64_t cb = 0; cb < s.c; cb += kLanes) {
    for (int64_t w0 = 0; w0 < s.w; w0 += kTile) {
      if (w0 - pad >= 0 && w0 + kTile - 1 + pad < s.w) {
        ForwardTile<false>(x, kernel, y, s, b, h, w0, cb);
      } else {
        ForwardTile<true>(x, kernel, y, s, b, h, w0, cb);
      }
    }
  }
}

// dk[b, i * k + j, cb : cb + 8] for all taps (i, j) of one example and
// channel block; each kernel row's k taps accumulate in registers.
void KernelGradUnit(const float* x, const float* dy, float* dk,
                    const Shape& s, int64_t unit) {
  const int64_t blocks = s.c / kLanes;
  const int64_t b = unit / blocks, cb = (unit % blocks) * kLanes;
  const int pad = s.k / 2;
  for (int i = 0; i < s.k; ++i) {
    v8 acc[kMaxK] = {};
    for (int64_t h = 0; h < s.h; ++h) {
      const int64_t hx = h + i - pad;
      if (hx < 0 || hx >= s.h) continue;
      const float* xr = x + ((b * s.h + hx) * s.w) * s.c + cb;
      const float* gr = dy + ((b * s.h + h) * s.w) * s.c + cb;
      for (int64_t w = 0; w < s.w; ++w) {
        const v8 g = Load(gr + w * s.c);
        if (w - pad >= 0 && w + pad < s.w) {
          const float* xw = xr + (w - pad) * s.c;
          for (int j = 0; j < s.k; ++j) acc[j] += Load(xw + j * s.c) * g;
        } else {
          for (int j = 0; j < s.k; ++j) {
            const int64_t wx = w + j - pad;
            if (wx >= 0 && wx < s.w) acc[j] += Load(xr + wx * s.c) * g;
          }
        }
      }
    }
    float* out = dk + (b * s.k * s.k + i * s.k) * s.c + cb;
    for (int j = 0; j < s.k; ++j) Store(out + j * s.c, acc[j]);
  }
}

ffi::Error CheckImage(const char* op, const char* name,
                      ffi::Span<const int64_t> dims) {
  if (dims.size() != 4 || dims[3] % kLanes != 0) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": " + name +
        " must be [B, H, W, C] float32 with C a multiple of 8");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto d = x.dimensions();
  const auto kd = kernel.dimensions();
  if (auto e = CheckImage("depthwise_conv_forward", "x", d); e.failure()) {
    return e;
  }
  if (kd.size() != 3 || kd[0] != kd[1] || kd[0] % 2 == 0 || kd[0] > kMaxK ||
      kd[2] != d[3]) {
    return ffi::Error::InvalidArgument(
        "depthwise_conv_forward: kernel must be [k, k, C], k odd <= 7, C as "
        "x's");
  }
  const Shape s{d[0], d[1], d[2], d[3], static_cast<int>(kd[0])};
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  ParallelFor::Run(pool, s.b * s.h,
                   [&](int64_t row) { ForwardRow(xp, kp, yp, s, row); });
  return ffi::Error::Success();
}

ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk) {
  const auto d = x.dimensions();
  const auto od = dk->dimensions();
  if (auto e = CheckImage("depthwise_conv_kernel_grad", "x", d); e.failure()) {
    return e;
  }
  if (!std::equal(d.begin(), d.end(), dy.dimensions().begin(),
                  dy.dimensions().end())) {
    return ffi::Error::InvalidArgument(
        "depthwise_conv_kernel_grad: dy must have x's shape");
  }
  int k = 1;
  while (od.size() == 3 && k * k < od[1]) ++k;
  if (od.size() != 3 || od[0] != d[0] || od[2] != d[3] || k * k != od[1] ||
      k % 2 == 0 || k > kMaxK) {
    return ffi::Error::InvalidArgument(
        "depthwise_conv_kernel_grad: dk must be [B, k * k, C], k odd <= 7");
  }
  const Shape s{d[0], d[1], d[2], d[3], k};
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  float* kp = dk->typed_data();
  ParallelFor::Run(pool, s.b * (s.c / kLanes), [&](int64_t unit) {
    KernelGradUnit(xp, gp, kp, s, unit);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseConvForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseConvKernelGrad, KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
