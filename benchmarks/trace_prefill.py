"""GPU time of the kernels inside the JAX programs of benchmarks/prefill.py, from a
CUPTI trace (torch.profiler records every kernel of the process, JAX's too): the
same cases and implementations, timed as the kernels' span on the GPU rather than
by the wall clock. It tells a kernel's own time from what a JAX-level timing adds
(gaps, extra kernels), and compares with figures taken by CUDA events, such as
FlashInfer's in ../shared/ANCHORS.md.

    cd benchmarks && python3 trace_prefill.py [--quick] [--only-jaxinfer]   # after scripts/gpu_check.sh

Prints each program's kernels (count, median time) and writes trace_prefill.md to
--out. With --slope it traces the benchmark's own timing instead
(common.time_per_call, first case only) and prints the GPU's idle gaps between
kernels, which the slope counts and a kernel's span does not (NOTES P53). With
--plain it only runs each program once, untraced, for Nsight Compute
(which cannot share CUPTI with torch.profiler). Without preallocation, since
ncu saves and restores the device memory in use around each replayed kernel
(with JAX preallocating 75% of the card, three kernels ran past 140 s: NOTES P65):

    XLA_PYTHON_CLIENT_PREALLOCATE=false \\
    ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section InstructionStats --section Occupancy \\
        -k regex:"prefill_ws|sdpa|mosaic" -c 4 python3 trace_prefill.py --quick --plain
"""

import collections
import os
import sys

import torch  # noqa: F401 - before jax, so that its CUDA libraries load first
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import jax
import numpy as np
from common import parse_args, repeated, time_per_call, write_table
from prefill import CASES, HEADER, flops, implementations

REPEAT = 16


def gpu_time_per_call(fn, args):
    """Seconds from the first kernel's start to the last one's end, per call, over
    REPEAT calls in one jitted program (as common.time_per_call runs them); prints
    each kernel's count and median time."""
    f = repeated(fn, REPEAT)
    jax.block_until_ready(f(*args))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        jax.block_until_ready(f(*args))
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    by_name = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name[:100]].append(e.time_range.end - e.time_range.start)
    for kernel, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        print(f"    {len(times):4d} x {np.median(times):9.1f} us  {kernel}")
    return (kernels[-1].time_range.end - kernels[0].time_range.start) * 1e-6 / REPEAT


def slope_gaps(fn, args):
    """common.time_per_call under the profiler: its figure, the GPU's busy time per call
    (calls counted by the kernel of most total time) and the idle gaps between kernels."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time_per_call(fn, args)
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == DeviceType.CUDA), key=lambda k: k[0])
    longest = collections.Counter()
    for start, end, name in kernels:
        longest[name] += end - start
    main_name = longest.most_common(1)[0][0]
    calls = sum(1 for k in kernels if k[2] == main_name)
    busy = gaps = 0.0
    sizes = collections.Counter()
    reach = kernels[0][0]
    for start, end, _ in kernels:  # the union of the kernels' intervals, and the holes in it
        if start > reach:
            gap = start - reach
            sizes["<5 us" if gap < 5 else "5-50 us" if gap < 50 else "50-500 us" if gap < 500 else ">500 us"] += 1
            if gap < 500:  # longer ones are the rounds' synchronisations, outside the slope
                gaps += gap
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    print(f"    slope {t * 1e6:.1f} us a call; {calls} calls of {main_name[:60]}: "
          f"busy {busy / calls:.1f} us a call, gaps under 500 us {gaps / calls:.1f} us a call; "
          f"gaps by size {dict(sizes)}", flush=True)


def main():
    plain = "--plain" in sys.argv
    if plain:
        sys.argv.remove("--plain")
    if "--slope" in sys.argv:
        batch, length, causal = CASES[0]
        for column, fn, fn_args in implementations(batch, length, causal):
            if fn_args is not None and column != HEADER[5]:  # not XLA: 10 ms a call
                print(f"{batch} x {length}, {column}:", flush=True)
                try:
                    slope_gaps(fn, fn_args)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    print(f"    error: {type(e).__name__}: {str(e)[:60]}", flush=True)
        return
    args = parse_args(__doc__)
    rows = []
    for batch, length, causal in CASES[:1] if args.quick else CASES:
        name = f"{batch} x {length}" + ("" if causal else " non-causal")
        row = [name]
        for column, fn, fn_args in implementations(batch, length, causal, args.only_jaxinfer):
            if fn_args is None:
                row.append("-")
                continue
            print(f"{name}, {column}:", flush=True)
            try:
                if plain:
                    jax.block_until_ready(jax.jit(fn)(*fn_args))
                    continue
                t = gpu_time_per_call(fn, fn_args)
                row.append(f"{t * 1e3:.3f} ms, {flops(batch, length, causal) / t / 1e12:.0f} TFLOP/s")
            except Exception as e:  # noqa: BLE001 - report, keep going
                row.append(f"error: {type(e).__name__}: {str(e)[:60]}")
        rows.append(row)
    if not plain:
        header = HEADER[:4] if args.only_jaxinfer else HEADER
        write_table(os.path.join(args.out, "trace_prefill.md"),
                    "Batch prefill, GPU time of the kernels (CUPTI trace; bf16, 32/8 heads, D=128)",
                    "cd benchmarks && python3 trace_prefill.py", header, rows)


if __name__ == "__main__":
    main()
