// Attention variants as one value type with hooks, shared by every attention
// kernel (decode now; prefill and cascade later), so a new variant is a new
// field and hook here, not a kernel fork. Runtime flags are uniform across a
// launch, so their branches cost a predicate, not divergence; the kernels
// are memory-bound where these run.
//
// Semantics (identical to jaxinfer/reference.py):
//   s = sm_scale * q.k; if soft_cap > 0: s = soft_cap * tanh(s / soft_cap);
//   s += alibi_slope[head] * (kv_pos - q_pos); masked when causal and
//   kv_pos > q_pos, or when window_left >= 0 and kv_pos < q_pos - window_left.
//   RoPE (rotate-half) at absolute positions.
#pragma once
#include <cmath>

namespace jaxinfer {

struct AttentionVariant {
  float sm_scale = 1.f;
  bool causal = false;              // decode: a no-op (the query sits after every key)
  float soft_cap = 0.f;             // <= 0: off
  int window_left = -1;             // < 0: off
  const float* alibi_slopes = nullptr;  // [num_qo_heads] or nullptr
  bool rope = false;
  float rope_rcp_scale = 1.f;       // 1 / rope_scale
  float rope_theta = 1e4f;

  static constexpr float kLog2e = 1.4426950408889634f;

  // The plain variant: a positive scale and causal or not, nothing else.
  // Kernels built for it see the other fields as constants (plain() below),
  // so the other variants' code leaves their loops.
  bool is_plain() const {
    return sm_scale > 0.f && soft_cap <= 0.f && window_left < 0 && alibi_slopes == nullptr && !rope;
  }

#ifdef __CUDACC__  // hooks; host code only fills the fields

  __host__ __device__ static AttentionVariant plain(float sm_scale, bool causal) {
    AttentionVariant v;
    v.sm_scale = sm_scale;
    v.causal = causal;
    return v;
  }

  // Logit in the base-2 domain (log2(e) folded in), before masking.
  __device__ __forceinline__ float logit(float qk, int qo_head, int kv_pos, int q_pos) const {
    float s = qk * sm_scale;
    if (soft_cap > 0.f) s = soft_cap * tanhf(s / soft_cap);
    if (alibi_slopes != nullptr) s += __ldg(alibi_slopes + qo_head) * float(kv_pos - q_pos);
    return s * kLog2e;
  }

  // Whether logit() only scales: kernels test this once per tile, not per element.
  __device__ __forceinline__ bool plain_logits() const { return soft_cap <= 0.f && alibi_slopes == nullptr; }

  __device__ __forceinline__ bool visible(int kv_pos, int q_pos) const {
    return (!causal || kv_pos <= q_pos) && (window_left < 0 || kv_pos >= q_pos - window_left);
  }

  // Whether every key in [first_kv, last_kv] is visible to every query in
  // [min_q, max_q]: then a tile needs no per-element mask.
  __device__ __forceinline__ bool all_visible(int first_kv, int last_kv, int min_q, int max_q) const {
    return visible(last_kv, min_q) && visible(first_kv, max_q);
  }

  // One past the last key position a query at q_pos can see, of kv_len keys.
  __device__ __forceinline__ int end_visible(int q_pos, int kv_len) const {
    return causal ? min(kv_len, q_pos + 1) : kv_len;
  }

  // First key position any query at q_pos can see (lets kernels skip whole tiles).
  __device__ __forceinline__ int first_visible(int q_pos) const {
    return window_left < 0 ? 0 : max(0, q_pos - window_left);
  }

  // Rotates the pair (x[i], x[i + D/2]) of a vector at position pos (Llama rotate-half).
  __device__ __forceinline__ void rope_pair(float& lo, float& hi, int i, int head_dim, int pos) const {
    const float inv_freq = powf(rope_theta, -2.f * float(i) / float(head_dim));
    float sin_a, cos_a;
    sincosf(float(pos) * rope_rcp_scale * inv_freq, &sin_a, &cos_a);
    const float l = lo, h = hi;
    lo = l * cos_a - h * sin_a;
    hi = h * cos_a + l * sin_a;
  }
#endif
};

}  // namespace jaxinfer
