// FFI handler for batch prefill / append (CUDA only; the CPU path is the jnp
// reference), and the host planner's work split for Python.
#include <nanobind/ndarray.h>

#include <stdexcept>

#include "csrc/prefill.h"
#include "csrc/prefill_plan.h"
#include "xla_ffi/common.h"

namespace jaxinfer {
namespace {

namespace ffi = xla::ffi;
using ffi_util::invalid;
using I32 = ffi::Buffer<ffi::S32>;

#ifdef JAXINFER_WITH_CUDA
// q [total_q, Hq, D]. Paged caches: k, v [pages, page_size, Hkv, D] ("NHD", kv_layout = 0)
// or [pages, Hkv, page_size, D] ("HND", 1), or one [pages, 2, ...] array passed as both;
// ragged: k, v [total_kv, Hkv, D] with kv_indices of size 0.
ffi::Error prefill_gpu(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                       ffi::AnyBuffer v_cache, ffi::Buffer<ffi::F32> alibi_slopes, I32 kv_indices,
                       I32 items, ffi::AnyBuffer custom_mask, ffi::AnyBuffer merge_o,
                       ffi::Buffer<ffi::F32> merge_lse, ffi::Result<ffi::AnyBuffer> o,
                       ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::Buffer<ffi::F32>> partial_o,
                       ffi::Result<ffi::Buffer<ffi::F32>> partial_lse, ffi::Result<I32> work_counter,
                       int32_t kv_splits,
                       int32_t kv_layout, int32_t causal,
                       float sm_scale, float logits_soft_cap, int32_t window_left, int32_t use_alibi,
                       int32_t use_mask, int32_t use_merge, int32_t rope, float rope_scale,
                       float rope_theta, int32_t heads_inner) {
  const auto dtype = ffi_util::to_dtype(q.element_type());
  const auto qd = q.dimensions();
  const auto kd = k_cache.dimensions();
  const bool ragged = kd.size() == 3;
  if (!dtype || k_cache.element_type() != q.element_type() || qd.size() != 3 ||
      !(ragged || kd.size() == 4 || kd.size() == 5)) {
    return invalid("prefill: q must be [tokens, heads, dim] and the caches of q's dtype");
  }
  if (items.dimensions().size() != 2 || items.dimensions()[1] != kPfItemFields) {
    return invalid("prefill: plan.items must be [work_items, 11]");
  }
  PrefillParams p{};
  p.dtype = *dtype;
  p.total_q = qd[0];
  p.num_qo_heads = static_cast<int>(qd[1]);
  p.head_dim = static_cast<int>(qd[2]);
  p.num_items = static_cast<int>(items.dimensions()[0]);
  p.q = q.untyped_data();
  p.items = items.typed_data();
  if (ragged) {  // rows of k and v are pages of one slot, named directly by the items
    if (kd[2] != qd[2]) return invalid("prefill: q and k head dims disagree");
    p.num_kv_heads = static_cast<int>(kd[1]);
    p.kv = KvCache{k_cache.untyped_data(), v_cache.untyped_data(), kd[1] * kd[2], 0, kd[2], 1, kd[0],
                   nullptr, 0};
  } else {
    const auto cache = ffi_util::paged_cache(k_cache, v_cache, kv_layout);
    if (!cache || cache->head_dim != qd[2]) return invalid("prefill: empty cache or head dims disagree");
    p.num_kv_heads = static_cast<int>(cache->num_kv_heads);
    p.kv = cache->kv;
    p.kv.kv_indices = kv_indices.typed_data();
    p.kv.num_kv_indices = kv_indices.element_count();
  }
  if (p.num_kv_heads == 0 || p.num_qo_heads % p.num_kv_heads != 0) {
    return invalid("prefill: num_qo_heads must be a multiple of num_kv_heads");
  }
  if (p.num_items > 65535) return invalid("prefill: more than 65535 work items");
  p.custom_mask = use_mask ? static_cast<const uint8_t*>(custom_mask.untyped_data()) : nullptr;
  p.mask_len = custom_mask.size_bytes();
  if (use_merge) {
    if (merge_o.element_type() != q.element_type() || merge_o.element_count() != q.element_count() ||
        merge_lse.element_count() != p.total_q * p.num_qo_heads) {
      return invalid("prefill: merge_with must be o like q and lse [tokens, heads]");
    }
    p.merge_o = merge_o.untyped_data();
    p.merge_lse = merge_lse.typed_data();
  }
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  p.num_splits = kv_splits;
  if (kv_splits > 1) {
    if (partial_o->element_count() != p.total_q * kv_splits * p.num_qo_heads * p.head_dim ||
        partial_lse->element_count() != p.total_q * kv_splits * p.num_qo_heads) {
      return invalid("prefill: the split workspace must be [tokens, kv_splits, heads, (dim)]");
    }
    p.partial_o = partial_o->typed_data();
    p.partial_lse = partial_lse->typed_data();
  } else if (kv_splits != 1) {
    return invalid("prefill: kv_splits must be at least 1");
  }
  if (work_counter->element_count() != 2) return invalid("prefill: the work counter must be int32 [2]");
  p.heads_inner = heads_inner != 0;
  p.work_counter = reinterpret_cast<unsigned long long*>(work_counter->typed_data());  // XLA aligns buffers
  p.variant = ffi_util::attention_variant(sm_scale, causal != 0, logits_soft_cap, window_left,
                                          use_alibi ? alibi_slopes.typed_data() : nullptr, rope != 0,
                                          rope_scale, rope_theta);
  if (cudaError_t e = prefill_cuda(p, stream); e != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxinfer prefill: ") + cudaGetErrorString(e));
  }
  return ffi::Error::Success();
}
#endif

using HostI32 = nanobind::ndarray<int32_t, nanobind::c_contig, nanobind::device::cpu>;

// jaxinfer.plan_prefill's work split (csrc/prefill_plan.h) into the caller's items array.
int64_t split_work(HostI32 qo_indptr, HostI32 kv_len, HostI32 kv_begin, HostI32 kv_end,
                   HostI32 mask_begin, int group, int kv_splits, int64_t total_q, HostI32 items) {
  const int64_t batch = static_cast<int64_t>(kv_len.size());
  if (static_cast<int64_t>(qo_indptr.size()) != batch + 1 || kv_begin.size() != kv_len.size() ||
      kv_end.size() != kv_len.size() || mask_begin.size() != kv_len.size() || items.ndim() != 2 ||
      items.shape(1) != kPfItemFields || group < 1 || kv_splits < 1) {
    throw std::invalid_argument("split_work: inconsistent array sizes");
  }
  return split_prefill_work(qo_indptr.data(), kv_len.data(), kv_begin.data(), kv_end.data(),
                            mask_begin.data(), static_cast<int>(batch), group, kPrefillTileRows,
                            kv_splits, total_q, items.data(), static_cast<int64_t>(items.shape(0)));
}

}  // namespace

#ifdef JAXINFER_WITH_CUDA
XLA_FFI_DEFINE_HANDLER(kPrefillGpu, prefill_gpu,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()         // q
                           .Arg<ffi::AnyBuffer>()         // k (cache or ragged)
                           .Arg<ffi::AnyBuffer>()         // v
                           .Arg<ffi::Buffer<ffi::F32>>()  // alibi_slopes
                           .Arg<I32>()                    // kv_indices (size 0 when ragged)
                           .Arg<I32>()                    // items
                           .Arg<ffi::AnyBuffer>()         // custom_mask (bool)
                           .Arg<ffi::AnyBuffer>()         // merge_with: o (size 0 when unused)
                           .Arg<ffi::Buffer<ffi::F32>>()  // merge_with: lse
                           .Ret<ffi::AnyBuffer>()         // o
                           .Ret<ffi::Buffer<ffi::F32>>()  // lse
                           .Ret<ffi::Buffer<ffi::F32>>()  // partial_o (KV splits; workspace)
                           .Ret<ffi::Buffer<ffi::F32>>()  // partial_lse (workspace)
                           .Ret<I32>()                    // work_counter (workspace: 8 bytes)
                           .Attr<int32_t>("kv_splits")
                           .Attr<int32_t>("kv_layout")
                           .Attr<int32_t>("causal")
                           .Attr<float>("sm_scale")
                           .Attr<float>("logits_soft_cap")
                           .Attr<int32_t>("window_left")
                           .Attr<int32_t>("use_alibi")
                           .Attr<int32_t>("use_mask")
                           .Attr<int32_t>("use_merge")
                           .Attr<int32_t>("rope")
                           .Attr<float>("rope_scale")
                           .Attr<float>("rope_theta")
                           .Attr<int32_t>("heads_inner"),
                       {ffi::Traits::kCmdBufferCompatible});
#endif

}  // namespace jaxinfer

NB_MODULE(_prefill, m) {
  m.def("split_work", &jaxinfer::split_work);
  m.def("registrations", []() {
    nanobind::dict out;
#ifdef JAXINFER_WITH_CUDA
    nanobind::dict gpu;
    gpu["jaxinfer_batch_prefill"] = jaxinfer::ffi_util::capsule(jaxinfer::kPrefillGpu);
    out["CUDA"] = gpu;
#endif
    return out;
  });
}
