"""One cascade case of benchmarks/cascade.py (one query per request), for Nsight
Compute on the GPU machine: the fused launch once, then the suffix level alone once.

  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats \
      -k regex:prefill_ws -c 2 python3 benchmarks/profile_cascade.py 32768 64 512
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer

prefix, batch, suffix = (int(a) for a in sys.argv[1:4])
heads, kv_heads, dim, page = 32, 8, 128, 16
prefix_pages, suffix_pages = prefix // page, suffix // page
num_pages = prefix_pages + batch * suffix_pages
k = jax.random.normal(jax.random.key(0), (num_pages, page, kv_heads, dim), jnp.bfloat16)
v = jax.random.normal(jax.random.key(1), k.shape, jnp.bfloat16)
q = jax.random.normal(jax.random.key(2), (batch, heads, dim), jnp.bfloat16)
shared = np.arange(prefix_pages, dtype=np.int32)
own = prefix_pages + np.arange(batch * suffix_pages, dtype=np.int32)
rows = np.arange(batch + 1, dtype=np.int32)
last = np.full(batch, page, np.int32)
levels = [(np.array([0, batch], np.int32), np.array([0, prefix_pages], np.int32), shared,
           np.array([page], np.int32)),
          (rows, rows * suffix_pages, own, last)]
plan = jax.device_put(jaxinfer.plan_cascade(
    levels, num_qo_heads=heads, num_kv_heads=kv_heads, page_size=page, max_q_tokens=batch,
    max_groups=[1, batch], max_pages=[num_pages, num_pages]))
fused = jax.jit(lambda q, k, v, p: jaxinfer.cascade_attention(q, [(k, v), (k, v)], p))
suffix_level = jax.jit(lambda q, k, v, p: jaxinfer.batch_prefill(q, (k, v), p, causal=True))
jax.block_until_ready(fused(q, k, v, plan))
jax.block_until_ready(suffix_level(q, k, v, plan.levels[1]))
print("fused works", int((plan.fused.items[:, 0] >= 0).sum()) * kv_heads)
