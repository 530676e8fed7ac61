// FFI handlers for the merge family: jaxinfer_merge_state and
// jaxinfer_merge_states, on CPU and (with CUDA) on the GPU.
#include "csrc/merge_state.h"
#include "xla_ffi/common.h"

namespace jaxinfer {
namespace {

namespace ffi = xla::ffi;
namespace nb = nanobind;
using ffi_util::invalid;
using ffi_util::prod;

// v_a, v_b, v_out: [..., heads, dim]; s_a, s_b, s_out: [..., heads].
ffi::ErrorOr<MergeParams> merge_state_params(ffi::AnyBuffer v_a, ffi::Buffer<ffi::F32> s_a,
                                             ffi::AnyBuffer v_b, ffi::Buffer<ffi::F32> s_b,
                                             ffi::Result<ffi::AnyBuffer> v_out,
                                             ffi::Result<ffi::Buffer<ffi::F32>> s_out) {
  auto dtype = ffi_util::to_dtype(v_a.element_type());
  const auto dims = v_a.dimensions();
  if (!dtype || v_b.element_type() != v_a.element_type()) return ffi::Unexpected(invalid("merge_state: bad v dtype"));
  if (dims.size() < 2 || v_b.element_count() != v_a.element_count() ||
      s_a.element_count() * dims.back() != v_a.element_count() ||
      s_b.element_count() != s_a.element_count()) {
    return ffi::Unexpected(invalid("merge_state: v_a, v_b must be [..., heads, dim] and s_a, s_b [..., heads]"));
  }
  return MergeParams{*dtype, prod(dims, 0, dims.size() - 2), dims[dims.size() - 2], dims.back(), 2,
                     v_a.untyped_data(), s_a.typed_data(), v_b.untyped_data(), s_b.typed_data(),
                     v_out->untyped_data(), s_out->typed_data()};
}

// v: [..., num_states, heads, dim]; s: [..., num_states, heads].
ffi::ErrorOr<MergeParams> merge_states_params(ffi::AnyBuffer v, ffi::Buffer<ffi::F32> s,
                                              ffi::Result<ffi::AnyBuffer> v_out,
                                              ffi::Result<ffi::Buffer<ffi::F32>> s_out) {
  auto dtype = ffi_util::to_dtype(v.element_type());
  const auto dims = v.dimensions();
  if (!dtype) return ffi::Unexpected(invalid("merge_states: bad v dtype"));
  if (dims.size() < 3 || s.element_count() * dims.back() != v.element_count()) {
    return ffi::Unexpected(invalid("merge_states: v must be [..., num_states, heads, dim] and s [..., num_states, heads]"));
  }
  const size_t r = dims.size();
  return MergeParams{*dtype, prod(dims, 0, r - 3), dims[r - 2], dims[r - 1], dims[r - 3],
                     v.untyped_data(), s.typed_data(), nullptr, nullptr,
                     v_out->untyped_data(), s_out->typed_data()};
}

// Runs a decoded MergeParams on the CPU, or launches it on a CUDA stream.
ffi::Error run_cpu(ffi::ErrorOr<MergeParams> p) {
  if (p.has_error()) return p.error();
  if (p->dtype != DType::kFloat32) return invalid("merge (cpu): expects float32 (upcast in Python)");
  merge_cpu(*p);
  return ffi::Error::Success();
}

ffi::Error merge_state_cpu(ffi::AnyBuffer v_a, ffi::Buffer<ffi::F32> s_a, ffi::AnyBuffer v_b,
                           ffi::Buffer<ffi::F32> s_b, ffi::Result<ffi::AnyBuffer> v_out,
                           ffi::Result<ffi::Buffer<ffi::F32>> s_out) {
  return run_cpu(merge_state_params(v_a, s_a, v_b, s_b, v_out, s_out));
}

ffi::Error merge_states_cpu(ffi::AnyBuffer v, ffi::Buffer<ffi::F32> s,
                            ffi::Result<ffi::AnyBuffer> v_out, ffi::Result<ffi::Buffer<ffi::F32>> s_out) {
  return run_cpu(merge_states_params(v, s, v_out, s_out));
}

#ifdef JAXINFER_WITH_CUDA
ffi::Error run_cuda(cudaStream_t stream, ffi::ErrorOr<MergeParams> p) {
  if (p.has_error()) return p.error();
  if (p->dim > 1024 && p->dim % 8 != 0) return invalid("merge: head dim > 1024 must be a multiple of 8");
  if (cudaError_t e = merge_cuda(*p, stream); e != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxinfer merge kernel: ") + cudaGetErrorString(e));
  }
  return ffi::Error::Success();
}

ffi::Error merge_state_gpu(cudaStream_t stream, ffi::AnyBuffer v_a, ffi::Buffer<ffi::F32> s_a,
                           ffi::AnyBuffer v_b, ffi::Buffer<ffi::F32> s_b,
                           ffi::Result<ffi::AnyBuffer> v_out, ffi::Result<ffi::Buffer<ffi::F32>> s_out) {
  return run_cuda(stream, merge_state_params(v_a, s_a, v_b, s_b, v_out, s_out));
}

ffi::Error merge_states_gpu(cudaStream_t stream, ffi::AnyBuffer v, ffi::Buffer<ffi::F32> s,
                            ffi::Result<ffi::AnyBuffer> v_out, ffi::Result<ffi::Buffer<ffi::F32>> s_out) {
  return run_cuda(stream, merge_states_params(v, s, v_out, s_out));
}
#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER(kMergeStateCpu, merge_state_cpu,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()
                           .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER(kMergeStatesCpu, merge_states_cpu,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());
#ifdef JAXINFER_WITH_CUDA
XLA_FFI_DEFINE_HANDLER(kMergeStateGpu, merge_state_gpu,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()
                           .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>(),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMergeStatesGpu, merge_states_gpu,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()
                           .Ret<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>(),
                       {ffi::Traits::kCmdBufferCompatible});
#endif

}  // namespace jaxinfer

NB_MODULE(_merge, m) {
  namespace nb = nanobind;
  using jaxinfer::ffi_util::capsule;
  m.def("registrations", []() {
    nb::dict cpu, out;
    cpu["jaxinfer_merge_state"] = capsule(jaxinfer::kMergeStateCpu);
    cpu["jaxinfer_merge_states"] = capsule(jaxinfer::kMergeStatesCpu);
    out["cpu"] = cpu;
#ifdef JAXINFER_WITH_CUDA
    nb::dict gpu;
    gpu["jaxinfer_merge_state"] = capsule(jaxinfer::kMergeStateGpu);
    gpu["jaxinfer_merge_states"] = capsule(jaxinfer::kMergeStatesGpu);
    out["CUDA"] = gpu;
#endif
    return out;
  });
}
