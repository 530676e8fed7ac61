// Batch prefill / append attention with tensor cores (mma.sync m16n8k16,
// sm80+): the portable path, FlashAttention-2 style.
//
// One CTA = one KV head x one work item: kPrefillTileRows packed query rows
// (token, head of the GQA group), 16 per warp, against the keys those rows
// can see, in 64-key tiles through a 2-stage cp.async pipeline. Each warp
// keeps the online softmax of its own 16 rows, so no cross-warp merge; the
// CTA writes o and lse directly.
//
// Key rows are located as in decode: one thread per key resolves the row's
// element offset a tile ahead (a page-table read when paged, the row itself
// when ragged), -1 for no key; copies of missing keys are zero-filled and
// their logits masked.
//
// Shared-memory tiles are [rows][D], swizzled (csrc/attention_tile.cuh).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "csrc/attention_tile.cuh"
#include "csrc/merge_state.cuh"
#include "csrc/mma.cuh"
#include "csrc/prefill.h"
#include "csrc/vec.cuh"

namespace jaxinfer {
namespace prefill_detail {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileKeys = 64;
constexpr int kRows = kPrefillTileRows;  // 16 per warp
constexpr int kStages = 2;
constexpr int kRowSlots = kStages + 1;

template <int D>
struct Config {
  static_assert(D % 64 == 0, "head dim must be a multiple of 64 (8 swizzled 16-byte chunks)");
  static constexpr int kChunks = D / 8;
  static constexpr int kTileElems = kTileKeys * D;
  static constexpr size_t kSmem = (2 * kStages * kTileElems + kRows * D) * 2;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefill_kernel(const PrefillParams p) {
  using Cfg = Config<D>;
  constexpr int kChunks = Cfg::kChunks;
  extern __shared__ __align__(128) uint8_t smem[];
  auto stage_k = [&](int stage) { return reinterpret_cast<T*>(smem) + stage * 2 * Cfg::kTileElems; };
  T* s_q = stage_k(kStages);  // [kRows][D]

  const int32_t* f = p.items + int64_t(blockIdx.y) * kPfItemFields;
  if (f[kPfRequest] < 0) return;  // padding item
  const int kv_head = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int group = p.num_qo_heads / p.num_kv_heads;
  const AttentionVariant& var = p.variant;

  // The item, clamped so that a corrupt plan reads and writes only inside the buffers.
  const int64_t q_begin = min(max(int64_t(f[kPfQBegin]), int64_t(0)), p.total_q);
  const int q_len = static_cast<int>(min(max(int64_t(f[kPfQLen]), int64_t(0)), p.total_q - q_begin));
  const int row_begin = max(f[kPfRowBegin], 0);
  const int kv_len = max(f[kPfKvLen], 0);
  const int64_t kv_begin = max(int64_t(f[kPfKvBegin]), int64_t(0));
  const int64_t kv_end = min(int64_t(f[kPfKvEnd]), p.kv.num_entries());
  const int64_t mask_begin = f[kPfMaskBegin];
  const int rows_total = static_cast<int>(min(int64_t(q_len) * group, int64_t(INT32_MAX)));
  const int rows = max(min(kRows, rows_total - row_begin), 0);  // valid rows of this tile
  if (rows == 0) return;

  // Position of packed row r (of the tile) and the tile's key range.
  auto q_pos_of = [&](int r) { return kv_len - q_len + (row_begin + r) / group; };
  const int kv_lo = max(max(var.first_visible(q_pos_of(0)), f[kPfSplitBegin]), 0);
  const int kv_hi = min(var.end_visible(q_pos_of(rows - 1), kv_len), f[kPfSplitEnd]);
  const int num_tiles = kv_lo < kv_hi ? (kv_hi - kv_lo + kTileKeys - 1) / kTileKeys : 0;

  const T* k_base = static_cast<const T*>(p.kv.k) + kv_head * p.kv.stride_head;
  const T* v_base = static_cast<const T*>(p.kv.v) + kv_head * p.kv.stride_head;
  __shared__ int64_t s_row[kRowSlots][kTileKeys];
  auto row_offset = [&](int tile) -> int64_t {  // key row tid of `tile`
    const int pos = kv_lo + tile * kTileKeys + tid;  // negative only on int overflow (a corrupt plan)
    if (tile >= num_tiles || pos >= kv_hi) return -1;
    return p.kv.row_offset(kv_begin, kv_end, pos);
  };
  auto load_tile = [&](int tile) {
    T* s_k = stage_k(tile % kStages);
    load_kv_tile<T, D, kTileKeys, kThreads>(s_k, s_k + Cfg::kTileElems, k_base, v_base, s_row[tile % kRowSlots]);
  };

  if (tid < kTileKeys) {
    s_row[0][tid] = row_offset(0);
    s_row[1][tid] = row_offset(1);
  }
  __syncthreads();
  if (num_tiles > 0) load_tile(0);
  cp_async_commit();

  // Query rows -> s_q (zeros past the valid rows), RoPE applied pairwise on the way.
  for (int i = tid; i < kRows * (kChunks / 2); i += kThreads) {
    const int r = i / (kChunks / 2), ch = i % (kChunks / 2);
    float lo[8] = {}, hi[8] = {};
    if (r < rows) {
      const int packed = row_begin + r;
      const T* q = static_cast<const T*>(p.q) +
                   ((q_begin + packed / group) * p.num_qo_heads + kv_head * group + packed % group) * D;
      load_float<T, 8>(q + ch * 8, lo);
      load_float<T, 8>(q + D / 2 + ch * 8, hi);
      if (var.rope) {
#pragma unroll
        for (int e = 0; e < 8; ++e) var.rope_pair(lo[e], hi[e], ch * 8 + e, D, q_pos_of(r));
      }
    }
    store_float<T, 8>(s_q + swizzle<D>(r, ch), lo);
    store_float<T, 8>(s_q + swizzle<D>(r, ch + kChunks / 2), hi);
  }

  // This thread's two rows (gid and gid + 8 of its warp's 16).
  int my_pos[2], my_head[2], my_token[2];
  bool my_valid[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + gid + 8 * i;
    my_valid[i] = r < rows;
    my_pos[i] = q_pos_of(r);
    my_token[i] = (row_begin + r) / group;
    my_head[i] = kv_head * group + (row_begin + r) % group;
  }

  constexpr bool kQInRegisters = D <= 128;
  auto load_q_frag = [&](uint32_t(&frag)[4], int ks) {
    const int mi = lane / 8;
    ldmatrix_x4(frag, s_q + swizzle<D>(warp * 16 + (lane % 8) + 8 * (mi % 2), 2 * ks + mi / 2));
  };
  uint32_t q_frag[kQInRegisters ? D / 16 : 1][4];
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<0>();
    __syncthreads();  // tile landed (and s_q written); every warp is done with the other stage
    if (tile + 1 < num_tiles) load_tile(tile + 1);
    cp_async_commit();
    const int64_t next_row = tid < kTileKeys ? row_offset(tile + 2) : -1;
    if (tile == 0 && kQInRegisters) {
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) load_q_frag(q_frag[ks], ks);
    }
    const int first = kv_lo + tile * kTileKeys;
    T* s_kt = stage_k(tile % kStages);
    const T* s_vt = s_kt + Cfg::kTileElems;
    if (var.rope) {
      rotate_key_tile<T, D, kTileKeys, kThreads>(s_kt, first, var);
      __syncthreads();
    }

    // S = Q K^T: 16 rows x 64 keys per warp, eight n-tiles of 8 keys.
    float s[8][4] = {};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a_smem[4];
      if constexpr (!kQInRegisters) load_q_frag(a_smem, ks);
      const uint32_t(&a)[4] = kQInRegisters ? q_frag[kQInRegisters ? ks : 0] : a_smem;
#pragma unroll
      for (int n2 = 0; n2 < 4; ++n2) {
        const int mi = lane / 8;
        uint32_t b[4];
        ldmatrix_x4(b, s_kt + swizzle<D>(n2 * 16 + (lane % 8) + 8 * (mi / 2), 2 * ks + (mi % 2)));
        mma_16816<T>(s[2 * n2], a, b[0], b[1]);
        mma_16816<T>(s[2 * n2 + 1], a, b[2], b[3]);
      }
    }

    // Variant logits and masks, then the online-softmax update of each row.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = j / 2;
        const int key = nt * 8 + 2 * tig + (j % 2);
        const int pos = first + key;
        bool ok = my_valid[i] && s_row[tile % kRowSlots][key] >= 0 && var.visible(pos, my_pos[i]);
        if (p.custom_mask != nullptr && ok) {
          const int64_t at = mask_begin + int64_t(my_token[i]) * kv_len + pos;
          ok = at >= 0 && at < p.mask_len && p.custom_mask[at] != 0;
        }
        s[nt][j] = ok ? var.logit(s[nt][j], my_head[i], pos, my_pos[i]) : -INFINITY;
      }
    }
    online_softmax_step(s, m, l, o);

    // O += P V, 16 keys per k-step: P's C fragments are the A fragments.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t p_frag[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                  pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        const int mi = lane / 8;
        uint32_t b[4];
        ldmatrix_x4_trans(b, s_vt + swizzle<D>(kk * 16 + (lane % 8) + 8 * (mi % 2), 2 * dt2 + mi / 2));
        mma_16816<T>(o[2 * dt2], p_frag, b[0], b[1]);
        mma_16816<T>(o[2 * dt2 + 1], p_frag, b[2], b[3]);
      }
    }
    if (tid < kTileKeys) s_row[(tile + 2) % kRowSlots][tid] = next_row;
  }
  cp_async_wait<0>();

  // Normalise and write this thread's two rows (zeros and -inf for a row that
  // saw no key): to o, or to the partial state of this item's KV split.
  const int split = min(max(f[kPfSplit], 0), p.num_splits - 1);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    if (!my_valid[i]) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    const float row_lse = l[i] > 0.f ? m[i] + log2f(l[i]) : -INFINITY;
    const int64_t token = q_begin + my_token[i];
    if (p.partial_o != nullptr) {
      const int64_t state = (token * p.num_splits + split) * p.num_qo_heads + my_head[i];
      float* out = p.partial_o + state * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<float2*>(out + dt * 8 + 2 * tig) = make_float2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
      }
      if (tig == 0) p.partial_lse[state] = row_lse;
      continue;
    }
    const int64_t out_row = token * p.num_qo_heads + my_head[i];
    T* out = static_cast<T*>(p.o) + out_row * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const float pair[2] = {o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv};
      store_float<T, 2>(out + dt * 8 + 2 * tig, pair);
    }
    if (tig == 0) p.lse[out_row] = row_lse;
  }
}

// The KV splits' partial states: [total_q, num_splits, num_qo_heads, head_dim].
struct SplitStates {
  using Elem = float;
  const float* o_base;
  const float* lse_base;
  int64_t splits, heads, dim;
  __device__ int count(int64_t) const { return static_cast<int>(splits); }
  __device__ bool done(int64_t) const { return false; }
  __device__ int64_t index(int64_t row, int i) const { return ((row / heads) * splits + i) * heads + row % heads; }
  __device__ float lse(int64_t row, int i) const { return lse_base[index(row, i)]; }
  __device__ const float* v(int64_t row, int i) const { return o_base + index(row, i) * dim; }
};

}  // namespace prefill_detail

template <int kHeadDim>
cudaError_t launch_prefill(const PrefillParams& p, cudaStream_t stream) {
  using namespace prefill_detail;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // tensor-core path: 16-bit inputs only
    } else {
      constexpr auto kernel = prefill_kernel<T, kHeadDim>;
      constexpr size_t smem = Config<kHeadDim>::kSmem;
      if (cudaError_t e = allow_dynamic_smem<kernel>(smem)) return e;
      if (p.num_items > 0) kernel<<<dim3(p.num_kv_heads, p.num_items), kThreads, smem, stream>>>(p);
      if (p.partial_o != nullptr) {
        launch_merge(SplitStates{p.partial_o, p.partial_lse, p.num_splits, p.num_qo_heads, kHeadDim},
                     static_cast<T*>(p.o), p.lse, p.total_q * p.num_qo_heads, kHeadDim, p.num_splits,
                     stream, /*after_writer=*/p.num_items > 0);
      }
      return cudaGetLastError();
    }
  });
}

}  // namespace jaxinfer
