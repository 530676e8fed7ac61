// Merging partial attention states.
//
// A state is (v, lse) for one query row over some subset of keys: v is the
// softmax-weighted mean of the values, lse the log-sum-exp (BASE 2) of the
// scaled logits. Two states over disjoint key sets merge exactly:
//   lse = log2(2^lse_a + 2^lse_b),  v = (2^lse_a v_a + 2^lse_b v_b) / 2^lse.
// A state over no keys has lse = -inf and contributes nothing; merging only
// such states gives v = 0 and lse = -inf (never NaN).
#pragma once
#include <cstdint>

#include "csrc/dtype.h"

namespace jaxinfer {

struct MergeParams {
  DType dtype;        // of v_a, v_b, v_out; every lse is fp32
  int64_t tokens;     // leading (flattened) dimension
  int64_t heads;
  int64_t dim;
  int64_t num_states;
  // merge_state:  v_a, v_b [tokens, heads, dim]; s_a, s_b [tokens, heads]; num_states = 2.
  // merge_states: v_a [tokens, num_states, heads, dim]; s_a [tokens, num_states, heads];
  //               v_b and s_b are nullptr.
  const void* v_a;
  const float* s_a;
  const void* v_b;  // may be nullptr
  const float* s_b;  // may be nullptr
  void* v_out;       // [tokens, heads, dim]; may alias v_a (in-place merge_state)
  float* s_out;      // [tokens, heads]; may alias s_a
};

// CPU reference-quality loops; fp32 only (the Python layer upcasts).
void merge_cpu(const MergeParams& p);

}  // namespace jaxinfer

#ifdef JAXINFER_WITH_CUDA
#include <cuda_runtime_api.h>
namespace jaxinfer {
// Launches on `stream`; returns the launch status (no synchronisation).
cudaError_t merge_cuda(const MergeParams& p, cudaStream_t stream);
}  // namespace jaxinfer
#endif
