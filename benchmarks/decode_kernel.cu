// The decode kernel alone, without JAX: times several kernel configurations
// (warps per CTA, pipeline stages; csrc/decode.cuh Config) on the shapes of
// benchmarks/decode.py (bf16, D = 128, page 16, pages in random order), with
// CUDA events around a CUDA graph of back-to-back calls (best of 5), and checks every configuration's output
// against a plain fp32 kernel. For A/B runs of kernel changes in one device call.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I. -DJAXINFER_WITH_CUDA \
//     --expt-relaxed-constexpr benchmarks/decode_kernel.cu -o /tmp/decode_kernel
//   /tmp/decode_kernel [nhd | hnd | sweep] [JAXINFER_PDL: 0 | 1] [pages: 0 shuffled | 1 in order | 2 no table | 3 shared]
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "csrc/decode.cuh"
#include "csrc/decode_plan.h"
#include "tests/cuda/check.h"

namespace {

using bf16 = __nv_bfloat16;
constexpr int kD = 128, kPage = 16;

__global__ void fill_random(bf16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    x[i] = __float2bfloat16(float(h & 0xffff) / 32768.f - 1.f);
  }
}

// o[b, h] = softmax(sm_scale q k^T) v over request b's keys in fp32, one thread per (b, h).
__global__ void reference_kernel(const jaxinfer::DecodeParams p, int kv_len, int pages_per_seq, float* o) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.num_qo_heads) return;
  const int b = i / p.num_qo_heads, h = i % p.num_qo_heads, kvh = h / (p.num_qo_heads / p.num_kv_heads);
  const bf16* q = static_cast<const bf16*>(p.q) + size_t(i) * kD;
  float m = -INFINITY, l = 0.f, acc[kD] = {};
  for (int pos = 0; pos < kv_len; ++pos) {
    const int64_t page = p.kv.kv_indices[b * pages_per_seq + pos / kPage];
    const int64_t off = page * p.kv.stride_page + (pos % kPage) * p.kv.stride_slot + kvh * p.kv.stride_head;
    const bf16* k = static_cast<const bf16*>(p.kv.k) + off;
    const bf16* v = static_cast<const bf16*>(p.kv.v) + off;
    float sc = 0.f;
    for (int d = 0; d < kD; ++d) sc += __bfloat162float(q[d]) * __bfloat162float(k[d]);
    sc *= p.variant.sm_scale;
    const float m_new = fmaxf(m, sc), scale = expf(m - m_new), e = expf(sc - m_new);
    l = l * scale + e;
    for (int d = 0; d < kD; ++d) acc[d] = acc[d] * scale + e * __bfloat162float(v[d]);
    m = m_new;
  }
  for (int d = 0; d < kD; ++d) o[size_t(i) * kD + d] = l > 0.f ? acc[d] / l : 0.f;
}

// Page order: 0 shuffled (as a long-running server's cache), 1 in order, 2 in
// order without a page table (the kernel's ragged path: no kv_indices reads),
// 3 every request on the same pages (a shared prefix).
int g_pages = 0;

struct Case {
  int qo_heads, kv_heads, batch, kv_len;
};

struct Buffers {
  bf16 *q, *k, *v, *o;
  float *lse, *partial_o, *partial_lse;
  int32_t *kv_indices, *items, *cta_items, *merge_indptr;
};

float time_ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0.f;
  cudaEventElapsedTime(&ms, a, b);
  return ms;
}

// Runs configuration Cfg on case c; returns 1 on a CUDA error or a wrong
// output. `reference` holds the fp32 kernel's output, computed once per case.
template <typename Cfg>
int run(const char* name, const Case& c, bool hnd, std::vector<float>& reference) {
  using namespace jaxinfer;
  int sms = 0, per_sm = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK(cudaFuncSetAttribute(decode_detail::decode_kernel<bf16, kD, Cfg>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem));
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_detail::decode_kernel<bf16, kD, Cfg>,
                                                      Cfg::kThreads, Cfg::kSmem));
  const int num_ctas = std::max(1, sms * per_sm / c.kv_heads);
  const int pages_per_seq = (c.kv_len + kPage - 1) / kPage, num_pages = c.batch * pages_per_seq;

  std::vector<int32_t> indptr(c.batch + 1), last(c.batch, (c.kv_len - 1) % kPage + 1), indices(num_pages);
  for (int b = 0; b <= c.batch; ++b) indptr[b] = b * pages_per_seq;
  std::iota(indices.begin(), indices.end(), 0);
  if (g_pages == 0) std::shuffle(indices.begin(), indices.end(), std::mt19937(7));
  if (g_pages == 3) {  // one shared prefix: every request names the same pages (L2 reuse across CTAs)
    for (int i = 0; i < num_pages; ++i) indices[i] = i % pages_per_seq;
  }
  const int64_t capacity = c.batch + num_ctas;
  std::vector<int32_t> items(capacity * kItemFields), cta_items(num_ctas + 1), merge_indptr(c.batch + 1);
  const int64_t num_items = split_decode_work(indptr.data(), last.data(), c.batch, kPage, Cfg::kTileKeys,
                                              num_ctas, items.data(), capacity, cta_items.data(),
                                              merge_indptr.data(), c.batch);

  const size_t cache = size_t(num_pages) * kPage * c.kv_heads * kD;
  const size_t q_elems = size_t(c.batch) * c.qo_heads * kD;
  Buffers d{};
  CHECK(cudaMalloc(&d.q, q_elems * 2));
  CHECK(cudaMalloc(&d.k, cache * 2));
  CHECK(cudaMalloc(&d.v, cache * 2));
  CHECK(cudaMalloc(&d.o, q_elems * 2));
  CHECK(cudaMalloc(&d.lse, size_t(c.batch) * c.qo_heads * 4));
  CHECK(cudaMalloc(&d.partial_o, size_t(capacity) * c.qo_heads * kD * 4));
  CHECK(cudaMalloc(&d.partial_lse, size_t(capacity) * c.qo_heads * 4));
  fill_random<<<1024, 256>>>(d.q, q_elems, 1);
  fill_random<<<1024, 256>>>(d.k, cache, 2);
  fill_random<<<1024, 256>>>(d.v, cache, 3);
  d.kv_indices = upload(indices), d.items = upload(items), d.cta_items = upload(cta_items);
  d.merge_indptr = upload(merge_indptr);

  DecodeParams p{};
  p.dtype = DType::kBFloat16;
  p.batch = c.batch, p.num_qo_heads = c.qo_heads, p.num_kv_heads = c.kv_heads, p.head_dim = kD;
  p.num_items = static_cast<int>(capacity), p.num_ctas = num_ctas;
  p.q = d.q, p.kv.k = d.k, p.kv.v = d.v, p.kv.page_size = kPage, p.kv.num_pages = num_pages;
  p.kv.kv_indices = d.kv_indices, p.kv.num_kv_indices = num_pages;
  p.kv.stride_page = int64_t(kPage) * c.kv_heads * kD;
  p.kv.stride_slot = hnd ? kD : int64_t(c.kv_heads) * kD;
  p.kv.stride_head = hnd ? int64_t(kPage) * kD : kD;
  p.items = d.items, p.cta_items = d.cta_items, p.merge_indptr = d.merge_indptr;
  p.o = d.o, p.lse = d.lse, p.partial_o = d.partial_o, p.partial_lse = d.partial_lse;
  p.variant.sm_scale = 1.f / std::sqrt(float(kD));
  const DecodeParams with_table = p;  // for the reference
  if (g_pages == 2) p.kv.kv_indices = nullptr, p.kv.num_kv_indices = 0;

  CHECK(cudaMemset(d.o, 0xff, q_elems * 2));  // poison: NaN where nothing is written
  CHECK((decode_detail::launch<bf16, kD, Cfg>(p, nullptr)));
  CHECK(cudaDeviceSynchronize());
  std::vector<bf16> out(q_elems);
  CHECK(cudaMemcpy(out.data(), d.o, q_elems * 2, cudaMemcpyDeviceToHost));
  float err = 0.f;
  if (reference.empty()) {  // the fp32 reference, once per case
    float* ref = nullptr;
    CHECK(cudaMalloc(&ref, q_elems * 4));
    reference_kernel<<<(c.batch * c.qo_heads + 63) / 64, 64>>>(with_table, c.kv_len, pages_per_seq, ref);
    reference.resize(q_elems);
    CHECK(cudaMemcpy(reference.data(), ref, q_elems * 4, cudaMemcpyDeviceToHost));
    cudaFree(ref);
  }
  for (size_t i = 0; i < q_elems; ++i) {
    const float x = __bfloat162float(out[i]);
    err = std::isnan(x) ? INFINITY : std::max(err, std::fabs(x - reference[i]));
  }

  // kIters calls captured in one CUDA graph (as XLA's command buffers run
  // them), so the host's launch rate does not bound the small cases.
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  constexpr int kIters = 50;
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kIters; ++i) decode_detail::launch<bf16, kD, Cfg>(p, stream);
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphLaunch(exec, stream));  // warm-up
  float best = INFINITY;
  for (int round = 0; round < 5; ++round) {
    cudaEventRecord(e0, stream);
    CHECK(cudaGraphLaunch(exec, stream));
    cudaEventRecord(e1, stream);
    CHECK(cudaEventSynchronize(e1));
    best = std::min(best, time_ms(e0, e1));
  }
  cudaGraphExecDestroy(exec), cudaGraphDestroy(graph), cudaStreamDestroy(stream);
  const double us = best * 1e3 / kIters;
  const double bytes = 2.0 * cache * 2;
  std::printf("%-7s %2d/%d b=%-3d kv=%-6d %s | %2d CTA/SM %3d slots %4lld items | %7.1f us %4.2f TB/s | max diff %.3g\n",
              name, c.qo_heads, c.kv_heads, c.batch, c.kv_len, hnd ? "HND" : "NHD", per_sm, num_ctas,
              static_cast<long long>(num_items), us, bytes / us * 1e-6, err);
  const bool wrong = !(err <= 1e-2f);  // bf16 output of values below 1
  for (void* x : {(void*)d.q, (void*)d.k, (void*)d.v, (void*)d.o, (void*)d.lse, (void*)d.partial_o,
                  (void*)d.partial_lse, (void*)d.kv_indices, (void*)d.items, (void*)d.cta_items,
                  (void*)d.merge_indptr}) {
    cudaFree(x);
  }
  return wrong ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  using jaxinfer::decode_detail::Config;
  if (argc > 2) setenv("JAXINFER_PDL", argv[2], 1);  // the merge as a programmatic dependent (default 1)
  if (argc > 3) g_pages = std::atoi(argv[3]);          // page order: see g_pages
  const bool hnd = argc > 1 && std::strcmp(argv[1], "hnd") == 0;  // [nhd|hnd|sweep] [PDL 0|1]
  if (argc > 1 && std::strcmp(argv[1], "sweep") == 0) {  // fixed cost: time against length at batch 1
    for (int kv : {16, 256, 1024, 4096, 8192, 16384, 32768, 65536, 131072}) {
      std::vector<float> reference;
      if (run<Config<kD>>("landed", {32, 8, 1, kv}, false, reference)) return 1;
    }
    for (int b : {2, 4, 8, 16, 32}) {
      std::vector<float> reference;
      if (run<Config<kD>>("landed", {32, 8, b, 16384}, false, reference)) return 1;
    }
    return 0;
  }
  const Case cases[] = {{32, 8, 1, 16384}, {32, 8, 1, 4096}, {64, 8, 1, 1024}, {32, 8, 16, 4096},
                        {32, 8, 64, 4096}, {64, 8, 64, 4096}, {32, 8, 256, 1024}};
  for (const Case& c : cases) {
    std::vector<float> reference;
    int bad = 0;
    bad |= run<Config<kD>>("landed", c, hnd, reference);
    bad |= run<Config<kD, 4, 2, 3, false, false>>("normalL2", c, hnd, reference);  // K/V without evict-first
    bad |= run<Config<kD, 4, 3, 2, true>>("w4s3x2", c, hnd, reference);  // 2 CTAs/SM, Q in registers
    bad |= run<Config<kD, 4, 4, 1, true>>("w4s4x1", c, hnd, reference);  // 1 CTA/SM: instruction-bound
    if (bad) return 1;
  }
  return 0;
}
