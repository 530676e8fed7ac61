// Sorting-free sampling, one token per row of a probability matrix.
//
// Every draw is exact and needs no sort and no prefix sum over the row: one
// pass sums each thread's share of the candidates, an exponential race
// (argmax of mass / E, E = -log u, the Gumbel-max trick) picks a share with
// probability proportional to its mass, and one warp walks that share (1/1024
// of the row) to the token where the running mass passes u times the share's
// mass. Random numbers come from counter-based Philox keyed by the caller's
// JAX PRNG key, the row, the round and the thread. Top-k and top-p draw by
// rejection with a rising pivot: a round draws among the tokens with p >
// pivot; the next round's pass, which sums exactly the tokens above that
// draw, keeps it if it lies in the filtered set (fewer than k tokens above
// it, or less than top_p of the row's mass above it), else draws again above
// its probability. Every filtered token stays above the pivot, so each
// accepted token is distributed exactly as the renormalised filtered
// distribution; the row maximum is always accepted, so the rounds end.
#pragma once
#include <cstdint>

namespace jaxinfer {

enum class SamplingMode : int32_t { kPlain = 0, kTopK = 1, kTopP = 2, kMinP = 3, kTopKTopP = 4 };

struct SamplingParams {
  int64_t batch, vocab;
  const float* probs;     // [batch, vocab], nonnegative, any scale
  const uint32_t* seed;   // [2]: words derived from the JAX PRNG key
  const int32_t* top_k;   // [batch] (kTopK, kTopKTopP; values below 1 count as 1)
  const float* param;     // [batch]: top_p (kTopP, kTopKTopP) or min_p (kMinP)
  SamplingMode mode;
  int32_t* tokens;        // [batch]: the draw, -1 for a row with no positive probability
};

// Filters that rewrite whole rows, built on a radix select of the threshold
// (four passes of a 256-bin histogram over the order-preserving bits of the
// values: the k-th largest value, or the smallest value whose strictly-larger
// mass stays under top_p of the row), then one pass to write.
enum class FilterMode : int32_t { kTopKRenorm = 0, kTopPRenorm = 1, kTopKMaskLogits = 2 };

struct FilterParams {
  int64_t batch, vocab;
  const float* x;        // [batch, vocab]: probabilities (renorm) or logits (mask)
  const int32_t* top_k;  // [batch]
  const float* top_p;    // [batch]
  FilterMode mode;
  float* out;            // [batch, vocab]
};

}  // namespace jaxinfer

#ifdef JAXINFER_WITH_CUDA
#include <cuda_runtime_api.h>
namespace jaxinfer {
cudaError_t sampling_cuda(const SamplingParams& p, cudaStream_t stream);
cudaError_t filter_cuda(const FilterParams& p, cudaStream_t stream);
}  // namespace jaxinfer
#endif
