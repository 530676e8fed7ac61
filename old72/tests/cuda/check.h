// Helpers of the standalone CUDA test programs in tests/cuda/.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdio>
#include <vector>

#define CHECK(x)                                                              \
  do {                                                                        \
    cudaError_t e = (x);                                                      \
    if (e != cudaSuccess) {                                                   \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      return 1;                                                               \
    }                                                                         \
  } while (0)

// A device copy of `host`, exactly its size (so memcheck sees any access past it).
template <typename T>
T* upload(const std::vector<T>& host) {
  T* dev = nullptr;
  cudaMalloc(&dev, host.size() * sizeof(T));
  cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return dev;
}
