"""Cascade attention: keys shared by many queries are attended once per step.

A cascade has levels; each level groups the step's query rows and gives each
group its own keys in a paged cache. Typically level 0 is one group holding
every query against the shared prefix (a system prompt, few-shot examples,
the prompt of parallel samples), and the last level has one group per request
holding its own suffix. Each level runs as one batch prefill (its groups are
the "requests"; the shared level's queries of all requests go through the
kernel together, so the prefix is read once per step, not once per request),
and each level merges the levels above into its result by their log-sum-exp
as it writes it:

>>> plan = jaxinfer.plan_cascade([shared_level, suffix_level], num_qo_heads=32,
...                              num_kv_heads=8, page_size=16, max_q_tokens=256,
...                              max_groups=[1, 256], max_pages=[4096, 65536])
>>> o = jaxinfer.cascade_attention(q, [shared_cache, suffix_cache], plan, causal=True)

Each level is ``(qo_indptr, kv_indptr, kv_indices, kv_last_page_len)``: group
g owns query rows ``qo_indptr[g]:qo_indptr[g+1]`` and the keys of pages
``kv_indices[kv_indptr[g]:kv_indptr[g+1]]``. The result equals attention of
each query over the concatenation of its groups' keys, level by level.

When every level reads one page pool (the same cache object at every level,
as a serving system keeps its pages) and an upper level is cut into KV splits
(few queries over long shared keys: decode), all levels run as ONE launch of
the prefill kernel instead: every level's work items in one list, heaviest
first, each writing the partial state of its level's splits, merged once at
the end. Each step the plan gives the long shared items only the share of
the SMs that their share of the work asks for, so the short per-request items
run beside them from the start and all end together; the levels pay one
start-up and one merge between them.

Only the last level knows positions (its queries are the last positions of
its keys): ``causal`` applies there, the upper levels are fully visible, and
options that need absolute positions across levels (window, ALiBi, RoPE) are
not offered.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from jaxinfer.decode import H100_SMS
from jaxinfer.prefill import (ITEM_FIELDS, ITEM_KV_BEGIN, ITEM_KV_END, ITEM_KV_LEN, ITEM_Q_LEN,
                              ITEM_REQUEST, ITEM_SPLIT, ITEM_SPLIT_BEGIN, ITEM_SPLIT_END, TILE_ROWS,
                              batch_prefill, kernel_runs, plan_prefill, prefill_items)


class FusedLevels(NamedTuple):
    """Every level's work for one launch of the prefill kernel (all int32)."""

    kv_indices: np.ndarray  # the levels' page tables one after another
    items: np.ndarray       # the levels' items, heaviest first, then unused rows (request -1)
    kv_splits: np.ndarray   # its LENGTH: partial states per query row, the levels' splits in order


class CascadePlan(NamedTuple):
    """One PrefillPlan per level, top (most shared) first, and the same work as one
    launch (None where the levels run one after another: see the module's doc)."""

    levels: tuple
    fused: FusedLevels | None = None


def shared_kv_splits(max_q_tokens: int, num_qo_heads: int, num_kv_heads: int,
                     num_sms: int = H100_SMS) -> int:
    """KV splits for a shared level: its few query tiles alone would leave most of the
    GPU idle, so each tile's keys are cut into slices until one wave of CTAs (one per SM,
    as the Hopper kernel runs) fills the GPU. A second wave measured 15-40% slower."""
    tiles = -(-max_q_tokens * (num_qo_heads // num_kv_heads) // TILE_ROWS)
    return max(1, min(16, num_sms // (tiles * num_kv_heads)))


def plan_cascade(levels: Sequence, *, num_qo_heads: int, num_kv_heads: int, page_size: int,
                 max_q_tokens: int, max_groups: Sequence[int], max_pages: Sequence[int],
                 kv_splits: Sequence[int] | None = None) -> CascadePlan:
    """Plans every level once per step on the host.

    Args:
      levels: per level, (qo_indptr [G + 1], kv_indptr [G + 1], kv_indices, kv_last_page_len [G]),
        all int; every level's groups cover the same query rows 0..qo_indptr[-1].
      num_qo_heads, num_kv_heads, page_size: of q and the caches (the same at every level).
      max_q_tokens: static rows of q; max_groups, max_pages: static capacities per level.
      kv_splits: static KV splits per level (see plan_prefill); default: shared_kv_splits
        for every level but the last, 1 for the last (one group per request), of which
        the one launch uses as many as balanced_splits finds for this step's lengths.
    """
    if not levels:
        raise ValueError("levels: expected at least one level")
    if len(max_groups) != len(levels) or len(max_pages) != len(levels):
        raise ValueError(f"max_groups, max_pages: expected one capacity per level ({len(levels)}), "
                         f"got {len(max_groups)} and {len(max_pages)}")
    default_splits = kv_splits is None
    if default_splits:
        shared = shared_kv_splits(max_q_tokens, num_qo_heads, num_kv_heads)
        kv_splits = [shared] * (len(levels) - 1) + [1]
    plans, rows = [], None
    for i, (qo_indptr, kv_indptr, kv_indices, kv_last_page_len) in enumerate(levels):
        # A level may hold fewer keys than queries (an empty suffix): its queries then
        # sit before its first key, and under causal see none of its keys.
        plan = plan_prefill(qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                            max_batch=max_groups[i], max_q_tokens=max_q_tokens,
                            page_size=page_size, max_pages=max_pages[i], queries_after_keys=False,
                            kv_splits=kv_splits[i])
        total = int(plan.qo_indptr[-1])
        if rows is not None and total != rows:
            raise ValueError(f"levels[{i}]: its groups cover {total} query rows, level 0's {rows}")
        rows = total
        plans.append(plan)
    # One launch needs a partial state per level's split for every query row; an
    # upper level with splits has that workspace already.
    split = any(plan.kv_splits.shape[0] > 1 for plan in plans[:-1])
    return CascadePlan(tuple(plans), _fuse(plans, num_kv_heads, balance=default_splits)
                       if split else None)


# The one launch's cost model, in tiles of 128 query rows x 128 keys (per-work stamps,
# benchmarks/NOTES.md P56, P71, P82): a work costs about 1.5 tiles to start and end; a
# tile of a short work (few query rows: decode) about 1.2, and 1.27 times that when
# every SM runs short works at once (they then share the DRAM: P77 measured 18.3
# against 23.3 GB/s per SM with up to 52 SMs).
KV_TILE = 128
WORK_START, SHORT_WORK_TILE, CROWDED = 1.5, 1.2, 1.27
MARGIN = 0.05


def balanced_splits(upper, last, num_kv_heads: int, max_splits: int,
                    num_sms: int = H100_SMS) -> int:
    """How many of their max_splits KV splits the upper levels' works use in the one
    launch this step (benchmarks/NOTES.md P86, P87).

    Filling the GPU with shared works first leaves the last level's short works to
    run all at once at the end, crowding the DRAM. With fewer, longer shared works the
    other SMs run short works from the start, their memory traffic beside the shared
    works' tensor-core time. Too few, and the shared works end last. The choice is the
    split count of the least estimated time: short works run on the SMs the shared
    works leave until those end, the rest then on every SM, crowded.
    upper: the upper levels' items (every split); last: the last level's items."""
    # One item per tile of query rows: its first split (rows with no keys, such as q's
    # padding, have empty works in every split: not counted).
    first = [items[(items[:, ITEM_SPLIT] == 0) & (items[:, ITEM_KV_LEN] > 0)] for items in upper]
    tile_rows = sum(items.shape[0] for items in first) * num_kv_heads
    longest = max((int(items[:, ITEM_KV_LEN].max(initial=0)) for items in first), default=0)
    keys = np.minimum(last[:, ITEM_SPLIT_END], last[:, ITEM_KV_LEN]) - last[:, ITEM_SPLIT_BEGIN]
    short_works = last.shape[0] * num_kv_heads
    if longest == 0 or short_works == 0:
        return max_splits
    short = WORK_START + SHORT_WORK_TILE * float(np.mean(-(-keys.clip(0) // KV_TILE)))

    def estimate(splits):
        shared_works = tile_rows * splits
        shared = WORK_START + longest / KV_TILE / splits
        if shared_works >= num_sms:  # no SM left beside them
            return -(-shared_works // num_sms) * shared + -(-short_works // num_sms) * short * CROWDED
        beside = (num_sms - shared_works) * int(shared // short)
        if beside >= short_works:
            return max(shared, -(-short_works // (num_sms - shared_works)) * short)
        return shared + -(-(short_works - beside) // num_sms) * short * CROWDED

    # The model is rough (its rounding moves it a few percent either way): fewer splits
    # must gain more than MARGIN to be taken.
    best = min(range(1, max_splits + 1), key=estimate)
    return best if estimate(best) < (1 - MARGIN) * estimate(max_splits) else max_splits


def _slice(items, used):
    """Re-cuts an upper level's items into `used` slices of each tile's keys (the same
    64-key rounding as the planner); its other splits get empty slices, whose works write
    the empty state the merge expects."""
    length = items[:, ITEM_KV_LEN].astype(np.int64)

    def bound(c):
        return np.where(c >= used, length, (length * c // used + 63) // 64 * 64)

    split = items[:, ITEM_SPLIT].astype(np.int64)
    items[:, ITEM_SPLIT_BEGIN] = bound(split)
    items[:, ITEM_SPLIT_END] = bound(split + 1)


def _fuse(plans, num_kv_heads: int, balance: bool) -> FusedLevels:
    """The levels' items as one list: level l's splits, page table entries and
    positions moved past those of the levels before it. balance: the upper levels
    use only as many of their splits as balanced_splits finds for this step."""
    used_items = [plan.items[plan.items[:, ITEM_REQUEST] >= 0] for plan in plans]
    if balance:
        used = balanced_splits(used_items[:-1], used_items[-1], num_kv_heads,
                               max(plan.kv_splits.shape[0] for plan in plans[:-1]))
        for items, plan in zip(used_items[:-1], plans):
            if used < plan.kv_splits.shape[0]:
                _slice(items, used)
    lists, splits, pages = [], 0, 0
    for i, (plan, items) in enumerate(zip(plans, used_items)):
        items[:, ITEM_SPLIT] += splits
        items[:, ITEM_KV_BEGIN] += pages
        items[:, ITEM_KV_END] += pages
        if i < len(plans) - 1:
            # An upper level's keys all precede the queries. Counting the queries
            # into its length puts them after every key, so the last level's causal
            # mask hides none; its slices, clipped to its real length (the last
            # ones may pass it: they are rounded to 64 keys), still end there.
            length = items[:, ITEM_KV_LEN].copy()
            items[:, ITEM_SPLIT_BEGIN] = np.minimum(items[:, ITEM_SPLIT_BEGIN], length)
            items[:, ITEM_SPLIT_END] = np.minimum(items[:, ITEM_SPLIT_END], length)
            items[:, ITEM_KV_LEN] += items[:, ITEM_Q_LEN]
        lists.append(items)
        splits += plan.kv_splits.shape[0]
        pages += plan.kv_indices.shape[0]
    used = np.concatenate(lists)
    used = used[np.argsort(used[:, ITEM_SPLIT_BEGIN] - used[:, ITEM_SPLIT_END], kind="stable")]
    items = np.zeros((sum(plan.items.shape[0] for plan in plans), ITEM_FIELDS), np.int32)
    items[:, ITEM_REQUEST] = -1
    items[:used.shape[0]] = used
    return FusedLevels(np.concatenate([plan.kv_indices for plan in plans]), items,
                       np.arange(splits, dtype=np.int32))


def _one_pool(caches) -> bool:
    """Whether every level names the same cache arrays."""
    def arrays(cache):
        return tuple(cache) if isinstance(cache, (tuple, list)) else (cache,)
    first = arrays(caches[0])
    return all(len(arrays(c)) == len(first) and all(x is y for x, y in zip(arrays(c), first))
               for c in caches[1:])


def cascade_attention(q, paged_kv_caches: Sequence, plan: CascadePlan, *, kv_layout="NHD",
                      causal=False, sm_scale=None, logits_soft_cap=0.0, return_lse=False,
                      implementation=None):
    """Attention of q over every level's keys, merged.

    Args:
      q: [max_q_tokens, num_qo_heads, head_dim].
      paged_kv_caches: one paged cache per level ((k, v) or one array; see batch_prefill);
        the same arrays at every level allow the single launch (module doc).
      plan: from plan_cascade.
      causal: on the last level (the per-request suffix), as for batch_prefill.
      sm_scale, logits_soft_cap, return_lse, implementation: as for batch_prefill.
    Returns o [max_q_tokens, num_qo_heads, head_dim] (and lse, base 2).
    """
    if len(paged_kv_caches) != len(plan.levels):
        raise ValueError(f"paged_kv_caches: expected one cache per level ({len(plan.levels)}), "
                         f"got {len(paged_kv_caches)}")
    if plan.fused is not None and _one_pool(paged_kv_caches) and kernel_runs(q, implementation):
        fused = plan.fused
        o, lse = prefill_items(q, paged_kv_caches[0], fused.kv_indices, fused.items,
                               fused.kv_splits.shape[0], kv_layout=kv_layout, causal=causal,
                               sm_scale=sm_scale, logits_soft_cap=logits_soft_cap)
        return (o, lse) if return_lse else o
    # Each level merges the levels above into its own result as it writes it
    # (batch_prefill's merge_with): no separate merge pass.
    state = None
    for i, (cache, level) in enumerate(zip(paged_kv_caches, plan.levels)):
        last = i == len(plan.levels) - 1
        state = batch_prefill(q, cache, level, kv_layout=kv_layout, causal=causal and last,
                              sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, merge_with=state,
                              return_lse=True, implementation=implementation)
    o, lse = state
    return (o, lse) if return_lse else o
