// Paged-KV split decode with tensor cores (mma.sync m16n8k16, sm80+).
//
// One CTA = one KV head x up to 16 query heads of its GQA group x one CTA slot
// of the plan: a run of work items (key ranges of requests) walked as one
// stream of 64-key tiles, so the pipeline runs on across item boundaries and
// every CTA of the wave streams the same number of keys. The query heads are
// the mma's M rows, zeros past the group.
// 4 warps; the K/V of each tile arrive through cp.async (16 bytes a thread,
// zero-filled for missing keys), kStages deep. Each warp owns 16 of the 64
// keys of every tile and keeps its own online softmax; at the end of an item
// the warps' states merge in the shared memory of the stage just consumed,
// and the CTA writes the request's output (an item that is the whole request)
// or an fp32 partial (o, lse) that the merge kernel combines per request.
//
// Shared-memory tiles are [rows][D], swizzled (csrc/attention_tile.cuh).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "csrc/decode.h"
#include "csrc/merge_state.cuh"
#include "csrc/attention_tile.cuh"
#include "csrc/mma.cuh"
#include "csrc/vec.cuh"

namespace jaxinfer {
namespace decode_detail {

constexpr int kRows = 16;  // query heads per CTA (the mma M)

// Each warp owns 16 keys of every tile. The defaults are what the H100
// measured best (benchmarks/decode_kernel.cu times other configurations): at
// D = 128, three CTAs per SM with two stages each beat two with three stages
// (12 warps per SM hide more latency than deeper stages), so Q is re-read from
// shared memory to fit the registers. jaxinfer/decode.py ctas_per_sm mirrors
// the CTAs per SM.
template <int D, int kWarps_ = 4, int kStages_ = (D == 64 ? 3 : 2), int kMinBlocks_ = (D == 128 ? 3 : 1),
          bool kQRegs_ = (D == 64), bool kEvictFirst_ = true>
struct Config {
  static_assert(D % 64 == 0, "head dim must be a multiple of 64 (8 swizzled 16-byte chunks)");
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTileKeys = 16 * kWarps;  // keys per stage
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;  // CTAs per SM the registers must allow
  static constexpr bool kQInRegisters = kQRegs_;  // Q's A fragments kept across tiles
  static constexpr bool kEvictFirst = kEvictFirst_;  // K/V, read once, leave L2 first (b=1 x 16384: -2%)
  static constexpr int kChunks = D / 8;           // 16-byte chunks per row (16-bit elements)
  static constexpr int kTileElems = kTileKeys * D;
  static constexpr size_t kSmem = (2 * kStages * kTileElems + kRows * D) * 2;
  // An item's epilogue merges the warps' fp32 outputs in one consumed stage (K and V).
  static_assert(kWarps * kRows * D * sizeof(float) <= 2 * kTileElems * 2, "epilogue must fit a stage");
  static_assert(kTileKeys % 32 == 0, "whole warps resolve a tile's key rows");
};

// The partials of request b are the items merge_indptr[b]..merge_indptr[b+1]
// (clamped to the workspace, so a corrupt plan cannot read past it); a
// request with one item was written by the decode kernel itself.
struct PlanStates {
  using Elem = float;
  const float* o_base; const float* lse_base; const int32_t* merge_indptr;
  int64_t heads, dim, num_items;
  struct Row {
    int64_t head = 0, first = 0;
    int count = 0;
  };
  __device__ Row row(int64_t r) const {
    const int64_t first = min(max(int64_t(merge_indptr[r / heads]), int64_t(0)), num_items);
    const int64_t end = min(max(int64_t(merge_indptr[r / heads + 1]), int64_t(0)), num_items);
    return {r % heads, first, static_cast<int>(max(end - first, int64_t(0)))};
  }
  __device__ int count(const Row& r) const { return r.count; }
  __device__ bool done(const Row& r) const { return r.count == 1; }
  __device__ int64_t index(const Row& r, int i) const { return (r.first + i) * heads + r.head; }

  static __host__ __device__ PlanStates of(const DecodeParams& p, int64_t dim) {
    return {p.partial_o, p.partial_lse, p.merge_indptr, p.num_qo_heads, dim, p.num_items};
  }
  __device__ float lse(const Row& r, int i) const { return lse_base[index(r, i)]; }
  __device__ const float* v(const Row& r, int i) const { return o_base + index(r, i) * dim; }
};


// Walks the tiles of one CTA slot's work items in order. Every item has at
// least one tile: an item with no visible keys runs one fully masked tile, so
// it still writes its zeros and -inf.
template <int kTileKeys>
struct TileCursor {
  int item, item_end;   // current item; one past the slot's last
  int tile, num_tiles;  // tile within the item
  int request;          // -1: padding (or a corrupt plan), computes nothing visible, writes nothing
  int kv_begin, kv_end, q_pos;
  int64_t page_begin, page_end;  // entries of kv_indices, clamped to the array

  __device__ bool done() const { return item >= item_end; }
  __device__ int first_key() const { return kv_begin + tile * kTileKeys; }

  __device__ void open(const DecodeParams& p) {
    tile = 0, num_tiles = 1, request = -1, kv_begin = kv_end = 0, q_pos = -1;
    page_begin = page_end = 0;
    if (done()) return;
    const int32_t* f = p.items + int64_t(item) * kItemFields;
    const int req = f[kItemRequest];
    if (req < 0 || req >= p.batch) return;
    request = req;
    const int kv_len = f[kItemKvLen];
    q_pos = kv_len - 1;
    page_begin = max(int64_t(f[kItemPageBegin]), int64_t(0));
    page_end = min(int64_t(f[kItemPageEnd]), p.kv.num_entries());
    kv_begin = max(max(f[kItemKvStart], p.variant.first_visible(q_pos)), 0);
    kv_end = min(f[kItemKvEnd], kv_len);
    if (kv_begin < kv_end) num_tiles = (kv_end - kv_begin + kTileKeys - 1) / kTileKeys;
  }

  __device__ void advance(const DecodeParams& p) {
    if (++tile < num_tiles) return;
    ++item;
    open(p);
  }
};

template <typename T, int D, typename Cfg = Config<D>>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) decode_kernel(const DecodeParams p) {
  constexpr int kStages = Cfg::kStages, kChunks = Cfg::kChunks;
  constexpr int kWarps = Cfg::kWarps, kThreads = Cfg::kThreads, kTileKeys = Cfg::kTileKeys;
  using TileCursor = decode_detail::TileCursor<kTileKeys>;
  extern __shared__ __align__(128) uint8_t smem[];
  // Stage s holds K then V of one tile ([kTileKeys][D] each); s_q follows.
  auto stage_k = [&](int stage) { return reinterpret_cast<T*>(smem) + stage * 2 * Cfg::kTileElems; };
  T* s_q = stage_k(kStages);  // [kRows][D]

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The merge kernel, launched as a programmatic dependent (launch_merge), may
  // be scheduled now: it waits for this grid's completion before it reads, and
  // its launch latency hides behind this kernel's tail.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  // Consecutive CTAs take the KV heads of one slot: in the NHD layout they read
  // neighbouring parts of the same key rows at the same time.
  const int slot = blockIdx.y;
  const int item_begin = min(max(p.cta_items[slot], 0), p.num_items);
  const int item_end = min(max(p.cta_items[slot + 1], item_begin), p.num_items);
  if (item_begin >= item_end) return;  // an idle slot (a small batch)
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane / 4, tig = lane % 4;

  const int group = p.num_qo_heads / p.num_kv_heads;
  const int row_tiles = (group + kRows - 1) / kRows;
  const int kv_head = blockIdx.x / row_tiles;
  const int head0 = kv_head * group + (blockIdx.x % row_tiles) * kRows;  // first query head
  const int rows = min(kRows, kv_head * group + group - head0);
  const AttentionVariant& var = p.variant;

  const T* k_base = static_cast<const T*>(p.kv.k) + kv_head * p.kv.stride_head;
  const T* v_base = static_cast<const T*>(p.kv.v) + kv_head * p.kv.stride_head;

  // Element offset (page * stride_page + slot * stride_slot) of each key row,
  // resolved kStages tiles ahead of its compute by one thread per row, so the
  // dependent plan and kv_indices reads leave the copy loop; -1 = no such key
  // (past the range, past the request's page list, or a page outside the
  // cache). Row slots are indexed by tile % (kStages + 1): one more than the
  // stages, so the slot refilled after a tile's compute is never one another
  // warp still reads.
  constexpr int kRowSlots = kStages + 1;
  __shared__ int64_t s_row[kRowSlots][kTileKeys];
  // Per row slot and resolving warp: whether any of its rows is -1. A tile
  // without missing rows needs no mask: its keys lie in [kv_begin, kv_end),
  // which the cursor already clipped to the window, and the query follows them all.
  constexpr int kRowWarps = kTileKeys / 32;
  __shared__ int s_missing[kRowSlots][kRowWarps];
  auto store_rows = [&](int slot, int64_t row) {  // by the threads tid < kTileKeys (whole warps)
    s_row[slot][tid] = row;
    const bool missing = __any_sync(0xffffffff, row < 0);
    if (lane == 0) s_missing[slot][warp] = missing;
  };
  auto row_offset = [&](const TileCursor& c) -> int64_t {  // key row tid of c's tile (tid < kTileKeys)
    const int pos = c.first_key() + tid;
    if (c.done() || c.request < 0 || pos >= c.kv_end) return -1;
    return p.kv.row_offset(c.page_begin, c.page_end, pos);
  };

  // Issues the cp.async of tile `tile` into its stage; missing keys are zero-filled.
  auto load_tile = [&](int tile) {
    T* s_k = stage_k(tile % kStages);
    load_kv_tile<T, D, kTileKeys, kThreads, RowSwizzle<D>, Cfg::kEvictFirst>(s_k, s_k + Cfg::kTileElems, k_base, v_base,
                                                                          s_row[tile % kRowSlots]);
  };

  // Prologue: rows of the first kStages tiles, then the first kStages - 1 loads.
  TileCursor cur{item_begin, item_end};
  cur.open(p);
  TileCursor ahead = cur;  // the tile whose rows are resolved next
  for (int s = 0; s < kStages; ++s) {
    if (tid < kTileKeys) store_rows(s, row_offset(ahead));
    ahead.advance(p);
  }
  __syncthreads();
  for (int s = 0; s < kStages - 1; ++s) {
    load_tile(s);
    cp_async_commit();
  }

  // The item's query rows -> s_q (zeros past the group), RoPE applied to each
  // (x[j], x[j + D/2]) pair on the way, both halves loaded by one thread.
  auto load_queries = [&](const TileCursor& c) {
    const T* q = static_cast<const T*>(p.q) + (int64_t(max(c.request, 0)) * p.num_qo_heads + head0) * D;
    for (int i = tid; i < kRows * (kChunks / 2); i += kThreads) {
      const int r = i / (kChunks / 2), ch = i % (kChunks / 2);
      float lo[8] = {}, hi[8] = {};
      if (r < rows && c.request >= 0) {
        load_float<T, 8>(q + r * D + ch * 8, lo);
        load_float<T, 8>(q + r * D + D / 2 + ch * 8, hi);
        if (var.rope) {
#pragma unroll
          for (int e = 0; e < 8; ++e) var.rope_pair(lo[e], hi[e], ch * 8 + e, D, c.q_pos);
        }
      }
      store_float<T, 8>(s_q + swizzle<D>(r, ch), lo);
      store_float<T, 8>(s_q + swizzle<D>(r, ch + kChunks / 2), hi);
    }
  };
  // Q as A fragments, one per 16-wide k-step: held in registers when the
  // configuration says so (D = 64), else re-read from shared memory each tile
  // (the registers go to the output, or to a third CTA per SM at D = 128).
  constexpr bool kQInRegisters = Cfg::kQInRegisters;
  auto load_q_frag = [&](uint32_t(&frag)[4], int ks) {
    const int mi = lane / 8;
    ldmatrix_x4(frag, s_q + swizzle<D>((lane % 8) + 8 * (mi % 2), 2 * ks + mi / 2));
  };
  uint32_t q_frag[kQInRegisters ? D / 16 : 1][4];

  float o[D / 8][4];  // this warp's unnormalised output, C fragments per 8-wide d-tile
  float m[2];         // running max (base 2) of rows gid and gid + 8
  float l[2];         // this lane's share of the running sums

  // Epilogue of an item, after the compute of its last tile (in `stage`): the
  // warps' states merge through that stage's shared memory, which no copy
  // targets until the next iteration's barrier.
  __shared__ float s_m[kWarps * kRows], s_l[kWarps * kRows];
  auto finish_item = [&](const TileCursor& c, int stage) {
    __syncthreads();  // every warp is done reading the stage
    float* s_o = reinterpret_cast<float*>(stage_k(stage));  // [kWarps][kRows][D]
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
    if (c.request < 0) return;
    const PlanStates plan = PlanStates::of(p, D);
    const bool whole_request = plan.done(plan.row(int64_t(c.request) * p.num_qo_heads));
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
      if (whole_request) {  // the request's only item: write the final output, skip the merge
        const int64_t out_row = int64_t(c.request) * p.num_qo_heads + head0 + r;
        static_cast<T*>(p.o)[out_row * D + d] = from_float<T>(out);
        if (d == 0) p.lse[out_row] = out_lse;
      } else {
        const int64_t out_row = int64_t(c.item) * p.num_qo_heads + head0 + r;
        p.partial_o[out_row * D + d] = out;
        if (d == 0) p.partial_lse[out_row] = out_lse;
      }
    }
  };

  for (int tile = 0; !cur.done(); ++tile) {
    const bool item_start = cur.tile == 0;
    if (item_start) load_queries(cur);  // its global reads overlap the copies in flight
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the tile has landed; s_q is written; every warp is done with the stage refilled next
    load_tile(tile + kStages - 1);
    cp_async_commit();
    // Rows of tile + kStages, stored after this tile's compute (the slot's last
    // readers, load_tile and the masks of tile - 1, finished before the barrier above).
    const int64_t next_row = tid < kTileKeys ? row_offset(ahead) : -1;
    ahead.advance(p);

    const int stage = tile % kStages;
    const int first = cur.first_key(), q_pos = cur.q_pos;
    T* s_kt = stage_k(stage);
    const T* s_vt = s_kt + Cfg::kTileElems;
    if (item_start) {
      if constexpr (kQInRegisters) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) load_q_frag(q_frag[ks], ks);
      }
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
      m[0] = m[1] = -INFINITY;
      l[0] = l[1] = 0.f;
    }
    if (var.rope) {
      rotate_key_tile<T, D, kTileKeys, kThreads>(s_kt, first, var);
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

    // Variant logits (plain ones: the scale folds into the softmax's exponent)
    // and, on a tile with missing rows, their mask; then the online softmax.
    float logit_scale = 1.f;
    if (var.plain_logits() && var.sm_scale > 0.f) {
      logit_scale = var.sm_scale * AttentionVariant::kLog2e;
    } else {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int key = key0 + nt * 8 + 2 * tig + (j % 2);
          s[nt][j] = var.logit(s[nt][j], head0 + gid + 8 * (j / 2), first + key, q_pos);
        }
      }
    }
    bool missing = false;
#pragma unroll
    for (int w = 0; w < kRowWarps; ++w) missing |= s_missing[tile % kRowSlots][w] != 0;
    if (missing) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (s_row[tile % kRowSlots][key0 + nt * 8 + 2 * tig + (j % 2)] < 0) s[nt][j] = -INFINITY;
        }
      }
    }
    online_softmax_step(s, m, l, o, logit_scale);

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
    if (tid < kTileKeys) store_rows((tile + kStages) % kRowSlots, next_row);
    if (cur.tile == cur.num_tiles - 1) finish_item(cur, stage);
    cur.advance(p);
  }
  cp_async_wait<0>();  // the zero-filled copies past the end
}

// The decode kernel of configuration Cfg, then the merge of the partials of
// split requests (a programmatic dependent launch: see launch_merge).
template <typename T, int D, typename Cfg = Config<D>>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  constexpr auto kernel = decode_kernel<T, D, Cfg>;
  if (cudaError_t e = allow_dynamic_smem<kernel>(Cfg::kSmem)) return e;
  const int group = p.num_qo_heads / p.num_kv_heads;
  const dim3 grid(p.num_kv_heads * ((group + kRows - 1) / kRows), p.num_ctas);
  if (p.num_ctas > 0) kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(p);
  // A request has at most one item per CTA slot it touches.
  launch_merge(PlanStates::of(p, D), static_cast<T*>(p.o), p.lse, int64_t(p.batch) * p.num_qo_heads, D,
               p.num_ctas, stream, /*after_writer=*/p.num_ctas > 0);
  return cudaGetLastError();
}

}  // namespace decode_detail

template <int kHeadDim>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // tensor-core path: 16-bit inputs only
    } else {
      return decode_detail::launch<T, kHeadDim>(p, stream);
    }
  });
}

}  // namespace jaxinfer
