// What the two prefill kernels share: the barrier-synchronised one
// (csrc/prefill.cuh) and the warp-specialised one (csrc/prefill_ws.cuh).
// Reading a work item, the thread's two query rows, the variant and softmax
// step of a score tile, the Hopper MMAs and the epilogue.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "csrc/attention_tile.cuh"
#include "csrc/prefill.h"
#include "csrc/vec.cuh"
#include "csrc/wgmma.cuh"

namespace jaxinfer {

// A work item of the plan (csrc/prefill_plan.h), clamped so that a corrupt
// plan reads and writes only inside the buffers, and the key positions
// [kv_lo, kv_hi) its rows can see. rows == 0: nothing to do (a padding
// item, or a tile past the request's rows).
struct PrefillItem {
  int64_t q_begin, kv_begin, kv_end, mask_begin;
  int q_len, row_begin, kv_len, group, rows, kv_lo, kv_hi, split;

  // Query position of packed row r (token * group + head in group) of the tile.
  __device__ __forceinline__ int q_pos_of(int r) const { return kv_len - q_len + (row_begin + r) / group; }
  __device__ __forceinline__ int num_tiles(int keys) const {
    return kv_lo < kv_hi ? (kv_hi - kv_lo + keys - 1) / keys : 0;
  }
};

// f: the item's kPfItemFields fields (in the plan, or a copy in shared memory).
__device__ __forceinline__ PrefillItem read_prefill_item(const PrefillParams& p, const int32_t* f, int tile_rows) {
  PrefillItem it;
  it.group = p.num_qo_heads / p.num_kv_heads;
  it.q_begin = min(max(int64_t(f[kPfQBegin]), int64_t(0)), p.total_q);
  it.q_len = static_cast<int>(min(max(int64_t(f[kPfQLen]), int64_t(0)), p.total_q - it.q_begin));
  it.row_begin = max(f[kPfRowBegin], 0);
  it.kv_len = max(f[kPfKvLen], 0);
  it.kv_begin = max(int64_t(f[kPfKvBegin]), int64_t(0));
  it.kv_end = min(int64_t(f[kPfKvEnd]), p.kv.num_entries());
  it.mask_begin = f[kPfMaskBegin];
  const int rows_total = static_cast<int>(min(int64_t(it.q_len) * it.group, int64_t(INT32_MAX)));
  it.rows = f[kPfRequest] < 0 ? 0 : max(min(tile_rows, rows_total - it.row_begin), 0);
  it.kv_lo = max(max(p.variant.first_visible(it.q_pos_of(0)), f[kPfSplitBegin]), 0);
  it.kv_hi = min(p.variant.end_visible(it.q_pos_of(it.rows - 1), it.kv_len), f[kPfSplitEnd]);
  it.split = min(max(f[kPfSplit], 0), p.num_splits - 1);
  return it;
}
__device__ __forceinline__ PrefillItem read_prefill_item(const PrefillParams& p, int item, int tile_rows) {
  return read_prefill_item(p, p.items + int64_t(item) * kPfItemFields, tile_rows);
}

// The two rows a thread holds in m16n8 (and wgmma) C fragments: rows gid and
// gid + 8 of its warp's 16. The warp's rows span positions [warp_pos_lo, warp_pos_hi].
struct ThreadRows {
  int pos[2], head[2], token[2];
  bool valid[2];
  int warp_pos_lo, warp_pos_hi;
};

__device__ __forceinline__ ThreadRows thread_rows(const PrefillItem& it, int kv_head) {
  const int tid = threadIdx.x, warp = tid / 32, gid = tid % 32 / 4;
  ThreadRows t;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + gid + 8 * i;
    t.valid[i] = r < it.rows;
    t.pos[i] = it.q_pos_of(r);
    t.token[i] = (it.row_begin + r) / it.group;
    t.head[i] = kv_head * it.group + (it.row_begin + r) % it.group;
  }
  const int warp_rows = max(min(16, it.rows - warp * 16), 1);
  t.warp_pos_lo = it.q_pos_of(warp * 16);
  t.warp_pos_hi = it.q_pos_of(warp * 16 + warp_rows - 1);
  return t;
}

// Variant logits and online softmax of one warp's score tile: keys at
// positions first + column, key_rows[column] < 0 for a missing key
// (keys_missing: any of the tile's). Per-element masks run only on tiles
// that need them (the causal diagonal, window edges, missing keys, custom
// masks). var and custom_mask are the kernel's own copies, so that a kernel
// built for the plain variant passes constants and the other variants' code
// folds away. s leaves as the unnormalised probabilities. masks_done() runs
// once key_rows are no longer read (the warp-specialised kernel frees the K
// stage).
template <int kKeys, int kDTiles, typename MasksDone>
__device__ __forceinline__ void softmax_tile(float (&s)[kKeys / 8][4], float (&m)[2], float (&l)[2],
                                             float (&o)[kDTiles][4], const AttentionVariant& var,
                                             const uint8_t* custom_mask, int64_t mask_len, const PrefillItem& it,
                                             const ThreadRows& mine, int first, bool keys_missing,
                                             const int64_t* key_rows, MasksDone masks_done) {
  const bool masked = keys_missing || custom_mask != nullptr ||
                      !var.all_visible(first, first + kKeys - 1, mine.warp_pos_lo, mine.warp_pos_hi);
  const float logit_scale = apply_variant(s, var, masked, first, mine.pos, mine.head, [&](int i, int key) {
    if (!mine.valid[i] || key_rows[key] < 0) return false;
    if (custom_mask == nullptr) return true;
    const int64_t at = it.mask_begin + int64_t(mine.token[i]) * it.kv_len + first + key;
    return at >= 0 && at < mask_len && custom_mask[at] != 0;
  });
  masks_done();
  online_softmax_step(s, m, l, o, logit_scale);
}

// P's C fragments as the A fragments of P V, 16 keys per k-step.
template <typename T, int kKeys>
__device__ __forceinline__ void pack_probabilities(const float (&s)[kKeys / 8][4], uint32_t (&p_frag)[kKeys / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    p_frag[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    p_frag[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    p_frag[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    p_frag[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// Hopper: S = Q K^T for a warpgroup's 64 rows against a BlockSwizzle<kKeys>
// key tile. q_desc: wgmma_desc(p, 16, 1024) of the first of the warpgroup's
// rows in a BlockSwizzle<kRows> tile; k_desc: the same of the key tile.
// (Callers keep descriptors from one tile to the next: building one costs
// about ten instructions.) kWait false: the caller waits (wgmma_wait<0>, then
// wgmma_fence_operands(s)) before it reads s, and may do other work first.
template <typename T, int D, int kRows, int kKeys, bool kWait = true>
__device__ __forceinline__ void wgmma_scores(float (&s)[kKeys / 8][4], uint64_t q_desc, uint64_t k_desc) {
#pragma unroll
  for (int nt = 0; nt < kKeys / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
  wgmma_fence();
  wgmma_fence_operands(s);
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int block = ks / 4, within = (ks % 4) * 16;
    wgmma_ss<T, kKeys>(s, q_desc + wgmma_desc_step<T>(block * kRows * 64 + within),
                       k_desc + wgmma_desc_step<T>(block * kKeys * 64 + within), ks > 0);
  }
  wgmma_commit();
  if constexpr (kWait) {
    wgmma_wait<0>();
    wgmma_fence_operands(s);
  }
}

// Hopper: O += P V. V [keys][D] is N-major for this product: 64-column blocks
// kKeys rows apart; v_desc: wgmma_desc(tile, kKeys * 128, 1024).
template <typename T, int D, int kKeys>
__device__ __forceinline__ void wgmma_attend(float (&o)[D / 8][4], const uint32_t (&p_frag)[kKeys / 16][4],
                                             uint64_t v_desc) {
  wgmma_fence();
  wgmma_fence_operands(o);
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    wgmma_rs<T, D>(o, p_frag[kk], v_desc + wgmma_desc_step<T>(kk * 16 * 64));
  }
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(o);
}

// The merge_with rows this thread will read in write_rows, prefetched into L2
// as a work starts, so that its end does not wait twice on DRAM (lse, then o).
template <typename T, int D>
__device__ __forceinline__ void prefetch_merge_state(const PrefillParams& p, const PrefillItem& it,
                                                     const ThreadRows& mine) {
  if (p.merge_o == nullptr || it.split != 0) return;
  constexpr int kLines = D * sizeof(T) / 128;  // 128-byte lines of a row: 1, 2 or 4
  const int tig = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!mine.valid[i]) continue;
    const int64_t row = (it.q_begin + mine.token[i]) * p.num_qo_heads + mine.head[i];
    if (tig == 0) prefetch_l2(p.merge_lse + row);
    if (tig < kLines) prefetch_l2(static_cast<const T*>(p.merge_o) + row * D + tig * (128 / sizeof(T)));
  }
}

// write_rows for the plain output (no split partials, no merge_with state),
// short and with few branches: the warp-specialised kernel runs it once a
// work, from a cold instruction cache (benchmarks/NOTES.md P58). The
// approximate reciprocal (2 ulp) and log2 (about 2^-21 absolute) err far
// below the output's bf16 / fp16 rounding.
template <typename T, int D>
__device__ __forceinline__ void write_rows_plain(const PrefillParams& p, const PrefillItem& it, const ThreadRows& mine,
                                                 const float (&o)[D / 8][4], const float (&m)[2], float (&l)[2]) {
  const int tig = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    if (!mine.valid[i]) continue;
    const int64_t out_row = (it.q_begin + mine.token[i]) * p.num_qo_heads + mine.head[i];
    const bool seen = l[i] > 0.f;
    const float scale = seen ? __fdividef(1.f, l[i]) : 0.f;
    T* out = static_cast<T*>(p.o) + out_row * D + 2 * tig;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const float pair[2] = {o[dt][2 * i] * scale, o[dt][2 * i + 1] * scale};
      store_float<T, 2>(out + dt * 8, pair);
    }
    if (tig == 0) p.lse[out_row] = seen ? m[i] + __log2f(l[i]) : -INFINITY;
  }
}

// Normalises and writes this thread's two rows (zeros and -inf for a row that
// saw no key): to o and lse, or to the partial state of the item's KV split.
// A merge_with state (p.merge_o, p.merge_lse: the same rows over other keys)
// joins the state of split 0 by merge_state's rule, so the result, or the
// merge of the splits, covers both key sets.
template <typename T, int D>
__device__ __forceinline__ void write_rows(const PrefillParams& p, const PrefillItem& it, const ThreadRows& mine,
                                           const float (&o)[D / 8][4], const float (&m)[2], float (&l)[2]) {
  const int tid = threadIdx.x, tig = tid % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    if (!mine.valid[i]) continue;
    const int64_t token = it.q_begin + mine.token[i];
    const int64_t out_row = token * p.num_qo_heads + mine.head[i];
    // Row value at column c: o[c] * scale (+ other_weight * other[c]).
    float scale = l[i] > 0.f ? 1.f / l[i] : 0.f;
    float row_lse = l[i] > 0.f ? m[i] + log2f(l[i]) : -INFINITY;
    const T* other = nullptr;
    float other_weight = 0.f;
    if (p.merge_o != nullptr && it.split == 0) {
      const float other_lse = p.merge_lse[out_row];
      const float top = fmaxf(row_lse, other_lse);
      if (top > -INFINITY) {  // else neither state saw a key: zeros, -inf
        const float w_self = exp2f(row_lse - top), w_other = exp2f(other_lse - top);
        const float sum = w_self + w_other;
        scale *= w_self / sum;
        other_weight = w_other / sum;
        other = static_cast<const T*>(p.merge_o) + out_row * D;
        row_lse = top + log2f(sum);
      }
    }
    auto pair_at = [&](int dt, float (&pair)[2]) {
      pair[0] = o[dt][2 * i] * scale;
      pair[1] = o[dt][2 * i + 1] * scale;
      if (other != nullptr) {
        float x[2];
        load_float<T, 2>(other + dt * 8 + 2 * tig, x);
        pair[0] = fmaf(other_weight, x[0], pair[0]);
        pair[1] = fmaf(other_weight, x[1], pair[1]);
      }
    };
    if (p.partial_o != nullptr) {
      const int64_t state = (token * p.num_splits + it.split) * p.num_qo_heads + mine.head[i];
      float* out = p.partial_o + state * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        float pair[2];
        pair_at(dt, pair);
        *reinterpret_cast<float2*>(out + dt * 8 + 2 * tig) = make_float2(pair[0], pair[1]);
      }
      if (tig == 0) p.partial_lse[state] = row_lse;
      continue;
    }
    T* out = static_cast<T*>(p.o) + out_row * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      float pair[2];
      pair_at(dt, pair);
      store_float<T, 2>(out + dt * 8 + 2 * tig, pair);
    }
    if (tig == 0) p.lse[out_row] = row_lse;
  }
}

}  // namespace jaxinfer
