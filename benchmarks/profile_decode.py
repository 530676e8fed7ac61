"""One decode case, run a few times, for Nsight Compute (ncu) on the GPU machine:

  ncu --section SpeedOfLight --section LaunchStats --section Occupancy \
      -k regex:"decode_kernel|merge_kernel" -c 4 python3 benchmarks/profile_decode.py 1 16384
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer

batch, kv_len = int(sys.argv[1]), int(sys.argv[2])
heads, kv_heads, dim, page = 32, 8, 128, 16
pages = batch * kv_len // page
k = jax.random.normal(jax.random.key(0), (pages, page, kv_heads, dim), jnp.bfloat16)
v = jax.random.normal(jax.random.key(1), k.shape, jnp.bfloat16)
q = jax.random.normal(jax.random.key(2), (batch, heads, dim), jnp.bfloat16)
indptr = np.arange(batch + 1, dtype=np.int32) * (kv_len // page)
plan = jaxinfer.plan_decode(indptr, np.random.default_rng(0).permutation(pages).astype(np.int32),
                            np.full(batch, page, np.int32), page_size=page, num_kv_heads=kv_heads,
                            max_batch=batch, max_pages=pages)
f = jax.jit(lambda q, k, v, p: jaxinfer.batch_decode(q, (k, v), p))
for _ in range(3):
    jax.block_until_ready(f(q, k, v, plan))
print("items", int(plan.merge_indptr[-1]), "capacity", plan.items.shape[0])
