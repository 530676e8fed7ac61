// Merge of attention states on the GPU. One group of threads per (token,
// head) row; each thread owns kVec consecutive elements of the head dim and
// reads them with one 16-byte load per state. Memory-bound: every byte of
// every state is read once and the result written once.
#include <cmath>

#include "csrc/merge_state.h"
#include "csrc/vec.cuh"

namespace jaxinfer {
namespace {

// merge_state: two separate states with the same [tokens, heads, dim] layout.
template <typename T>
struct PairStates {
  const T* v_a; const float* s_a; const T* v_b; const float* s_b;
  int64_t dim;
  __device__ int count() const { return 2; }
  __device__ float lse(int64_t row, int i) const { return i == 0 ? s_a[row] : s_b[row]; }
  __device__ const T* v(int64_t row, int i) const { return (i == 0 ? v_a : v_b) + row * dim; }
};

// merge_states: states stacked on axis 1, v [tokens, n, heads, dim], lse [tokens, n, heads].
template <typename T>
struct StackedStates {
  const T* v_base; const float* s_base;
  int64_t n, heads, dim;
  __device__ int count() const { return static_cast<int>(n); }
  __device__ int64_t index(int64_t row, int i) const {
    return ((row / heads) * n + i) * heads + row % heads;
  }
  __device__ float lse(int64_t row, int i) const { return s_base[index(row, i)]; }
  __device__ const T* v(int64_t row, int i) const { return v_base + index(row, i) * dim; }
};

template <typename T, int kVec, typename States>
__global__ void merge_kernel(States states, T* v_out, float* s_out,
                             int64_t rows, int64_t dim) {
  const int threads_per_row = static_cast<int>(dim / kVec);
  const int64_t row = blockIdx.x * int64_t(blockDim.x / threads_per_row) + threadIdx.x / threads_per_row;
  const int64_t col = int64_t(threadIdx.x % threads_per_row) * kVec;
  if (row >= rows) return;

  float m = -INFINITY;
  for (int i = 0; i < states.count(); ++i) m = fmaxf(m, states.lse(row, i));

  float acc[kVec] = {};
  float sum = 0.f;
  if (m != -INFINITY) {
    for (int i = 0; i < states.count(); ++i) {
      const float w = exp2f(states.lse(row, i) - m);
      float x[kVec];
      load_float<T, kVec>(states.v(row, i) + col, x);
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] += w * x[k];
      sum += w;
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int k = 0; k < kVec; ++k) acc[k] *= inv;
  // In-place merges alias v_out with state 0: every read above precedes this
  // write within the thread, and no thread reads another thread's elements.
  store_float<T, kVec>(v_out + row * dim + col, acc);
  if (col == 0) s_out[row] = sum > 0.f ? m + log2f(sum) : -INFINITY;
}

template <typename T, typename States>
void launch(const States& states, const MergeParams& p, cudaStream_t stream) {
  const int64_t rows = p.tokens * p.heads;
  if (rows == 0 || p.dim == 0) return;
  auto go = [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    const int threads_per_row = static_cast<int>(p.dim / kVec);
    const int rows_per_block = threads_per_row >= 256 ? 1 : 256 / threads_per_row;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    merge_kernel<T, kVec><<<blocks, rows_per_block * threads_per_row, 0, stream>>>(
        states, static_cast<T*>(p.v_out), p.s_out, rows, p.dim);
  };
  // 16-byte accesses when the head dim allows, else one element per thread.
  constexpr int kWide = 16 / sizeof(T);
  if (p.dim % kWide == 0 && p.dim / kWide <= 1024) {
    go(std::integral_constant<int, kWide>{});
  } else {
    go(std::integral_constant<int, 1>{});
  }
}

}  // namespace

cudaError_t merge_cuda(const MergeParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.v_b != nullptr) {
      launch<T>(PairStates<T>{static_cast<const T*>(p.v_a), p.s_a, static_cast<const T*>(p.v_b),
                              p.s_b, p.dim}, p, stream);
    } else {
      launch<T>(StackedStates<T>{static_cast<const T*>(p.v_a), p.s_a, p.num_states, p.heads, p.dim},
                p, stream);
    }
  });
  return cudaGetLastError();
}

}  // namespace jaxinfer
