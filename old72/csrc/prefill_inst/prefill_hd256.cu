// One row of the prefill instantiation table: head dim 256, bf16 and fp16.
#include "csrc/prefill.cuh"

template cudaError_t jaxinfer::launch_prefill<256>(const PrefillParams&, cudaStream_t);
