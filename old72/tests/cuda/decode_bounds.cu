// Standalone check, run under compute-sanitizer memcheck by scripts/gpu_check.sh
// (JAX itself does not start under the sanitizer): the decode kernels given
// corrupt page tables and a corrupt plan must not touch memory outside the
// exactly-sized buffers they are handed.
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I. -DJAXINFER_WITH_CUDA \
//        tests/cuda/decode_bounds.cu csrc/decode.cu csrc/decode_inst/decode_hd128.cu \
//        csrc/decode_inst/decode_hd64.cu csrc/decode_inst/decode_hd256.cu -o /tmp/decode_bounds
#include <cuda_bf16.h>

#include "csrc/decode.h"
#include "tests/cuda/check.h"

int main() {
  const int batch = 3, heads = 8, kv_heads = 2, dim = 128, page = 8, pages = 16, items = 6;
  std::vector<__nv_bfloat16> q(batch * heads * dim, __float2bfloat16(0.5f));
  std::vector<__nv_bfloat16> kv(size_t(pages) * page * kv_heads * dim, __float2bfloat16(0.25f));
  jaxinfer::DecodeParams p{};
  p.dtype = jaxinfer::DType::kBFloat16;
  p.batch = batch, p.num_qo_heads = heads, p.num_kv_heads = kv_heads, p.head_dim = dim;
  p.num_items = items, p.num_ctas = 4;
  p.q = upload(q), p.kv.k = upload(kv), p.kv.v = upload(kv);
  p.kv.page_size = page, p.kv.num_pages = pages, p.kv.num_kv_indices = 5;
  p.kv.stride_page = page * kv_heads * dim, p.kv.stride_slot = kv_heads * dim, p.kv.stride_head = dim;
  // Corrupt tables: page ids out of range; items naming absent requests, page
  // ranges outside kv_indices, lengths past the pages and endless key ranges;
  // CTA slots overlapping and outside the items.
  p.kv.kv_indices = upload(std::vector<int>{3, 99, -1, 15, 16});
  const int big = 1 << 30;
  p.items = upload(std::vector<int>{
      // request, kv_start, kv_end, kv_len, page_begin, page_end
      0, 0, 100000, big, 0, 5,    //
      1000000, 0, 64, 64, 0, 5,   //
      2, -50, 200000, 9, -7, 3,   //
      -1, 0, 0, 0, 0, 0,          //
      1, 5, 100000, 100000, 2, 1000000,  //
      0, big, big, big, 4, 5});
  p.cta_items = upload(std::vector<int>{0, 3, -2, 1000000, 6});
  p.merge_indptr = upload(std::vector<int>{0, 1000000, -4, 2});
  cudaMalloc(&p.o, batch * heads * dim * sizeof(__nv_bfloat16));
  cudaMalloc(&p.lse, batch * heads * sizeof(float));
  cudaMalloc(&p.partial_o, size_t(items) * heads * dim * sizeof(float));
  cudaMalloc(&p.partial_lse, size_t(items) * heads * sizeof(float));
  CHECK(jaxinfer::decode_cuda(p, nullptr));
  CHECK(cudaDeviceSynchronize());
  std::printf("decode_bounds: ok\n");
  return 0;
}
