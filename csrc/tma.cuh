// Hopper tensor-memory-accelerator (TMA) copies of K/V key rows into the
// 128B-swizzled tiles of csrc/attention_tile.cuh (BlockSwizzle): the host
// encodes one descriptor (CUtensorMap) per K and V for each launch, and one
// thread's copy then moves a box of key rows x 64 elements that would take a
// warpgroup's cp.async. Encoding is host work only (no stream operation), so
// it is legal while XLA captures a command buffer; the capture is re-traced
// when buffers move, which re-encodes the addresses.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>

#include "csrc/kv_cache.h"
#include "csrc/mma.cuh"    // smem_addr
#include "csrc/wgmma.cuh"  // JAXINFER_SM90A

namespace jaxinfer {

// Descriptors of K and V, a kernel parameter (__grid_constant__: TMA reads
// them where they lie). box_rows: key rows per copy, 128 (a ragged tile) or
// the page size (one page); 0: no TMA, the kernel copies with cp.async.
// row_pages: no TMA per page, but the maps view the paged cache as rows
// ([pages * page_size][heads][D], NHD pages back to back), for the tiles
// whose pages run consecutively through the cache (benchmarks/NOTES.md P80).
struct KvTensorMaps {  // CUtensorMap brings its own 64-byte alignment
  CUtensorMap k, v;
  int box_rows;
  int row_pages;
};

// Ragged K/V: [rows][heads][D] as a 3-d tensor, one copy per 128-row tile.
// Paged: [pages][slots][heads][D] (NHD) or [pages][heads][slots][D] (HND) as
// a 4-d tensor, one copy per page; page sizes 32 to 128 that divide a tile
// (pages of 16 keys load 3-7% faster by cp.async than by 16 boxes of 2 KB a
// tile: benchmarks/NOTES.md P52). Other NHD pages laid out back to back: the
// ragged view of their rows (row_pages), for runs of consecutive pages.
// Returns box_rows = 0 and row_pages = 0 where TMA does not apply or the
// driver refuses.
template <typename T, int D>
KvTensorMaps encode_kv_tensor_maps(const KvCache& kv, int num_kv_heads) {
  static_assert(sizeof(T) == 2 && D % 64 == 0, "16-bit elements in 128-byte boxes");
  static const auto encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  KvTensorMaps maps{};
  // Pages that TMA does not copy one by one, laid out back to back (NHD), read as rows.
  const bool paged_boxes = kv.page_size >= 32 && 128 % kv.page_size == 0;
  const bool row_pages = kv.kv_indices != nullptr && !paged_boxes && kv.stride_page == kv.page_size * kv.stride_slot &&
                         kv.num_pages <= INT32_MAX / kv.page_size;
  const bool as_rows = kv.kv_indices == nullptr || row_pages;  // the 3-d view
  const int64_t rows = row_pages ? kv.num_pages * kv.page_size : kv.num_pages;
  // (Box coordinates are int32: larger caches keep cp.async.)
  if (encode == nullptr || kv.num_pages <= 0 || kv.num_pages > INT32_MAX ||
      (!as_rows && !paged_boxes)) {
    return maps;
  }
  const cuuint64_t bytes = sizeof(T);
  const cuuint32_t rank = as_rows ? 3 : 4;
  const cuuint64_t ragged_dims[3] = {D, cuuint64_t(num_kv_heads), cuuint64_t(rows)};
  const cuuint64_t paged_dims[4] = {D, cuuint64_t(kv.page_size), cuuint64_t(num_kv_heads), cuuint64_t(kv.num_pages)};
  const cuuint64_t ragged_strides[2] = {kv.stride_head * bytes, (row_pages ? kv.stride_slot : kv.stride_page) * bytes};
  const cuuint64_t paged_strides[3] = {kv.stride_slot * bytes, kv.stride_head * bytes, kv.stride_page * bytes};
  const cuuint32_t ragged_box[3] = {64, 1, 128};
  const cuuint32_t paged_box[4] = {64, cuuint32_t(kv.page_size), 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  for (CUtensorMap* map : {&maps.k, &maps.v}) {
    void* base = const_cast<void*>(map == &maps.k ? kv.k : kv.v);
    const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, rank, base, as_rows ? ragged_dims : paged_dims,
                              as_rows ? ragged_strides : paged_strides, as_rows ? ragged_box : paged_box, unit,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return KvTensorMaps{};
  }
  maps.box_rows = row_pages ? 0 : as_rows ? 128 : kv.page_size;
  maps.row_pages = row_pages;
  return maps;
}

#ifdef __CUDACC__
// The barrier's phase also waits for `bytes` more to land (this thread's arrival included).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  JAXINFER_SM90A("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

// One box to dst (1024-byte aligned for the swizzle), counted on bar.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  JAXINFER_SM90A(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  JAXINFER_SM90A(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}
#endif

}  // namespace jaxinfer
