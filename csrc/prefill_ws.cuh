// Warp-specialised Hopper prefill (sm_90a), beside the Hopper path of
// csrc/prefill.cuh: the same work items, tiles, layouts, wgmma calls and
// softmax, but the loads move to producer warps and no barrier spans the CTA.
//
//   warps 8-11 (producer warpgroup): per tile, resolve the key rows (page-table
//     reads), then copy K and then V with cp.async into a free stage; each of
//     a stage's K and V has its own full / empty barrier pair, so the next K
//     loads as soon as the scores of the last one are done. setmaxnreg moves
//     registers from this warpgroup (56) to the consumers (224): 384 threads
//     start at 168 each.
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
#include "csrc/vec.cuh"
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
__global__ void __launch_bounds__(kThreads, 1) prefill_ws_kernel(const PrefillParams p) {
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

  const int32_t* f = p.items + int64_t(blockIdx.y) * kPfItemFields;
  if (f[kPfRequest] < 0) return;  // padding item
  const int kv_head = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int group = p.num_qo_heads / p.num_kv_heads;
  const AttentionVariant& var = p.variant;

  // The item, clamped as in csrc/prefill.cuh.
  const int64_t q_begin = min(max(int64_t(f[kPfQBegin]), int64_t(0)), p.total_q);
  const int q_len = static_cast<int>(min(max(int64_t(f[kPfQLen]), int64_t(0)), p.total_q - q_begin));
  const int row_begin = max(f[kPfRowBegin], 0);
  const int kv_len = max(f[kPfKvLen], 0);
  const int64_t kv_begin = max(int64_t(f[kPfKvBegin]), int64_t(0));
  const int64_t kv_end = min(int64_t(f[kPfKvEnd]), p.kv.num_entries());
  const int64_t mask_begin = f[kPfMaskBegin];
  const int rows_total = static_cast<int>(min(int64_t(q_len) * group, int64_t(INT32_MAX)));
  const int rows = max(min(kRows, rows_total - row_begin), 0);
  if (rows == 0) return;
  auto q_pos_of = [&](int r) { return kv_len - q_len + (row_begin + r) / group; };
  const int kv_lo = max(max(var.first_visible(q_pos_of(0)), f[kPfSplitBegin]), 0);
  const int kv_hi = min(var.end_visible(q_pos_of(rows - 1), kv_len), f[kPfSplitEnd]);
  const int num_tiles = kv_lo < kv_hi ? (kv_hi - kv_lo + kKeys - 1) / kKeys : 0;

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
    for (int tile = 0; tile < num_tiles; ++tile) {
      const int s = tile % kStages;
      const uint32_t reuse_parity = ((tile / kStages) - 1) & 1;
      if (tile >= kStages) mbarrier_wait(&k_empty[s], reuse_parity);
      // The consumers also read s_rows[s] and s_missing[s] (masks) before releasing K.
      const int pos = kv_lo + tile * kKeys + i;
      const int64_t offset = pos < kv_hi ? p.kv.row_offset(kv_begin, kv_end, pos) : -1;
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
      copy_tile(k_stage(s), k_base, s_rows[s], &k_full[s]);
      if (tile >= kStages) mbarrier_wait(&v_empty[s], reuse_parity);
      copy_tile(v_stage(s), v_base, s_rows[s], &v_full[s]);
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");  // 128 x 56 + 256 x 224 <= 64 K

  // Query rows -> s_q (zeros past the valid rows) while the first K/V tiles
  // load; named barrier 2 joins the consumers once every copy has landed.
  for (int i = tid; i < kRows * kChunks; i += kConsumers) {
    const int r = i / kChunks, ch = i % kChunks;
    const int packed = row_begin + min(r, rows - 1);
    const T* q = static_cast<const T*>(p.q) +
                 ((q_begin + packed / group) * p.num_qo_heads + kv_head * group + packed % group) * D;
    cp_async_16(s_q + QLayout::at(r, ch), q + ch * 8, r < rows);
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_shared();  // s_q is read by wgmma
  asm volatile("bar.sync 2, %0;\n" ::"n"(kConsumers) : "memory");

  // Consumers. This thread's two rows (gid and gid + 8 of its warp's 16).
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
  const int warp_rows = max(min(16, rows - warp * 16), 1);
  const int warp_pos_lo = q_pos_of(warp * 16), warp_pos_hi = q_pos_of(warp * 16 + warp_rows - 1);

  const T* q_rows = s_q + (warp / 4) * 64 * 64;  // this warpgroup's 64 rows (8 KB into each block)
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
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
    wgmma_fence();
    wgmma_fence_operands(sc);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int block = ks / 4, within = (ks % 4) * 16;
      wgmma_ss<T, kKeys>(sc, wgmma_desc(q_rows + block * kRows * 64 + within, 16, 1024),
                         wgmma_desc(k_stage(s) + block * kKeys * 64 + within, 16, 1024), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(sc);

    // Variant, masks (the producer's row offsets and missing flag), then K is free.
    const int first = kv_lo + tile * kKeys;
    const bool masked = s_missing[s] != 0 || p.custom_mask != nullptr ||
                        !var.all_visible(first, first + kKeys - 1, warp_pos_lo, warp_pos_hi);
    const int64_t* key_rows = s_rows[s];
    const float logit_scale = apply_variant(sc, var, masked, first, my_pos, my_head, [&](int i, int key) {
      if (!my_valid[i] || key_rows[key] < 0) return false;
      if (p.custom_mask == nullptr) return true;
      const int64_t at = mask_begin + int64_t(my_token[i]) * kv_len + first + key;
      return at >= 0 && at < p.mask_len && p.custom_mask[at] != 0;
    });
    release(k_empty, tile);
    online_softmax_step(sc, m, l, o, logit_scale);

    // O += P V: P's C fragments are the A fragments; V [keys][D] is N-major
    // for this product, 64-column blocks kKeys rows apart.
    uint32_t p_frag[kKeys / 16][4];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      p_frag[kk][0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
      p_frag[kk][1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
      p_frag[kk][2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      p_frag[kk][3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
    wait_full(v_full, tile);
    wgmma_fence();
    wgmma_fence_operands(o);
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      wgmma_rs<T, D>(o, p_frag[kk], wgmma_desc(v_stage(s) + kk * 16 * 64, kKeys * 64 * 2, 1024));
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(o);
    release(v_empty, tile);
  }

  // Normalise and write this thread's two rows, as csrc/prefill.cuh does.
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

}  // namespace prefill_ws_detail
}  // namespace jaxinfer
