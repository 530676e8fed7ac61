// Sorting-free sampling kernels (see csrc/sampling.h for the method).
// One CTA per row; each pass streams the row from global memory (L2 holds it
// between the passes of a round for all but the largest batches).
#include <cfloat>
#include <cmath>

#include "csrc/sampling.h"

namespace jaxinfer {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

// Philox4x32-10 (Salmon et al. 2011): four 32-bit words from a 128-bit counter
// and a 64-bit key.
__device__ __forceinline__ uint4 philox(uint4 c, uint2 k) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = __umulhi(kM1, c.z), lo1 = kM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += kW0;
    k.y += kW1;
  }
  return c;
}

// Gumbel noise from 32 random bits: u in (0, 1), G = -log(-log u).
__device__ __forceinline__ float gumbel(uint32_t bits) {
  const float u = (float(bits >> 8) + 0.5f) * (1.f / 16777216.f);
  return -__logf(-__logf(u));
}

struct Best {
  float score;
  int64_t token;
};

__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.score > a.score || (b.score == a.score && b.token >= 0 && (a.token < 0 || b.token < a.token))) return b;
  return a;
}

// Block-wide reductions (every thread gets the result); `scratch` holds kWarps entries.
template <typename T, typename Op>
__device__ T block_reduce(T x, Op op, T* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = op(x, __shfl_xor_sync(0xffffffff, x, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch free from any earlier use
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < kWarps; ++w) x = op(x, scratch[w]);
  return x;
}

__device__ Best block_best(Best x, Best* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    Best other{__shfl_xor_sync(0xffffffff, x.score, off),
               static_cast<int64_t>(__shfl_xor_sync(0xffffffff, static_cast<long long>(x.token), off))};
    x = better(x, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < kWarps; ++w) x = better(x, scratch[w]);
  return x;
}

__global__ void __launch_bounds__(kThreads) sampling_kernel(const SamplingParams p) {
  __shared__ float s_float[kWarps];
  __shared__ int64_t s_int[kWarps];
  __shared__ Best s_best[kWarps];
  const int64_t row = blockIdx.x;
  const float* x = p.probs + row * p.vocab;
  const uint2 key = make_uint2(p.seed[0], p.seed[1]);
  auto add_f = [](float a, float b) { return a + b; };
  auto add_i = [](int64_t a, int64_t b) { return a + b; };
  auto max_f = [](float a, float b) { return fmaxf(a, b); };

  // Min-p scales by the row maximum: one pass before the draw. The row total
  // (top-p's reference mass) is summed during the first draw.
  float row_max = 0.f, total = 0.f;
  if (p.mode == SamplingMode::kMinP) {
    for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) row_max = fmaxf(row_max, x[j]);
    row_max = block_reduce(row_max, max_f, s_float);
  }

  // Candidates: p > low and p >= floor_incl. Round r draws with counter (r, row, j / 4).
  float low = 0.f;
  const float floor_incl = p.mode == SamplingMode::kMinP ? fmaxf(p.param[row], 0.f) * row_max : 0.f;
  const int64_t k = p.mode == SamplingMode::kTopK ? max(p.top_k[row], 1) : 0;
  int64_t token = -1;
  for (uint32_t round = 0;; ++round) {
    Best best{-INFINITY, -1};
    for (int64_t j4 = threadIdx.x; j4 * 4 < p.vocab; j4 += kThreads) {
      const uint4 bits = philox(make_uint4(round, static_cast<uint32_t>(row), static_cast<uint32_t>(j4),
                                           static_cast<uint32_t>(j4 >> 32)), key);
      const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j4 * 4 + e;
        if (j >= p.vocab) break;
        const float v = x[j];
        if (round == 0 && v > 0.f) total += v;
        if (v > low && v >= floor_incl) best = better(best, Best{__logf(v) + gumbel(words[e]), j});
      }
    }
    best = block_best(best, s_best);
    token = best.token;
    if (token < 0 || p.mode == SamplingMode::kPlain || p.mode == SamplingMode::kMinP) break;
    if (round == 0 && p.mode == SamplingMode::kTopP) total = block_reduce(total, add_f, s_float);

    // Is the drawn token in the filtered set? (The row maximum always is: nothing
    // lies above it, so the rounds end.)
    const float pt = x[token];
    int64_t count_above = 0;
    float mass_above = 0.f;
    for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
      const float v = x[j];
      if (v > pt) ++count_above, mass_above += v;
    }
    bool accept;
    if (p.mode == SamplingMode::kTopK) {
      accept = block_reduce(count_above, add_i, s_int) < k;
    } else {
      const float top_p = p.param[row];
      mass_above = block_reduce(mass_above, add_f, s_float);
      accept = mass_above == 0.f || top_p >= 1.f || mass_above < top_p * total;
    }
    if (accept) break;
    low = pt;
  }
  if (threadIdx.x == 0) p.tokens[row] = static_cast<int32_t>(token);
}

}  // namespace

cudaError_t sampling_cuda(const SamplingParams& p, cudaStream_t stream) {
  if (p.batch > 0 && p.vocab > 0) sampling_kernel<<<p.batch, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jaxinfer
