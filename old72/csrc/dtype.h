// Element types the kernels are instantiated for. Kept free of CUDA and XLA
// headers so that CPU code, CUDA code and FFI handlers all share it.
#pragma once

namespace jaxinfer {

enum class DType { kFloat32, kFloat16, kBFloat16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

}  // namespace jaxinfer
