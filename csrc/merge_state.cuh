// The merge kernel, generic over where the states live (a States accessor),
// so merge_state, merge_states, split-KV decode and cascade share one body.
// One group of threads per (token, head) row; each thread owns kVec
// consecutive elements of the head dim, read with one 16-byte load per state.
#pragma once
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "csrc/vec.cuh"

namespace jaxinfer {

// A States accessor provides, for an output row (token * heads + head):
//   using Elem = ...;                       // element type of the state values
//   int count(int64_t row) const;           // number of states
//   float lse(int64_t row, int i) const;    // base-2 log-sum-exp of state i
//   const Elem* v(int64_t row, int i) const;  // state i's values [dim]
//   bool done(int64_t row) const;           // row already written elsewhere: skip it
template <typename Out, int kVec, typename States>
__global__ void merge_kernel(States states, Out* v_out, float* s_out, int64_t rows, int64_t dim) {
  using Elem = typename States::Elem;
  const int threads_per_row = static_cast<int>(dim / kVec);
  const int64_t row = blockIdx.x * int64_t(blockDim.x / threads_per_row) + threadIdx.x / threads_per_row;
  const int64_t col = int64_t(threadIdx.x % threads_per_row) * kVec;
  if (row >= rows || states.done(row)) return;
  const int n = states.count(row);

  // Unrolled so that several states' loads are in flight at once: a split-KV
  // decode merges tens of states per row, and a serial chain of dependent
  // loads would cost a memory latency per state.
  float m = -INFINITY;
#pragma unroll 8
  for (int i = 0; i < n; ++i) m = fmaxf(m, states.lse(row, i));

  float acc[kVec] = {};
  float sum = 0.f;
  if (m != -INFINITY) {
#pragma unroll 8
    for (int i = 0; i < n; ++i) {
      const float w = exp2f(states.lse(row, i) - m);
      float x[kVec];
      load_float<Elem, kVec>(states.v(row, i) + col, x);
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
  store_float<Out, kVec>(v_out + row * dim + col, acc);
  if (col == 0) s_out[row] = sum > 0.f ? m + log2f(sum) : -INFINITY;
}

// Launches merge_kernel over `rows` rows of `dim` elements. dim must be at
// most 1024, or a multiple of the 16-byte vector width of States::Elem.
template <typename Out, typename States>
void launch_merge(const States& states, Out* v_out, float* s_out, int64_t rows, int64_t dim,
                  cudaStream_t stream) {
  if (rows == 0 || dim == 0) return;
  auto go = [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    const int threads_per_row = static_cast<int>(dim / kVec);
    const int rows_per_block = threads_per_row >= 256 ? 1 : 256 / threads_per_row;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    merge_kernel<Out, kVec><<<blocks, rows_per_block * threads_per_row, 0, stream>>>(
        states, v_out, s_out, rows, dim);
  };
  constexpr int kWide = 16 / sizeof(typename States::Elem);
  if (dim % kWide == 0 && dim / kWide <= 1024) {
    go(std::integral_constant<int, kWide>{});
  } else {
    go(std::integral_constant<int, 1>{});
  }
}

}  // namespace jaxinfer
