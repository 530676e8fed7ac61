"""merge_states and merge_state on the GPU: jaxinfer's kernel vs the jnp reference (XLA-fused).

Memory-bound: bytes = every state read once + the result written once.
"""

import os

import jax
import jax.numpy as jnp
from common import copy_bandwidth, parse_args, time_per_call, write_table

import jaxinfer
from jaxinfer import reference

args = parse_args(__doc__)
ceiling = copy_bandwidth()
rows = []
shapes = [(4096, 2, 32, 128), (16384, 4, 32, 128), (512, 16, 32, 128)]
for tokens, n, heads, dim in shapes[:1] if args.quick else shapes:
    key = jax.random.key(0)
    v = jax.random.normal(key, (tokens, n, heads, dim), jnp.bfloat16)
    s = jax.random.normal(key, (tokens, n, heads), jnp.float32)
    nbytes = v.nbytes + s.nbytes + v.nbytes // n + s.nbytes // n
    row = [f"{tokens} x {n} states x {heads}x{dim}"]
    for fn in (jaxinfer.merge_states, reference.merge_states):
        t = time_per_call(fn, [v, s])
        row.append(f"{t * 1e6:.1f} us, {nbytes / t / 1e12:.2f} TB/s ({nbytes / t / ceiling:.0%})")
    rows.append(row)
# merge_state: two separate states (a cascade's two levels).
tokens, heads, dim = 4096, 32, 128
keys = jax.random.split(jax.random.key(1), 4)
pair = [jax.random.normal(keys[0], (tokens, heads, dim), jnp.bfloat16),
        jax.random.normal(keys[1], (tokens, heads), jnp.float32),
        jax.random.normal(keys[2], (tokens, heads, dim), jnp.bfloat16),
        jax.random.normal(keys[3], (tokens, heads), jnp.float32)]
nbytes = sum(x.nbytes for x in pair) + pair[0].nbytes + pair[1].nbytes
row = [f"merge_state: {tokens} x 2 separate states x {heads}x{dim}"]
for fn in (jaxinfer.merge_state, reference.merge_state):
    t = time_per_call(fn, pair)
    row.append(f"{t * 1e6:.1f} us, {nbytes / t / 1e12:.2f} TB/s ({nbytes / t / ceiling:.0%})")
rows.append(row)
write_table(os.path.join(args.out, "merge.md"), "merge_states and merge_state (bf16)", "bash scripts/gpu_check.sh",
            ["shape", "jaxinfer", "jnp reference (XLA)"], rows,
            f"Copy ceiling measured in the same run: {ceiling / 1e12:.2f} TB/s (read + write).")
