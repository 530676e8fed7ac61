"""Sweep of the decode split target (work items per wave) on a few shapes, to
check the planner's one-wave rule. Prints one line per (shape, target)."""

import jax
import jax.numpy as jnp
import numpy as np
from common import time_per_call

import jaxinfer
from jaxinfer import decode as decode_mod

PAGE, DIM, HQ, HKV = 16, 128, 32, 8
for batch, kv_len in [(1, 16384), (16, 4096), (64, 4096), (64, 1024)]:
    pages = batch * kv_len // PAGE
    k = jax.random.normal(jax.random.key(0), (pages, PAGE, HKV, DIM), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(1), k.shape, jnp.bfloat16)
    q = jax.random.normal(jax.random.key(2), (batch, HQ, DIM), jnp.bfloat16)
    indptr = np.arange(batch + 1, dtype=np.int32) * (kv_len // PAGE)
    table = np.random.default_rng(0).permutation(pages).astype(np.int32)
    nbytes = 2 * k.nbytes
    for target in [17, 33, 66, 132, 264]:
        decode_mod.wave_ctas = lambda *a, target=target, **kw: target  # noqa: E731
        plan = jax.device_put(jaxinfer.plan_decode(indptr, table, np.full(batch, PAGE, np.int32),
                                                   page_size=PAGE, num_kv_heads=HKV, max_batch=batch,
                                                   max_pages=pages))
        t = time_per_call(lambda q, k, v, p: jaxinfer.batch_decode(q, (k, v), p), [q, k, v, plan])
        print(f"b={batch} kv={kv_len} target={target} items={int(plan.merge_indptr[-1])}: "
              f"{t * 1e6:.1f} us {nbytes / t / 1e12:.2f} TB/s", flush=True)
