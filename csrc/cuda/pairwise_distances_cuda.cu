// Pairwise distances between the rows of x [B,Q,D] and y [B,N,D] (see ops.h), and their gradients.
#include <type_traits>

#include "cuda_utils.cuh"

namespace pymeta::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpThreads = 256;  // threads of the one-warp-per-row kernels

template <Metric M>
using MetricTag = std::integral_constant<Metric, M>;

// Calls f(MetricTag<M>{}) so each metric gets its own kernel instantiation.
template <class F>
void dispatch_metric(Metric metric, F&& f) {
  switch (metric) {
    case Metric::SqEuclidean: return f(MetricTag<Metric::SqEuclidean>{});
    case Metric::Euclidean: return f(MetricTag<Metric::Euclidean>{});
    case Metric::Cosine: return f(MetricTag<Metric::Cosine>{});
    case Metric::Dot: return f(MetricTag<Metric::Dot>{});
  }
  throw std::invalid_argument("pymeta CUDA kernel pairwise_distances: unsupported metric code " +
                              std::to_string(static_cast<int>(metric)));
}

// max(v, eps) as std::max on the CPU: a NaN norm stays NaN (PTX max returns the non-NaN operand).
template <class A>
__device__ __forceinline__ A clamp_eps(A v) {
  return v < A(kCosineEps) ? A(kCosineEps) : v;
}

// Distance from the reduced sums: s = sum (x-y)^2 for the Euclidean metrics, x.y otherwise;
// xx, yy = |x|^2, |y|^2 (cosine only).
template <Metric M, class A>
__device__ __forceinline__ A finish(A s, A xx, A yy) {
  if constexpr (M == Metric::SqEuclidean) {
    return s;
  } else if constexpr (M == Metric::Euclidean) {
    return sqrt(s);
  } else if constexpr (M == Metric::Dot) {
    return -s;
  } else {
    return A(1) - s / (clamp_eps(sqrt(xx)) * clamp_eps(sqrt(yy)));
  }
}

// One warp per output element (b,q,n): lanes stride over D, then a warp reduction.
template <class T, Metric M>
__global__ void forward_kernel(i64 B, i64 Q, i64 N, i64 D, const T* __restrict__ x,
                               const T* __restrict__ y, T* __restrict__ out) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const i64 total = B * Q * N, warps = i64(gridDim.x) * blockDim.x / kWarp;
  // i is the same for all lanes of a warp, so the whole warp reaches every warp_sum.
  for (i64 i = (i64(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; i < total; i += warps) {
    const i64 bq = i / N, b = bq / Q;
    const T* xr = x + bq * D;
    const T* yr = y + (b * N + i % N) * D;
    A s = 0, xx = 0, yy = 0;
    for (i64 d = lane; d < D; d += kWarp) {
      const A a = to_acc(xr[d]), c = to_acc(yr[d]);
      if constexpr (M == Metric::SqEuclidean || M == Metric::Euclidean) {
        s += (a - c) * (a - c);  // differences, not norms: no cancellation for close rows
      } else {
        s += a * c;
        if constexpr (M == Metric::Cosine) {
          xx += a * a;
          yy += c * c;
        }
      }
    }
    s = warp_sum(s);
    if constexpr (M == Metric::Cosine) {
      xx = warp_sum(xx);
      yy = warp_sum(yy);
    }
    if (lane == 0) out[i] = from_acc<T>(finish<M>(s, xx, yy));
  }
}

// |v_r| for each row of v [rows, D], one warp per row (cosine backward only).
template <class T>
__global__ void row_norms_kernel(i64 rows, i64 D, const T* __restrict__ v,
                                 acc_t<T>* __restrict__ norms) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const i64 warps = i64(gridDim.x) * blockDim.x / kWarp;
  for (i64 r = (i64(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; r < rows; r += warps) {
    A s = 0;
    for (i64 d = lane; d < D; d += kWarp) {
      const A a = to_acc(v[r * D + d]);
      s += a * a;
    }
    s = warp_sum(s);
    if (lane == 0) norms[r] = sqrt(s);
  }
}

// Cosine backward only: the similarity of each pair (b,q,n) into sim [B,Q,N], for the rows'
// radial terms. In float32/float64, 1 - dist carries it to about one ulp of 1, unless a norm is
// clamped: the similarity (<= |row| / eps) can then be far below an ulp. Half types round dist
// to theirs (30x the float32 error for nearly opposite rows). Those pairs are recomputed from
// the rows, one warp per pair as in the forward.
template <class T>
__global__ void cosine_similarity_kernel(i64 B, i64 Q, i64 N, i64 D, const T* __restrict__ x,
                                         const T* __restrict__ y, const T* __restrict__ out,
                                         const acc_t<T>* __restrict__ x_norm,
                                         const acc_t<T>* __restrict__ y_norm,
                                         acc_t<T>* __restrict__ sim) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const i64 total = B * Q * N, warps = i64(gridDim.x) * blockDim.x / kWarp;
  for (i64 i = (i64(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; i < total; i += warps) {
    const i64 bq = i / N, yi = bq / Q * N + i % N;
    const A nx = x_norm[bq], ny = y_norm[yi];
    if (std::is_same_v<T, A> && nx >= A(kCosineEps) && ny >= A(kCosineEps)) {
      if (lane == 0) sim[i] = A(1) - to_acc(out[i]);
      continue;  // the same branch for the whole warp: nx, ny depend on i only
    }
    A s = 0;
    for (i64 d = lane; d < D; d += kWarp) s += to_acc(x[bq * D + d]) * to_acc(y[yi * D + d]);
    s = warp_sum(s);
    if (lane == 0) sim[i] = s / (clamp_eps(nx) * clamp_eps(ny));
  }
}

// For one (self, other) row pair with upstream gradient g and forward distance dist (cosine:
// the similarity instead), the weight w of the other row and the coefficient a of the self
// row in grad_self = sum a*self + w*other. Symmetric in the two sides, so the same formula
// serves grad_x and grad_y (see ops.h/brief). ns, no are the unclamped norms |self|, |other|
// (cosine only); a norm at the clamp's limit passes its gradient, as torch's clamp does.
template <Metric M, class A>
__device__ __forceinline__ void pair_coef(A g, A dist, A ns, A no, A& w, A& a) {
  if constexpr (M == Metric::Dot) {
    w = -g;
    a = 0;
  } else if constexpr (M == Metric::Cosine) {
    const A cs = clamp_eps(ns), co = clamp_eps(no);
    w = -g / (cs * co);
    a = ns >= A(kCosineEps) ? g * dist / (cs * cs) : A(0);  // dist: the similarity
  } else {
    if constexpr (M == Metric::Euclidean) g = dist != A(0) ? g / (A(2) * dist) : A(0);
    w = A(-2) * g;
    a = A(2) * g;
  }
}

// Gradient w.r.t. the R rows per task of "self" [B,R,D] against the K rows of "other" [B,K,D]:
// grad_r = (sum_k a_rk) * self_r + sum_k w_rk * other_k. One block per self row, threads over D;
// each thread recomputes the scalar coefficients (broadcast reads), so there is no block sync.
// grad_out/out element (b, r, k) is at b*R*K + r*g_r + k*g_k.
template <class T, Metric M>
__global__ void backward_kernel(i64 B, i64 R, i64 K, i64 D, i64 g_r, i64 g_k,
                                const T* __restrict__ grad_out, const T* __restrict__ out,
                                const T* __restrict__ self, const T* __restrict__ other,
                                const acc_t<T>* __restrict__ self_norm,
                                const acc_t<T>* __restrict__ other_norm,
                                const acc_t<T>* __restrict__ sim, T* __restrict__ grad) {
  using A = acc_t<T>;
  constexpr bool kNeedsNorms = M == Metric::Cosine;
  // The Euclidean metrics have a = -w: sum w * (other - self) keeps close rows from cancelling.
  constexpr bool kDiff = M == Metric::SqEuclidean || M == Metric::Euclidean;
  for (i64 row = blockIdx.x; row < B * R; row += gridDim.x) {
    const i64 b = row / R, g_base = b * R * K + (row % R) * g_r;
    const T* other_b = other + b * K * D;
    const A ns = kNeedsNorms ? self_norm[row] : A(0);
    for (i64 d = threadIdx.x; d < D; d += blockDim.x) {
      const A s = to_acc(self[row * D + d]);
      A alpha = 0, sum = 0;
      for (i64 k = 0; k < K; ++k) {
        const i64 gi = g_base + k * g_k;
        const A no = kNeedsNorms ? other_norm[b * K + k] : A(0);
        A dist = A(0);  // cosine: the similarity, needed only for an unclamped self norm
        if constexpr (M == Metric::Euclidean) dist = to_acc(out[gi]);
        if constexpr (M == Metric::Cosine) dist = ns >= A(kCosineEps) ? sim[gi] : A(0);
        A w, a;
        pair_coef<M>(to_acc(grad_out[gi]), dist, ns, no, w, a);
        const A o = to_acc(other_b[k * D + d]);
        if constexpr (kDiff) {
          sum += w * (o - s);
        } else {
          alpha += a;
          sum += w * o;
        }
      }
      // dot has no self term (a = 0): leaving it out keeps 0 * Inf from becoming NaN
      grad[row * D + d] = from_acc<T>(M == Metric::Cosine ? alpha * s + sum : sum);
    }
  }
}

}  // namespace

void pairwise_distances_forward(const Device& dev, DType dtype, Metric metric, i64 B, i64 Q, i64 N,
                                i64 D, const void* x, const void* y, void* out) {
  constexpr const char* kName = "pairwise_distances_forward";
  if (B <= 0 || Q <= 0 || N <= 0) return;  // empty output (D == 0 still writes distances)
  DeviceGuard guard(dev, kName);
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_metric(metric, [&](auto m) {
      forward_kernel<T, decltype(m)::value>
          <<<grid_for(ceil_div(B * Q * N, kWarpThreads / kWarp)), kWarpThreads, 0,
             guard.stream()>>>(B, Q, N, D, static_cast<const T*>(x), static_cast<const T*>(y),
                               static_cast<T*>(out));
      check_launch(kName);
    });
  });
}

void pairwise_distances_backward(const Device& dev, DType dtype, Metric metric, i64 B, i64 Q,
                                 i64 N, i64 D, const void* grad_out, const void* x, const void* y,
                                 const void* out, void* grad_x, void* grad_y) {
  constexpr const char* kName = "pairwise_distances_backward";
  // Only empty outputs are skipped: with N == 0 (or Q == 0) the other gradient is all zeros.
  const bool want_x = grad_x && B > 0 && Q > 0 && D > 0;
  const bool want_y = grad_y && B > 0 && N > 0 && D > 0;
  if (!want_x && !want_y) return;
  DeviceGuard guard(dev, kName);
  const cudaStream_t stream = guard.stream();
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (Q == 0 || N == 0) {  // no distances: zero gradients as on the CPU (not 0 * x: NaN at Inf)
      if (want_x)
        PYMETA_CUDA_CHECK(kName, cudaMemsetAsync(grad_x, 0, std::size_t(B * Q * D) * sizeof(T), stream));
      if (want_y)
        PYMETA_CUDA_CHECK(kName, cudaMemsetAsync(grad_y, 0, std::size_t(B * N * D) * sizeof(T), stream));
      return;
    }
    const T* g = static_cast<const T*>(grad_out);
    const T* o = static_cast<const T*>(out);
    const T* xs = static_cast<const T*>(x);
    const T* ys = static_cast<const T*>(y);
    // Cosine needs every row norm and pair similarity, computed once into scratch: [B*Q]
    // norms of x, then [B*N] of y, then [B*Q*N] similarities.
    const bool cosine = metric == Metric::Cosine;
    Scratch scratch(cosine ? std::size_t(B * (Q + N + Q * N)) * sizeof(A) : 0, stream, kName);
    A* x_norm = scratch.as<A>();
    A* y_norm = cosine ? x_norm + B * Q : nullptr;
    A* sim = cosine ? y_norm + B * N : nullptr;
    if (cosine) {
      const i64 rows_per_block = kWarpThreads / kWarp;
      row_norms_kernel<T><<<grid_for(ceil_div(B * Q, rows_per_block)), kWarpThreads, 0, stream>>>(
          B * Q, D, xs, x_norm);
      check_launch(kName);
      row_norms_kernel<T><<<grid_for(ceil_div(B * N, rows_per_block)), kWarpThreads, 0, stream>>>(
          B * N, D, ys, y_norm);
      check_launch(kName);
      cosine_similarity_kernel<T><<<grid_for(ceil_div(B * Q * N, rows_per_block)), kWarpThreads,
                                    0, stream>>>(B, Q, N, D, xs, ys, o, x_norm, y_norm, sim);
      check_launch(kName);
    }
    dispatch_metric(metric, [&](auto m) {
      constexpr Metric M = decltype(m)::value;
      if (want_x) {  // self = x (rows q), other = y (rows n): element (q, n) at q*N + n
        backward_kernel<T, M><<<grid_for(B * Q), threads_for(D), 0, stream>>>(
            B, Q, N, D, N, 1, g, o, xs, ys, x_norm, y_norm, sim, static_cast<T*>(grad_x));
        check_launch(kName);
      }
      if (want_y) {  // self = y (rows n), other = x (rows q): element (n, q) at q*N + n
        backward_kernel<T, M><<<grid_for(B * N), threads_for(D), 0, stream>>>(
            B, N, Q, D, 1, N, g, o, ys, xs, y_norm, x_norm, sim, static_cast<T*>(grad_y));
        check_launch(kName);
      }
    });
  });
}

}  // namespace pymeta::cuda
