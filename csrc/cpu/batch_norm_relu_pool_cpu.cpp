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
  // Offset of pixel (n, h, w) of x, and of window (n, ho, wo) in the pooled output.
  std::int64_t at(std::int64_t n, std::int64_t h, std::int64_t w) const {
    return ((n * H + h) * W + w) * K;
  }
  std::int64_t pooled(std::int64_t n, std::int64_t ho, std::int64_t wo) const {
    return ((n * Ho + ho) * Wo + wo) * K;
  }
};

// Sums of width values over items [0, count), taken per fixed block of kRowBlock items and
// added in block order, so they never depend on the thread count: add(i0, i1, acc) adds
// items [i0, i1) into acc[0, width), on nt threads.
template <class Add>
std::vector<double> block_sums(int nt, std::int64_t count, std::int64_t width, Add add) {
  const std::int64_t nblk = ceil_div(count, kRowBlock);
  std::vector<double> part(nblk * width, 0.0), sums(width, 0.0);
  parallel_region(nt, [&] {
#pragma omp for schedule(static)
    for (std::int64_t b = 0; b < nblk; ++b)
      add(b * kRowBlock, std::min(count, (b + 1) * kRowBlock), &part[b * width]);
  });
  for (std::int64_t b = 0; b < nblk; ++b)
    for (std::int64_t k = 0; k < width; ++k) sums[k] += part[b * width + k];
  return sums;
}

// Over rows [r0, r1) (K apart): acc[k] += x (center null), or acc[k] += (x - center)^2, or
// with weights a: acc[k] += a and acc[K + k] += a * (x - center).
template <class T>
PYMETA_SIMD_CLONES void sum_rows(const T* x, const T* a, std::int64_t r0, std::int64_t r1,
                                 std::int64_t K, const double* center, double* acc) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ row = x + r * K;
    if (a) {
      const T* __restrict__ ar = a + r * K;
      for (std::int64_t k = 0; k < K; ++k) {
        acc[k] += double(ar[k]);
        acc[K + k] += double(ar[k]) * (double(row[k]) - center[k]);
      }
    } else if (center) {
      for (std::int64_t k = 0; k < K; ++k) {
        const double d = double(row[k]) - center[k];
        acc[k] += d * d;
      }
    } else {
      for (std::int64_t k = 0; k < K; ++k) acc[k] += double(row[k]);
    }
  }
}

// Per-channel sums over all rows, as sum_rows: K values (2K with weights a).
template <class T>
std::vector<double> channel_sums(const Device& dev, const Geometry& g, const T* x, const T* a,
                                 const double* center) {
  return block_sums(threads_for(dev, g.rows() * g.K), g.rows(), a ? 2 * g.K : g.K,
                    [&](std::int64_t r0, std::int64_t r1, double* acc) {
                      sum_rows(x, a, r0, r1, g.K, center, acc);
                    });
}

// Per-channel constants in T: y = (x - mean) * scale + bias is BatchNorm's output
// (scale = weight * invstd). Gradient passes write dx = dy * route + (x - mean) * u + v
// (+ gg * extra in double backward), and double backward's gathered output is
// gg * gain + (x - mean) * p + q at each window's winner.
template <class T>
struct Coef {
  std::vector<T> mean, scale, bias, u, v, route, extra, gain, p, q;
};

template <class T>
Coef<T> coefficients(std::int64_t K, const T* weight, const T* bias, const double* mean,
                     const double* invstd) {
  Coef<T> f;
  f.mean.resize(K);
  f.scale.resize(K);
  f.bias.resize(K);
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

// value where the ReLU passes gradient: everywhere but at inputs <= 0 (a NaN passes, as in
// torch's threshold_backward).
template <class V>
__attribute__((always_inline)) inline V zero_unless(V value, V keep_if_positive) {
  return keep_if_positive <= V{} ? V{} : value;
}

// One window's four pixels at channel k, normalised: y_i = (x_i - mean) * scale + bias.
template <class V, class T>
struct WindowAt {
  V x[4], y[4], best;
  WindowAt(const T* px, const Window& w, std::int64_t k, const Coef<T>& f) {
    const V mean = load<V>(&f.mean[k]), scale = load<V>(&f.scale[k]),
            bias = load<V>(&f.bias[k]);
    for (int i = 0; i < 4; ++i) {
      x[i] = load<V>(px + w.off[i] + k) - mean;  // centred
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
    T* o = out + g.pooled(n, ho, wo);
    over_channels<T>(g.K, [&](auto lanes, std::int64_t k) {
      using V = decltype(lanes);
      const V best = WindowAt<V, T>(x, w, k, f).best;
      store(o + k, ((best < V{}) ? V{} : best));  // ReLU; NaN stays NaN
    });
  }
}

// Backward, pass 1, one row of windows: sums[k] += dy and sums[K + k] += dy * (x - mean) at
// each window's first maximum, where dy is the output gradient if it passed the ReLU; with gg,
// also sums[2K + k] += dy * gg there.
template <class T>
PYMETA_SIMD_CLONES void grad_sums_unit(const Geometry& g, const T* x, const T* gg,
                                       const Coef<T>& f, const T* grad_out, std::int64_t n,
                                       std::int64_t ho, T* sums) {
  const std::int64_t K = g.K;
  for (std::int64_t wo = 0; wo < g.Wo; ++wo) {
    const Window w(g, n, ho, wo);
    const T* go = grad_out + g.pooled(n, ho, wo);
    over_channels<T>(K, [&](auto lanes, std::int64_t k) {
      using V = decltype(lanes);
      const WindowAt<V, T> a(x, w, k, f);
      V x_best = a.x[3], gg_best = gg ? load<V>(gg + w.off[3] + k) : V{};
      for (int i = 2; i >= 0; --i) {  // the first maximum wins
        const auto hit = a.y[i] == a.best;
        x_best = hit ? a.x[i] : x_best;
        if (gg) gg_best = hit ? load<V>(gg + w.off[i] + k) : gg_best;
      }
      const V dy = zero_unless(load<V>(go + k), a.best);
      store(sums + k, load<V>(sums + k) + dy);
      store(sums + K + k, load<V>(sums + K + k) + dy * x_best);
      if (gg) store(sums + 2 * K + k, load<V>(sums + 2 * K + k) + dy * gg_best);
    });
  }
}

// Pass 2, one row of windows: dx = (x - mean) * u + v (+ gg * extra), plus dy * route at the
// first maximum.
template <class T>
PYMETA_SIMD_CLONES void grad_x_unit(const Geometry& g, const T* x, const T* gg,
                                    const Coef<T>& f, const T* grad_out, std::int64_t n,
                                    std::int64_t ho, T* dx) {
  for (std::int64_t wo = 0; wo < g.Wo; ++wo) {
    const Window w(g, n, ho, wo);
    const T* go = grad_out + g.pooled(n, ho, wo);
    over_channels<T>(g.K, [&](auto lanes, std::int64_t k) {
      using V = decltype(lanes);
      const WindowAt<V, T> a(x, w, k, f);
      const V u = load<V>(&f.u[k]), v = load<V>(&f.v[k]);
      V rest = zero_unless(load<V>(go + k) * load<V>(&f.route[k]), a.best);
      for (int i = 0; i < 4; ++i) {
        const V hit = (a.y[i] == a.best) ? rest : V{};
        rest -= hit;
        V d = a.x[i] * u + v + hit;
        if (gg) d += load<V>(gg + w.off[i] + k) * load<V>(&f.extra[k]);
        store(dx + w.off[i] + k, d);
      }
    });
  }
}

// Double backward, one row of windows: out = gg * gain + (x - mean) * p + q at each window's
// first maximum if it passed the ReLU, else 0.
template <class T>
PYMETA_SIMD_CLONES void gather_unit(const Geometry& g, const T* x, const T* gg,
                                    const Coef<T>& f, std::int64_t n, std::int64_t ho, T* out) {
  for (std::int64_t wo = 0; wo < g.Wo; ++wo) {
    const Window w(g, n, ho, wo);
    T* o = out + g.pooled(n, ho, wo);
    over_channels<T>(g.K, [&](auto lanes, std::int64_t k) {
      using V = decltype(lanes);
      const WindowAt<V, T> a(x, w, k, f);
      V h = a.x[3] * load<V>(&f.p[k]) + load<V>(gg + w.off[3] + k) * load<V>(&f.gain[k]);
      for (int i = 2; i >= 0; --i) {
        const V hi = a.x[i] * load<V>(&f.p[k]) + load<V>(gg + w.off[i] + k) * load<V>(&f.gain[k]);
        h = (a.y[i] == a.best) ? hi : h;
      }
      store(o + k, zero_unless(h + load<V>(&f.q[k]), a.best));
    });
  }
}

// dx of pixels outside every window (dy = 0): count consecutive pixels from x.
template <class T>
PYMETA_SIMD_CLONES void grad_x_uncovered(const T* x, const T* gg, std::int64_t count,
                                         const Coef<T>& f, std::int64_t K, T* __restrict__ dx) {
  const T *mean = f.mean.data(), *u = f.u.data(), *v = f.v.data(), *e = f.extra.data();
  for (std::int64_t i = 0; i < count; ++i)
    for (std::int64_t k = 0; k < K; ++k)
      dx[i * K + k] = (x[i * K + k] - mean[k]) * u[k] + v[k] + (gg ? gg[i * K + k] * e[k] : T(0));
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
  const T* none = nullptr;
  const std::vector<double> sums = channel_sums(dev, g, x, none, nullptr);
  for (std::int64_t k = 0; k < g.K; ++k) mean[k] = sums[k] / count;
  const std::vector<double> squares = channel_sums(dev, g, x, none, mean);
  for (std::int64_t k = 0; k < g.K; ++k) var[k] = squares[k] / count;
  const Coef<T> f = coefficients(g.K, weight, bias, mean, inverse_std(g.K, var, eps).data());
  parallel_region(threads_for(dev, g.rows() * g.K), [&] {
#pragma omp for schedule(static)
    for (std::int64_t u = 0; u < g.units(); ++u) pool_unit(g, x, f, u / g.Ho, u % g.Ho, out);
  });
}

// Pass 1 over all windows: sums [2K] (3K with gg) as grad_sums_unit adds them. One row of
// windows sums in T (a few dozen terms), blocks of rows in double.
template <class T>
std::vector<double> grad_sums(const Device& dev, const Geometry& g, const T* x, const T* gg,
                              const Coef<T>& f, const T* grad_out) {
  const std::int64_t n = (gg ? 3 : 2) * g.K;
  const int nt = threads_for(dev, g.rows() * g.K);
  ThreadScratch<T> rows(nt, n);
  return block_sums(nt, g.units(), n, [&](std::int64_t u0, std::int64_t u1, double* acc) {
    T* row = rows.get();
    for (std::int64_t u = u0; u < u1; ++u) {
      std::fill(row, row + n, T(0));
      grad_sums_unit(g, x, gg, f, grad_out, u / g.Ho, u % g.Ho, row);
      for (std::int64_t k = 0; k < n; ++k) acc[k] += double(row[k]);
    }
  });
}

// Pass 2: dx of every pixel (grad_x_unit; pixels outside every window get no dy) and, with
// gathered, double backward's pooled output (gather_unit).
template <class T>
void grad_x(const Device& dev, const Geometry& g, const T* x, const T* gg, const Coef<T>& f,
            const T* grad_out, T* dx, T* gathered) {
  const std::int64_t K = g.K, Wc = 2 * g.Wo;  // columns [Wc, W) and rows [2 Ho, H): no window
  auto off = [&](const T* p, std::int64_t n, std::int64_t h, std::int64_t w) {
    return p ? p + g.at(n, h, w) : p;
  };
  parallel_region(threads_for(dev, g.rows() * K), [&] {
#pragma omp for schedule(static)
    for (std::int64_t un = 0; un < g.units(); ++un) {
      const std::int64_t n = un / g.Ho, ho = un % g.Ho;
      if (gathered) gather_unit(g, x, gg, f, n, ho, gathered);
      if (!dx) continue;
      grad_x_unit(g, x, gg, f, grad_out, n, ho, dx);
      for (std::int64_t h = 2 * ho; h < 2 * ho + 2 && Wc < g.W; ++h)
        grad_x_uncovered(x + g.at(n, h, Wc), off(gg, n, h, Wc), g.W - Wc, f, K,
                         dx + g.at(n, h, Wc));
    }
#pragma omp for schedule(static)
    for (std::int64_t n = 0; n < g.N; ++n)
      for (std::int64_t h = 2 * g.Ho; h < g.H && dx; ++h)
        grad_x_uncovered(x + g.at(n, h, 0), off(gg, n, h, 0), g.W, f, K, dx + g.at(n, h, 0));
  });
}

template <class T>
void backward(const Device& dev, const Geometry& g, const T* x, const T* weight, const T* bias,
              const double* mean, const double* var, double eps, const T* grad_out, T* grad_x_out,
              T* grad_weight, T* grad_bias) {
  const std::int64_t K = g.K;
  const std::vector<double> invstd = inverse_std(K, var, eps);
  Coef<T> f = coefficients(K, weight, bias, mean, invstd.data());
  const T* none = nullptr;
  const std::vector<double> sums = grad_sums(dev, g, x, none, f, grad_out);
  const double *sum_dy = sums.data(), *sum_dy_xc = sums.data() + K;
  for (std::int64_t k = 0; k < K; ++k) {
    if (grad_weight) grad_weight[k] = T(sum_dy_xc[k] * invstd[k]);
    if (grad_bias) grad_bias[k] = T(sum_dy[k]);
  }
  if (!grad_x_out) return;
  // dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), x_hat = (x - mean) * invstd.
  f.route = f.scale;
  f.u.resize(K);
  f.v.resize(K);
  const double count = double(g.rows());
  for (std::int64_t k = 0; k < K; ++k) {
    const double s = double(weight[k]) * invstd[k];
    f.u[k] = T(-s * invstd[k] * invstd[k] * sum_dy_xc[k] / count);
    f.v[k] = T(-s * sum_dy[k] / count);
  }
  grad_x(dev, g, x, none, f, grad_out, grad_x_out, static_cast<T*>(nullptr));
}

// Backward of backward. Per channel, with M pixels, r = invstd, xc = x - mean, x_hat = xc r,
// dy the output gradient routed to each window's winner, A = mean(dy), B = mean(dy x_hat),
// and the incoming gradients gg (of dx), ggw (of dweight), ggb (of dbias):
//   G = mean(gg), D = sum(gg x_hat), C = sum(gg dy) - M A G
//   d/dgrad_out at a winner = w r (gg - G - x_hat D / M) + ggw x_hat + ggb
//   d/dweight = r (C - B D)                   d/dbias = 0 (the winners are locally constant)
//   d/dx = c1 x_hat + c2 (dy - A - x_hat B) + c3 (gg - G - x_hat D / M), with
//   c1 = -w r^2 (C - B D) / M, c2 = ggw r - w r^2 D / M, c3 = -w r^2 B.
template <class T>
void double_backward(const Device& dev, const Geometry& g, const T* x, const T* weight,
                     const T* bias, const double* mean, const double* var, double eps,
                     const T* grad_out, const T* gg, const T* ggw, const T* ggb, T* gx,
                     T* gweight, T* ggrad_out) {
  const std::int64_t K = g.K;
  const double M = double(g.rows());
  const std::vector<double> r = inverse_std(K, var, eps);
  Coef<T> f = coefficients(K, weight, bias, mean, r.data());
  const std::vector<double> sums = grad_sums(dev, g, x, gg, f, grad_out);
  const std::vector<double> gsums = channel_sums(dev, g, x, gg, mean);
  for (auto* v : {&f.u, &f.v, &f.route, &f.extra, &f.gain, &f.p, &f.q}) v->resize(K);
  for (std::int64_t k = 0; k < K; ++k) {
    const double w = weight[k], rk = r[k], A = sums[k] / M, B = sums[K + k] * rk / M,
                 G = gsums[k] / M, D = gsums[K + k] * rk, C = sums[2 * K + k] - M * A * G;
    const double c1 = -w * rk * rk * (C - B * D) / M, c2 = double(ggw[k]) * rk - w * rk * rk * D / M,
                 c3 = -w * rk * rk * B;
    if (gweight) gweight[k] = T(rk * (C - B * D));
    // dx = dy c2 + gg c3 + xc u + v
    f.route[k] = T(c2);
    f.extra[k] = T(c3);
    f.u[k] = T(rk * (c1 - c2 * B - c3 * D / M));
    f.v[k] = T(-c2 * A - c3 * G);
    // d/dgrad_out = gg gain + xc p + q
    f.gain[k] = T(w * rk);
    f.p[k] = T(rk * (double(ggw[k]) - w * rk * D / M));
    f.q[k] = T(double(ggb[k]) - w * rk * G);
  }
  grad_x(dev, g, x, gg, f, grad_out, gx, ggrad_out);
}

// Runs body(zero, g, x, weight, bias) with the tail's geometry and its inputs cast to the
// dtype's T (zero: a T, for the body's own casts).
template <class Body>
void typed(DType dtype, const BnReluPool& a, Body body) {
  const Geometry g{a.N, a.H, a.W, a.K, a.H / 2, a.W / 2};
  dispatch_float(dtype, "batch_norm_relu_pool", [&](auto zero) {
    using T = decltype(zero);
    body(zero, g, static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
         static_cast<const T*>(a.bias));
  });
}

}  // namespace

void batch_norm_relu_pool_forward(const Device& dev, DType dtype, const BnReluPool& a,
                                  void* out) {
  typed(dtype, a, [&](auto zero, const Geometry& g, auto x, auto weight, auto bias) {
    using T = decltype(zero);
    forward(dev, g, x, weight, bias, a.eps, static_cast<T*>(out), a.mean, a.var);
  });
}

void batch_norm_relu_pool_backward(const Device& dev, DType dtype, const BnReluPool& a,
                                   const void* grad_out, void* grad_x, void* grad_weight,
                                   void* grad_bias) {
  typed(dtype, a, [&](auto zero, const Geometry& g, auto x, auto weight, auto bias) {
    using T = decltype(zero);
    backward(dev, g, x, weight, bias, a.mean, a.var, a.eps, static_cast<const T*>(grad_out),
             static_cast<T*>(grad_x), static_cast<T*>(grad_weight), static_cast<T*>(grad_bias));
  });
}

void batch_norm_relu_pool_double_backward(const Device& dev, DType dtype, const BnReluPool& a,
                                          const void* grad_out, const void* gg, const void* ggw,
                                          const void* ggb, void* gx, void* gweight,
                                          void* ggrad_out) {
  typed(dtype, a, [&](auto zero, const Geometry& g, auto x, auto weight, auto bias) {
    using T = decltype(zero);
    double_backward(dev, g, x, weight, bias, a.mean, a.var, a.eps,
                    static_cast<const T*>(grad_out), static_cast<const T*>(gg),
                    static_cast<const T*>(ggw), static_cast<const T*>(ggb), static_cast<T*>(gx),
                    static_cast<T*>(gweight), static_cast<T*>(ggrad_out));
  });
}

}  // namespace pymeta::cpu
