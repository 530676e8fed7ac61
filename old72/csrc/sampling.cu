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

// Exponential noise from 32 random bits: u in (0, 1), E = -log u > 0. The
// argmax of p / E over a set is a draw proportional to p (the Gumbel-max
// trick: log p - log E is log p plus Gumbel noise).
__device__ __forceinline__ float exponential(uint32_t bits) {
  const float u = (float(bits >> 8) + 0.5f) * (1.f / 16777216.f);
  return -__logf(u);
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

// Order-preserving bits of a float: a larger float has a larger key.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float from_order_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Loads quad j4 of a row, x[4 j4 .. 4 j4 + 3]; values past the row are NaN,
// which every test here rejects. One 16-byte load when the row is aligned
// (any vocab that is a multiple of 4).
__device__ __forceinline__ void load_quad(const float* x, int64_t vocab, int64_t j4, float (&v)[4]) {
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && j4 * 4 + 4 <= vocab) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(x) + j4);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = j4 * 4 + e < vocab ? x[j4 * 4 + e] : NAN;
  }
}

// Calls f(v) for each quad of this thread's share of the row: quads
// threadIdx.x, threadIdx.x + kThreads, ..., in that order. Four quads are
// loaded before any is used, so each thread keeps 64 bytes in flight.
template <typename F>
__device__ __forceinline__ void for_each_quad(const float* x, int64_t vocab, F f) {
  constexpr int kUnroll = 4;
  for (int64_t j4 = threadIdx.x; j4 * 4 < vocab; j4 += kUnroll * kThreads) {
    float v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_quad(x, vocab, j4 + u * kThreads, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) f(v[u]);
  }
}

// Warp 0 (only) draws a token proportional to its value among the candidates
// of thread `share`'s share of the row (see for_each_quad): walking the
// share's quads in order, the first candidate where the running mass passes
// `target`, or the last candidate if rounding leaves the sum short.
template <typename IsCandidate>
__device__ int64_t draw_in_share(const float* x, int64_t vocab, int share, float target, IsCandidate is_candidate) {
  const int lane = threadIdx.x % 32;
  float carry = 0.f;
  int64_t last = -1;
  for (int64_t base = share; base * 4 < vocab; base += int64_t(32) * kThreads) {
    const int64_t j4 = base + int64_t(lane) * kThreads;
    float v[4];
    load_quad(x, vocab, j4, v);
    float mass = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) mass += is_candidate(v[e]) ? v[e] : 0.f;
    float running = mass;  // inclusive scan over the lanes
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const float up = __shfl_up_sync(0xffffffff, running, off);
      if (lane >= off) running += up;
    }
    // The lane whose quad passes the target walks its four values.
    const unsigned passing = __ballot_sync(0xffffffff, mass > 0.f && carry + running > target);
    const unsigned holding = __ballot_sync(0xffffffff, mass > 0.f);
    const int src = passing ? __ffs(passing) - 1 : (holding ? 31 - __clz(holding) : -1);
    if (src >= 0) {
      int64_t found = -1;
      float acc = carry + running - mass;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (!is_candidate(v[e])) continue;
        found = j4 * 4 + e;
        acc += v[e];
        if (passing && acc > target) break;
      }
      found = __shfl_sync(0xffffffff, found, src);
      if (passing) return found;
      last = found;
    }
    carry += __shfl_sync(0xffffffff, running, 31);
  }
  return last;
}

// Radix select over a row: walking the values from the largest down, the
// value at which the running weight (1 per element when by_mass is false,
// the value itself when true; NaN and, by mass, nonpositive values weigh
// nothing) first reaches `target`, or the smallest value if it never does.
// By count this is the target-th largest value; by mass, with target =
// top_p * total, the smallest value whose strictly-larger mass is under
// target. Four passes of 8 bits, per-warp histograms in `hist`
// ([kWarps][256]). Every thread returns the same value.
__device__ float select_threshold(const float* x, int64_t vocab, float target, bool by_mass,
                                  float (*hist)[256], uint32_t* s_choice, float* s_target) {
  const int warp = threadIdx.x / 32;
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kWarps * 256; i += kThreads) hist[i / 256][i % 256] = 0.f;
    __syncthreads();
    for_each_quad(x, vocab, [&](const float(&v)[4]) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float w = by_mass ? (v[e] > 0.f ? v[e] : 0.f) : (v[e] == v[e] ? 1.f : 0.f);
        const uint32_t key = order_key(v[e]);
        if (w > 0.f && (key & mask) == prefix) atomicAdd(&hist[warp][(key >> shift) & 255u], w);
      }
    });
    __syncthreads();
    if (threadIdx.x < 256) {
      float total = 0.f;
      for (int w = 0; w < kWarps; ++w) total += hist[w][threadIdx.x];
      hist[0][threadIdx.x] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float above = 0.f;
      int chosen = -1, lowest = -1;
      for (int b = 255; b >= 0; --b) {
        const float here = hist[0][b];
        if (here <= 0.f) continue;
        lowest = b;
        if (above + here >= target) {
          chosen = b;
          break;
        }
        above += here;
      }
      if (chosen >= 0) {
        *s_choice = chosen;
        *s_target = target - above;
      } else {  // never reached: keep descending to the smallest value
        *s_choice = lowest >= 0 ? lowest : 0;
        *s_target = INFINITY;
      }
    }
    __syncthreads();
    prefix |= *s_choice << shift;
    mask |= 255u << shift;
    target = *s_target;
    __syncthreads();  // s_choice, s_target and hist reused by the next digit
  }
  return from_order_key(prefix);
}

__global__ void __launch_bounds__(kThreads, 1) sampling_kernel(const SamplingParams p) {
  __shared__ float s_float[kWarps];
  __shared__ int64_t s_int[kWarps];
  __shared__ Best s_best[kWarps];
  __shared__ float s_hist[kWarps][256];
  __shared__ uint32_t s_choice;
  __shared__ float s_target;
  const int64_t row = blockIdx.x;
  const float* x = p.probs + row * p.vocab;
  const uint2 key = make_uint2(p.seed[0], p.seed[1]);
  auto add_f = [](float a, float b) { return a + b; };
  auto add_i = [](int64_t a, int64_t b) { return a + b; };
  auto max_f = [](float a, float b) { return fmaxf(a, b); };

  // Min-p scales by the row maximum: one pass before the draws. Joint top-k +
  // top-p first selects the k-th largest value: draws stay among the top k,
  // and top-p applies to their mass.
  float floor_incl = 0.f;
  if (p.mode == SamplingMode::kMinP) {
    float row_max = 0.f;
    for_each_quad(x, p.vocab, [&](const float(&v)[4]) {
#pragma unroll
      for (int e = 0; e < 4; ++e) row_max = v[e] > row_max ? v[e] : row_max;
    });
    row_max = block_reduce(row_max, max_f, s_float);
    floor_incl = fmaxf(p.param[row], 0.f) * row_max;
  } else if (p.mode == SamplingMode::kTopKTopP) {
    floor_incl = select_threshold(x, p.vocab, float(max(p.top_k[row], 1)), false, s_hist, &s_choice, &s_target);
  }

  // Round r draws token_r among the candidates above `low` (0, then the
  // probability of the last rejected token). Its one pass over the row counts
  // and weighs the candidates, per thread: the row's sums are exactly what
  // lies above token_{r-1}, which decides whether token_{r-1} is kept, and
  // the draw is two-level: an exponential race picks a thread's share with
  // probability proportional to its mass, then warp 0 walks that share (1/1024
  // of the row) to the token where the running mass passes u times the
  // share's mass. Randomness: counter (round, row, thread). The row total
  // (top-p's reference mass) is round 0's mass.
  const int64_t k = p.mode == SamplingMode::kTopK ? max(p.top_k[row], 1) : 0;
  const bool one_round = p.mode == SamplingMode::kPlain || p.mode == SamplingMode::kMinP;
  float low = 0.f, total = 0.f;
  int64_t token = -1;  // the draw awaiting its test
  for (uint32_t round = 0;; ++round) {
    auto is_candidate = [&](float v) { return v > low && v >= floor_incl; };
    int64_t count = 0;
    float mass = 0.f;
    for_each_quad(x, p.vocab, [&](const float(&v)[4]) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool c = is_candidate(v[e]);
        count += c;
        mass += c ? v[e] : 0.f;
      }
    });
    const uint4 bits = philox(make_uint4(round, static_cast<uint32_t>(row), threadIdx.x, 0u), key);
    const Best share = block_best(
        mass > 0.f ? Best{__fdividef(mass, exponential(bits.x)), threadIdx.x} : Best{-INFINITY, -1}, s_best);
    const float row_mass = block_reduce(mass, add_f, s_float);
    if (round > 0) {
      // (The row maximum has nothing above it, so the rounds end.)
      const bool accept = p.mode == SamplingMode::kTopK
                              ? block_reduce(count, add_i, s_int) < k
                              : row_mass == 0.f || p.param[row] >= 1.f || row_mass < p.param[row] * total;
      if (accept) break;
    }
    total = round == 0 ? row_mass : total;
    if (share.token < 0) {  // nothing to draw (only possible in round 0)
      token = -1;
      break;
    }
    if (threadIdx.x == share.token) s_target = mass * ((float(bits.y >> 8) + 0.5f) * (1.f / 16777216.f));
    __syncthreads();
    if (threadIdx.x < 32) {
      const int64_t drawn = draw_in_share(x, p.vocab, static_cast<int>(share.token), s_target, is_candidate);
      if (threadIdx.x == 0) s_int[0] = drawn;
    }
    __syncthreads();
    token = s_int[0];
    __syncthreads();  // s_int and s_target are reused
    if (round == 0 && one_round) break;
    low = x[token];
  }
  if (threadIdx.x == 0) p.tokens[row] = static_cast<int32_t>(token);
}

__global__ void __launch_bounds__(kThreads, 1) filter_kernel(const FilterParams p) {
  __shared__ float s_float[kWarps];
  __shared__ float s_hist[kWarps][256];
  __shared__ uint32_t s_choice;
  __shared__ float s_target;
  const int64_t row = blockIdx.x;
  const float* x = p.x + row * p.vocab;
  float* out = p.out + row * p.vocab;
  auto add_f = [](float a, float b) { return a + b; };

  float threshold;
  if (p.mode == FilterMode::kTopPRenorm) {
    float total = 0.f;
    for_each_quad(x, p.vocab, [&](const float(&v)[4]) {
#pragma unroll
      for (int e = 0; e < 4; ++e) total += v[e] > 0.f ? v[e] : 0.f;
    });
    total = block_reduce(total, add_f, s_float);
    const float top_p = p.top_p[row];
    threshold = top_p >= 1.f ? 0.f
                             : select_threshold(x, p.vocab, fmaxf(top_p, 0.f) * total, true, s_hist, &s_choice, &s_target);
  } else {
    threshold = select_threshold(x, p.vocab, float(max(p.top_k[row], 1)), false, s_hist, &s_choice, &s_target);
  }
  if (p.mode == FilterMode::kTopKMaskLogits) {
    for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) out[j] = x[j] >= threshold ? x[j] : -INFINITY;
    return;
  }
  float kept = 0.f;
  for_each_quad(x, p.vocab, [&](const float(&v)[4]) {
#pragma unroll
    for (int e = 0; e < 4; ++e) kept += v[e] >= threshold && v[e] > 0.f ? v[e] : 0.f;
  });
  kept = block_reduce(kept, add_f, s_float);
  const float inv = kept > 0.f ? 1.f / kept : 0.f;
  for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
    out[j] = x[j] >= threshold && x[j] > 0.f ? x[j] * inv : 0.f;
  }
}

}  // namespace

cudaError_t filter_cuda(const FilterParams& p, cudaStream_t stream) {
  if (p.batch > 0 && p.vocab > 0) filter_kernel<<<p.batch, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t sampling_cuda(const SamplingParams& p, cudaStream_t stream) {
  if (p.batch > 0 && p.vocab > 0) sampling_kernel<<<p.batch, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jaxinfer
