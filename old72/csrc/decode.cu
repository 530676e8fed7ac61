// The decode dispatch point: runtime head dim -> the instantiation table in
// csrc/decode_inst/ (one translation unit per head dim).
#include "csrc/decode.h"

namespace jaxinfer {

cudaError_t decode_cuda(const DecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_decode<64>(p, stream);
    case 128: return launch_decode<128>(p, stream);
    case 256: return launch_decode<256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace jaxinfer
