// Helpers shared by the FFI handlers: dtype mapping, shape products, and the
// capsules that hand handlers to Python. Handlers only decode buffers and
// attributes, check what the Python layer cannot, and call a launcher.
#pragma once
#include <nanobind/nanobind.h>

#include <cstdint>
#include <optional>
#include <string>

#include "csrc/attention_variant.cuh"
#include "csrc/dtype.h"
#include "csrc/kv_cache.h"
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

// A paged K/V cache's addressing (csrc/kv_cache.h; the caller adds the page
// table) and its head count and head dim.
struct PagedCache {
  KvCache kv;
  int64_t num_kv_heads, head_dim;
};

// k, v: [pages, page_size, Hkv, D] (kv_layout 0, "NHD") or [pages, Hkv,
// page_size, D] (1, "HND"); or one [pages, 2, ...] array passed as both.
// nullopt for other ranks or a cache with no pages.
inline std::optional<PagedCache> paged_cache(ffi::AnyBuffer k, ffi::AnyBuffer v, int32_t kv_layout) {
  const auto kd = k.dimensions();
  const bool combined = kd.size() == 5;
  if ((kd.size() != 4 && !combined) || kd[0] == 0) return std::nullopt;
  // Page-relative dims, dropping the combined cache's K/V axis.
  const int64_t a = kd[combined ? 2 : 1], b = kd[combined ? 3 : 2], head_dim = kd[combined ? 4 : 3];
  const bool nhd = kv_layout == 0;
  const int64_t pages = kd[0], page_size = nhd ? a : b, num_kv_heads = nhd ? b : a;
  PagedCache c{};
  c.num_kv_heads = num_kv_heads;
  c.head_dim = head_dim;
  c.kv.k = k.untyped_data();
  c.kv.v = combined ? static_cast<const char*>(c.kv.k) + k.size_bytes() / pages / 2 : v.untyped_data();
  c.kv.stride_page = (combined ? 2 : 1) * page_size * num_kv_heads * head_dim;
  c.kv.stride_slot = nhd ? num_kv_heads * head_dim : head_dim;
  c.kv.stride_head = nhd ? head_dim : page_size * head_dim;
  c.kv.page_size = static_cast<int>(page_size);
  c.kv.num_pages = pages;
  return c;
}

// The variant attributes every attention handler takes, as the kernels' value type.
inline AttentionVariant attention_variant(float sm_scale, bool causal, float logits_soft_cap,
                                          int32_t window_left, const float* alibi_slopes, bool rope,
                                          float rope_scale, float rope_theta) {
  AttentionVariant v;
  v.sm_scale = sm_scale;
  v.causal = causal;
  v.soft_cap = logits_soft_cap;
  v.window_left = window_left;
  v.alibi_slopes = alibi_slopes;
  v.rope = rope;
  v.rope_rcp_scale = 1.f / rope_scale;
  v.rope_theta = rope_theta;
  return v;
}

template <typename Fn>
nb::capsule capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "expects an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace jaxinfer::ffi_util
