// Vectorised loads and stores that convert to and from fp32 registers.
// N elements of T are moved as one access of N * sizeof(T) bytes (16 bytes
// for the usual 8 x bf16 / 4 x fp32), which is what keeps memory-bound
// kernels at full bandwidth.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "csrc/dtype.h"

namespace jaxinfer {

template <DType> struct CudaType;
template <> struct CudaType<DType::kFloat32> { using type = float; };
template <> struct CudaType<DType::kFloat16> { using type = __half; };
template <> struct CudaType<DType::kBFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Raw storage of N elements of T, aligned for a single access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T x[N];
};

// N elements of T as one access, left packed (converted later, to_float).
template <typename T, int N>
__device__ __forceinline__ Packed<T, N> load_packed(const T* __restrict__ src) {
  return *reinterpret_cast<const Packed<T, N>*>(src);
}

template <typename T, int N>
__device__ __forceinline__ void load_float(const T* __restrict__ src, float (&dst)[N]) {
  const Packed<T, N> p = load_packed<T, N>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = to_float(p.x[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* __restrict__ dst, const float (&src)[N]) {
  Packed<T, N> p;
#pragma unroll
  for (int i = 0; i < N; ++i) p.x[i] = from_float<T>(src[i]);
  *reinterpret_cast<Packed<T, N>*>(dst) = p;
}

// Brings the 128-byte line holding `at` into L2 (no register result, no wait).
__device__ __forceinline__ void prefetch_l2(const void* at) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(at));
}

template <typename T> struct TypeTag { using type = T; };

// Returns f(TypeTag<T>{}) with T the CUDA type of dtype: the one place where a
// runtime dtype becomes a template parameter. In f: `using T = typename
// decltype(tag)::type;`.
template <typename F>
__host__ auto dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default: return f(TypeTag<float>{});
  }
}

}  // namespace jaxinfer
