// Helpers shared by the FFI handlers: dtype mapping, shape products, and the
// capsules that hand handlers to Python. Handlers only decode buffers and
// attributes, check what the Python layer cannot, and call a launcher.
#pragma once
#include <nanobind/nanobind.h>

#include <cstdint>
#include <optional>
#include <string>

#include "csrc/dtype.h"
#include "xla/ffi/api/ffi.h"

namespace jaxinfer::ffi_util {

namespace ffi = xla::ffi;
namespace nb = nanobind;

inline std::optional<DType> to_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return DType::kFloat32;
    case ffi::DataType::F16: return DType::kFloat16;
    case ffi::DataType::BF16: return DType::kBFloat16;
    default: return std::nullopt;
  }
}

// Product of dims[begin, end).
inline int64_t prod(ffi::AnyBuffer::Dimensions dims, size_t begin, size_t end) {
  int64_t n = 1;
  for (size_t i = begin; i < end; ++i) n *= dims[i];
  return n;
}

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jaxinfer: " + what);
}

template <typename Fn>
nb::capsule capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "expects an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace jaxinfer::ffi_util
