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


def measure(label, fns, args, nbytes):
    """A table row: label, then each fn's time per call and bandwidth on args."""
    row = [label]
    for fn in fns:
        t = time_per_call(fn, args)
        row.append(f"{t * 1e6:.1f} us, {nbytes / t / 1e12:.2f} TB/s ({nbytes / t / ceiling:.0%})")
    return row


def random_states(tokens, n, heads, dim):
    key_v, key_s = jax.random.split(jax.random.key(0))
    return (jax.random.normal(key_v, (tokens, n, heads, dim), jnp.bfloat16),
            jax.random.normal(key_s, (tokens, n, heads), jnp.float32))


rows = []
shapes = [(4096, 2, 32, 128), (16384, 4, 32, 128), (512, 16, 32, 128)]
for tokens, n, heads, dim in shapes[:1] if args.quick else shapes:
    v, s = random_states(tokens, n, heads, dim)
    nbytes = v.nbytes + s.nbytes + v.nbytes // n + s.nbytes // n
    rows.append(measure(f"{tokens} x {n} states x {heads}x{dim}", (jaxinfer.merge_states, reference.merge_states),
                        [v, s], nbytes))
# merge_state: two separate states (a cascade's two levels).
tokens, heads, dim = 4096, 32, 128
v, s = random_states(tokens, 2, heads, dim)
pair = [v[:, 0], s[:, 0], v[:, 1], s[:, 1]]
nbytes = v.nbytes + s.nbytes + v.nbytes // 2 + s.nbytes // 2
rows.append(measure(f"merge_state: {tokens} x 2 separate states x {heads}x{dim}",
                    (jaxinfer.merge_state, reference.merge_state), pair, nbytes))
write_table(os.path.join(args.out, "merge.md"), "merge_states and merge_state (bf16)", "bash scripts/gpu_check.sh",
            ["shape", "jaxinfer", "jnp reference (XLA)"], rows,
            f"Copy ceiling measured in the same run: {ceiling / 1e12:.2f} TB/s (read + write).")
