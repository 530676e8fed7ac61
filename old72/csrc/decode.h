// Paged-KV batch decode: one query token per request. The host planner
// (jaxinfer/decode.py) cuts the batch's keys into one wave of equal runs;
// each CTA slot walks its run's work items (key ranges of requests), then a
// merge kernel combines the partials of requests cut across CTAs.
//
// The plan is data, not launch shape: the grid is [kv heads x head tiles,
// CTA slots] for the static slot count, and every kernel reads the page
// table and the plan from device memory. Launches are thus identical from
// step to step, as command buffers require.
#pragma once
#include <cstdint>

#include "csrc/attention_variant.cuh"
#include "csrc/dtype.h"
#include "csrc/kv_cache.h"

namespace jaxinfer {

// Columns of one work item in the plan (jaxinfer/decode.py ITEM_*): the keys
// [kv_start, kv_end) of `request`, whose length is kv_len and whose pages are
// kv_indices[page_begin, page_end).
enum ItemField { kItemRequest, kItemKvStart, kItemKvEnd, kItemKvLen, kItemPageBegin, kItemPageEnd,
                 kItemFields };

struct DecodeParams {
  DType dtype;  // of q, the caches and o
  int batch;    // static capacity (rows of q)
  int num_qo_heads, num_kv_heads, head_dim;
  int num_items;  // static capacity of the work items
  int num_ctas;   // CTA slots (per KV head and head tile)

  const void* q;  // [batch, num_qo_heads, head_dim]
  KvCache kv;     // paged

  const int32_t* items;         // [num_items, kItemFields]; request -1 = padding
  const int32_t* cta_items;     // [num_ctas + 1]: slot c runs items cta_items[c]..[c+1]
  const int32_t* merge_indptr;  // [batch + 1]: items of request b are merge_indptr[b]..[b+1]

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
