// Batched pairwise distances on the CPU. Forward: one parallel loop over (task, query) rows.
// Backward: gx_q = alpha_q x_q + sum_n W_qn y_n and gy_n = beta_n y_n + sum_q W_qn x_q (over
// differences for the Euclidean metrics), fused so each x row is read once; gy is accumulated
// per (task, query chunk) and reduced in a fixed order, with chunks chosen from the shape alone,
// so results never depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "cpu_utils.h"

namespace pymeta::cpu {
namespace {

// res[r] = sum_d (x_r[d] - y[d])^2 (Diff) or sum_d x_r[d] * y[d], for R rows x_r = x + r*D,
// each y vector loaded once for all R rows. Two accumulators per row hide the FMA latency.
template <int R, bool Diff, class T>
__attribute__((always_inline)) inline void row_sums(const T* x, const T* y, std::int64_t D,
                                                    T* res) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[R][2] = {};
  auto term = [](Vec<T> xv, Vec<T> yv) {
    if constexpr (Diff) {
      const Vec<T> t = xv - yv;
      return t * t;
    } else {
      return xv * yv;
    }
  };
  std::int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    const Vec<T> y0 = loadu(y + d), y1 = loadu(y + d + L);
    for (int r = 0; r < R; ++r) {
      acc[r][0] += term(loadu(x + r * D + d), y0);
      acc[r][1] += term(loadu(x + r * D + d + L), y1);
    }
  }
  for (; d < D; d += L) {
    const std::int64_t n = std::min<std::int64_t>(L, D - d);
    const Vec<T> yv = load_partial(y + d, n);
    for (int r = 0; r < R; ++r) acc[r][0] += term(load_partial(x + r * D + d, n), yv);
  }
  for (int r = 0; r < R; ++r) res[r] = hsum(acc[r][0] + acc[r][1]);
}

template <class T>
inline T clamped_norm(const T* a, std::int64_t D) {
  T s;
  row_sums<1, false>(a, a, D, &s);
  return std::max(std::sqrt(s), static_cast<T>(kCosineEps));
}

// A distance from its reduced sum s (sum of squared differences, or inner product).
template <class T>
inline T finish(Metric m, T s, T nx, T ny) {
  switch (m) {
    case Metric::SqEuclidean: return s;
    case Metric::Euclidean: return std::sqrt(s);
    case Metric::Dot: return -s;
    case Metric::Cosine: return T(1) - s / (nx * ny);
  }
  return s;
}

// Query rows handled together: each support row is loaded once per block, not per row.
constexpr int kRowBlock = 4;

// R query rows x (row stride D) against the N rows of Y: out (row stride N).
template <int R, class T>
__attribute__((always_inline)) inline void forward_rows_impl(Metric m, const T* x, const T* Y,
                                                             const T* ny, std::int64_t N,
                                                             std::int64_t D, T* out) {
  T nx[R], s[R];
  for (int r = 0; r < R; ++r) nx[r] = m == Metric::Cosine ? clamped_norm(x + r * D, D) : T(1);
  const bool diff = m == Metric::SqEuclidean || m == Metric::Euclidean;
  for (std::int64_t n = 0; n < N; ++n) {
    if (diff)
      row_sums<R, true>(x, Y + n * D, D, s);
    else
      row_sums<R, false>(x, Y + n * D, D, s);
    for (int r = 0; r < R; ++r) out[r * N + n] = finish(m, s[r], nx[r], ny ? ny[n] : T(1));
  }
}

// The same distances with support rows transposed, yT [D, Np] (Np >= N, a multiple of the
// vector width, zero padded): vectors run over support rows, so there is no horizontal sum
// per distance. Faster once N fills the vectors.
template <int R, int V, bool Diff, class T>
__attribute__((always_inline)) inline void transposed_sums(const T* x, const T* yT,
                                                           std::int64_t Np, std::int64_t nb,
                                                           std::int64_t D, Vec<T> (*acc)[V]) {
  constexpr int L = kLanes<T>;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec<T>{};
  for (std::int64_t d = 0; d < D; ++d) {
    Vec<T> yv[V];
    for (int v = 0; v < V; ++v) yv[v] = loadu(yT + d * Np + nb + v * L);
    for (int r = 0; r < R; ++r) {
      const T xs = x[r * D + d];
      for (int v = 0; v < V; ++v) {
        if constexpr (Diff) {
          const Vec<T> t = xs - yv[v];
          acc[r][v] += t * t;
        } else {
          acc[r][v] += xs * yv[v];
        }
      }
    }
  }
}

// R query rows against support rows [nb, nb + V*L) of yT; writes the valid ones.
template <int R, int V, class T>
__attribute__((always_inline)) inline void transposed_tile(Metric m, const T* x, const T* yT,
                                                           std::int64_t Np, std::int64_t nb,
                                                           const T* nx, const T* ny,
                                                           std::int64_t N, std::int64_t D,
                                                           T* out) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[R][V];
  if (m == Metric::SqEuclidean || m == Metric::Euclidean)
    transposed_sums<R, V, true>(x, yT, Np, nb, D, acc);
  else
    transposed_sums<R, V, false>(x, yT, Np, nb, D, acc);
  for (int r = 0; r < R; ++r) {
    T lanes[V * L];
    std::memcpy(lanes, acc[r], sizeof lanes);
    for (std::int64_t l = 0; l < std::min<std::int64_t>(V * L, N - nb); ++l)
      out[r * N + nb + l] = finish(m, lanes[l], nx[r], ny ? ny[nb + l] : T(1));
  }
}

// Two vectors of support rows per pass where they exist (more work per load of x), then one.
template <int R, class T>
__attribute__((always_inline)) inline void forward_rows_t_impl(Metric m, const T* x,
                                                               const T* yT, std::int64_t Np,
                                                               const T* ny, std::int64_t N,
                                                               std::int64_t D, T* out) {
  constexpr int L = kLanes<T>;
  T nx[R];
  for (int r = 0; r < R; ++r) nx[r] = m == Metric::Cosine ? clamped_norm(x + r * D, D) : T(1);
  std::int64_t nb = 0;
  for (; nb + 2 * L <= Np; nb += 2 * L) transposed_tile<R, 2>(m, x, yT, Np, nb, nx, ny, N, D, out);
  for (; nb < N; nb += L) transposed_tile<R, 1>(m, x, yT, Np, nb, nx, ny, N, D, out);
}

// For R query rows x (stride D) with coefficients W (R x N) and alpha (R):
// gx_r = alpha_r x_r + sum_n W_rn y_n (if gx) and gyp_n += sum_r W_rn x_r in row order (if gyp).
// Diff (the Euclidean metrics, where alpha_r = -sum_n W_rn and beta_n = -sum_r W_rn) takes the
// same sums over differences instead, gx_r = sum_n W_rn (y_n - x_r) and gyp_n += sum_r W_rn
// (x_r - y_n), so rows that nearly coincide do not cancel. NoSelf (dot: alpha = beta = 0)
// leaves the self terms out, so an Inf in x_r does not make 0 * Inf = NaN in gx_r.
// One pass over the features: each x, y and gyp vector is loaded once per row block.
enum BackwardForm { kSelf, kDiff, kNoSelf };

template <int R, int Form, class T>
__attribute__((always_inline)) inline void backward_rows_impl(const T* x, const T* Y, const T* W,
                                                              const T* alpha, std::int64_t N,
                                                              std::int64_t D, T* gx, T* gyp,
                                                              bool stream) {
  constexpr int L = kLanes<T>;
  constexpr bool Diff = Form == kDiff;
  std::int64_t d = 0;
  for (; d + L <= D; d += L) {
    Vec<T> xv[R], gv[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = loadu(x + r * D + d);
      gv[r] = Form == kSelf ? alpha[r] * xv[r] : Vec<T>{};
    }
    for (std::int64_t n = 0; n < N; ++n) {
      const T* wn = W + n;  // W[r * N + n]
      const Vec<T> yv = (gx || Diff) ? loadu(Y + n * D + d) : Vec<T>{};
      Vec<T> acc = gyp ? loadu(gyp + n * D + d) : Vec<T>{};
      for (int r = 0; r < R; ++r) {
        if (Diff) {
          const Vec<T> diff = yv - xv[r];
          gv[r] += wn[r * N] * diff;
          acc -= wn[r * N] * diff;
        } else {
          gv[r] += wn[r * N] * yv;
          acc += wn[r * N] * xv[r];
        }
      }
      if (gyp) storeu(gyp + n * D + d, acc);
    }
    if (gx)
      for (int r = 0; r < R; ++r) {
        if (stream)
          stream_store(gx + r * D + d, gv[r]);
        else
          storeu(gx + r * D + d, gv[r]);
      }
  }
  for (; d < D; ++d) {  // the same arithmetic, one feature at a time
    if (gx)
      for (int r = 0; r < R; ++r) {
        const T xr = x[r * D + d];
        T acc = Form == kSelf ? alpha[r] * xr : T(0);
        for (std::int64_t n = 0; n < N; ++n)
          acc += W[r * N + n] * (Diff ? Y[n * D + d] - xr : Y[n * D + d]);
        gx[r * D + d] = acc;
      }
    if (gyp)
      for (std::int64_t n = 0; n < N; ++n) {
        const T yn = Y[n * D + d];
        T acc = gyp[n * D + d];
        for (int r = 0; r < R; ++r) {
          const T xr = x[r * D + d];
          if (Diff)
            acc -= W[r * N + n] * (yn - xr);
          else
            acc += W[r * N + n] * xr;
        }
        gyp[n * D + d] = acc;
      }
  }
}

template <int R, class T>
__attribute__((always_inline)) inline void backward_rows_by_form(int form, const T* x,
                                                                 const T* Y, const T* W,
                                                                 const T* alpha, std::int64_t N,
                                                                 std::int64_t D, T* gx, T* gyp,
                                                                 bool stream) {
  if (form == kDiff)
    backward_rows_impl<R, kDiff>(x, Y, W, alpha, N, D, gx, gyp, stream);
  else if (form == kNoSelf)
    backward_rows_impl<R, kNoSelf>(x, Y, W, alpha, N, D, gx, gyp, stream);
  else
    backward_rows_impl<R, kSelf>(x, Y, W, alpha, N, D, gx, gyp, stream);
}

#define PYMETA_ROW_KERNELS(T)                                                                 \
  PYMETA_SIMD_CLONES void forward_rows(Metric m, const T* x, std::int64_t R, const T* Y,     \
                                       const T* ny, std::int64_t N, std::int64_t D, T* out) { \
    std::int64_t r = 0;                                                                       \
    for (; r + kRowBlock <= R; r += kRowBlock)                                                \
      forward_rows_impl<kRowBlock>(m, x + r * D, Y, ny, N, D, out + r * N);                   \
    for (; r < R; ++r) forward_rows_impl<1>(m, x + r * D, Y, ny, N, D, out + r * N);          \
  }                                                                                           \
  PYMETA_SIMD_CLONES void forward_rows_t(Metric m, const T* x, std::int64_t R, const T* yT,  \
                                         std::int64_t Np, const T* ny, std::int64_t N,       \
                                         std::int64_t D, T* out) {                           \
    std::int64_t r = 0;                                                                       \
    for (; r + kRowBlock <= R; r += kRowBlock)                                                \
      forward_rows_t_impl<kRowBlock>(m, x + r * D, yT, Np, ny, N, D, out + r * N);            \
    for (; r < R; ++r) forward_rows_t_impl<1>(m, x + r * D, yT, Np, ny, N, D, out + r * N);   \
  }                                                                                           \
  PYMETA_SIMD_CLONES void backward_rows(int form, const T* x, std::int64_t R, const T* Y,    \
                                        const T* W, const T* alpha, std::int64_t N,           \
                                        std::int64_t D, T* gx, T* gyp, bool stream) {         \
    std::int64_t r = 0;                                                                       \
    for (; r + kRowBlock <= R; r += kRowBlock)                                                \
      backward_rows_by_form<kRowBlock>(form, x + r * D, Y, W + r * N, alpha + r, N, D,        \
                                       gx ? gx + r * D : nullptr, gyp, stream);               \
    for (; r < R; ++r)                                                                        \
      backward_rows_by_form<1>(form, x + r * D, Y, W + r * N, alpha + r, N, D,                \
                               gx ? gx + r * D : nullptr, gyp, stream);                       \
  }                                                                                           \
  PYMETA_SIMD_CLONES void norm_rows(const T* a, std::int64_t R, std::int64_t D, T* out) {    \
    for (std::int64_t r = 0; r < R; ++r) row_sums<1, false>(a + r * D, a + r * D, D, out + r);  \
    for (std::int64_t r = 0; r < R; ++r) out[r] = std::sqrt(out[r]);                         \
  }
PYMETA_ROW_KERNELS(float)
PYMETA_ROW_KERNELS(double)
#undef PYMETA_ROW_KERNELS

// Raw (unclamped) L2 norms of R rows, in parallel.
template <class T>
std::vector<T> row_norms(const Device& dev, const T* a, std::int64_t R, std::int64_t D) {
  std::vector<T> out(R);
  const std::int64_t block = 64;
  parallel_region(threads_for(dev, R * D), [&] {
#pragma omp for schedule(static)
    for (std::int64_t r0 = 0; r0 < R; r0 += block)
      norm_rows(a + r0 * D, std::min(block, R - r0), D, out.data() + r0);
  });
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
  // Each distance's arithmetic is the same however rows are grouped, so the grouping may
  // follow the thread count: one thread takes whole tasks.
  const int nt = threads_for(dev, B * Q * N * D);
  const std::int64_t qb = nt == 1 ? std::max<std::int64_t>(Q, 1) : query_chunk(B, Q);
  const std::int64_t nqb = ceil_div(Q, qb);
  // Vectors over support rows once they fill a vector (see forward_rows_t).
  const bool transposed = N >= kLanes<T>;
  const std::int64_t Np = ceil_div(N, kLanes<T>) * kLanes<T>;
  ThreadScratch<T> transposes(nt, transposed ? D * Np : 0);
  parallel_region(nt, [&] {
    T* yT = transposes.get();
    std::int64_t yT_task = -1;
#pragma omp for schedule(static)
    for (std::int64_t u = 0; u < B * nqb; ++u) {
      const std::int64_t b = u / nqb, q0 = (u % nqb) * qb, rows = std::min(qb, Q - q0);
      const T* yb = y + b * N * D;
      const T* nyb = ny.empty() ? nullptr : ny.data() + b * N;
      if (!transposed) {
        forward_rows(m, x + (b * Q + q0) * D, rows, yb, nyb, N, D, out + (b * Q + q0) * N);
        continue;
      }
      if (yT_task != b) {  // transpose this task's support rows once per thread
        for (std::int64_t d = 0; d < D; ++d)
          for (std::int64_t n = 0; n < Np; ++n) yT[d * Np + n] = n < N ? yb[n * D + d] : T(0);
        yT_task = b;
      }
      forward_rows_t(m, x + (b * Q + q0) * D, rows, yT, Np, nyb, N, D,
                     out + (b * Q + q0) * N);
    }
  });

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
  const T* x;     // [B,Q,D] (cosine)
  const T* y;     // [B,N,D] (cosine)
  std::int64_t Q, N, D;

  static T clamp(T v) { return std::max(v, static_cast<T>(kCosineEps)); }
  // Whether a norm passes its gradient through the clamp (at the limit too, as torch's clamp).
  static bool live(T v) { return v >= static_cast<T>(kCosineEps); }

  // The cosine similarity of (q, n), which the radial terms need. 1 - out carries it to about
  // one ulp of 1; that is exact enough unless the other row's norm is clamped, where the
  // similarity (<= |other| / eps) can be far below an ulp: then it is recomputed.
  T similarity(std::int64_t b, std::int64_t q, std::int64_t n, T other_norm) const {
    if (live(other_norm)) return T(1) - out[(b * Q + q) * N + n];
    T s;
    row_sums<1, false>(x + (b * Q + q) * D, y + (b * N + n) * D, D, &s);
    return s / (clamp(nx[b * Q + q]) * clamp(ny[b * N + n]));
  }

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
          const T h = d != 0 ? gv / (2 * d) : T(0);  // a NaN distance stays NaN
          W[n] = -2 * h;
          alpha += 2 * h;
          break;
        }
        case Metric::Dot: W[n] = -gv; break;
        case Metric::Cosine: {
          const T nxq = clamp(nx[b * Q + q]);
          W[n] = -gv / (nxq * clamp(ny[b * N + n]));
          if (live(nx[b * Q + q]))  // else the row has no radial term
            alpha += gv * similarity(b, q, n, ny[b * N + n]) / (nxq * nxq);
          break;
        }
      }
    }
    return alpha;
  }

  T beta(std::int64_t b, std::int64_t n) const {
    if (m == Metric::Dot || (m == Metric::Cosine && !live(ny[b * N + n]))) return 0;
    T s = 0;
    for (std::int64_t q = 0; q < Q; ++q) {
      const std::int64_t i = (b * Q + q) * N + n;
      switch (m) {
        case Metric::SqEuclidean: s += 2 * g[i]; break;
        case Metric::Euclidean: s += out[i] != 0 ? g[i] / out[i] : T(0); break;
        case Metric::Cosine: {
          const T nyn = clamp(ny[b * N + n]);
          s += g[i] * similarity(b, q, n, nx[b * Q + q]) / (nyn * nyn);
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
  const Coefs<T> coefs{m, g, out, nx.data(), ny.data(), x, y, Q, N, D};
  const int form = m == Metric::SqEuclidean || m == Metric::Euclidean ? kDiff
                   : m == Metric::Dot                                   ? kNoSelf
                                                                        : kSelf;
  const std::int64_t qc = query_chunk(B, Q), nc = ceil_div(Q, qc);
  const bool direct = nc <= 1;  // accumulate straight into gy
  std::vector<T> partial(gy && !direct ? B * nc * N * D : 0);
  const int nt = threads_for(dev, B * Q * N * D);
  // gx is written once and not read here: past the cache size it bypasses the cache.
  const bool stream = gx && B * Q * D * std::int64_t(sizeof(T)) >= kStreamBytes &&
                      aligned16(gx) && (D * sizeof(T)) % 16 == 0;
  ThreadScratch<T> weights(nt, qc * N), alphas(nt, qc);
  parallel_region(nt, [&] {
    T* W = weights.get();
    T* alpha = alphas.get();
#pragma omp for schedule(static)
    for (std::int64_t u = 0; u < B * nc; ++u) {
      const std::int64_t b = u / nc, q0 = (u % nc) * qc, rows = std::min(qc, Q - q0);
      T* gyp = !gy ? nullptr : direct ? gy + b * N * D : partial.data() + u * N * D;
      if (gyp) std::fill(gyp, gyp + N * D, T(0));
      for (std::int64_t r = 0; r < rows; ++r) alpha[r] = coefs.row(b, q0 + r, W + r * N);
      backward_rows(form, x + (b * Q + q0) * D, rows, y + b * N * D, W, alpha, N, D,
                    gx ? gx + (b * Q + q0) * D : nullptr, gyp, stream);
    }
    if (stream) stream_fence();
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
        if (form != kSelf) continue;  // beta_n y_n is in the sums over differences, or 0
        const T beta = coefs.beta(b, n);
        const T* yn = y + r * D;
        for (std::int64_t d = 0; d < D; ++d) dst[d] += beta * yn[d];
      }
    }
  });

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
