// The merge kernel, generic over where the states live (a States accessor),
// so merge_state, merge_states, split-KV decode and cascade share one body.
// One group of threads per (token, head) row; each thread owns kVec
// consecutive elements of the head dim, read with one 16-byte load per state.
#pragma once
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "csrc/vec.cuh"

namespace jaxinfer {

// A States accessor provides, for an output row (token * heads + head):
//   using Elem = ...;                     // element type of the state values
//   struct Row {...};                     // what locates the row's states (default: no states)
//   Row row(int64_t row) const;           // reads no memory the states' writer writes
//   int count(const Row&) const;          // number of states
//   float lse(const Row&, int i) const;   // base-2 log-sum-exp of state i
//   const Elem* v(const Row&, int i) const;  // state i's values [dim]
//   bool done(const Row&) const;          // row already written elsewhere: skip it

// Row of the accessors whose states follow from the row index alone.
struct RowIndex {
  int64_t row = 0;
};

// __maxnreg__ exists from CUDA 12.4 on; older compilers leave the kernel uncapped.
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define JAXINFER_MAX_REGISTERS(n) __maxnreg__(n)
#else
#define JAXINFER_MAX_REGISTERS(n)
#endif

// Registers are capped so that more threads, and so more loads, are in
// flight, which the H200's memory needs: batches of 4 states at 64 registers
// (1024 threads per SM; up to 80 uncapped for 16-bit states), batches of 2 at
// 40 (1536 threads). merge_states 4096 x 2 x 32 x 128: 63 -> 54 us (M1), then
// 40 -> 29 us with batches of 2 (M3, benchmarks/NOTES.md).
template <typename Out, int kVec, int kBatch, typename States>
__global__ void JAXINFER_MAX_REGISTERS(kBatch <= 2 ? 40 : 64)
    merge_kernel(States states, Out* v_out, float* s_out, int64_t rows, int64_t dim) {
  using Elem = typename States::Elem;
  // Block = [state groups (y)] x [rows of this block] x [threads of a row];
  // group g takes states g, g + groups, ...: with few rows and many states (a
  // split-KV decode at small batch) the groups put every state's loads in
  // flight at once instead of a chain of memory latencies per thread.
  const int threads_per_row = static_cast<int>(dim / kVec);
  const int groups = blockDim.y, group = threadIdx.y;
  const int rows_per_block = blockDim.x / threads_per_row;
  const int local_row = threadIdx.x / threads_per_row;
  const int64_t row = blockIdx.x * int64_t(rows_per_block) + local_row;
  const int64_t col = int64_t(threadIdx.x % threads_per_row) * kVec;
  // Where the row's states lie (a split decode: its plan) is known before
  // their writer ends, so that read leaves the critical path.
  typename States::Row at{};
  if (row < rows) at = states.row(row);
  // Launched as a programmatic dependent of the kernel that wrote the states
  // (see launch_merge), this CTA may start before that kernel ends; wait for
  // its completion and its writes. Without such a launch this returns at once.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const bool active = row < rows && !states.done(at);

  // One pass with a running max: per batch of kBatch states, their lse and
  // values load together (all issued before any is waited for), then the
  // accumulators are rescaled once to the batch's new max and the states
  // added. Branch-free, so that the compiler does not sink a value load into the
  // code that uses it (which would wait for the lse first). The values stay
  // packed until used (fp32 copies of 16-bit states would spill under the
  // register cap). A state with lse -inf holds nothing and adds nothing,
  // whatever its values; past the last state, that state loads again and
  // counts as -inf.
  float m = -INFINITY, sum = 0.f, acc[kVec] = {};
  if (active) {
    const int n = states.count(at);
    for (int first = group; first < n; first += kBatch * groups) {
      float lse[kBatch];
      Packed<Elem, kVec> x[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int i = first + j * groups, load = min(i, n - 1);
        lse[j] = states.lse(at, load);
        x[j] = load_packed<Elem, kVec>(states.v(at, load) + col);
        if (i >= n) lse[j] = -INFINITY;
      }
      float m_new = m;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) m_new = fmaxf(m_new, lse[j]);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
      const float scale = exp2f(m - m_use);                  // 0 before the first state
      sum *= scale;
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] *= scale;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const bool empty = lse[j] == -INFINITY;
        const float w = exp2f(lse[j] - m_use);  // 0 when empty
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] = fmaf(w, empty ? 0.f : to_float(x[j].x[k]), acc[k]);
        sum += w;
      }
      m = m_new;
    }
  }
  if (groups > 1) {  // group 0 folds in the other groups' (m, sum, acc)
    extern __shared__ float s_part[];  // [groups][rows_per_block] x (m, sum), then [groups][blockDim.x][kVec]
    float* s_ms = s_part;
    float* s_acc = s_part + 2 * groups * rows_per_block;
    const int slot = group * rows_per_block + local_row;
    if (threadIdx.x % threads_per_row == 0) s_ms[2 * slot] = m, s_ms[2 * slot + 1] = sum;
#pragma unroll
    for (int k = 0; k < kVec; ++k) s_acc[(group * blockDim.x + threadIdx.x) * kVec + k] = acc[k];
    __syncthreads();
    if (group == 0) {
      float m_all = m;
      for (int g = 1; g < groups; ++g) m_all = fmaxf(m_all, s_ms[2 * (g * rows_per_block + local_row)]);
      sum = 0.f;
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] = 0.f;
      if (m_all != -INFINITY) {
        for (int g = 0; g < groups; ++g) {
          const int gs = g * rows_per_block + local_row;
          const float w = exp2f(s_ms[2 * gs] - m_all);
          sum += w * s_ms[2 * gs + 1];
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] += w * s_acc[(g * blockDim.x + threadIdx.x) * kVec + k];
        }
      }
      m = m_all;
    }
  }
  if (!active || group != 0) return;
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int k = 0; k < kVec; ++k) acc[k] *= inv;
  // In-place merges alias v_out with state 0: every read of a state precedes
  // this write (within the thread, or before the barrier above), and no
  // thread reads another row's or another column's elements.
  store_float<Out, kVec>(v_out + row * dim + col, acc);
  if (col == 0) s_out[row] = sum > 0.f ? m + log2f(sum) : -INFINITY;
}

// An attribute of the current device (0 if unknown), queried once per device:
// a host attribute read, not a stream operation.
template <cudaDeviceAttr kAttribute>
int current_device_attribute() {
  static int value_of[64] = {};  // 0 until asked
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  int& value = value_of[device & 63];
  if (value == 0 && cudaDeviceGetAttribute(&value, kAttribute, device) != cudaSuccess) value = 0;
  return value;
}

inline int current_device_major() { return current_device_attribute<cudaDevAttrComputeCapabilityMajor>(); }

// Programmatic dependent launch (sm90+) of the merge after the kernel that
// writes its states, so that the merge's launch and scheduling overlap that
// kernel's tail (with the decode kernel's early trigger: 1-1.5 us less per
// decode call on the H100, benchmarks/NOTES.md). JAXINFER_PDL=0 turns it off.
inline bool programmatic_merge() {
  static const bool enabled = [] {
    const char* v = std::getenv("JAXINFER_PDL");
    return v == nullptr || v[0] != '0';
  }();
  return enabled && current_device_major() >= 9;
}

// Launches merge_kernel over `rows` rows of `dim` elements, each merging at
// most `max_states` states (a static bound: it sizes the launch, never the
// work). dim must be at most 1024, or a multiple of the 16-byte vector width
// of States::Elem. after_writer: the states come from the kernel launched
// just before on `stream` (a programmatic dependent launch when enabled).
template <typename Out, typename States>
void launch_merge(const States& states, Out* v_out, float* s_out, int64_t rows, int64_t dim,
                  int64_t max_states, cudaStream_t stream, bool after_writer = false) {
  if (rows == 0 || dim == 0) return;
  auto go = [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    const int threads_per_row = static_cast<int>(dim / kVec);
    // State groups only while the grid is far from filling the GPU (under a
    // quarter of 132 SMs x 2048 threads) and states remain to share out; with
    // more rows, one group per row already keeps enough loads in flight.
    int groups = 1;
    while (groups < 8 && 2 * groups <= max_states && threads_per_row * 2 * groups <= 256 &&
           rows * threads_per_row * groups < 132 * 512) {
      groups *= 2;
    }
    const int row_threads = threads_per_row * groups >= 256 ? threads_per_row
                                                            : 256 / groups / threads_per_row * threads_per_row;
    const int rows_per_block = row_threads / threads_per_row;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    const size_t smem = groups > 1 ? (2 * groups * rows_per_block + groups * row_threads * kVec) * sizeof(float) : 0;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(blocks));
    config.blockDim = dim3(row_threads, groups);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    if (after_writer && programmatic_merge()) {
      config.attrs = &attribute;
      config.numAttrs = 1;
    }
    // Two states or fewer (merge_state, two-state stacks): batches of 2, so no
    // state loads twice. More states keep batches of 4: batches of 2 measured
    // within 2% at 16384 x 4 and 6% slower at 512 x 16 (NOTES.md M3).
    if (max_states <= 2) {
      cudaLaunchKernelEx(&config, merge_kernel<Out, kVec, 2, States>, states, v_out, s_out, rows, dim);
    } else {
      cudaLaunchKernelEx(&config, merge_kernel<Out, kVec, 4, States>, states, v_out, s_out, rows, dim);
    }
  };
  constexpr int kWide = 16 / sizeof(typename States::Elem);
  if (dim % kWide == 0 && dim / kWide <= 1024) {
    go(std::integral_constant<int, kWide>{});
  } else {
    go(std::integral_constant<int, 1>{});
  }
}

}  // namespace jaxinfer
