// Paged-KV batch decode: one query token per request, split-KV work items
// from the host planner (jaxinfer/decode.py), then a merge of the partials.
//
// The plan is data, not launch shape: the grid is [kv heads x head tiles,
// num_items] for the static item capacity, padded items exit at once, and every kernel
// reads the page table and the plan from device memory. Launches are thus
// identical from step to step, as command buffers require.
#pragma once
#include <cstdint>

#include "csrc/attention_variant.cuh"
#include "csrc/dtype.h"

namespace jaxinfer {

struct DecodeParams {
  DType dtype;  // of q, the caches and o
  int batch;    // static capacity (rows of q)
  int num_qo_heads, num_kv_heads, head_dim, page_size;
  int num_items;  // static capacity of the work-item arrays
  int64_t num_pages;       // pages in the cache (page indices outside [0, num_pages) are skipped)
  int64_t num_kv_indices;  // length of kv_indices

  const void* q;  // [batch, num_qo_heads, head_dim]
  // Key (value) element (page, slot, head, d) sits at
  // k (v) + page * stride_page + slot * stride_slot + head * stride_head + d.
  const void* k;
  const void* v;
  int64_t stride_page, stride_slot, stride_head;

  const int32_t* kv_indptr;         // [batch + 1]
  const int32_t* kv_indices;        // [num_kv_indices]
  const int32_t* kv_last_page_len;  // [batch]
  const int32_t* item_request;      // [num_items], -1 = padding
  const int32_t* item_kv_start;     // [num_items]
  const int32_t* item_kv_end;       // [num_items]
  const int32_t* merge_indptr;      // [batch + 1]: items of request b are merge_indptr[b]..[b+1]

  void* o;             // [batch, num_qo_heads, head_dim]
  float* lse;          // [batch, num_qo_heads], base 2
  float* partial_o;    // [num_items, num_qo_heads, head_dim] workspace (split requests only)
  float* partial_lse;  // [num_items, num_qo_heads] workspace

  AttentionVariant variant;
};

}  // namespace jaxinfer

#ifdef JAXINFER_WITH_CUDA
#include <cuda_runtime_api.h>
namespace jaxinfer {
// Sizes the launch from static fields only; returns the launch status.
cudaError_t decode_cuda(const DecodeParams& p, cudaStream_t stream);
// Instantiated per head dim in csrc/decode_inst/ (one translation unit each).
template <int kHeadDim>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream);
}  // namespace jaxinfer
#endif
