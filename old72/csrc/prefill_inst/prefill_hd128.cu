// One row of the prefill instantiation table: head dim 128, bf16 and fp16.
#include "csrc/prefill.cuh"

template cudaError_t jaxinfer::launch_prefill<128>(const PrefillParams&, cudaStream_t);
