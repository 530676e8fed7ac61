// Warp-specialised Hopper prefill (sm_90a), beside the Hopper path of
// csrc/prefill.cuh: the same work items, tiles, layouts, wgmma calls and
// softmax, but the loads move to producer warps and no barrier spans the CTA.
//
//   warps 8-11 (producer warpgroup): per tile, resolve the key rows (page-table
//     reads), then copy K and then V into a free stage: by TMA (csrc/tma.cuh)
//     when no row is missing and the boxes line up (ragged K/V; pages of 8 to
//     128 keys from a page-aligned first key), else with cp.async, which
//     zero-fills missing rows. Each of a stage's K and V has its own full /
//     empty barrier pair, so the next K loads as soon as the scores of the
//     last one are done. setmaxnreg moves registers from this warpgroup (56)
//     to the consumers (224): 384 threads start at 168 each.
//   warps 0-7 (two consumer warpgroups of 64 rows): per tile, wait for K,
//     S = Q K^T, variant and softmax, release K, wait for V, O += P V, release
//     V. The warpgroups never wait for each other. (Issuing S of the next
//     tile with P V of this one, and alternating the warpgroups' MMAs as
//     FlashAttention-3 does, measured no faster here: benchmarks/NOTES.md.)
//
// Not for RoPE (the key tile would need rotating between the copy and the
// MMA); the launcher uses the barrier-synchronised kernel then.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "csrc/attention_tile.cuh"
#include "csrc/mbarrier.cuh"
#include "csrc/mma.cuh"
#include "csrc/prefill.h"
#include "csrc/prefill_parts.cuh"
#include "csrc/tma.cuh"
#include "csrc/wgmma.cuh"

namespace jaxinfer {
namespace prefill_ws_detail {

constexpr int kRows = kPrefillTileRows;  // 128: two consumer warpgroups of 64
constexpr int kConsumers = 256;
constexpr int kProducers = 128;  // a whole warpgroup: setmaxnreg acts per warpgroup
constexpr int kThreads = kConsumers + kProducers;
constexpr int kKeys = 128;
constexpr int kStages = 2;

template <int D>
struct Layout {
  static constexpr int kTileElems = kKeys * D;
  // Element offsets in the 1024-byte aligned dynamic shared memory.
  static constexpr int kQ = 0;
  static constexpr int kK = kRows * D;
  static constexpr int kV = kK + kStages * kTileElems;
  static constexpr int kEnd = kV + kStages * kTileElems;
  // Then: key row offsets [kStages][kKeys] int64, missing flags [kStages] (+ pad), barriers [4][kStages].
  static constexpr size_t kSmem = size_t(kEnd) * 2 + kStages * kKeys * 8 + 2 * kStages * 4 + 4 * kStages * 8 + 1024;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_ws_kernel(const PrefillParams p, const __grid_constant__ KvTensorMaps tma) {
  using L = Layout<D>;
  using QLayout = BlockSwizzle<kRows>;
  using KvLayout = BlockSwizzle<kKeys>;
  constexpr int kChunks = D / 8;
  extern __shared__ uint8_t smem_raw[];
  // Aligned by an offset from smem_raw, so the compiler still knows every
  // pointer below is shared memory (LDS, not generic loads).
  T* smem = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  T* s_q = smem + L::kQ;
  auto k_stage = [&](int s) { return smem + L::kK + s * L::kTileElems; };
  auto v_stage = [&](int s) { return smem + L::kV + s * L::kTileElems; };
  int64_t(*s_rows)[kKeys] = reinterpret_cast<int64_t(*)[kKeys]>(smem + L::kEnd);
  int32_t* s_missing = reinterpret_cast<int32_t*>(s_rows + kStages);  // [kStages]
  uint64_t* k_full = reinterpret_cast<uint64_t*>(s_missing + 2 * kStages);  // 8-byte aligned
  uint64_t* k_empty = k_full + kStages;
  uint64_t* v_full = k_empty + kStages;
  uint64_t* v_empty = v_full + kStages;

  const PrefillItem item = read_prefill_item(p, blockIdx.x, kRows);
  const int kv_head = blockIdx.y;
  if (item.rows == 0) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = item.group, rows = item.rows, kv_lo = item.kv_lo, kv_hi = item.kv_hi;
  const int num_tiles = item.num_tiles(kKeys);

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&k_full[s], kProducers);  // every producer thread
      mbarrier_init(&v_full[s], kProducers);
      mbarrier_init(&k_empty[s], kConsumers / 32);  // one arrival per consumer warp
      mbarrier_init(&v_empty[s], kConsumers / 32);
    }
    mbarrier_init_fence();
  }
  __syncthreads();  // the barriers are initialised; the producer starts at once

  if (tid >= kConsumers) {
    // Producer: tile t into stage t % kStages once the consumers have released
    // the stage's previous K (then V). Thread i resolves key row i; then each
    // thread copies 16-byte chunk i % kChunks of rows i / kChunks + j * (kProducers / kChunks).
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");  // registers to the consumers
    const int i = tid - kConsumers;
    const T* k_base = static_cast<const T*>(p.kv.k) + kv_head * p.kv.stride_head;
    const T* v_base = static_cast<const T*>(p.kv.v) + kv_head * p.kv.stride_head;
    static_assert(kProducers % kChunks == 0, "producers cover whole rows");
    constexpr int kRowsPerPass = kProducers / kChunks;
    static_assert(kRowsPerPass % 8 == 0, "a thread's rows share row % 8, hence one swizzle");
    const int chunk = i % kChunks;
    // A missing row (offset -1) copies nothing and zero-fills; its address is never read.
    auto copy_tile = [&](T* dst, const T* src, const int64_t* rows, uint64_t* full) {
      src += chunk * 8;
      dst += KvLayout::at(i / kChunks, chunk);  // + 8 rows keeps the swizzle: row % 8 is fixed
      constexpr int kCopies = kKeys / kRowsPerPass;
      int64_t offset[kCopies];  // all loads first: each copy then issues without waiting
#pragma unroll
      for (int j = 0; j < kCopies; ++j) offset[j] = rows[i / kChunks + j * kRowsPerPass];
#pragma unroll
      for (int j = 0; j < kCopies; ++j) cp_async_16(dst + j * kRowsPerPass * 64, src + offset[j], offset[j] >= 0);
      mbarrier_arrive_on_cp_async(full);  // completes once the copies have landed
      mbarrier_arrive(full);
    };
    // A tile without missing rows, by TMA: the thread at the head of each box
    // (thread 0 of a ragged tile, the first row of each page) copies its rows
    // of every 64-column block; the others only arrive.
    const bool ragged = p.kv.kv_indices == nullptr;
    const bool tma_ok = tma.box_rows > 0 && (ragged || kv_lo % tma.box_rows == 0);
    auto tma_tile = [&](T* dst, const CUtensorMap* map, uint64_t* full, int pos) {
      if (i % tma.box_rows != 0) {
        mbarrier_arrive(full);
        return;
      }
      mbarrier_arrive_expect_tx(full, tma.box_rows * D * sizeof(T));
      // Ragged: the key row; paged: the page (pos is its first slot, as kv_lo is page-aligned).
      const int64_t entry = item.kv_begin + (ragged ? pos : pos / tma.box_rows);
      const int index = ragged ? int(entry) : p.kv.kv_indices[entry];
#pragma unroll
      for (int b = 0; b < D / 64; ++b) {
        T* box = dst + b * kKeys * 64 + i * 64;  // rows i.. of column block b
        if (ragged) {
          tma_load_3d(box, map, full, b * 64, kv_head, index);
        } else {
          tma_load_4d(box, map, full, b * 64, 0, kv_head, index);
        }
      }
    };
    for (int tile = 0; tile < num_tiles; ++tile) {
      const int s = tile % kStages;
      const uint32_t reuse_parity = ((tile / kStages) - 1) & 1;
      if (tile >= kStages) mbarrier_wait(&k_empty[s], reuse_parity);
      // The consumers also read s_rows[s] and s_missing[s] (masks) before releasing K.
      const int pos = kv_lo + tile * kKeys + i;
      const int64_t offset = pos < kv_hi ? p.kv.row_offset(item.kv_begin, item.kv_end, pos) : -1;
      s_rows[s][i] = offset;
      // Named barrier 1 over the producers: the rows are written, and whether any is missing.
      int missing;
      asm volatile(
          "{\n.reg .pred in, out;\nsetp.ne.s32 in, %1, 0;\n"
          "bar.red.or.pred out, 1, %2, in;\nselp.s32 %0, 1, 0, out;\n}\n"
          : "=r"(missing)
          : "r"(int(offset < 0)), "n"(kProducers)
          : "memory");
      if (i == 0) s_missing[s] = missing;
      const bool by_tma = tma_ok && !missing;
      if (by_tma) {
        tma_tile(k_stage(s), &tma.k, &k_full[s], pos);
      } else {
        copy_tile(k_stage(s), k_base, s_rows[s], &k_full[s]);
      }
      if (tile >= kStages) mbarrier_wait(&v_empty[s], reuse_parity);
      if (by_tma) {
        tma_tile(v_stage(s), &tma.v, &v_full[s], pos);
      } else {
        copy_tile(v_stage(s), v_base, s_rows[s], &v_full[s]);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");  // 128 x 56 + 256 x 224 <= 64 K

  // Query rows -> s_q (zeros past the valid rows) while the first K/V tiles
  // load; named barrier 2 joins the consumers once every copy has landed.
  for (int i = tid; i < kRows * kChunks; i += kConsumers) {
    const int r = i / kChunks, ch = i % kChunks;
    const int packed = item.row_begin + min(r, rows - 1);
    const T* q = static_cast<const T*>(p.q) +
                 ((item.q_begin + packed / group) * p.num_qo_heads + kv_head * group + packed % group) * D;
    cp_async_16(s_q + QLayout::at(r, ch), q + ch * 8, r < rows);
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_shared();  // s_q is read by wgmma
  asm volatile("bar.sync 2, %0;\n" ::"n"(kConsumers) : "memory");

  // Consumers.
  const ThreadRows mine = thread_rows(item, kv_head);
  // Descriptors of this warpgroup's 64 rows (8 KB into each block of s_q) and
  // of stage 0's K and V; a stage further is kStageStep on.
  const uint64_t q_desc = wgmma_desc(s_q + (warp / 4) * 64 * 64, 16, 1024);
  const uint64_t k_desc = wgmma_desc(k_stage(0), 16, 1024), v_desc = wgmma_desc(v_stage(0), kKeys * 128, 1024);
  constexpr uint64_t kStageStep = wgmma_desc_step<T>(L::kTileElems);
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  auto wait_full = [&](uint64_t* full, int tile) {
    mbarrier_wait(&full[tile % kStages], (tile / kStages) & 1);
    fence_async_shared();  // the cp.async (generic proxy) data, now read by wgmma
  };
  auto release = [&](uint64_t* empty, int tile) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&empty[tile % kStages]);  // this warp is done with it
  };
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int s = tile % kStages;
    wait_full(k_full, tile);
    float sc[kKeys / 8][4];
    wgmma_scores<T, D, kRows, kKeys>(sc, q_desc, k_desc + s * kStageStep);
    // The masks read the producer's row offsets and missing flag; then K is free.
    softmax_tile<kKeys>(sc, m, l, o, p, item, mine, kv_lo + tile * kKeys, s_missing[s] != 0, s_rows[s],
                        [&] { release(k_empty, tile); });

    uint32_t p_frag[kKeys / 16][4];
    pack_probabilities<T, kKeys>(sc, p_frag);
    wait_full(v_full, tile);
    wgmma_attend<T, D, kKeys>(o, p_frag, v_desc + s * kStageStep);
    release(v_empty, tile);
  }

  write_rows<T, D>(p, item, mine, o, m, l);
}

}  // namespace prefill_ws_detail
}  // namespace jaxinfer
