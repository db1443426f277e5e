// Training-mode BatchNorm + ReLU + 2x2 max-pool over NHWC activations, fused.
//
// Forward keeps no intermediate: backward recomputes each window's normalised values from x
// and the channel statistics, so only x (the convolution output) and the pooled output stay
// alive. Work units are rows of windows (image n, output row ho); channel sums are taken
// per fixed block of units and added in block order, so results never depend on the thread
// count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "cpu_utils.h"

namespace pymeta::cpu {
namespace {

// Rows of x (or of windows) per partial sum.
constexpr std::int64_t kRowBlock = 64;

struct Geometry {
  std::int64_t N, H, W, K, Ho, Wo;
  std::int64_t rows() const { return N * H * W; }
  std::int64_t units() const { return N * Ho; }  // rows of windows
  // Offset of pixel (n, h, w) in elements.
  std::int64_t at(std::int64_t n, std::int64_t h, std::int64_t w) const {
    return ((n * H + h) * W + w) * K;
  }
};

// acc[k] += f(row, k) over rows [r0, r1) of x; rows are K apart.
template <class T>
PYMETA_SIMD_CLONES void sum_rows(const T* x, std::int64_t r0, std::int64_t r1, std::int64_t K,
                                 const double* center, double* acc) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ row = x + r * K;
    if (center) {
      for (std::int64_t k = 0; k < K; ++k) {
        const double d = double(row[k]) - center[k];
        acc[k] += d * d;
      }
    } else {
      for (std::int64_t k = 0; k < K; ++k) acc[k] += double(row[k]);
    }
  }
}

// Per-channel sum over all rows (center == nullptr) or of squared deviations from center.
template <class T>
void channel_sums(const Device& dev, const Geometry& g, const T* x, const double* center,
                  double* out) {
  const std::int64_t rows = g.rows(), K = g.K, nblk = ceil_div(rows, kRowBlock);
  std::vector<double> part(nblk * K, 0.0);
  parallel_region(threads_for(dev, rows * K), [&] {
#pragma omp for schedule(static)
    for (std::int64_t b = 0; b < nblk; ++b)
      sum_rows(x, b * kRowBlock, std::min(rows, (b + 1) * kRowBlock), K, center, &part[b * K]);
  });
  std::fill(out, out + K, 0.0);
  for (std::int64_t b = 0; b < nblk; ++b)
    for (std::int64_t k = 0; k < K; ++k) out[k] += part[b * K + k];
}

// Per-channel constants in T: y = (x - mean) * scale + bias is BatchNorm's output, and
// backward's dx = dy * scale + (x - mean) * u + v (scale = weight * invstd).
template <class T>
struct Coef {
  std::vector<T> mean, scale, bias, u, v;
};

template <class T>
Coef<T> coefficients(std::int64_t K, const T* weight, const T* bias, const double* mean,
                     const double* invstd) {
  Coef<T> f{std::vector<T>(K), std::vector<T>(K), std::vector<T>(K), {}, {}};
  for (std::int64_t k = 0; k < K; ++k) {
    f.mean[k] = T(mean[k]);
    f.scale[k] = T(double(weight[k]) * invstd[k]);
    f.bias[k] = bias[k];
  }
  return f;
}

// The four pixels of window (n, ho, wo).
struct Window {
  std::int64_t off[4];
  Window(const Geometry& g, std::int64_t n, std::int64_t ho, std::int64_t wo)
      : off{g.at(n, 2 * ho, 2 * wo), g.at(n, 2 * ho, 2 * wo + 1), g.at(n, 2 * ho + 1, 2 * wo),
            g.at(n, 2 * ho + 1, 2 * wo + 1)} {}
};

// Lanes of one channel-vector step: V is Vec<T> (kLanes channels) or T (the tail). The
// same code serves both, so the tail rounds exactly like the body.
template <class V, class T>
__attribute__((always_inline)) inline V load(const T* p) {
  if constexpr (std::is_same_v<V, T>) {
    return *p;
  } else {
    return loadu(p);
  }
}

template <class V, class T>
__attribute__((always_inline)) inline void store(T* p, V v) {
  if constexpr (std::is_same_v<V, T>) {
    *p = v;
  } else {
    storeu(p, v);
  }
}

// b if it beats a (greater, or NaN), else a: the first maximum, or a NaN anywhere, as torch's
// max-pool picks.
template <class V>
__attribute__((always_inline)) inline V pick_max(V a, V b) {
  return ((b > a) | (b != b)) ? b : a;
}

template <class V>
__attribute__((always_inline)) inline V zero_unless(V value, V keep_if_positive) {
  return keep_if_positive > V{} ? value : V{};
}

// One window's four pixels at channel k, normalised: y_i = (x_i - mean) * scale + bias.
template <class V, class T>
struct WindowAt {
  V x[4], y[4], best;
  WindowAt(const T* const* px, std::int64_t k, const Coef<T>& f) {
    const V mean = load<V>(&f.mean[k]), scale = load<V>(&f.scale[k]),
            bias = load<V>(&f.bias[k]);
    for (int i = 0; i < 4; ++i) {
      x[i] = load<V>(px[i] + k) - mean;  // centred
      y[i] = x[i] * scale + bias;
    }
    best = pick_max(pick_max(pick_max(y[0], y[1]), y[2]), y[3]);  // ReLU commutes: after
  }
};

// Calls step(V{}, k) over channels [0, K): V = Vec<T> from k in steps of kLanes, then V = T
// for the tail.
template <class T, class Step>
__attribute__((always_inline)) inline void over_channels(std::int64_t K, Step&& step) {
  std::int64_t k = 0;
  for (; k + kLanes<T> <= K; k += kLanes<T>) step(Vec<T>{}, k);
  for (; k < K; ++k) step(T{}, k);
}

template <class T>
PYMETA_SIMD_CLONES void pool_unit(const Geometry& g, const T* x, const Coef<T>& f,
                                  std::int64_t n, std::int64_t ho, T* out) {
  for (std::int64_t wo = 0; wo < g.Wo; ++wo) {
    const Window w(g, n, ho, wo);
    const T* px[4] = {x + w.off[0], x + w.off[1], x + w.off[2], x + w.off[3]};
    T* o = out + ((n * g.Ho + ho) * g.Wo + wo) * g.K;
    over_channels<T>(g.K, [&](auto lanes, std::int64_t k) {
      using V = decltype(lanes);
      const V best = WindowAt<V, T>(px, k, f).best;
      store(o + k, ((best < V{}) ? V{} : best));  // ReLU; NaN stays NaN
    });
  }
}

// Backward, pass 1, one row of windows: sum_dy[k] += dy and sum_dy_xc[k] += dy * (x - mean)
// at each window's first maximum, where dy is the output gradient if it passed the ReLU.
template <class T>
PYMETA_SIMD_CLONES void grad_sums_unit(const Geometry& g, const T* x, const Coef<T>& f,
                                       const T* grad_out, std::int64_t n, std::int64_t ho,
                                       T* sum_dy, T* sum_dy_xc) {
  for (std::int64_t wo = 0; wo < g.Wo; ++wo) {
    const Window w(g, n, ho, wo);
    const T* px[4] = {x + w.off[0], x + w.off[1], x + w.off[2], x + w.off[3]};
    const T* go = grad_out + ((n * g.Ho + ho) * g.Wo + wo) * g.K;
    over_channels<T>(g.K, [&](auto lanes, std::int64_t k) {
      using V = decltype(lanes);
      const WindowAt<V, T> a(px, k, f);
      V x_best = a.x[0];
      for (int i = 3; i > 0; --i) x_best = (a.y[i] == a.best) ? a.x[i] : x_best;  // first wins
      const V dy = zero_unless(load<V>(go + k), a.best);
      store(sum_dy + k, load<V>(sum_dy + k) + dy);
      store(sum_dy_xc + k, load<V>(sum_dy_xc + k) + dy * x_best);
    });
  }
}

// Pass 2, one row of windows: dx = (x - mean) * u + v, plus dy * scale at the first maximum.
template <class T>
PYMETA_SIMD_CLONES void grad_x_unit(const Geometry& g, const T* x, const Coef<T>& f,
                                    const T* grad_out, std::int64_t n, std::int64_t ho, T* dx) {
  for (std::int64_t wo = 0; wo < g.Wo; ++wo) {
    const Window w(g, n, ho, wo);
    const T* px[4] = {x + w.off[0], x + w.off[1], x + w.off[2], x + w.off[3]};
    const T* go = grad_out + ((n * g.Ho + ho) * g.Wo + wo) * g.K;
    over_channels<T>(g.K, [&](auto lanes, std::int64_t k) {
      using V = decltype(lanes);
      const WindowAt<V, T> a(px, k, f);
      const V u = load<V>(&f.u[k]), v = load<V>(&f.v[k]);
      V rest = zero_unless(load<V>(go + k) * load<V>(&f.scale[k]), a.best);
      for (int i = 0; i < 4; ++i) {
        const V hit = (a.y[i] == a.best) ? rest : V{};
        rest -= hit;
        store(dx + w.off[i] + k, a.x[i] * u + v + hit);
      }
    });
  }
}

// dx of pixels outside every window (dy = 0): count consecutive pixels from x.
template <class T>
PYMETA_SIMD_CLONES void grad_x_uncovered(const T* x, std::int64_t count, const Coef<T>& f,
                                         std::int64_t K, T* __restrict__ dx) {
  const T *mean = f.mean.data(), *u = f.u.data(), *v = f.v.data();
  for (std::int64_t i = 0; i < count; ++i)
    for (std::int64_t k = 0; k < K; ++k) dx[i * K + k] = (x[i * K + k] - mean[k]) * u[k] + v[k];
}

std::vector<double> inverse_std(std::int64_t K, const double* var, double eps) {
  std::vector<double> invstd(K);
  for (std::int64_t k = 0; k < K; ++k) invstd[k] = 1.0 / std::sqrt(var[k] + eps);
  return invstd;
}

template <class T>
void forward(const Device& dev, const Geometry& g, const T* x, const T* weight, const T* bias,
             double eps, T* out, double* mean, double* var) {
  const double count = double(g.rows());
  channel_sums(dev, g, x, nullptr, mean);
  for (std::int64_t k = 0; k < g.K; ++k) mean[k] /= count;
  channel_sums(dev, g, x, mean, var);
  for (std::int64_t k = 0; k < g.K; ++k) var[k] /= count;
  const Coef<T> f = coefficients(g.K, weight, bias, mean, inverse_std(g.K, var, eps).data());
  parallel_region(threads_for(dev, g.rows() * g.K), [&] {
#pragma omp for schedule(static)
    for (std::int64_t u = 0; u < g.units(); ++u) pool_unit(g, x, f, u / g.Ho, u % g.Ho, out);
  });
}

template <class T>
void grad_sums(const Device& dev, const Geometry& g, const T* x, const Coef<T>& f,
               const T* grad_out, double* sum_dy, double* sum_dy_xc) {
  // One row of windows sums in T (a few dozen terms), blocks of rows in double.
  const std::int64_t K = g.K, nblk = ceil_div(g.units(), kRowBlock);
  std::vector<double> part(2 * nblk * K, 0.0);
  parallel_region(threads_for(dev, g.rows() * K), [&] {
    std::vector<T> row(2 * K);
#pragma omp for schedule(static)
    for (std::int64_t b = 0; b < nblk; ++b) {
      double* acc = &part[2 * b * K];
      for (std::int64_t u = b * kRowBlock; u < std::min(g.units(), (b + 1) * kRowBlock); ++u) {
        std::fill(row.begin(), row.end(), T(0));
        grad_sums_unit(g, x, f, grad_out, u / g.Ho, u % g.Ho, row.data(), row.data() + K);
        for (std::int64_t k = 0; k < 2 * K; ++k) acc[k] += double(row[k]);
      }
    }
  });
  std::fill(sum_dy, sum_dy + K, 0.0);
  std::fill(sum_dy_xc, sum_dy_xc + K, 0.0);
  for (std::int64_t b = 0; b < nblk; ++b)
    for (std::int64_t k = 0; k < K; ++k) {
      sum_dy[k] += part[2 * b * K + k];
      sum_dy_xc[k] += part[(2 * b + 1) * K + k];
    }
}

template <class T>
void grad_x(const Device& dev, const Geometry& g, const T* x, const Coef<T>& f,
            const T* grad_out, T* dx) {
  const std::int64_t K = g.K, Wc = 2 * g.Wo;  // columns [Wc, W) and rows [2 Ho, H): no window
  parallel_region(threads_for(dev, g.rows() * K), [&] {
#pragma omp for schedule(static)
    for (std::int64_t un = 0; un < g.units(); ++un) {
      const std::int64_t n = un / g.Ho, ho = un % g.Ho;
      grad_x_unit(g, x, f, grad_out, n, ho, dx);
      for (std::int64_t h = 2 * ho; h < 2 * ho + 2 && Wc < g.W; ++h)
        grad_x_uncovered(x + g.at(n, h, Wc), g.W - Wc, f, K, dx + g.at(n, h, Wc));
    }
#pragma omp for schedule(static)
    for (std::int64_t n = 0; n < g.N; ++n)
      for (std::int64_t h = 2 * g.Ho; h < g.H; ++h)
        grad_x_uncovered(x + g.at(n, h, 0), g.W, f, K, dx + g.at(n, h, 0));
  });
}

template <class T>
void backward(const Device& dev, const Geometry& g, const T* x, const T* weight, const T* bias,
              const double* mean, const double* var, double eps, const T* grad_out, T* grad_x_out,
              T* grad_weight, T* grad_bias) {
  const std::int64_t K = g.K;
  const std::vector<double> invstd = inverse_std(K, var, eps);
  Coef<T> f = coefficients(K, weight, bias, mean, invstd.data());
  std::vector<double> sum_dy(K), sum_dy_xc(K);
  grad_sums(dev, g, x, f, grad_out, sum_dy.data(), sum_dy_xc.data());
  for (std::int64_t k = 0; k < K; ++k) {
    if (grad_weight) grad_weight[k] = T(sum_dy_xc[k] * invstd[k]);
    if (grad_bias) grad_bias[k] = T(sum_dy[k]);
  }
  if (!grad_x_out) return;
  // dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), x_hat = (x - mean) * invstd.
  f.u.resize(K);
  f.v.resize(K);
  const double count = double(g.rows());
  for (std::int64_t k = 0; k < K; ++k) {
    const double s = double(weight[k]) * invstd[k];
    f.u[k] = T(-s * invstd[k] * invstd[k] * sum_dy_xc[k] / count);
    f.v[k] = T(-s * sum_dy[k] / count);
  }
  grad_x(dev, g, x, f, grad_out, grad_x_out);
}

}  // namespace

void batch_norm_relu_pool_forward(const Device& dev, DType dtype, std::int64_t N, std::int64_t H,
                                  std::int64_t W, std::int64_t K, const void* x,
                                  const void* weight, const void* bias, double eps, void* out,
                                  double* mean, double* var) {
  const Geometry g{N, H, W, K, H / 2, W / 2};
  dispatch_float(dtype, "batch_norm_relu_pool", [&](auto zero) {
    using T = decltype(zero);
    forward(dev, g, static_cast<const T*>(x), static_cast<const T*>(weight),
            static_cast<const T*>(bias), eps, static_cast<T*>(out), mean, var);
  });
}

void batch_norm_relu_pool_backward(const Device& dev, DType dtype, std::int64_t N,
                                   std::int64_t H, std::int64_t W, std::int64_t K,
                                   const void* x, const void* weight, const void* bias,
                                   const double* mean, const double* var, double eps,
                                   const void* grad_out, void* grad_x, void* grad_weight,
                                   void* grad_bias) {
  const Geometry g{N, H, W, K, H / 2, W / 2};
  dispatch_float(dtype, "batch_norm_relu_pool", [&](auto zero) {
    using T = decltype(zero);
    backward(dev, g, static_cast<const T*>(x), static_cast<const T*>(weight),
             static_cast<const T*>(bias), mean, var, eps, static_cast<const T*>(grad_out),
             static_cast<T*>(grad_x), static_cast<T*>(grad_weight), static_cast<T*>(grad_bias));
  });
}

}  // namespace pymeta::cpu
