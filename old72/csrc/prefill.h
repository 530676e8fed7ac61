// Batch prefill / append attention over a paged or a ragged KV cache. Each
// request has its own query and key counts; its queries are the LAST q_len
// positions of its keys (see jaxinfer/reference.py).
//
// Work: the host planner (csrc/prefill_plan.h) cuts each request's queries,
// packed with their GQA group as rows (row = token * group + head in group),
// into tiles of kPrefillTileRows rows; one work item per tile, heaviest
// first. Launches depend on static shapes only, as command buffers require:
// the portable kernels' grid is [item capacity, kv heads] (padding items exit
// at once); the Hopper kernel's persistent CTAs (at most one per SM) claim
// items x heads from a counter and skip padding.
#pragma once
#include <cstdint>

#include "csrc/attention_variant.cuh"
#include "csrc/dtype.h"
#include "csrc/kv_cache.h"

namespace jaxinfer {

constexpr int kPrefillTileRows = 128;  // packed query rows per CTA (8 warps x 16)

// Columns of one work item (jaxinfer/prefill.py ITEM_*): query rows
// [row_begin, row_begin + kPrefillTileRows) of the request whose queries are
// q[q_begin, q_begin + q_len) and whose kv_len keys are entries
// [kv_begin, kv_end) of kv_indices (paged) or rows [kv_begin, kv_end) of k, v
// (ragged); its custom mask, if any, starts at mask_begin. With KV splits,
// the item sees only key positions [split_begin, split_end) and writes the
// partial state of split `split`.
enum PrefillItemField {
  kPfRequest, kPfQBegin, kPfQLen, kPfRowBegin, kPfKvLen, kPfKvBegin, kPfKvEnd, kPfMaskBegin,
  kPfSplit, kPfSplitBegin, kPfSplitEnd, kPfItemFields
};

struct PrefillParams {
  DType dtype;
  int num_qo_heads, num_kv_heads, head_dim;
  int num_items;    // static item capacity
  int64_t total_q;  // rows of q and o

  const void* q;  // [total_q, num_qo_heads, head_dim]
  KvCache kv;     // paged or ragged (the item's kv range then names rows of k, v)
  const int32_t* items;       // [num_items, kPfItemFields]; request < 0 = padding
  const uint8_t* custom_mask;  // flattened per request [q_len, kv_len] row major, or nullptr
  int64_t mask_len;

  void* o;     // [total_q, num_qo_heads, head_dim]
  float* lse;  // [total_q, num_qo_heads], base 2
  // KV splits > 1: every item writes the fp32 state of its split here, and a
  // merge over the splits writes o and lse. 1: items write o and lse directly.
  int num_splits;
  float* partial_o;    // [total_q, num_splits, num_qo_heads, head_dim]
  float* partial_lse;  // [total_q, num_splits, num_qo_heads]

  // Optional (nullptr: none): the state of the same rows over other keys, o in
  // q's dtype [total_q, num_qo_heads, head_dim] and lse [total_q, num_qo_heads]
  // (base 2), merged into the result (a cascade's levels chain this way).
  const void* merge_o;
  const float* merge_lse;

  // The order in which the Hopper kernel's persistent CTAs claim works (items
  // x KV heads): false, a head's items together (they share its keys in L2);
  // true, every head of an item together, so the plan's order (heaviest
  // first) holds across heads (a fused cascade: jaxinfer/cascade.py).
  bool heads_inner;

  // Claims of the Hopper kernel's persistent CTAs (8 bytes, device memory):
  // the launch zeroes it when works outnumber CTAs.
  unsigned long long* work_counter;

  AttentionVariant variant;
};

}  // namespace jaxinfer

#ifdef JAXINFER_WITH_CUDA
#include <cuda_runtime_api.h>
namespace jaxinfer {
cudaError_t prefill_cuda(const PrefillParams& p, cudaStream_t stream);
template <int kHeadDim>
cudaError_t launch_prefill(const PrefillParams& p, cudaStream_t stream);
}  // namespace jaxinfer
#endif
