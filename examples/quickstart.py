"""Split attention over a long context in two halves, then merge the halves.

Run: python examples/quickstart.py  (CPU or GPU)
"""

import jax
import jax.numpy as jnp

import jaxinfer
from jaxinfer import reference

q_len, kv_len, heads, kv_heads, dim = 4, 1000, 8, 2, 128
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (q_len, heads, dim), jnp.bfloat16)
k = jax.random.normal(kk, (kv_len, kv_heads, dim), jnp.bfloat16)
v = jax.random.normal(kv, (kv_len, kv_heads, dim), jnp.bfloat16)


@jax.jit
def split_then_merge(q, k, v):
    # Each half returns its output and its base-2 log-sum-exp ...
    o1, lse1 = reference.single_attention(q, k[:600], v[:600], return_lse=True)
    o2, lse2 = reference.single_attention(q, k[600:], v[600:], return_lse=True)
    # ... and merge_state combines them exactly (a jaxinfer custom call).
    return jaxinfer.merge_state(o1, lse1, o2, lse2)


out, lse = split_then_merge(q, k, v)
whole = reference.single_attention(q, k, v)
print("backend:", jax.default_backend())
print("max |split+merge - whole|:", float(jnp.max(jnp.abs(out.astype(jnp.float32) - whole.astype(jnp.float32)))))
print("lowered to:", [t for t in ("jaxinfer_merge_state",) if t in split_then_merge.lower(q, k, v).as_text()])
