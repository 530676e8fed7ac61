// FFI handlers for the sorting-free sampling and filter kernels (CUDA only;
// the CPU path is the jnp formulation in jaxinfer/sampling.py).
#include "csrc/sampling.h"
#include "xla_ffi/common.h"

namespace jaxinfer {
namespace {

namespace ffi = xla::ffi;

#ifdef JAXINFER_WITH_CUDA
ffi::Error sample_gpu(cudaStream_t stream, ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::U32> seed,
                      ffi::Buffer<ffi::S32> top_k, ffi::Buffer<ffi::F32> param,
                      ffi::Result<ffi::Buffer<ffi::S32>> tokens, int32_t mode) {
  const auto dims = probs.dimensions();
  if (dims.size() != 2 || seed.element_count() != 2 || top_k.element_count() != dims[0] ||
      param.element_count() != dims[0] || mode < 0 || mode > 4) {
    return ffi_util::invalid("sampling: probs [batch, vocab], seed [2], top_k and param [batch], mode 0..4");
  }
  if (dims[0] > 2147483647) return ffi_util::invalid("sampling: batch past 2^31 rows");
  SamplingParams p{dims[0], dims[1], probs.typed_data(), seed.typed_data(), top_k.typed_data(),
                   param.typed_data(), static_cast<SamplingMode>(mode), tokens->typed_data()};
  if (cudaError_t e = sampling_cuda(p, stream); e != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxinfer sampling: ") + cudaGetErrorString(e));
  }
  return ffi::Error::Success();
}

ffi::Error filter_gpu(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> top_k,
                      ffi::Buffer<ffi::F32> top_p, ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t mode) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || top_k.element_count() != dims[0] || top_p.element_count() != dims[0] ||
      mode < 0 || mode > 2) {
    return ffi_util::invalid("filter: x [batch, vocab], top_k and top_p [batch], mode 0..2");
  }
  if (dims[0] > 2147483647) return ffi_util::invalid("filter: batch past 2^31 rows");
  FilterParams p{dims[0], dims[1], x.typed_data(), top_k.typed_data(), top_p.typed_data(),
                 static_cast<FilterMode>(mode), out->typed_data()};
  if (cudaError_t e = filter_cuda(p, stream); e != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxinfer filter: ") + cudaGetErrorString(e));
  }
  return ffi::Error::Success();
}
#endif

}  // namespace

#ifdef JAXINFER_WITH_CUDA
XLA_FFI_DEFINE_HANDLER(kFilterGpu, filter_gpu,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::Buffer<ffi::F32>>()  // x: probabilities or logits
                           .Arg<ffi::Buffer<ffi::S32>>()  // top_k
                           .Arg<ffi::Buffer<ffi::F32>>()  // top_p
                           .Ret<ffi::Buffer<ffi::F32>>()  // out
                           .Attr<int32_t>("mode"),
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kSampleGpu, sample_gpu,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::Buffer<ffi::F32>>()  // probs
                           .Arg<ffi::Buffer<ffi::U32>>()  // seed
                           .Arg<ffi::Buffer<ffi::S32>>()  // top_k
                           .Arg<ffi::Buffer<ffi::F32>>()  // param (top_p or min_p)
                           .Ret<ffi::Buffer<ffi::S32>>()  // tokens
                           .Attr<int32_t>("mode"),
                       {ffi::Traits::kCmdBufferCompatible});
#endif

}  // namespace jaxinfer

NB_MODULE(_sampling, m) {
  m.def("registrations", []() {
    nanobind::dict out;
#ifdef JAXINFER_WITH_CUDA
    nanobind::dict gpu;
    gpu["jaxinfer_sample"] = jaxinfer::ffi_util::capsule(jaxinfer::kSampleGpu);
    gpu["jaxinfer_filter"] = jaxinfer::ffi_util::capsule(jaxinfer::kFilterGpu);
    out["CUDA"] = gpu;
#endif
    return out;
  });
}
