// The prefill kernel alone, without JAX: times launch_prefill on the shapes of
// benchmarks/prefill.py (ragged K/V, bf16, 32/8 heads, D = 128), then on two
// decode-shaped batches (one query a request: a cascade's suffix level, in
// TB/s of K and V), and checks small causal batches (self-attention, and one or
// three queries a request) against a plain fp32 kernel. For A/B runs of kernel
// changes: each build is one binary, so variants compile side by side.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I. -DJAXINFER_WITH_CUDA \
//     --expt-relaxed-constexpr benchmarks/prefill_kernel.cu \
//     csrc/prefill_inst/prefill_hd128.cu -o /tmp/prefill_kernel && /tmp/prefill_kernel
#include <cuda_bf16.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "csrc/prefill.h"
#include "csrc/prefill_plan.h"
#include "csrc/tma.cuh"
#include "tests/cuda/check.h"

namespace {

constexpr int kHq = 32, kHkv = 8, kD = 128;
using bf16 = __nv_bfloat16;

// o[t, h] = softmax(sm_scale q k^T over visible keys) v, one warp per (token,
// head), each lane 4 of the 128 columns. Request b's kv_len[b] keys start at
// row kv_row[b] of k and v; its queries are the last positions of its keys.
__global__ void reference(const bf16* q, const bf16* k, const bf16* v, const int* qo_indptr, const int* kv_row,
                          const int* kv_len, int batch, bool causal, float sm_scale, float* o) {
  const int total_q = qo_indptr[batch];
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (i >= total_q * kHq) return;
  const int t = i / kHq, h = i % kHq, kvh = h / (kHq / kHkv);
  int b = 0;
  while (qo_indptr[b + 1] <= t) ++b;
  const int begin = qo_indptr[b], q_len = qo_indptr[b + 1] - begin, key0 = kv_row[b];
  const int pos = kv_len[b] - q_len + t - begin, end = causal ? pos + 1 : kv_len[b];
  float qd[4], acc[4] = {}, m = -INFINITY, l = 0.f;
  for (int d = 0; d < 4; ++d) qd[d] = __bfloat162float(q[(size_t(t) * kHq + h) * kD + lane * 4 + d]);
  for (int j = 0; j < end; ++j) {
    const size_t row = (size_t(key0 + j) * kHkv + kvh) * kD + lane * 4;
    float s = 0.f;
    for (int d = 0; d < 4; ++d) s += qd[d] * __bfloat162float(k[row + d]);
    for (int step = 16; step > 0; step /= 2) s += __shfl_xor_sync(0xffffffff, s, step);
    s *= sm_scale;
    const float m_new = fmaxf(m, s), scale = expf(m - m_new), e = expf(s - m_new);
    l = l * scale + e;
    for (int d = 0; d < 4; ++d) acc[d] = acc[d] * scale + e * __bfloat162float(v[row + d]);
    m = m_new;
  }
  for (int d = 0; d < 4; ++d) o[size_t(i) * kD + lane * 4 + d] = l > 0.f ? acc[d] / l : 0.f;
}

// Standard normal samples (Box-Muller on a hash of the index), made on the
// device: the host's generator took seconds of every run at the large shapes.
__device__ uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

__global__ void fill_normal(bf16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint32_t a = mix(uint32_t(i) ^ mix(seed)), c = mix(a + 0x9e3779b9u);
    const float u1 = ((a >> 8) + 0.5f) * 0x1p-24f, u2 = (c >> 8) * 0x1p-24f;  // u1 in (0, 1)
    x[i] = __float2bfloat16(sqrtf(-2.f * __logf(u1)) * __cosf(6.2831853f * u2));
  }
}

struct Batch {
  std::vector<int> qo_indptr, kv_row, kv_len;  // kv_row[b]: request b's first key row
  bool causal;
  bf16 *q, *k, *v, *o;
  float* lse;
  jaxinfer::PrefillParams p{};
};

// Attention over the requests' key lengths; a request's queries are its last
// q_len positions (q_len 0: all of them, self-attention). page_size 0: ragged
// K/V (rows of k and v); else K/V through a page table (pages in order, each
// request's keys from a page boundary).
Batch make_batch(const std::vector<int>& lengths, bool causal, int page_size, std::mt19937& rng, int q_len = 0) {
  Batch b;
  b.causal = causal;
  b.kv_len = lengths;
  b.qo_indptr = {0};
  b.kv_row = {0};
  const int unit = std::max(page_size, 1);
  for (int len : lengths) {
    b.qo_indptr.push_back(b.qo_indptr.back() + (q_len > 0 ? q_len : len));
    b.kv_row.push_back(b.kv_row.back() + (len + unit - 1) / unit * unit);
  }
  const int batch = static_cast<int>(lengths.size()), total = b.qo_indptr.back(), kv_rows = b.kv_row.back();
  auto random = [&](size_t n) {
    bf16* x = nullptr;
    cudaMalloc(&x, n * sizeof(bf16));
    fill_normal<<<1024, 256>>>(x, n, static_cast<uint32_t>(rng()));
    return x;
  };
  b.q = random(size_t(total) * kHq * kD);
  b.k = random(size_t(kv_rows) * kHkv * kD);
  b.v = random(size_t(kv_rows) * kHkv * kD);
  cudaMalloc(&b.o, size_t(total) * kHq * kD * sizeof(bf16));
  cudaMalloc(&b.lse, size_t(total) * kHq * sizeof(float));

  // Entries of the page table (ragged: rows) that hold each request's keys.
  std::vector<int> kv_len(lengths), kv_begin(batch), kv_end(batch), mask_begin(batch, 0);
  for (int i = 0; i < batch; ++i) kv_begin[i] = b.kv_row[i] / unit, kv_end[i] = (b.kv_row[i] + lengths[i] + unit - 1) / unit;
  const int group = kHq / kHkv;
  const int64_t capacity = (int64_t(total) * group / jaxinfer::kPrefillTileRows + batch + 1);
  std::vector<int32_t> items(capacity * jaxinfer::kPfItemFields);
  const int64_t n = jaxinfer::split_prefill_work(b.qo_indptr.data(), kv_len.data(), kv_begin.data(), kv_end.data(),
                                                 mask_begin.data(), batch, group, jaxinfer::kPrefillTileRows, 1,
                                                 total, items.data(), capacity);
  items.resize(n * jaxinfer::kPfItemFields);

  jaxinfer::PrefillParams& p = b.p;
  p.dtype = jaxinfer::DType::kBFloat16;
  p.num_qo_heads = kHq, p.num_kv_heads = kHkv, p.head_dim = kD;
  p.num_items = static_cast<int>(n);
  p.total_q = total;
  p.q = b.q, p.kv.k = b.k, p.kv.v = b.v;
  p.kv.page_size = unit, p.kv.num_pages = kv_rows / unit;  // NHD pages (ragged: pages of one row)
  p.kv.stride_page = unit * kHkv * kD, p.kv.stride_slot = kHkv * kD, p.kv.stride_head = kD;
  if (page_size > 0) {
    std::vector<int32_t> pages(p.kv.num_pages);
    for (int i = 0; i < p.kv.num_pages; ++i) pages[i] = i;
    p.kv.kv_indices = upload(pages);
    p.kv.num_kv_indices = p.kv.num_pages;
  }
  p.items = upload(items);
  p.o = b.o, p.lse = b.lse;
  cudaMalloc(&p.work_counter, sizeof(*p.work_counter));
  p.num_splits = 1;
  p.variant.sm_scale = 1.f / std::sqrt(float(kD));
  p.variant.causal = causal;
  return b;
}

// Causal attention of `lengths` keys a request, the last q_len positions of
// each as queries (0: all), against the fp32 reference; 0 if it matches.
int check(int page_size, std::mt19937& rng, const std::vector<int>& lengths, int q_len) {
  Batch b = make_batch(lengths, true, page_size, rng, q_len);
  const int batch = static_cast<int>(lengths.size());
  const int total = b.qo_indptr.back();
  CHECK(cudaMemset(b.o, 0xff, size_t(total) * kHq * kD * sizeof(bf16)));  // NaN poison
  CHECK(jaxinfer::launch_prefill<kD>(b.p, nullptr));
  float* ref = nullptr;
  cudaMalloc(&ref, size_t(total) * kHq * kD * sizeof(float));
  int *indptr = upload(b.qo_indptr), *kv_row = upload(b.kv_row), *kv_len = upload(b.kv_len);
  reference<<<(total * kHq * 32 + 127) / 128, 128>>>(b.q, b.k, b.v, indptr, kv_row, kv_len, batch, true,
                                                     b.p.variant.sm_scale, ref);
  CHECK(cudaDeviceSynchronize());
  std::vector<bf16> got(size_t(total) * kHq * kD);
  std::vector<float> want(got.size());
  cudaMemcpy(got.data(), b.o, got.size() * sizeof(bf16), cudaMemcpyDeviceToHost);
  cudaMemcpy(want.data(), ref, want.size() * sizeof(float), cudaMemcpyDeviceToHost);
  float err = 0.f;
  for (size_t i = 0; i < got.size(); ++i) {
    const float d = std::fabs(__bfloat162float(got[i]) - want[i]);
    err = std::isnan(d) ? INFINITY : std::max(err, d);
  }
  std::printf("check (causal, %zu requests, %s queries): max |error| %.4f %s\n", lengths.size(),
              q_len ? std::to_string(q_len).c_str() : "all", err, err < 0.03f ? "ok" : "FAIL");
  return err < 0.03f ? 0 : 1;
}

}  // namespace

// Optional argument: the index of the one case to time (for a profiler run).
// PREFILL_PAGE_SIZE=N in the environment: K/V through a page table of N-key
// pages (TMA copies one page per box for N = 32-128, cp.async otherwise).
int main(int argc, char** argv) {
  const auto started = std::chrono::steady_clock::now();
  const int only = argc > 1 ? std::atoi(argv[1]) : -1;
  const char* page_env = std::getenv("PREFILL_PAGE_SIZE");
  const int page_size = page_env ? std::max(std::atoi(page_env), 1) : 0;
  std::mt19937 rng(0);
  // Timed anyway: A/B builds may break results on purpose. The decode-shaped
  // batches (one query, or three, a request) take the kernels' paths for works
  // of few rows.
  const int failed = check(page_size, rng, {1, 7, 300, 1000, 129}, 0) |
                     check(page_size, rng, {1, 100, 128, 129, 300, 700}, 1) |
                     check(page_size, rng, {3, 100, 128, 129, 300, 700}, 3);
  struct Case { int batch, length; bool causal; int q_len = 0; };
  const Case cases[] = {{1, 8192, true}, {1, 16384, true}, {4, 4096, true}, {16, 1024, true}, {4, 4096, false},
                        {64, 512, true, 1}, {128, 256, true, 1}};
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int index = 0; index < 7; ++index) {
    if (only >= 0 && index != only) continue;
    const Case& c = cases[index];
    Batch b = make_batch(std::vector<int>(c.batch, c.length), c.causal, page_size, rng, c.q_len);
    if (index == 0 || only >= 0) {
      const jaxinfer::KvTensorMaps maps = jaxinfer::encode_kv_tensor_maps<bf16, kD>(b.p.kv, kHkv);
      std::printf("K/V: %s, copies by %s\n", page_size ? "paged (pages in order)" : "ragged",
                  maps.box_rows ? "TMA" : maps.row_pages ? "TMA for runs of consecutive pages" : "cp.async");
    }
    const double pairs = c.causal ? double(c.length) * (c.length + 1) / 2 : double(c.length) * c.length;
    const double flops = 4.0 * kHq * kD * c.batch * pairs;
    for (int i = 0; i < 3; ++i) CHECK(jaxinfer::launch_prefill<kD>(b.p, nullptr));
    std::vector<float> ms;
    constexpr int kCalls = 10;
    for (int rep = 0; rep < 7; ++rep) {
      cudaEventRecord(start);
      for (int i = 0; i < kCalls; ++i) jaxinfer::launch_prefill<kD>(b.p, nullptr);
      cudaEventRecord(stop);
      CHECK(cudaEventSynchronize(stop));
      float t = 0.f;
      cudaEventElapsedTime(&t, start, stop);
      ms.push_back(t / kCalls);
    }
    std::sort(ms.begin(), ms.end());
    if (c.q_len > 0) {  // decode-shaped: K and V bytes moved
      const double bytes = 2.0 * c.batch * c.length * kHkv * kD * sizeof(bf16);
      std::printf("%3d x %5d keys, %d queries each %8.1f us  %5.2f TB/s\n", c.batch, c.length, c.q_len, ms[3] * 1e3,
                  bytes / (ms[3] * 1e-3) / 1e12);
    } else {
      std::printf("%2d x %5d %-10s %7.3f ms  %5.0f TFLOP/s\n", c.batch, c.length, c.causal ? "causal" : "non-causal",
                  ms[3], flops / (ms[3] * 1e-3) / 1e12);
    }
  }
  // What a run costs in device time, for planning A/B calls.
  std::printf("run: %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return failed;
}
