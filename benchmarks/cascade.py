"""Cascade decode vs flat paged decode on the GPU, in one run.

bf16, 32 query / 8 KV heads, head dim 128, page 16 (NHD, or --kv-layout HND),
one query per request. Every request shares one prefix and has its own
suffix. Flat: batch_decode over each request's full page list (the prefix
pages repeated in every table, so the prefix is read once per request).
Cascade: the prefix level runs every request's query against the prefix
once, the suffix level per request: both levels as one launch (the pages
live in one pool), and, for comparison, one after the other (the suffix
level merging the prefix level's state as it writes). Reports time and the
speed-up over flat, and how many of its KV splits the plan gave the shared
level this step against the one launch with every split used.

For the issue's two target rows also a flat decode where every request owns a
copy of the prefix (a server without prefix sharing): then no page is in two
tables, so the prefix comes from DRAM once per request instead of partly from
L2, as in the shared-table flat decode.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from common import parse_args, time_per_call, write_table

import jaxinfer
from jaxinfer.prefill import ITEM_REQUEST, ITEM_SPLIT, ITEM_SPLIT_BEGIN, ITEM_SPLIT_END

HQ, HKV, D, PAGE = 32, 8, 128, 16
LAYOUT = "NHD"  # --kv-layout
TARGETS = [(32768, 128, 256), (32768, 64, 512)]  # issue 6's two rows: prefix, batch, suffix


def page_shape(num_pages):
    """A paged cache's shape in LAYOUT."""
    return (num_pages, PAGE, HKV, D) if LAYOUT == "NHD" else (num_pages, HKV, PAGE, D)


def cascade_levels(prefix_pages, batch, suffix_pages):
    """plan_cascade's two levels, one query a request: the shared prefix's pages first in the
    pool, then each request's own suffix pages. Returns (levels, shared, own, last)."""
    shared = np.arange(prefix_pages, dtype=np.int32)
    own = prefix_pages + np.arange(batch * suffix_pages, dtype=np.int32).reshape(batch, suffix_pages)
    last = np.full(batch, PAGE, np.int32)
    rows_q = np.arange(batch + 1, dtype=np.int32)
    levels = [(np.array([0, batch], np.int32), np.array([0, prefix_pages], np.int32), shared,
               np.array([PAGE], np.int32)),
              (rows_q, rows_q * suffix_pages, own.reshape(-1), last)]
    return levels, shared, own, last


def random_inputs(prefix, batch, suffix):
    """One case's q [batch, HQ, D] and page pool k, v: the prefix's pages, then each request's
    suffix pages (cascade_levels' order). Returns (q, k, v, key)."""
    key = jax.random.key(prefix + batch + suffix)
    k = jax.random.normal(key, page_shape(prefix // PAGE + batch * (suffix // PAGE)), jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 1), k.shape, jnp.bfloat16)
    q = jax.random.normal(jax.random.fold_in(key, 2), (batch, HQ, D), jnp.bfloat16)
    return q, k, v, key


def plan_cascade(levels, batch, num_pages, kv_splits=None):
    return jaxinfer.plan_cascade(levels, num_qo_heads=HQ, num_kv_heads=HKV, page_size=PAGE,
                                 max_q_tokens=batch, max_groups=[1, batch],
                                 max_pages=[num_pages, num_pages], kv_splits=kv_splits)


def one_launch(q, k, v, plan):
    """cascade_attention with both levels in one pool (k, v)."""
    return jaxinfer.cascade_attention(q, [(k, v), (k, v)], plan, kv_layout=LAYOUT)


def shared_splits(plan):
    """(static, used this step) KV splits of the shared level in the plan's one launch."""
    static = plan.levels[0].kv_splits.shape[0]
    items = plan.fused.items
    shared = items[(items[:, ITEM_REQUEST] >= 0) & (items[:, ITEM_SPLIT] < static)]
    return static, len(set(shared[shared[:, ITEM_SPLIT_END] > shared[:, ITEM_SPLIT_BEGIN], ITEM_SPLIT]))


def plan_flat(shared, own, last):
    """batch_decode's plan over each request's whole page list: the shared pages, then its own."""
    batch = own.shape[0]
    table = np.concatenate([np.broadcast_to(shared, (batch, shared.shape[0])), own], axis=1)
    indptr = np.arange(batch + 1, dtype=np.int32) * table.shape[1]
    return jax.device_put(jaxinfer.plan_decode(indptr, table.reshape(-1), last, page_size=PAGE,
                                               num_kv_heads=HKV, max_batch=batch, max_pages=table.size))


def flat_decode(q, k, v, plan):
    return jaxinfer.batch_decode(q, (k, v), plan, kv_layout=LAYOUT)


def breakdown(q, k, v, plan, levels, batch, own, last, num_pages):
    """Times the cascade's parts alone (--breakdown): what a speed-up has to come from."""
    prefill = lambda q, k, v, p: jaxinfer.batch_prefill(q, (k, v), p, kv_layout=LAYOUT,  # noqa: E731
                                                         return_lse=True)
    parts = {}
    shared, suffix = plan.levels
    parts[f"level 0 (batch_prefill, {shared.kv_splits.shape[0]} splits)"] = time_per_call(
        prefill, [q, k, v, shared])
    state = (jnp.zeros((batch, HQ, D), jnp.bfloat16), jnp.zeros((batch, HQ), jnp.float32))
    parts["level 1 (batch_prefill, causal, merge_with level 0)"] = time_per_call(
        lambda q, k, v, p, s: jaxinfer.batch_prefill(q, (k, v), p, kv_layout=LAYOUT, causal=True,
                                                     merge_with=s, return_lse=True),
        [q, k, v, suffix, state])
    parts["level 1 without merge_with"] = time_per_call(
        lambda q, k, v, p: jaxinfer.batch_prefill(q, (k, v), p, kv_layout=LAYOUT, causal=True,
                                                  return_lse=True),
        [q, k, v, suffix])
    suffix_plan = jax.device_put(jaxinfer.plan_decode(
        levels[1][1], own.reshape(-1), last, page_size=PAGE, num_kv_heads=HKV,
        max_batch=batch, max_pages=num_pages))
    parts["suffix as batch_decode"] = time_per_call(
        lambda q, k, v, p: jaxinfer.batch_decode(q, (k, v), p, kv_layout=LAYOUT, return_lse=True),
        [q, k, v, suffix_plan])
    def plan_with(splits):  # the shared level in `splits` KV splits
        return jax.device_put(plan_cascade(levels, batch, num_pages, kv_splits=[splits, 1]))

    for splits in (4, 8, 16, 32):
        parts[f"level 0 with {splits} splits"] = time_per_call(prefill, [q, k, v, plan_with(splits).levels[0]])
    # The one launch takes about its SM time over the SMs: fewer shared splits than fill
    # the GPU alone leave SMs to the suffix's works beside them (NOTES P36).
    for splits in (3, 4, 5, 6, 7, 8):
        parts[f"one launch, shared level in {splits} splits"] = time_per_call(
            one_launch, [q, k, v, plan_with(splits)])
    for name, t in parts.items():
        print(f"    {name}: {t * 1e6:.0f} us", flush=True)


def flat_private_prefix(q, batch, pages_per_request, key):
    """Time of flat batch_decode when each request's pages (prefix copy + suffix) are its own."""
    shape = page_shape(batch * pages_per_request)
    k = jax.random.normal(key, shape, jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16)
    indptr = np.arange(batch + 1, dtype=np.int32) * pages_per_request
    plan = jax.device_put(jaxinfer.plan_decode(
        indptr, np.arange(shape[0], dtype=np.int32), np.full(batch, PAGE, np.int32), page_size=PAGE,
        num_kv_heads=HKV, max_batch=batch, max_pages=shape[0]))
    return time_per_call(lambda q, k, v, p: jaxinfer.batch_decode(q, (k, v), p, kv_layout=LAYOUT),
                         [q, k, v, plan])


def main():
    global LAYOUT
    args = parse_args(__doc__)
    LAYOUT = args.kv_layout
    cases = [(p, b, s) for p in (8192, 32768) for b in (16, 64, 256) for s in (128, 1024)]
    cases += TARGETS
    if args.quick or args.breakdown:
        cases = cases[-2:]
    rows = []
    for prefix, batch, suffix in cases:
        prefix_pages, suffix_pages = prefix // PAGE, suffix // PAGE
        q, k, v, key = random_inputs(prefix, batch, suffix)
        num_pages = k.shape[0]
        levels, shared, own, last = cascade_levels(prefix_pages, batch, suffix_pages)

        t_flat = time_per_call(flat_decode, [q, k, v, plan_flat(shared, own, last)])

        host_plan = plan_cascade(levels, batch, num_pages)
        splits, used = shared_splits(host_plan)
        plan = jax.device_put(host_plan)
        t_cascade = time_per_call(one_launch, [q, k, v, plan])
        # The one launch with every static split used (the plan's balance off).
        t_filled = time_per_call(one_launch, [q, k, v, jax.device_put(
            plan_cascade(levels, batch, num_pages, kv_splits=[splits, 1]))])
        t_chained = time_per_call(one_launch, [q, k, v, plan._replace(fused=None)])
        row = [prefix, batch, suffix, f"{t_flat * 1e6:.0f} us", f"{t_cascade * 1e6:.0f} us",
               f"{t_flat / t_cascade:.1f}x", f"{used} of {splits}",
               f"{t_filled * 1e6:.0f} us ({t_flat / t_filled:.1f}x)",
               f"{t_chained * 1e6:.0f} us ({t_flat / t_chained:.1f}x)"]
        if args.breakdown:
            breakdown(q, k, v, plan, levels, batch, own, last, num_pages)
        del k, v  # room for the copies below
        if (prefix, batch, suffix) in TARGETS:
            t_private = flat_private_prefix(q, batch, prefix_pages + suffix_pages, key)
            row.append(f"{t_private * 1e6:.0f} us ({t_private / t_cascade:.1f}x)")
        else:
            row.append("-")
        rows.append(row)
        print(row, flush=True)

    write_table(os.path.join(args.out, "cascade.md"),
                f"Cascade vs flat paged decode (bf16, 32/8 heads, D=128, page 16, {LAYOUT})",
                "bash scripts/gpu_check.sh",
                ["shared prefix", "batch", "suffix", "flat batch_decode", "cascade_attention", "speed-up",
                 "shared splits used", "every split used", "levels one after another",
                 "flat, prefix copied per request (speed-up)"],
                rows)


if __name__ == "__main__":
    main()
