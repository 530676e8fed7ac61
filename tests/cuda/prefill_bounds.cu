// Standalone check, run under compute-sanitizer memcheck by scripts/gpu_check.sh
// (JAX itself does not start under the sanitizer): the prefill kernel given a
// corrupt plan must not touch memory outside the exactly-sized buffers it is
// handed, paged or ragged, with or without KV splits, in either claim order.
#include <cuda_bf16.h>

#include "csrc/prefill.h"
#include "tests/cuda/check.h"

int main() {
  // 40 pages: 320 rows ragged, room for whole 128-key tiles (copied without resolving
  // rows); paged, a run of 32 consecutive pages (two such tiles) before bad entries.
  const int total_q = 5, heads = 4, kv_heads = 2, dim = 128, page = 8, pages = 40;
  std::vector<__nv_bfloat16> q(total_q * heads * dim, __float2bfloat16(0.5f));
  std::vector<__nv_bfloat16> kv(size_t(pages) * page * kv_heads * dim, __float2bfloat16(0.25f));
  const int big = 1 << 30;
  // request, q_begin, q_len, row_begin, kv_len, kv_begin, kv_end, mask_begin, split, split_begin, split_end
  const std::vector<int> items = {
      0, 0, 1000, 0, 100000, 0, 1000000, -5, 0, -100, big,    // q and keys past the buffers
      1, -3, 2, -64, 70, -9, 4, 0, 7, 0, 70,                  // negative offsets, split past the count
      2, 4, 3, 64, 10, 2, 3, 1 << 29, -1, 64, 0,              // rows past q_len, empty split
      -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,                       // padding
      3, 2, 3, 0, 2147483000, 0, 6, 0, 1, 2147482000, 2147483647,  // positions near INT_MAX
  };
  for (int splits : {1, 2}) {
    for (bool paged : {true, false}) {
      jaxinfer::PrefillParams p{};
      p.heads_inner = splits == 2 && paged;  // a fused cascade's order
      p.dtype = jaxinfer::DType::kBFloat16;
      p.num_qo_heads = heads, p.num_kv_heads = kv_heads, p.head_dim = dim;
      p.num_items = static_cast<int>(items.size() / jaxinfer::kPfItemFields);
      p.total_q = total_q;
      p.q = upload(q), p.kv.k = upload(kv), p.kv.v = upload(kv);
      p.items = upload(items);
      std::vector<unsigned char> mask(13, 1);
      p.custom_mask = upload(mask), p.mask_len = 13;
      if (paged) {
        p.kv.page_size = page, p.kv.num_pages = pages;
        p.kv.stride_page = page * kv_heads * dim, p.kv.stride_slot = kv_heads * dim, p.kv.stride_head = dim;
        std::vector<int> indices(pages);
        for (int e = 0; e < pages; ++e) indices[e] = e;
        indices[32] = 99, indices[33] = -1;
        p.kv.kv_indices = upload(indices), p.kv.num_kv_indices = pages;
      } else {
        p.kv.page_size = 1, p.kv.num_pages = pages * page;  // rows of a ragged k, v
        p.kv.stride_page = kv_heads * dim, p.kv.stride_slot = 0, p.kv.stride_head = dim;
      }
      cudaMalloc(&p.o, size_t(total_q) * heads * dim * sizeof(__nv_bfloat16));
      cudaMalloc(&p.lse, size_t(total_q) * heads * sizeof(float));
      cudaMalloc(&p.work_counter, sizeof(*p.work_counter));
      p.num_splits = splits;
      if (splits > 1) {
        cudaMalloc(&p.partial_o, size_t(total_q) * splits * heads * dim * sizeof(float));
        cudaMalloc(&p.partial_lse, size_t(total_q) * splits * heads * sizeof(float));
      }
      CHECK(jaxinfer::prefill_cuda(p, nullptr));
      CHECK(cudaDeviceSynchronize());
    }
  }
  std::printf("prefill_bounds: ok\n");
  return 0;
}
