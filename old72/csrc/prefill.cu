// The prefill dispatch point: runtime head dim -> the instantiation table in
// csrc/prefill_inst/ (one translation unit per head dim).
#include "csrc/prefill.h"

namespace jaxinfer {

cudaError_t prefill_cuda(const PrefillParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_prefill<64>(p, stream);
    case 128: return launch_prefill<128>(p, stream);
    case 256: return launch_prefill<256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace jaxinfer
