"""One cascade case of benchmarks/cascade.py (one query per request), for Nsight
Compute on the GPU machine: the fused launch once, then the suffix level alone once.

  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats \
      -k regex:prefill_ws -c 2 python3 benchmarks/profile_cascade.py 32768 64 512
"""

import sys

import jax
from cascade import HKV, PAGE, cascade_levels, one_launch, plan_cascade, random_inputs

import jaxinfer

prefix, batch, suffix = (int(a) for a in sys.argv[1:4])
q, k, v, _ = random_inputs(prefix, batch, suffix)
levels = cascade_levels(prefix // PAGE, batch, suffix // PAGE)[0]
plan = jax.device_put(plan_cascade(levels, batch, k.shape[0]))
suffix_level = jax.jit(lambda q, k, v, p: jaxinfer.batch_prefill(q, (k, v), p, causal=True))
jax.block_until_ready(jax.jit(one_launch)(q, k, v, plan))
jax.block_until_ready(suffix_level(q, k, v, plan.levels[1]))
print("fused works", int((plan.fused.items[:, 0] >= 0).sum()) * HKV)
