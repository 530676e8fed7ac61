"""GPU time of each kernel inside the JAX programs of benchmarks/prefill.py, from a
CUPTI trace (torch.profiler records every kernel of the process, JAX's too), for
1 x 8192 causal: jaxinfer ragged, cuDNN and the Mosaic GPU Pallas kernel. It tells the
kernel's own time from what a JAX-level timing adds (gaps, extra kernels), and
the kernel under JAX from the kernel alone (benchmarks/prefill_kernel.cu).

    cd benchmarks && python3 trace_prefill.py     # GPU machine, after scripts/gpu_check.sh

With --plain it only runs each program once, untraced, for Nsight Compute (which
cannot share CUPTI with torch.profiler), one launch of each kernel:

    ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section InstructionStats --section Occupancy \
        -k regex:"prefill_ws|sdpa|mosaic" -c 3 python3 trace_prefill.py --plain
"""

import collections
import functools
import sys

import torch  # noqa: F401 - before jax, so that its CUDA libraries load first
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import jax
import jax.numpy as jnp
import numpy as np
from prefill import HQ, HKV, D, flops, mosaic_attention

import jaxinfer

BATCH, LENGTH, REPEAT = 1, 8192, 16


def trace(name, fn, args):
    """Runs fn REPEAT times in one jitted program (as common.time_per_call does) and
    prints each kernel's count and median GPU time, and the span of the repeats."""
    if "--plain" in sys.argv:
        jax.block_until_ready(jax.jit(fn)(*args))
        return

    def many(*a):
        outs = []
        for _ in range(REPEAT):
            a, outs = jax.lax.optimization_barrier((a, outs))
            outs = outs + [fn(*a)]
        return outs

    f = jax.jit(many)
    jax.block_until_ready(f(*args))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        jax.block_until_ready(f(*args))
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    by_name = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name[:90]].append(e.time_range.end - e.time_range.start)
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / REPEAT if kernels else 0
    f_call = flops(BATCH, LENGTH, True)
    print(f"== {name}: {span:.1f} us per call from first to last kernel "
          f"({f_call / span / 1e6:.0f} TFLOP/s)")
    for kernel, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        t = float(np.median(times))
        print(f"  {len(times):4d} x {t:8.1f} us  {kernel}")


def main():
    kq, kk, kv_ = jax.random.split(jax.random.key(BATCH + LENGTH), 3)
    q = jax.random.normal(kq, (BATCH, LENGTH, HQ, D), jnp.bfloat16)
    k = jax.random.normal(kk, (BATCH, LENGTH, HKV, D), jnp.bfloat16)
    v = jax.random.normal(kv_, (BATCH, LENGTH, HKV, D), jnp.bfloat16)
    tokens = BATCH * LENGTH
    indptr = np.arange(BATCH + 1, dtype=np.int32) * LENGTH
    plan = jax.device_put(jaxinfer.plan_prefill(indptr, indptr, num_qo_heads=HQ, num_kv_heads=HKV,
                                                max_batch=BATCH, max_q_tokens=tokens))
    flat = lambda x: x.reshape(tokens, *x.shape[2:])  # noqa: E731
    ragged = functools.partial(jaxinfer.batch_prefill_ragged, causal=True)
    trace("jaxinfer ragged", ragged, [flat(q), flat(k), flat(v), plan])
    trace("cuDNN", functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                     implementation="cudnn"), [q, k, v])
    trace("Mosaic GPU Pallas (fp16)", functools.partial(mosaic_attention, causal=True),
          [x.astype(jnp.float16) for x in (q, k, v)])


if __name__ == "__main__":
    main()
