#include <cmath>
#include <limits>
#include <vector>
#include <algorithm>

#include "csrc/merge_state.h"

namespace jaxinfer {

void merge_cpu(const MergeParams& p) {
  const float* v_a = static_cast<const float*>(p.v_a);
  const float* v_b = static_cast<const float*>(p.v_b);
  float* v_out = static_cast<float*>(p.v_out);
  const bool pair = v_b != nullptr;
  std::vector<float> acc(p.dim);
  for (int64_t t = 0; t < p.tokens; ++t) {
    for (int64_t h = 0; h < p.heads; ++h) {
      // Offsets of state i of row (t, h), in lse and in v units.
      auto lse_at = [&](int64_t i) -> int64_t {
        return pair ? t * p.heads + h : (t * p.num_states + i) * p.heads + h;
      };
      auto lse_of = [&](int64_t i) { return (pair && i == 1 ? p.s_b : p.s_a)[lse_at(i)]; };
      auto v_of = [&](int64_t i) { return (pair && i == 1 ? v_b : v_a) + lse_at(i) * p.dim; };

      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < p.num_states; ++i) m = std::fmax(m, lse_of(i));
      // Read every input before writing: the output may alias state 0.
      float sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      if (m != -std::numeric_limits<float>::infinity()) {
        for (int64_t i = 0; i < p.num_states; ++i) {
          const float w = std::exp2(lse_of(i) - m);
          const float* v = v_of(i);
          sum += w;
          for (int64_t d = 0; d < p.dim; ++d) acc[d] += w * v[d];
        }
      }
      float* out = v_out + (t * p.heads + h) * p.dim;
      for (int64_t d = 0; d < p.dim; ++d) out[d] = sum > 0.f ? acc[d] / sum : 0.f;
      p.s_out[t * p.heads + h] = sum > 0.f ? m + std::log2(sum) : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace jaxinfer
