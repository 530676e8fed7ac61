// One row of the decode instantiation table: head dim 256, bf16 and fp16.
#include "csrc/decode.cuh"

template cudaError_t jaxinfer::launch_decode<256>(const DecodeParams&, cudaStream_t);
