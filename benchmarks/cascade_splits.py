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
from cascade import (PAGE, TARGETS, cascade_levels, flat_decode, one_launch, plan_cascade,
                     plan_flat, random_inputs, shared_splits)
from common import time_per_call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    for prefix, batch, suffix in TARGETS:
        q, k, v, _ = random_inputs(prefix, batch, suffix)
        num_pages = k.shape[0]
        levels, shared, own, last = cascade_levels(prefix // PAGE, batch, suffix // PAGE)
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
            rounds = " ".join(f"{t:.0f}" for t in ts)
            print(f"  {name}: median {median:.0f} ({flat / median:.1f}x)  ({rounds})",
                  flush=True)
        del k, v


if __name__ == "__main__":
    main()
