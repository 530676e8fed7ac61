"""The fused cascade's time per shared split count at issue 6's two target rows,
the counts interleaved over rounds so that the card's drift between timings shows
as spread within a count, not as a difference between counts (one timing each,
as cascade.py's table takes them, moved by about 5% between runs), and the
plan's own choice (jaxinfer.cascade.balanced_splits: the static count, fewer used),
and flat batch_decode of the same requests for the speed-ups.

    cd benchmarks && python3 cascade_splits.py [--rounds 4]
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
from cascade import (HQ, PAGE, cascade_levels, flat_decode, one_launch, page_shape, plan_cascade,
                     plan_flat, shared_splits)
from common import time_per_call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    for prefix, batch, suffix in [(32768, 128, 256), (32768, 64, 512)]:
        prefix_pages, suffix_pages = prefix // PAGE, suffix // PAGE
        num_pages = prefix_pages + batch * suffix_pages
        key = jax.random.key(prefix + batch + suffix)
        k = jax.random.normal(key, page_shape(num_pages), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 1), k.shape, jnp.bfloat16)
        q = jax.random.normal(jax.random.fold_in(key, 2), (batch, HQ, k.shape[-1]), jnp.bfloat16)
        levels, shared, own, last = cascade_levels(prefix_pages, batch, suffix_pages)
        default = plan_cascade(levels, batch, num_pages)
        static, chosen = shared_splits(default)
        plans = {f"{n} splits": jax.device_put(plan_cascade(levels, batch, num_pages, kv_splits=[n, 1]))
                 for n in range(max(2, static // 2), static + 1)}
        plans[f"the plan's, {chosen} of {static}"] = jax.device_put(default)
        calls = {name: (one_launch, plan) for name, plan in plans.items()}
        calls["flat batch_decode"] = (flat_decode, plan_flat(shared, own, last))
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, (fn, plan) in calls.items():
                times[name].append(time_per_call(fn, [q, k, v, plan]) * 1e6)
        flat = statistics.median(times["flat batch_decode"])
        print(f"prefix {prefix}, batch {batch}, suffix {suffix}: us per call, {args.rounds} rounds")
        for name, ts in times.items():
            median = statistics.median(ts)
            print(f"  {name}: median {median:.0f} ({flat / median:.1f}x)  ({' '.join(f'{t:.0f}' for t in ts)})",
                  flush=True)
        del k, v


if __name__ == "__main__":
    main()
