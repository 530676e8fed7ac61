// Pieces shared by the tensor-core attention kernels (decode, prefill): the
// swizzled shared-memory tile layout, RoPE on a key tile, and the online
// softmax on mma.sync m16n8 C fragments.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "csrc/attention_variant.cuh"
#include "csrc/mma.cuh"
#include "csrc/vec.cuh"

namespace jaxinfer {

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][D] tile of
// 16-bit elements, chunks XOR-swizzled by row (chunk ^ (row % 8)), so the 8
// rows read by each ldmatrix hit distinct banks.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Tile layouts: Layout::at(row, chunk) is the element offset of 16-byte chunk
// `chunk` of row `row`.
//   RowSwizzle<D>:      [rows][D], the swizzle above.
//   BlockSwizzle<kRows>: D / 64 column blocks of [kRows][64]: 128-byte rows,
//                       chunks XOR-ed by row % 8. The layout of the wgmma
//                       descriptors' 128B swizzle (csrc/wgmma.cuh) when blocks
//                       are 1024-byte aligned; ldmatrix reads it conflict-free.
template <int D>
struct RowSwizzle {
  __device__ __forceinline__ static int at(int row, int chunk) { return swizzle<D>(row, chunk); }
};
template <int kRows>
struct BlockSwizzle {
  __device__ __forceinline__ static int at(int row, int chunk) {
    return (chunk / 8) * kRows * 64 + swizzle<64>(row, chunk % 8);
  }
};

// Issues the cp.async copies of one K/V tile of kRows keys into the tiles s_k
// and s_v: key row r starts at element offset rows[r] of k_base and v_base, -1
// for no key (zero-filled, nothing read). kThreads threads share the 16-byte
// chunks. kEvictFirst: the copies carry an L2 evict-first policy (decode,
// which reads K/V once; prefill re-reads them across query tiles).
template <typename T, int D, int kRows, int kThreads, typename Layout = RowSwizzle<D>, bool kEvictFirst = false>
__device__ __forceinline__ void load_kv_tile(T* s_k, T* s_v, const T* k_base, const T* v_base,
                                             const int64_t* rows) {
  const uint64_t policy = kEvictFirst ? l2_evict_first_policy() : 0;
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  const int chunk = threadIdx.x % kChunks;
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int row = threadIdx.x / kChunks + pass * kRowsPerPass;
    const int64_t offset = rows[row];
    const bool ok = offset >= 0;
    const int dst = Layout::at(row, chunk);
    // A missing row's address is formed (as an integer) but never read: no select.
    const uintptr_t at = uintptr_t(offset + chunk * 8) * sizeof(T);
    const T* k = reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(k_base) + at);
    const T* v = reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(v_base) + at);
    if constexpr (kEvictFirst) {
      cp_async_16(s_k + dst, k, ok, policy);
      cp_async_16(s_v + dst, v, ok, policy);
    } else {
      cp_async_16(s_k + dst, k, ok);
      cp_async_16(s_v + dst, v, ok);
    }
  }
}

// RoPE over a [kRows][D] key tile in place, row r at position first_pos + r;
// the CTA's kThreads threads share the pairs. The caller synchronises before
// and after.
template <typename T, int D, int kRows, int kThreads, typename Layout = RowSwizzle<D>>
__device__ __forceinline__ void rotate_key_tile(T* tile, int first_pos, const AttentionVariant& var) {
  for (int i = threadIdx.x; i < kRows * (D / 2); i += kThreads) {
    const int r = i / (D / 2), j = i % (D / 2);
    T* lo_p = tile + Layout::at(r, j / 8) + j % 8;
    T* hi_p = tile + Layout::at(r, (j + D / 2) / 8) + j % 8;
    float lo = to_float(*lo_p), hi = to_float(*hi_p);
    var.rope_pair(lo, hi, j, D, first_pos + r);
    *lo_p = from_float<T>(lo);
    *hi_p = from_float<T>(hi);
  }
}

// The variant's logits for one warp's 16 x (8 kNTiles) tile of raw scores in
// m16n8 C fragments (elements 0, 1: row gid, elements 2, 3: row gid + 8;
// columns 8 nt + 2 tig + {0, 1}). Keys sit at positions first_key + column;
// the thread's rows at q_pos[2], heads head[2]. With masked, elements where
// !var.visible or !allowed(i, column) (i = 0, 1: the row) become -inf; the
// caller passes masked = false for tiles every row sees entirely, which then
// cost nothing here. Branches here are uniform across the warp.
//
// Returns the factor that turns s into base-2 logits, for the softmax to fold
// into its exponent: the plain scale sm_scale * log2(e) (a max commutes with a
// positive factor), or 1 where s already holds the variant's logits.
template <int kNTiles, typename Allowed>
__device__ __forceinline__ float apply_variant(float (&s)[kNTiles][4], const AttentionVariant& var, bool masked,
                                               int first_key, const int (&q_pos)[2], const int (&head)[2],
                                               Allowed allowed) {
  const int tig = threadIdx.x % 4;
  float logit_scale = 1.f;
  if (var.plain_logits() && var.sm_scale > 0.f) {
    logit_scale = var.sm_scale * AttentionVariant::kLog2e;
  } else {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = first_key + nt * 8 + 2 * tig + (j % 2);
        s[nt][j] = var.logit(s[nt][j], head[j / 2], key, q_pos[j / 2]);
      }
    }
  }
  if (!masked) return logit_scale;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int column = nt * 8 + 2 * tig + (j % 2);
      const bool ok = var.visible(first_key + column, q_pos[j / 2]) && allowed(j / 2, column);
      s[nt][j] = ok ? s[nt][j] : -INFINITY;
    }
  }
  return logit_scale;
}

// 2^x on the MUFU unit with denormal results flushed to zero: exp2f's
// denormal-safe form costs three more instructions per element, and a
// probability below 2^-126 of the row's maximum is zero after normalisation.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One tile's online-softmax step for the two rows a thread holds in m16n8 C
// fragments (row gid: elements 0, 1 of each n-tile; row gid + 8: elements 2,
// 3; a row's 4 owners are the lanes of one quad). s * logit_scale are the
// tile's base-2 logits (-inf = masked); s leaves as unnormalised
// probabilities, the running max m and this lane's share of the sums l are
// updated, and the output accumulators o rescaled to the new max.
template <int kNTiles, int kDTiles>
__device__ __forceinline__ void online_softmax_step(float (&s)[kNTiles][4], float (&m)[2], float (&l)[2],
                                                    float (&o)[kDTiles][4], float logit_scale = 1.f) {
  float scale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float row_max = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) row_max = fmaxf(row_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffff, row_max, 1));
    row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffff, row_max, 2));
    const float m_new = fmaxf(m[r], row_max * logit_scale);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
    scale[r] = fast_exp2(m[r] - m_use);
    m[r] = m_new;
    l[r] *= scale[r];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      s[nt][2 * r] = fast_exp2(fmaf(s[nt][2 * r], logit_scale, -m_use));
      s[nt][2 * r + 1] = fast_exp2(fmaf(s[nt][2 * r + 1], logit_scale, -m_use));
      l[r] += s[nt][2 * r] + s[nt][2 * r + 1];
    }
  }
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
    o[dt][0] *= scale[0];
    o[dt][1] *= scale[0];
    o[dt][2] *= scale[1];
    o[dt][3] *= scale[1];
  }
}

// Large dynamic shared memory needs a one-time opt-in per kernel and device.
// It is not a stream operation, so it is legal during graph capture too.
template <auto kKernel>
cudaError_t allow_dynamic_smem(size_t bytes) {
  static bool opted_in[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (opted_in[device & 63]) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  opted_in[device & 63] = e == cudaSuccess;
  return e;
}

}  // namespace jaxinfer
