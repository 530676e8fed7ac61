"""One cascade case of benchmarks/cascade.py (one query per request), for Nsight
Compute on the GPU machine: the fused launch once, then the suffix level alone once.

  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats \
      -k regex:prefill_ws -c 2 python3 benchmarks/profile_cascade.py 32768 64 512
"""

import sys

import jax
import jax.numpy as jnp
from cascade import HKV, HQ, PAGE, cascade_levels, one_launch, page_shape, plan_cascade

import jaxinfer

prefix, batch, suffix = (int(a) for a in sys.argv[1:4])
prefix_pages, suffix_pages = prefix // PAGE, suffix // PAGE
num_pages = prefix_pages + batch * suffix_pages
k = jax.random.normal(jax.random.key(0), page_shape(num_pages), jnp.bfloat16)
v = jax.random.normal(jax.random.key(1), k.shape, jnp.bfloat16)
q = jax.random.normal(jax.random.key(2), (batch, HQ, k.shape[-1]), jnp.bfloat16)
plan = jax.device_put(plan_cascade(cascade_levels(prefix_pages, batch, suffix_pages)[0], batch, num_pages))
suffix_level = jax.jit(lambda q, k, v, p: jaxinfer.batch_prefill(q, (k, v), p, causal=True))
jax.block_until_ready(jax.jit(one_launch)(q, k, v, plan))
jax.block_until_ready(suffix_level(q, k, v, plan.levels[1]))
print("fused works", int((plan.fused.items[:, 0] >= 0).sum()) * HKV)
