// merge_state and merge_states: the merge kernel over two separate states or
// over states stacked on axis 1.
#include "csrc/merge_state.cuh"
#include "csrc/merge_state.h"

namespace jaxinfer {
namespace {

// merge_state: two separate states with the same [tokens, heads, dim] layout.
template <typename T>
struct PairStates {
  using Elem = T;
  const T* v_a; const float* s_a; const T* v_b; const float* s_b;
  int64_t dim;
  using Row = RowIndex;
  __device__ Row row(int64_t r) const { return {r}; }
  __device__ int count(const Row&) const { return 2; }
  __device__ bool done(const Row&) const { return false; }
  __device__ float lse(const Row& r, int i) const { return i == 0 ? s_a[r.row] : s_b[r.row]; }
  __device__ const T* v(const Row& r, int i) const { return (i == 0 ? v_a : v_b) + r.row * dim; }
};

// merge_states: v [tokens, n, heads, dim], lse [tokens, n, heads].
template <typename T>
struct StackedStates {
  using Elem = T;
  const T* v_base; const float* s_base;
  int64_t n, heads, dim;
  // Where the row's state 0 is (token * n * heads + head); state i is i * heads
  // on. Resolved once per row: a 64-bit division per state, with the address
  // arithmetic, pushed the kernel's loads into a chain (benchmarks/NOTES.md M2).
  struct Row {
    int64_t first = 0;
  };
  __device__ Row row(int64_t r) const { return {(r / heads) * n * heads + r % heads}; }
  __device__ int count(const Row&) const { return static_cast<int>(n); }
  __device__ bool done(const Row&) const { return false; }
  __device__ float lse(const Row& r, int i) const { return s_base[r.first + i * heads]; }
  __device__ const T* v(const Row& r, int i) const { return v_base + (r.first + i * heads) * dim; }
};

}  // namespace

cudaError_t merge_cuda(const MergeParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* out = static_cast<T*>(p.v_out);
    const int64_t rows = p.tokens * p.heads;
    if (p.v_b != nullptr) {
      PairStates<T> states{static_cast<const T*>(p.v_a), p.s_a, static_cast<const T*>(p.v_b), p.s_b, p.dim};
      launch_merge(states, out, p.s_out, rows, p.dim, 2, stream);
    } else {
      StackedStates<T> states{static_cast<const T*>(p.v_a), p.s_a, p.num_states, p.heads, p.dim};
      launch_merge(states, out, p.s_out, rows, p.dim, p.num_states, stream);
    }
  });
  return cudaGetLastError();
}

}  // namespace jaxinfer
