// FFI handler for paged-KV batch decode (CUDA only; the CPU path is the
// jnp reference). Decodes buffers and attributes into DecodeParams; every
// size comes from static shapes, the plan stays on the device.
#include <nanobind/ndarray.h>

#include <stdexcept>

#include "csrc/decode.h"
#include "csrc/decode_plan.h"
#include "xla_ffi/common.h"

namespace jaxinfer {
namespace {

namespace ffi = xla::ffi;
using ffi_util::invalid;
using I32 = ffi::Buffer<ffi::S32>;

#ifdef JAXINFER_WITH_CUDA
// q [batch, Hq, D]. Caches: k, v [pages, page_size, Hkv, D] ("NHD", kv_layout = 0) or
// [pages, Hkv, page_size, D] ("HND", 1); or one [pages, 2, ...] array passed as both k and v.
ffi::Error decode_gpu(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                      ffi::AnyBuffer v_cache, ffi::Buffer<ffi::F32> alibi_slopes, I32 kv_indices,
                      I32 items, I32 cta_items, I32 merge_indptr, ffi::Result<ffi::AnyBuffer> o,
                      ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::Buffer<ffi::F32>> partial_o,
                      ffi::Result<ffi::Buffer<ffi::F32>> partial_lse, int32_t kv_layout, float sm_scale,
                      float logits_soft_cap, int32_t window_left, int32_t use_alibi, int32_t rope,
                      float rope_scale, float rope_theta) {
  const auto dtype = ffi_util::to_dtype(q.element_type());
  const auto qd = q.dimensions();
  const auto cache = ffi_util::paged_cache(k_cache, v_cache, kv_layout);
  if (!dtype || k_cache.element_type() != q.element_type() || qd.size() != 3 || !cache) {
    return invalid("decode: q must be [batch, heads, dim] and the caches 4-d (or one 5-d) of q's "
                   "dtype with at least one page");
  }

  DecodeParams p{};
  p.dtype = *dtype;
  p.batch = static_cast<int>(qd[0]);
  p.num_qo_heads = static_cast<int>(qd[1]);
  p.num_kv_heads = static_cast<int>(cache->num_kv_heads);
  p.head_dim = static_cast<int>(cache->head_dim);
  p.num_items = static_cast<int>(items.element_count() / kItemFields);
  p.num_ctas = static_cast<int>(cta_items.element_count()) - 1;
  if (items.dimensions().size() != 2 || items.dimensions()[1] != kItemFields || p.num_ctas < 0) {
    return invalid("decode: plan.items must be [work_items, 6] and plan.cta_items non-empty");
  }
  if (p.num_ctas > 65535) return invalid("decode: more than 65535 CTA slots");
  if (qd[2] != cache->head_dim || p.num_kv_heads == 0 || p.num_qo_heads % p.num_kv_heads != 0) {
    return invalid("decode: q and cache head dims disagree, or num_qo_heads % num_kv_heads != 0");
  }
  p.q = q.untyped_data();
  p.kv = cache->kv;
  p.kv.kv_indices = kv_indices.typed_data();
  p.kv.num_kv_indices = kv_indices.element_count();
  p.items = items.typed_data();
  p.cta_items = cta_items.typed_data();
  p.merge_indptr = merge_indptr.typed_data();
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  p.partial_o = partial_o->typed_data();
  p.partial_lse = partial_lse->typed_data();
  p.variant = ffi_util::attention_variant(sm_scale, false, logits_soft_cap, window_left,
                                          use_alibi ? alibi_slopes.typed_data() : nullptr, rope != 0,
                                          rope_scale, rope_theta);

  if (cudaError_t e = decode_cuda(p, stream); e != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxinfer decode: ") + cudaGetErrorString(e));
  }
  return ffi::Error::Success();
}
#endif

}  // namespace

#ifdef JAXINFER_WITH_CUDA
XLA_FFI_DEFINE_HANDLER(kDecodeGpu, decode_gpu,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()             // q
                           .Arg<ffi::AnyBuffer>()             // k_cache
                           .Arg<ffi::AnyBuffer>()             // v_cache
                           .Arg<ffi::Buffer<ffi::F32>>()      // alibi_slopes
                           .Arg<I32>()                        // kv_indices
                           .Arg<I32>()                        // items
                           .Arg<I32>()                        // cta_items
                           .Arg<I32>()                        // merge_indptr
                           .Ret<ffi::AnyBuffer>()             // o
                           .Ret<ffi::Buffer<ffi::F32>>()      // lse
                           .Ret<ffi::Buffer<ffi::F32>>()      // partial_o
                           .Ret<ffi::Buffer<ffi::F32>>()      // partial_lse
                           .Attr<int32_t>("kv_layout")
                           .Attr<float>("sm_scale")
                           .Attr<float>("logits_soft_cap")
                           .Attr<int32_t>("window_left")
                           .Attr<int32_t>("use_alibi")
                           .Attr<int32_t>("rope")
                           .Attr<float>("rope_scale")
                           .Attr<float>("rope_theta"),
                       {ffi::Traits::kCmdBufferCompatible});
#endif

}  // namespace jaxinfer

namespace {
using HostI32 = nanobind::ndarray<int32_t, nanobind::c_contig, nanobind::device::cpu>;

// jaxinfer.plan_decode's work split (csrc/decode_plan.h), filling arrays the
// caller allocated: items [capacity, 6], cta_items [num_ctas + 1], merge_indptr [max_batch + 1].
int64_t split_work(HostI32 kv_indptr, HostI32 kv_last_page_len, int page_size, int tile_keys,
                   HostI32 items, HostI32 cta_items, HostI32 merge_indptr) {
  const int64_t batch = static_cast<int64_t>(kv_last_page_len.size());
  if (static_cast<int64_t>(kv_indptr.size()) != batch + 1 || items.ndim() != 2 ||
      items.shape(1) != jaxinfer::kItemFields || cta_items.size() < 2 ||
      static_cast<int64_t>(merge_indptr.size()) < batch + 1 || page_size < 1 || tile_keys < 1) {
    throw std::invalid_argument("split_work: inconsistent array sizes");
  }
  return jaxinfer::split_decode_work(
      kv_indptr.data(), kv_last_page_len.data(), static_cast<int>(batch), page_size, tile_keys,
      static_cast<int>(cta_items.size() - 1), items.data(), static_cast<int64_t>(items.shape(0)),
      cta_items.data(), merge_indptr.data(), static_cast<int>(merge_indptr.size() - 1));
}
}  // namespace

NB_MODULE(_decode, m) {
  m.def("split_work", &split_work);
  m.def("registrations", []() {
    nanobind::dict out;
#ifdef JAXINFER_WITH_CUDA
    nanobind::dict gpu;
    gpu["jaxinfer_batch_decode"] = jaxinfer::ffi_util::capsule(jaxinfer::kDecodeGpu);
    out["CUDA"] = gpu;
#endif
    return out;
  });
}
