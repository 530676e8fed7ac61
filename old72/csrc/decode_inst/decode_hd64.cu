// One row of the decode instantiation table: head dim 64, bf16 and fp16.
#include "csrc/decode.cuh"

template cudaError_t jaxinfer::launch_decode<64>(const DecodeParams&, cudaStream_t);
