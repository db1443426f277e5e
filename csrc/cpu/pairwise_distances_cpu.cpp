// Batched pairwise distances on the CPU. Forward: one parallel loop over (task, query) rows.
// Backward: gx_q = alpha_q x_q + sum_n W_qn y_n and gy_n = beta_n y_n + sum_q W_qn x_q, fused
// so each x row is read once; gy is accumulated per (task, query chunk) and reduced in a fixed
// order, with chunks chosen from the shape alone, so results never depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "cpu_utils.h"

namespace pymeta::cpu {
namespace {

template <class T>
inline T dot(const T* a, const T* b, std::int64_t D) {
  return lane_sum<T>(D, [&](std::int64_t d) { return a[d] * b[d]; });
}

template <class T>
inline T clamped_norm(const T* a, std::int64_t D) {
  return std::max(std::sqrt(dot(a, a, D)), static_cast<T>(kCosineEps));
}

// Query rows handled together: each support row is loaded once per block, not per row.
constexpr int kRowBlock = 4;

// R query rows x (row stride D) against the N rows of Y: out (row stride N).
template <int R, class T>
__attribute__((always_inline)) inline void forward_rows_impl(Metric m, const T* x, const T* Y,
                                                             const T* ny, std::int64_t N,
                                                             std::int64_t D, T* out) {
  T nx[R], s[R];
  if (m == Metric::Cosine)
    for (int r = 0; r < R; ++r) nx[r] = clamped_norm(x + r * D, D);
  for (std::int64_t n = 0; n < N; ++n) {
    const T* yn = Y + n * D;
    if (m == Metric::SqEuclidean || m == Metric::Euclidean)
      lane_sums<R, T>(D, [&](int r, std::int64_t d) { T t = x[r * D + d] - yn[d]; return t * t; }, s);
    else
      lane_sums<R, T>(D, [&](int r, std::int64_t d) { return x[r * D + d] * yn[d]; }, s);
    for (int r = 0; r < R; ++r) {
      T v = s[r];
      switch (m) {
        case Metric::SqEuclidean: break;
        case Metric::Euclidean: v = std::sqrt(v); break;
        case Metric::Dot: v = -v; break;
        case Metric::Cosine: v = T(1) - v / (nx[r] * ny[n]); break;
      }
      out[r * N + n] = v;
    }
  }
}

// For R query rows x (stride D) with coefficients W (R x N) and alpha (R):
// gx_r = alpha_r x_r + sum_n W_rn y_n (if gx) and gyp_n += sum_r W_rn x_r in row order (if gyp).
// Feature blocks keep the working set in L1.
template <int R, class T>
__attribute__((always_inline)) inline void backward_rows_impl(const T* x, const T* Y, const T* W,
                                                              const T* alpha, std::int64_t N,
                                                              std::int64_t D, T* gx, T* gyp) {
  constexpr std::int64_t kBlock = 256;
  for (std::int64_t d0 = 0; d0 < D; d0 += kBlock) {
    const std::int64_t d1 = std::min(D, d0 + kBlock);
    if (gx)
      for (int r = 0; r < R; ++r)
        for (std::int64_t d = d0; d < d1; ++d) gx[r * D + d] = alpha[r] * x[r * D + d];
    for (std::int64_t n = 0; n < N; ++n) {
      const T* yn = Y + n * D;
      if (gx)
        for (int r = 0; r < R; ++r) {
          const T w = W[r * N + n];
          for (std::int64_t d = d0; d < d1; ++d) gx[r * D + d] += w * yn[d];
        }
      if (gyp) {
        T* gn = gyp + n * D;
        for (std::int64_t d = d0; d < d1; ++d) {
          T acc = gn[d];
          for (int r = 0; r < R; ++r) acc += W[r * N + n] * x[r * D + d];
          gn[d] = acc;
        }
      }
    }
  }
}

#define PYMETA_ROW_KERNELS(T)                                                                 \
  PYMETA_SIMD_CLONES void forward_rows(Metric m, const T* x, std::int64_t R, const T* Y,     \
                                       const T* ny, std::int64_t N, std::int64_t D, T* out) { \
    std::int64_t r = 0;                                                                       \
    for (; r + kRowBlock <= R; r += kRowBlock)                                                \
      forward_rows_impl<kRowBlock>(m, x + r * D, Y, ny, N, D, out + r * N);                   \
    for (; r < R; ++r) forward_rows_impl<1>(m, x + r * D, Y, ny, N, D, out + r * N);          \
  }                                                                                           \
  PYMETA_SIMD_CLONES void backward_rows(const T* x, std::int64_t R, const T* Y, const T* W,  \
                                        const T* alpha, std::int64_t N, std::int64_t D, T* gx, \
                                        T* gyp) {                                             \
    std::int64_t r = 0;                                                                       \
    for (; r + kRowBlock <= R; r += kRowBlock)                                                \
      backward_rows_impl<kRowBlock>(x + r * D, Y, W + r * N, alpha + r, N, D,                 \
                                    gx ? gx + r * D : nullptr, gyp);                          \
    for (; r < R; ++r)                                                                        \
      backward_rows_impl<1>(x + r * D, Y, W + r * N, alpha + r, N, D,                         \
                            gx ? gx + r * D : nullptr, gyp);                                  \
  }                                                                                           \
  PYMETA_SIMD_CLONES void norm_rows(const T* a, std::int64_t R, std::int64_t D, T* out) {    \
    for (std::int64_t r = 0; r < R; ++r) out[r] = std::sqrt(dot(a + r * D, a + r * D, D));    \
  }
PYMETA_ROW_KERNELS(float)
PYMETA_ROW_KERNELS(double)
#undef PYMETA_ROW_KERNELS

// Raw (unclamped) L2 norms of R rows, in parallel.
template <class T>
std::vector<T> row_norms(const Device& dev, const T* a, std::int64_t R, std::int64_t D) {
  std::vector<T> out(R);
  const std::int64_t block = 64;
#pragma omp parallel for num_threads(threads_for(dev, R * D)) schedule(static)
  for (std::int64_t r0 = 0; r0 < R; r0 += block)
    norm_rows(a + r0 * D, std::min(block, R - r0), D, out.data() + r0);
  return out;
}

template <class T>
void clamp_eps(std::vector<T>& v) {
  for (auto& e : v) e = std::max(e, static_cast<T>(kCosineEps));
}

// Query rows per work unit: whole tasks when there are enough of them, else chunks.
inline std::int64_t query_chunk(std::int64_t B, std::int64_t Q) {
  return B >= 8 ? std::max<std::int64_t>(Q, 1) : std::max<std::int64_t>(8, ceil_div(Q, 8));
}

template <class T>
void forward(const Device& dev, Metric m, std::int64_t B, std::int64_t Q, std::int64_t N,
             std::int64_t D, const T* x, const T* y, T* out) {
  std::vector<T> ny;
  if (m == Metric::Cosine) {
    ny = row_norms(dev, y, B * N, D);
    clamp_eps(ny);
  }
  const std::int64_t qb = query_chunk(B, Q), nqb = ceil_div(Q, qb);
#pragma omp parallel for num_threads(threads_for(dev, B * Q * N * D)) schedule(static)
  for (std::int64_t u = 0; u < B * nqb; ++u) {
    const std::int64_t b = u / nqb, q0 = (u % nqb) * qb, rows = std::min(qb, Q - q0);
    forward_rows(m, x + (b * Q + q0) * D, rows, y + b * N * D,
                 ny.empty() ? nullptr : ny.data() + b * N, N, D, out + (b * Q + q0) * N);
  }
}

// Per-(q, n) coefficients of the backward. W multiplies the other side's row; the row
// coefficient alpha_q sums `row` over n, and beta_n sums `col` over q.
template <class T>
struct Coefs {
  Metric m;
  const T* g;     // [B,Q,N]
  const T* out;   // [B,Q,N]
  const T* nx;    // raw norms [B,Q] (cosine)
  const T* ny;    // raw norms [B,N] (cosine)
  std::int64_t Q, N;

  static T clamp(T v) { return std::max(v, static_cast<T>(kCosineEps)); }
  static bool live(T v) { return v > static_cast<T>(kCosineEps); }

  // Fills W[0..N) for row (b, q) and returns alpha_q.
  T row(std::int64_t b, std::int64_t q, T* W) const {
    const std::int64_t base = (b * Q + q) * N;
    T alpha = 0;
    for (std::int64_t n = 0; n < N; ++n) {
      const T gv = g[base + n];
      switch (m) {
        case Metric::SqEuclidean: W[n] = -2 * gv; alpha += 2 * gv; break;
        case Metric::Euclidean: {
          const T d = out[base + n];
          const T h = d > 0 ? gv / (2 * d) : T(0);
          W[n] = -2 * h;
          alpha += 2 * h;
          break;
        }
        case Metric::Dot: W[n] = -gv; break;
        case Metric::Cosine: {
          const T nxq = clamp(nx[b * Q + q]);
          W[n] = -gv / (nxq * clamp(ny[b * N + n]));
          alpha += gv * (T(1) - out[base + n]) / (nxq * nxq);
          break;
        }
      }
    }
    return (m == Metric::Cosine && !live(nx[b * Q + q])) ? T(0) : alpha;
  }

  T beta(std::int64_t b, std::int64_t n) const {
    if (m == Metric::Dot || (m == Metric::Cosine && !live(ny[b * N + n]))) return 0;
    T s = 0;
    for (std::int64_t q = 0; q < Q; ++q) {
      const std::int64_t i = (b * Q + q) * N + n;
      switch (m) {
        case Metric::SqEuclidean: s += 2 * g[i]; break;
        case Metric::Euclidean: s += out[i] > 0 ? g[i] / out[i] : T(0); break;
        case Metric::Cosine: {
          const T nyn = clamp(ny[b * N + n]);
          s += g[i] * (T(1) - out[i]) / (nyn * nyn);
          break;
        }
        default: break;
      }
    }
    return s;
  }
};

template <class T>
void backward(const Device& dev, Metric m, std::int64_t B, std::int64_t Q, std::int64_t N,
              std::int64_t D, const T* g, const T* x, const T* y, const T* out, T* gx, T* gy) {
  if (Q == 0 || N == 0) {  // no distances: the gradients are zero
    if (gx) std::fill(gx, gx + B * Q * D, T(0));
    if (gy) std::fill(gy, gy + B * N * D, T(0));
    return;
  }
  std::vector<T> nx, ny;
  if (m == Metric::Cosine) {
    nx = row_norms(dev, x, B * Q, D);
    ny = row_norms(dev, y, B * N, D);
  }
  const Coefs<T> coefs{m, g, out, nx.data(), ny.data(), Q, N};
  const std::int64_t qc = query_chunk(B, Q), nc = ceil_div(Q, qc);
  const bool direct = nc <= 1;  // accumulate straight into gy
  std::vector<T> partial(gy && !direct ? B * nc * N * D : 0);
  const int nt = threads_for(dev, B * Q * N * D);
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> W(qc * N), alpha(qc);
#pragma omp for schedule(static)
    for (std::int64_t u = 0; u < B * nc; ++u) {
      const std::int64_t b = u / nc, q0 = (u % nc) * qc, rows = std::min(qc, Q - q0);
      T* gyp = !gy ? nullptr : direct ? gy + b * N * D : partial.data() + u * N * D;
      if (gyp) std::fill(gyp, gyp + N * D, T(0));
      for (std::int64_t r = 0; r < rows; ++r) alpha[r] = coefs.row(b, q0 + r, W.data() + r * N);
      backward_rows(x + (b * Q + q0) * D, rows, y + b * N * D, W.data(), alpha.data(), N, D,
                    gx ? gx + (b * Q + q0) * D : nullptr, gyp);
    }
    if (gy) {
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < B * N; ++r) {
        const std::int64_t b = r / N, n = r % N;
        T* dst = gy + r * D;
        if (!direct) {
          std::fill(dst, dst + D, T(0));
          for (std::int64_t c = 0; c < nc; ++c) {
            const T* src = partial.data() + ((b * nc + c) * N + n) * D;
            for (std::int64_t d = 0; d < D; ++d) dst[d] += src[d];
          }
        }
        const T beta = coefs.beta(b, n);
        const T* yn = y + r * D;
        for (std::int64_t d = 0; d < D; ++d) dst[d] += beta * yn[d];
      }
    }
  }
}

}  // namespace

void pairwise_distances_forward(const Device& dev, DType dtype, Metric metric, std::int64_t B,
                                std::int64_t Q, std::int64_t N, std::int64_t D, const void* x,
                                const void* y, void* out) {
  dispatch_float(dtype, "pairwise_distances", [&](auto t) {
    using T = decltype(t);
    forward<T>(dev, metric, B, Q, N, D, static_cast<const T*>(x), static_cast<const T*>(y),
               static_cast<T*>(out));
  });
}

void pairwise_distances_backward(const Device& dev, DType dtype, Metric metric, std::int64_t B,
                                 std::int64_t Q, std::int64_t N, std::int64_t D,
                                 const void* grad_out, const void* x, const void* y,
                                 const void* out, void* grad_x, void* grad_y) {
  dispatch_float(dtype, "pairwise_distances backward", [&](auto t) {
    using T = decltype(t);
    backward<T>(dev, metric, B, Q, N, D, static_cast<const T*>(grad_out),
                static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const T*>(out),
                static_cast<T*>(grad_x), static_cast<T*>(grad_y));
  });
}

}  // namespace pymeta::cpu
