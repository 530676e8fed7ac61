// Paged-KV split decode with tensor cores (mma.sync m16n8k16, sm80+).
//
// One CTA = one KV head x up to 16 query heads of its GQA group x one work item
// (request, key range); the query heads are the mma's M rows, zeros past the group.
// 4 warps; the K/V of 64 keys per pipeline stage arrive through cp.async
// (16 bytes a thread, zero-filled past the range), kStages deep. Each warp
// owns 16 of the 64 keys of every stage and keeps its own online softmax;
// the warps' states merge in shared memory at the end, and the CTA writes an
// fp32 partial (o, lse) that the merge kernel combines per request.
//
// Shared-memory tiles are [rows][D] with 16-byte chunks XOR-swizzled by row
// (chunk ^ (row % 8)), so the 8 rows read by each ldmatrix hit distinct banks.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "csrc/decode.h"
#include "csrc/merge_state.cuh"
#include "csrc/mma.cuh"
#include "csrc/vec.cuh"

namespace jaxinfer {
namespace decode_detail {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileKeys = 64;  // keys per stage: 16 per warp
constexpr int kRows = 16;      // query heads per CTA (the mma M)

template <int D>
struct Config {
  static_assert(D % 64 == 0, "head dim must be a multiple of 64 (8 swizzled 16-byte chunks)");
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row (16-bit elements)
  // Deeper pipelines for smaller rows: about 64-96 KB of K/V in flight per CTA.
  static constexpr int kStages = D >= 256 ? 2 : 3;
  static constexpr int kTileElems = kTileKeys * D;
  static constexpr size_t kSmemPipeline = (2 * kStages * kTileElems + kRows * D) * 2;
  static constexpr size_t kSmemEpilogue = kWarps * kRows * (D + 2) * sizeof(float);
  static constexpr size_t kSmem = kSmemPipeline > kSmemEpilogue ? kSmemPipeline : kSmemEpilogue;
};

template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// The partials of request b are the items merge_indptr[b]..merge_indptr[b+1]
// (clamped to the workspace, so a corrupt plan cannot read past it); a
// request with one item was written by the decode kernel itself.
struct PlanStates {
  using Elem = float;
  const float* o_base; const float* lse_base; const int32_t* merge_indptr;
  int64_t heads, dim, num_items;
  __device__ int64_t first(int64_t row) const {
    return min(max(int64_t(merge_indptr[row / heads]), int64_t(0)), num_items);
  }
  __device__ int count(int64_t row) const {
    const int64_t end = min(max(int64_t(merge_indptr[row / heads + 1]), int64_t(0)), num_items);
    return static_cast<int>(max(end - first(row), int64_t(0)));
  }
  __device__ bool done(int64_t row) const { return count(row) == 1; }
  __device__ int64_t index(int64_t row, int i) const { return (first(row) + i) * heads + row % heads; }

  static __host__ __device__ PlanStates of(const DecodeParams& p, int64_t dim) {
    return {p.partial_o, p.partial_lse, p.merge_indptr, p.num_qo_heads, dim, p.num_items};
  }
  __device__ float lse(int64_t row, int i) const { return lse_base[index(row, i)]; }
  __device__ const float* v(int64_t row, int i) const { return o_base + index(row, i) * dim; }
};


template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  using Cfg = Config<D>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kChunks = Cfg::kChunks;
  extern __shared__ __align__(128) uint8_t smem[];
  T* s_k = reinterpret_cast<T*>(smem);             // [kStages][kTileKeys][D]
  T* s_v = s_k + kStages * Cfg::kTileElems;        // [kStages][kTileKeys][D]
  T* s_q = s_v + kStages * Cfg::kTileElems;        // [kRows][D]

  // Consecutive CTAs take the KV heads of one item: in the NHD layout they read
  // neighbouring parts of the same key rows at the same time.
  const int item = blockIdx.y;
  const int request = p.item_request[item];
  if (request < 0 || request >= p.batch) return;  // padding item (or a corrupt plan)
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane / 4, tig = lane % 4;

  const int group = p.num_qo_heads / p.num_kv_heads;
  const int row_tiles = (group + kRows - 1) / kRows;
  const int kv_head = blockIdx.x / row_tiles;
  const int head0 = kv_head * group + (blockIdx.x % row_tiles) * kRows;  // first query head
  const int rows = min(kRows, kv_head * group + group - head0);

  // Key range of this item, clipped to what the device page table holds.
  const int page_begin = p.kv_indptr[request];
  const int page_end = p.kv_indptr[request + 1];
  const int kv_len = page_end > page_begin ? (page_end - page_begin - 1) * p.page_size +
                                                 p.kv_last_page_len[request]
                                           : 0;
  const int q_pos = kv_len - 1;
  const AttentionVariant& var = p.variant;
  const int kv_begin = max(p.item_kv_start[item], var.first_visible(q_pos));
  const int kv_end = min(p.item_kv_end[item], kv_len);
  const int num_tiles = kv_begin < kv_end ? (kv_end - kv_begin + kTileKeys - 1) / kTileKeys : 0;

  const T* k_base = static_cast<const T*>(p.k) + kv_head * p.stride_head;
  const T* v_base = static_cast<const T*>(p.v) + kv_head * p.stride_head;

  // Element offset (page * stride_page + slot * stride_slot) of each key row,
  // resolved one tile ahead of its cp.async by one thread per row, so the
  // dependent kv_indices read and the index arithmetic leave the copy loop;
  // -1 = no such key (past the range, past the request's page list, or a page
  // outside the cache). Slots are indexed by tile % (kStages + 1): one more
  // than the stages, so the slot refilled after a tile's compute is never one
  // another warp still reads.
  constexpr int kRowSlots = kStages + 1;
  __shared__ int64_t s_row[kRowSlots][kTileKeys];
  auto row_offset = [&](int tile) -> int64_t {  // for key row tid of `tile` (tid < kTileKeys)
    const int pos = kv_begin + tile * kTileKeys + tid;
    const int page_in_request = pos / p.page_size;
    const int64_t entry = int64_t(page_begin) + page_in_request;
    if (tile >= num_tiles || pos >= kv_end || entry >= page_end || entry < 0 ||
        entry >= p.num_kv_indices) {
      return -1;
    }
    const int64_t page = p.kv_indices[entry];
    if (page < 0 || page >= p.num_pages) return -1;
    return page * p.stride_page + int64_t(pos - page_in_request * p.page_size) * p.stride_slot;
  };

  // Issues the cp.async of tile `tile` into stage `stage`; missing keys are zero-filled.
  auto load_tile = [&](int tile, int stage) {
    const int chunk = tid % kChunks;
    constexpr int kRowsPerPass = kThreads / kChunks;
#pragma unroll
    for (int pass = 0; pass < kTileKeys / kRowsPerPass; ++pass) {
      const int row = tid / kChunks + pass * kRowsPerPass;
      const int64_t offset = s_row[tile % kRowSlots][row];
      const bool ok = offset >= 0;
      const int dst = stage * Cfg::kTileElems + swizzle<D>(row, chunk);
      cp_async_16(s_k + dst, k_base + (ok ? offset + chunk * 8 : 0), ok);
      cp_async_16(s_v + dst, v_base + (ok ? offset + chunk * 8 : 0), ok);
    }
  };

  // Prologue: rows of the first kStages tiles, then the first kStages - 1 loads.
  for (int s = 0; s < kStages; ++s) {
    if (tid < kTileKeys) s_row[s % kRowSlots][tid] = row_offset(s);
  }
  __syncthreads();
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, s);
    cp_async_commit();
  }

  // q rows -> shared (zeros past the group), rotated in place when RoPE is on.
  const T* q = static_cast<const T*>(p.q) + (int64_t(request) * p.num_qo_heads + head0) * D;
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    float x[8] = {};
    if (r < rows) load_float<T, 8>(q + r * D + c * 8, x);
    store_float<T, 8>(s_q + swizzle<D>(r, c), x);
  }
  // RoPE in shared memory: row r of `tile` sits at position first_pos + r * pos_step.
  auto rotate_rows = [&](T* tile, int num_rows, int first_pos, int pos_step) {
    for (int i = tid; i < num_rows * (D / 2); i += kThreads) {
      const int r = i / (D / 2), j = i % (D / 2);
      T* lo_p = tile + swizzle<D>(r, j / 8) + j % 8;
      T* hi_p = tile + swizzle<D>(r, (j + D / 2) / 8) + j % 8;
      float lo = to_float(*lo_p), hi = to_float(*hi_p);
      var.rope_pair(lo, hi, j, D, first_pos + r * pos_step);
      *lo_p = from_float<T>(lo);
      *hi_p = from_float<T>(hi);
    }
  };
  if (var.rope) {
    __syncthreads();
    rotate_rows(s_q, kRows, q_pos, 0);  // every query head sits at q_pos
  }
  __syncthreads();

  // Q as A fragments, one per 16-wide k-step: held in registers up to D = 128,
  // re-read from shared memory each tile beyond (registers go to the output).
  constexpr bool kQInRegisters = D <= 128;
  auto load_q_frag = [&](uint32_t(&frag)[4], int ks) {
    const int mi = lane / 8;
    ldmatrix_x4(frag, s_q + swizzle<D>((lane % 8) + 8 * (mi % 2), 2 * ks + mi / 2));
  };
  uint32_t q_frag[kQInRegisters ? D / 16 : 1][4];
  if constexpr (kQInRegisters) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) load_q_frag(q_frag[ks], ks);
  }

  float o[D / 8][4] = {};  // this warp's unnormalised output, C fragments per 8-wide d-tile
  float m[2] = {-INFINITY, -INFINITY};  // running max (base 2) of rows gid and gid + 8
  float l[2] = {0.f, 0.f};              // this lane's share of the running sums

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the tile has landed; every warp is done with the stage refilled next
    if (tile + kStages - 1 < num_tiles) load_tile(tile + kStages - 1, (tile + kStages - 1) % kStages);
    cp_async_commit();
    // Rows of tile + kStages, stored after this tile's compute (the slot's last
    // readers, load_tile and the masks of tile - 1, finished before the barrier above).
    const int64_t next_row = tid < kTileKeys ? row_offset(tile + kStages) : -1;

    const int stage = tile % kStages;
    const int first = kv_begin + tile * kTileKeys;
    T* s_kt = s_k + stage * Cfg::kTileElems;
    const T* s_vt = s_v + stage * Cfg::kTileElems;
    if (var.rope) {
      rotate_rows(s_kt, kTileKeys, first, 1);
      __syncthreads();
    }
    const int key0 = warp * 16;

    // S = Q K^T for this warp's 16 keys: two n-tiles of 8 keys.
    float s[2][4] = {};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int mi = lane / 8;
      uint32_t b[4];
      ldmatrix_x4(b, s_kt + swizzle<D>(key0 + (lane % 8) + 8 * (mi / 2), 2 * ks + (mi % 2)));
      uint32_t(&a)[4] = q_frag[kQInRegisters ? ks : 0];
      if constexpr (!kQInRegisters) load_q_frag(a, ks);
      mma_16816<T>(s[0], a, b[0], b[1]);
      mma_16816<T>(s[1], a, b[2], b[3]);
    }

    // Variant logits and masks, then the online-softmax update per row.
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = key0 + nt * 8 + 2 * tig + (j % 2);
        const int pos = first + key;
        const int head = head0 + gid + 8 * (j / 2);
        const bool ok = s_row[tile % kRowSlots][key] >= 0 && var.visible(pos, q_pos);
        s[nt][j] = ok ? var.logit(s[nt][j], head, pos, q_pos) : -INFINITY;
        row_max[j / 2] = fmaxf(row_max[j / 2], s[nt][j]);
      }
    }
    float scale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffff, row_max[r], 1));
      row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffff, row_max[r], 2));
      const float m_new = fmaxf(m[r], row_max[r]);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
      scale[r] = exp2f(m[r] - m_use);
      m[r] = m_new;
      l[r] *= scale[r];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
        l[r] += s[nt][2 * r] + s[nt][2 * r + 1];
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= scale[0];
      o[dt][1] *= scale[0];
      o[dt][2] *= scale[1];
      o[dt][3] *= scale[1];
    }

    // O += P V: P's C fragments are exactly the A fragment of a k=16 step.
    const uint32_t p_frag[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                                pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int dt2 = 0; dt2 < D / 16; ++dt2) {
      const int mi = lane / 8;
      uint32_t b[4];
      ldmatrix_x4_trans(b, s_vt + swizzle<D>(key0 + (lane % 8) + 8 * (mi % 2), 2 * dt2 + mi / 2));
      mma_16816<T>(o[2 * dt2], p_frag, b[0], b[1]);
      mma_16816<T>(o[2 * dt2 + 1], p_frag, b[2], b[3]);
    }
    if (tid < kTileKeys) s_row[(tile + kStages) % kRowSlots][tid] = next_row;
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  // Merge the 4 warps' states through shared memory.
  float* s_o = reinterpret_cast<float*>(smem);     // [kWarps][kRows][D]
  float* s_m = s_o + kWarps * kRows * D;           // [kWarps][kRows]
  float* s_l = s_m + kWarps * kRows;               // [kWarps][kRows]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
    if (tig == 0) {
      s_m[warp * kRows + gid + 8 * r] = m[r];
      s_l[warp * kRows + gid + 8 * r] = l[r];
    }
  }
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    float* base = s_o + (warp * kRows + gid) * D + dt * 8 + 2 * tig;
    base[0] = o[dt][0];
    base[1] = o[dt][1];
    base[8 * D] = o[dt][2];
    base[8 * D + 1] = o[dt][3];
  }
  __syncthreads();

  const bool single_item = PlanStates::of(p, D).done(int64_t(request) * p.num_qo_heads);
  for (int i = tid; i < rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w * kRows + r]);
    float sum = 0.f, acc = 0.f;
    if (m_all != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float wgt = exp2f(s_m[w * kRows + r] - m_all);
        sum += wgt * s_l[w * kRows + r];
        acc += wgt * s_o[(w * kRows + r) * D + d];
      }
    }
    const float out = sum > 0.f ? acc / sum : 0.f;
    const float out_lse = sum > 0.f ? m_all + log2f(sum) : -INFINITY;
    if (single_item) {  // the request's only item: write the final output, skip the merge
      const int64_t out_row = int64_t(request) * p.num_qo_heads + head0 + r;
      static_cast<T*>(p.o)[out_row * D + d] = from_float<T>(out);
      if (d == 0) p.lse[out_row] = out_lse;
    } else {
      const int64_t out_row = int64_t(item) * p.num_qo_heads + head0 + r;
      p.partial_o[out_row * D + d] = out;
      if (d == 0) p.partial_lse[out_row] = out_lse;
    }
  }
}

}  // namespace decode_detail

template <int kHeadDim>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  using namespace decode_detail;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // tensor-core path: 16-bit inputs only
    } else {
      auto kernel = decode_kernel<T, kHeadDim>;
      constexpr size_t smem = Config<kHeadDim>::kSmem;
      // Large dynamic shared memory needs a one-time opt-in per device. It is
      // not a stream operation, so it is legal during graph capture too.
      static bool opted_in[64] = {};
      int device = 0;
      cudaGetDevice(&device);
      if (!opted_in[device & 63]) {
        if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem))
          return e;
        opted_in[device & 63] = true;
      }
      const int group = p.num_qo_heads / p.num_kv_heads;
      const dim3 grid(p.num_kv_heads * ((group + kRows - 1) / kRows), p.num_items);
      if (p.num_items > 0) kernel<<<grid, kThreads, smem, stream>>>(p);
      launch_merge(PlanStates::of(p, kHeadDim), static_cast<T*>(p.o), p.lse,
                   int64_t(p.batch) * p.num_qo_heads, kHeadDim, stream);
      return cudaGetLastError();
    }
  });
}

}  // namespace jaxinfer
