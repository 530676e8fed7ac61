// Batch prefill / append attention with tensor cores, FlashAttention style,
// with two MMA back ends over one kernel body:
//   portable (sm80+): mma.sync m16n8k16, 64-key tiles, Q fragments in registers;
//   Hopper (sm_90a):  wgmma, 128-key tiles, Q and K/V read by descriptors from
//                     128B-swizzled shared memory, P from registers
//                     (head dims 64 and 128; 256 would not fit two stages).
//
// One CTA = one KV head x one work item: kPrefillTileRows (128) packed query
// rows (token, head of the GQA group), 16 per warp (for wgmma: two
// warpgroups of 64), against the keys those rows can see, in key tiles
// through a 2-stage cp.async pipeline. Each warp keeps the online softmax of
// its own 16 rows in m16n8 C fragments (wgmma's accumulators share the
// order), so no cross-warp merge; the CTA writes o and lse directly.
//
// Key rows are located as in decode: one thread per key resolves the row's
// element offset a tile ahead (a page-table read when paged, the row itself
// when ragged), -1 for no key; copies of missing keys are zero-filled and
// their logits masked. Per-element masks run only on tiles that need them.
//
// Shared-memory tiles are BlockSwizzle (csrc/attention_tile.cuh), 1024-byte
// aligned.
//
// On sm_90a, run_prefill launches the warp-specialised kernel of
// csrc/prefill_ws.cuh instead (same items, tiles, layouts and softmax) for
// every variant but RoPE on the fly; this kernel's Hopper form remains for RoPE.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "csrc/attention_tile.cuh"
#include "csrc/merge_state.cuh"
#include "csrc/mma.cuh"
#include "csrc/prefill.h"
#include "csrc/prefill_parts.cuh"
#include "csrc/prefill_ws.cuh"
#include "csrc/vec.cuh"
#include "csrc/wgmma.cuh"

namespace jaxinfer {
namespace prefill_detail {

constexpr int kRows = kPrefillTileRows;
constexpr int kWarps = kRows / 16;
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = 2;
constexpr int kRowSlots = kStages + 1;

template <int D, bool kHopper>
struct Config {
  static_assert(D % 64 == 0, "head dim must be a multiple of 64 (64-element swizzle blocks)");
  static_assert(!kHopper || D <= 128, "the Hopper path holds two stages of 128-key tiles: D <= 128");
  static constexpr int kKeys = kHopper ? 128 : 64;  // keys per tile
  static constexpr int kTileElems = kKeys * D;
  static constexpr size_t kSmem = (2 * kStages * kTileElems + kRows * D) * 2 + 1024;  // + alignment
};

template <typename T, int D, bool kHopper>
__global__ void __launch_bounds__(kThreads, 1) prefill_kernel(const PrefillParams p) {
  using Cfg = Config<D, kHopper>;
  constexpr int kKeys = Cfg::kKeys;
  constexpr int kChunks = D / 8;
  using QLayout = BlockSwizzle<kRows>;
  using KvLayout = BlockSwizzle<kKeys>;
  extern __shared__ uint8_t smem_raw[];
  T* smem = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  auto stage_k = [&](int stage) { return smem + stage * 2 * Cfg::kTileElems; };
  T* s_q = stage_k(kStages);  // [kRows][D]

  const PrefillItem item = read_prefill_item(p, blockIdx.x, kRows);
  if (item.rows == 0) return;
  const int kv_head = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = item.group, rows = item.rows, kv_lo = item.kv_lo, kv_hi = item.kv_hi;
  const int num_tiles = item.num_tiles(kKeys);
  const AttentionVariant& var = p.variant;

  const T* k_base = static_cast<const T*>(p.kv.k) + kv_head * p.kv.stride_head;
  const T* v_base = static_cast<const T*>(p.kv.v) + kv_head * p.kv.stride_head;
  __shared__ int64_t s_row[kRowSlots][kKeys];
  auto row_offset = [&](int tile) -> int64_t {  // key row tid of `tile`
    const int pos = kv_lo + tile * kKeys + tid;  // negative only on int overflow (a corrupt plan)
    if (tile >= num_tiles || pos >= kv_hi) return -1;
    return p.kv.row_offset(item.kv_begin, item.kv_end, pos);
  };
  auto load_tile = [&](int tile) {
    T* s_k = stage_k(tile % kStages);
    load_kv_tile<T, D, kKeys, kThreads, KvLayout>(s_k, s_k + Cfg::kTileElems, k_base, v_base,
                                                  s_row[tile % kRowSlots]);
  };

  if (tid < kKeys) {
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
      const int packed = item.row_begin + r;
      const T* q = static_cast<const T*>(p.q) +
                   ((item.q_begin + packed / group) * p.num_qo_heads + kv_head * group + packed % group) * D;
      load_float<T, 8>(q + ch * 8, lo);
      load_float<T, 8>(q + D / 2 + ch * 8, hi);
      if (var.rope) {
#pragma unroll
        for (int e = 0; e < 8; ++e) var.rope_pair(lo[e], hi[e], ch * 8 + e, D, item.q_pos_of(r));
      }
    }
    store_float<T, 8>(s_q + QLayout::at(r, ch), lo);
    store_float<T, 8>(s_q + QLayout::at(r, ch + kChunks / 2), hi);
  }

  const ThreadRows mine = thread_rows(item, kv_head);
  prefetch_merge_state<T, D>(p, item, mine);

  // Portable path: Q fragments stay in registers for D <= 128.
  constexpr bool kQInRegisters = !kHopper && D <= 128;
  auto load_q_frag = [&](uint32_t(&frag)[4], int ks) {
    const int mi = lane / 8;
    ldmatrix_x4(frag, s_q + QLayout::at(warp * 16 + (lane % 8) + 8 * (mi % 2), 2 * ks + mi / 2));
  };
  uint32_t q_frag[kQInRegisters ? D / 16 : 1][4];
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<0>();
    if constexpr (kHopper) fence_async_shared();  // cp.async and st.shared data, read by wgmma
    // Tile landed (and s_q written); every warp is done with the other stage.
    // The barrier also tells whether any key of this tile is missing.
    const bool keys_missing = __syncthreads_or(tid < kKeys && s_row[tile % kRowSlots][tid] < 0);
    if (tile + 1 < num_tiles) load_tile(tile + 1);
    cp_async_commit();
    const int64_t next_row = tid < kKeys ? row_offset(tile + 2) : -1;
    if constexpr (kQInRegisters) {
      if (tile == 0) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) load_q_frag(q_frag[ks], ks);
      }
    }
    const int first = kv_lo + tile * kKeys;
    T* s_kt = stage_k(tile % kStages);
    const T* s_vt = s_kt + Cfg::kTileElems;
    if (var.rope) {
      rotate_key_tile<T, D, kKeys, kThreads, KvLayout>(s_kt, first, var);
      if constexpr (kHopper) fence_async_shared();
      __syncthreads();
    }

    // S = Q K^T: this warp's 16 rows x kKeys keys.
    float s[kKeys / 8][4] = {};
    if constexpr (kHopper) {
      // Each warpgroup: its 64 rows of s_q (8 KB into each block) against the tile.
      const T* q_rows = s_q + (warp / 4) * 64 * 64;
      wgmma_scores<T, D, kRows, kKeys>(s, wgmma_desc(q_rows, 16, 1024), wgmma_desc(s_kt, 16, 1024));
    } else {
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a_smem[4];
        if constexpr (!kQInRegisters) load_q_frag(a_smem, ks);
        const uint32_t(&a)[4] = kQInRegisters ? q_frag[kQInRegisters ? ks : 0] : a_smem;
#pragma unroll
        for (int n2 = 0; n2 < kKeys / 16; ++n2) {
          const int mi = lane / 8;
          uint32_t b[4];
          ldmatrix_x4(b, s_kt + KvLayout::at(n2 * 16 + (lane % 8) + 8 * (mi / 2), 2 * ks + (mi % 2)));
          mma_16816<T>(s[2 * n2], a, b[0], b[1]);
          mma_16816<T>(s[2 * n2 + 1], a, b[2], b[3]);
        }
      }
    }

    softmax_tile<kKeys>(s, m, l, o, var, p.custom_mask, p.mask_len, item, mine, first, keys_missing,
                        s_row[tile % kRowSlots], [] {});

    // O += P V.
    uint32_t p_frag[kKeys / 16][4];
    pack_probabilities<T, kKeys>(s, p_frag);
    if constexpr (kHopper) {
      wgmma_attend<T, D, kKeys>(o, p_frag, wgmma_desc(s_vt, kKeys * 128, 1024));
    } else {
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
#pragma unroll
        for (int dt2 = 0; dt2 < D / 16; ++dt2) {
          const int mi = lane / 8;
          uint32_t b[4];
          ldmatrix_x4_trans(b, s_vt + KvLayout::at(kk * 16 + (lane % 8) + 8 * (mi % 2), 2 * dt2 + mi / 2));
          mma_16816<T>(o[2 * dt2], p_frag[kk], b[0], b[1]);
          mma_16816<T>(o[2 * dt2 + 1], p_frag[kk], b[2], b[3]);
        }
      }
    }
    if (tid < kKeys) s_row[(tile + 2) % kRowSlots][tid] = next_row;
  }
  cp_async_wait<0>();

  write_rows<T, D>(p, item, mine, o, m, l);
}

// The KV splits' partial states: [total_q, num_splits, num_qo_heads, head_dim].
struct SplitStates {
  using Elem = float;
  const float* o_base;
  const float* lse_base;
  int64_t splits, heads, dim;
  using Row = RowIndex;
  __device__ Row row(int64_t r) const { return {r}; }
  __device__ int count(const Row&) const { return static_cast<int>(splits); }
  __device__ bool done(const Row&) const { return false; }
  __device__ int64_t index(const Row& r, int i) const {
    return ((r.row / heads) * splits + i) * heads + r.row % heads;
  }
  __device__ float lse(const Row& r, int i) const { return lse_base[index(r, i)]; }
  __device__ const float* v(const Row& r, int i) const { return o_base + index(r, i) * dim; }
};

// The Hopper path on sm_90 devices for head dims up to 128, else the portable one.
inline bool use_hopper_path(int head_dim) { return current_device_major() == 9 && head_dim <= 128; }

// The persistent kernel on `ctas` CTAs, built for the plain variant or for any.
template <typename T, int D, bool kPlain>
cudaError_t run_prefill_ws(const PrefillParams& p, int ctas, cudaStream_t stream) {
  constexpr auto kernel = prefill_ws_detail::prefill_ws_kernel<T, D, kPlain>;
  constexpr size_t smem = prefill_ws_detail::Layout<D>::kSmem;
  if (cudaError_t e = allow_dynamic_smem<kernel>(smem)) return e;
  const KvTensorMaps maps = encode_kv_tensor_maps<T, D>(p.kv, p.num_kv_heads);
  if (ctas > 0) kernel<<<ctas, prefill_ws_detail::kThreads, smem, stream>>>(p, maps);
  return cudaSuccess;
}

// On sm_90a the warp-specialised kernel runs every variant but RoPE on the
// fly (its keys would need rotating between the copy and the MMA), which the
// barrier-synchronised Hopper path keeps.
template <typename T, int D, bool kHopper>
cudaError_t run_prefill(const PrefillParams& p, cudaStream_t stream) {
  using namespace prefill_detail;
  // Items along x, heads along y: the CTAs running at once mostly share one
  // head's keys, which then stay in L2 (heads along x measured 5-7% slower).
  // The persistent kernel claims works in the same order.
  const dim3 grid(p.num_items, p.num_kv_heads);
  bool launched = false;
  if constexpr (kHopper) {
    if (!p.variant.rope) {
      // Persistent: one CTA per SM walks its share of the works (items x heads).
      const int64_t works = int64_t(p.num_items) * p.num_kv_heads;
      const int ctas = static_cast<int>(std::min<int64_t>(works, std::max(current_device_attribute<cudaDevAttrMultiProcessorCount>(), 1)));
      if (works > ctas) {  // CTAs claim works past their first from the counter
        if (p.work_counter == nullptr) return cudaErrorInvalidValue;
        if (cudaError_t e = cudaMemsetAsync(p.work_counter, 0, sizeof(*p.work_counter), stream)) return e;
      }
      const bool plain = p.variant.is_plain() && p.custom_mask == nullptr;
      const cudaError_t e = plain ? run_prefill_ws<T, D, true>(p, ctas, stream)
                                  : run_prefill_ws<T, D, false>(p, ctas, stream);
      if (e != cudaSuccess) return e;
      launched = true;
    }
  }
  if (!launched) {
    constexpr auto kernel = prefill_kernel<T, D, kHopper>;
    constexpr size_t smem = Config<D, kHopper>::kSmem;
    if (cudaError_t e = allow_dynamic_smem<kernel>(smem)) return e;
    if (p.num_items > 0) kernel<<<grid, kThreads, smem, stream>>>(p);
  }
  if (p.partial_o != nullptr) {
    launch_merge(SplitStates{p.partial_o, p.partial_lse, p.num_splits, p.num_qo_heads, D}, static_cast<T*>(p.o),
                 p.lse, p.total_q * p.num_qo_heads, D, p.num_splits, stream, /*after_writer=*/p.num_items > 0);
  }
  return cudaGetLastError();
}

}  // namespace prefill_detail

template <int kHeadDim>
cudaError_t launch_prefill(const PrefillParams& p, cudaStream_t stream) {
  using namespace prefill_detail;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // tensor-core path: 16-bit inputs only
    } else if constexpr (kHeadDim <= 128) {
      return use_hopper_path(kHeadDim) ? run_prefill<T, kHeadDim, true>(p, stream)
                                       : run_prefill<T, kHeadDim, false>(p, stream);
    } else {
      return run_prefill<T, kHeadDim, false>(p, stream);
    }
  });
}

}  // namespace jaxinfer
