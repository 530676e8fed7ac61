"""Cascade attention: equal to flat attention over each request's concatenated keys."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from capture import assert_captured
from conftest import assert_close
from test_decode import page_table, poison_allocator, random_cache

import jaxinfer
from jaxinfer import reference
from jaxinfer.prefill import (ITEM_KV_BEGIN, ITEM_REQUEST, ITEM_ROW_BEGIN, ITEM_SPLIT,
                              ITEM_SPLIT_BEGIN, ITEM_SPLIT_END, TILE_ROWS)

RNG = np.random.default_rng()
PAGE = 16


def paged(ks, vs):
    """Packs per-group key and value arrays [n_g, H, D] into page-aligned caches (pages
    scattered in a random order, one spare page) and their CSR page table."""
    def pages_of(x):
        num = -(-x.shape[0] // PAGE)
        padded = jnp.zeros((num * PAGE, *x.shape[1:]), x.dtype).at[:x.shape[0]].set(x)
        return padded.reshape(num, PAGE, *x.shape[1:])

    counts = [-(-k.shape[0] // PAGE) for k in ks]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    order = RNG.permutation(int(indptr[-1]) + 1).astype(np.int32)  # page i of the packing -> slot
    caches = []
    for xs in (ks, vs):
        packed = jnp.concatenate([pages_of(x) for x in xs] + [jnp.zeros((1, PAGE, *xs[0].shape[1:]), xs[0].dtype)])
        caches.append(jnp.zeros_like(packed).at[order].set(packed))
    last = np.array([(k.shape[0] - 1) % PAGE + 1 if k.shape[0] else 1 for k in ks], np.int32)
    return tuple(caches), indptr, order[:indptr[-1]], last


def make_cascade(q_lens, groups_per_level, level_lens, *, group, num_kv_heads=2, head_dim=128,
                 dtype=jnp.bfloat16, one_pool=False):
    """groups_per_level[l]: the requests of each group of level l; level_lens[l]: its key counts.
    one_pool: every level's pages in one cache (the levels then run as one launch)."""
    num_qo_heads = group * num_kv_heads
    max_q = sum(q_lens) + 5
    normal = lambda *shape: jax.random.normal(jax.random.key(int(RNG.integers(1 << 30))), shape, dtype)  # noqa: E731
    q = normal(max_q, num_qo_heads, head_dim)
    qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    keys = [[(normal(n, num_kv_heads, head_dim), normal(n, num_kv_heads, head_dim)) for n in lens]
            for lens in level_lens]
    if one_pool:  # one packing of every group's keys, its page table cut per level
        pool, indptr, indices, last = paged(*zip(*[kv for level in keys for kv in level]))
        bounds = np.cumsum([0] + [len(level) for level in keys])
        tables = [(indptr[a:b + 1] - indptr[a], indices[indptr[a]:indptr[b]], last[a:b])
                  for a, b in zip(bounds[:-1], bounds[1:])]
        caches = [pool] * len(keys)
    else:
        packed = [paged(*zip(*level)) for level in keys]
        tables = [table for _, *table in packed]
        caches = [cache for cache, *_ in packed]
    levels = []
    for groups, table in zip(groups_per_level, tables):
        group_qo = np.concatenate([[0], np.cumsum([sum(q_lens[r] for r in g) for g in groups])])
        levels.append((group_qo.astype(np.int32), *table))
    plan = jaxinfer.plan_cascade(levels, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                                 page_size=PAGE, max_q_tokens=max_q,
                                 max_groups=[len(g) + 1 for g in groups_per_level],
                                 max_pages=[c[0].shape[0] for c in caches])
    return dict(q=q, qo=qo, caches=caches, plan=plan, keys=keys, groups=groups_per_level)


def flat_reference(case, causal):
    """Each request against the concatenation of its groups' keys, level by level."""
    q, qo = case["q"], case["qo"]
    outs = []
    for b in range(len(qo) - 1):
        ks, vs = [], []
        for groups, level_keys in zip(case["groups"], case["keys"]):
            g = next(i for i, members in enumerate(groups) if b in members)
            ks.append(level_keys[g][0])
            vs.append(level_keys[g][1])
        outs.append(reference.single_attention(q[qo[b]:qo[b + 1]], jnp.concatenate(ks),
                                               jnp.concatenate(vs), causal=causal))
    outs.append(jnp.zeros((q.shape[0] - int(qo[-1]), *q.shape[1:]), q.dtype))
    return jnp.concatenate(outs)


def check(case, causal):
    poison_allocator((case["q"].shape, case["q"].dtype))
    caches, levels = case["caches"], len(case["caches"])
    if all(c is caches[0] for c in caches):  # one pool: passed once, so the levels share it in jit
        fn = jax.jit(lambda q, pool, plan: jaxinfer.cascade_attention(
            q, [pool] * levels, plan, causal=causal))
        caches = caches[0]
    else:
        fn = jax.jit(functools.partial(jaxinfer.cascade_attention, causal=causal))
    assert_close(fn(case["q"], caches, case["plan"]), flat_reference(case, causal),
                 case["q"].dtype)


@pytest.mark.parametrize("one_pool", [False, True])
@pytest.mark.parametrize("prefix", [0, 1, 1000])
def test_two_levels_equal_flat_attention(prefix, one_pool):
    q_lens = [1, 3, 1, 2]
    suffix = [5, 3, 40, 17]
    case = make_cascade(q_lens, [[[0, 1, 2, 3]], [[0], [1], [2], [3]]], [[prefix], suffix], group=4,
                        head_dim=64, one_pool=one_pool)
    check(case, causal=True)


@pytest.mark.parametrize("one_pool", [False, True])
def test_three_levels_and_empty_suffixes(one_pool):
    q_lens = [1, 1, 1, 1, 1]
    case = make_cascade(q_lens, [[[0, 1, 2, 3, 4]], [[0, 1], [2, 3, 4]], [[0], [1], [2], [3], [4]]],
                        [[70], [33, 0], [0, 9, 0, 20, 1]], group=8, head_dim=64, one_pool=one_pool)
    check(case, causal=False)  # decode: the query's own key may live anywhere, or nowhere


def test_one_pool_and_split_upper_level_plan_one_launch():
    """The fused work list: every level's used items once, heaviest first, each level's
    splits and page table entries past the levels' before it."""
    case = make_cascade([1, 2, 1], [[[0, 1, 2]], [[0], [1], [2]]], [[300], [5, 0, 40]], group=4,
                        head_dim=64, one_pool=True)
    shared, own = case["plan"].levels
    fused = case["plan"].fused
    assert shared.kv_splits.shape[0] > 1 and fused is not None
    splits = shared.kv_splits.shape[0]
    assert fused.kv_splits.shape[0] == splits + 1
    np.testing.assert_array_equal(fused.kv_indices,
                                  np.concatenate([shared.kv_indices, own.kv_indices]))
    used = fused.items[fused.items[:, ITEM_REQUEST] >= 0]
    assert used.shape[0] == sum(int((p.items[:, ITEM_REQUEST] >= 0).sum()) for p in (shared, own))
    assert (fused.items[used.shape[0]:, ITEM_REQUEST] == -1).all()
    keys = used[:, ITEM_SPLIT_END] - used[:, ITEM_SPLIT_BEGIN]
    assert (np.diff(keys) <= 0).all()  # heaviest first
    suffix_items = used[used[:, ITEM_SPLIT] == splits]
    assert suffix_items.shape[0] == int((own.items[:, ITEM_REQUEST] >= 0).sum())
    assert (suffix_items[:, ITEM_KV_BEGIN] >= shared.kv_indices.shape[0]).all()  # own pages after


def decode_levels(prefix_pages, batch, suffix_pages):
    """A shared prefix and one suffix per request, one query each, pages in one pool."""
    rows = np.arange(batch + 1, dtype=np.int32)
    return [(np.array([0, batch], np.int32), np.array([0, prefix_pages], np.int32),
             np.arange(prefix_pages, dtype=np.int32), np.array([PAGE], np.int32)),
            (rows, rows * suffix_pages,
             prefix_pages + np.arange(batch * suffix_pages, dtype=np.int32), np.full(batch, PAGE, np.int32))]


def upper_items(plan):
    """The fused list's used items of the upper levels (their splits come first), and the
    splits among them with a non-empty slice of keys."""
    items = plan.fused.items
    static = plan.levels[0].kv_splits.shape[0]
    upper = items[(items[:, ITEM_REQUEST] >= 0) & (items[:, ITEM_SPLIT] < static)]
    return upper, set(upper[upper[:, ITEM_SPLIT_END] > upper[:, ITEM_SPLIT_BEGIN], ITEM_SPLIT])


@pytest.mark.parametrize("batch, suffix, splits, used", [(64, 512, 8, 6), (128, 256, 4, 3),
                                                         (16, 1024, 16, 16)])
def test_one_launch_balances_shared_splits(batch, suffix, splits, used):
    """The shared level's works leave SMs to the suffixes' (issue 6's target rows: 6 of 8
    and 3 of 4 splits used), unless the suffixes' works would not fit beside them (16
    long ones: every split); the splits left over get empty slices, and each tile's
    slices cover its keys once."""
    prefix_pages, suffix_pages = 32768 // PAGE, suffix // PAGE
    pages = prefix_pages + batch * suffix_pages
    levels = decode_levels(prefix_pages, batch, suffix_pages)
    kw = dict(num_qo_heads=32, num_kv_heads=8, page_size=PAGE, max_q_tokens=batch,
              max_groups=[1, batch], max_pages=[pages, pages])
    for plan, expect in ((jaxinfer.plan_cascade(levels, **kw), used),
                         (jaxinfer.plan_cascade(levels, kv_splits=[splits, 1], **kw), splits)):
        assert plan.levels[0].kv_splits.shape[0] == splits
        shared, nonempty = upper_items(plan)
        assert nonempty == set(range(expect))
        for row in set(shared[:, ITEM_ROW_BEGIN]):
            slices = shared[shared[:, ITEM_ROW_BEGIN] == row]
            slices = slices[np.argsort(slices[:, ITEM_SPLIT])]
            assert slices.shape[0] == splits and slices[0, ITEM_SPLIT_BEGIN] == 0
            np.testing.assert_array_equal(slices[1:, ITEM_SPLIT_BEGIN], slices[:-1, ITEM_SPLIT_END])
            assert slices[-1, ITEM_SPLIT_END] == 32768


def run_items(q, pool, kv_indices, items, splits, group, causal):
    """The kernel's item contract (csrc/prefill.h) read plainly, in fp32: each item's rows
    against the visible keys of its slice, a partial state per split, merged."""
    k, v = (np.asarray(jnp.asarray(x, jnp.float32)) for x in pool)  # [pages, PAGE, Hkv, D]
    qf = np.asarray(jnp.asarray(q, jnp.float32))
    lse = np.full((qf.shape[0], splits, qf.shape[1]), -np.inf)
    out = np.zeros((*lse.shape, qf.shape[2]))
    for (request, q_begin, q_len, row_begin, kv_len, kv_begin, kv_end, _, split, lo,
         hi) in items:
        if request < 0:
            continue
        for row in range(row_begin, min(row_begin + TILE_ROWS, q_len * group)):
            token, head_in_group = divmod(row, group)
            last = min(hi, kv_len - q_len + token + 1 if causal else kv_len)
            pos = np.arange(max(lo, 0), max(last, 0))
            pos = pos[kv_begin + pos // PAGE < kv_end]
            pages = kv_indices[kv_begin + pos // PAGE]
            for kv_head in range(k.shape[2]):
                h = kv_head * group + head_in_group
                if pos.size:
                    logits = k[pages, pos % PAGE, kv_head] @ qf[q_begin + token, h] / np.sqrt(qf.shape[2])
                    top = logits.max()
                    w = np.exp(logits - top)
                    lse[q_begin + token, split, h] = top + np.log(w.sum())
                    out[q_begin + token, split, h] = w @ v[pages, pos % PAGE, kv_head] / w.sum()
    top = np.max(lse, axis=1, keepdims=True)
    w = np.where(np.isfinite(top), np.exp(lse - np.where(np.isfinite(top), top, 0)), 0)
    return (w[..., None] * out).sum(1) / np.maximum(w.sum(1), 1e-30)[..., None]


@pytest.mark.parametrize("used", [None, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_one_launch_items_equal_flat_attention(causal, used, monkeypatch):
    """The fused work list on the CPU, read as the kernel reads it: three levels, a short
    shared level whose last slices pass its length, empty groups, several queries each;
    with the plan's own split count, and with the upper levels re-cut into 3 slices."""
    if used is not None:
        monkeypatch.setattr(jaxinfer.cascade, "balanced_splits", lambda *args: used)
    q_lens = [1, 3, 2, 1, 2]
    case = make_cascade(q_lens, [[[0, 1, 2, 3, 4]], [[0, 1], [2, 3, 4]], [[0], [1], [2], [3], [4]]],
                        [[70], [33, 0], [4, 9, 2, 20, 7]], group=4, head_dim=64, one_pool=True)
    fused = case["plan"].fused
    if used is not None:
        assert upper_items(case["plan"])[1] <= {0, 1, 2}
    got = run_items(case["q"], case["caches"][0], fused.kv_indices, fused.items,
                    fused.kv_splits.shape[0], 4, causal)
    assert_close(got, flat_reference(case, causal), case["q"].dtype)


@pytest.mark.gpu
def test_gpu_one_pool_runs_one_launch():
    case = make_cascade([1, 2, 1], [[[0, 1, 2]], [[0], [1], [2]]], [[300], [5, 0, 40]], group=4,
                        head_dim=64, one_pool=True)
    fn = jax.jit(lambda q, pool, plan: jaxinfer.cascade_attention(q, [pool, pool], plan))
    text = fn.lower(case["q"], case["caches"][0], case["plan"]).as_text()
    assert text.count("@jaxinfer_batch_prefill") == 1


def test_cascade_one_compilation_for_many_length_mixes():
    traces = []

    @jax.jit
    def step(q, caches, plan):
        traces.append(1)
        return jaxinfer.cascade_attention(q, caches, plan, causal=True)

    shared_cache = random_cache(20, PAGE, 1, 64, jnp.bfloat16, "NHD")
    suffix_cache = random_cache(30, PAGE, 1, 64, jnp.bfloat16, "NHD")
    for _ in range(6):
        q_lens = RNG.integers(1, 4, 3)
        suffix = (q_lens + RNG.integers(0, 30, 3)).tolist()
        prefix = int(RNG.integers(0, 200))
        qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        shared = (np.array([0, qo[-1]], np.int32), *page_table([prefix], PAGE, 20))
        own = (qo, *page_table(suffix, PAGE, 30))
        plan = jaxinfer.plan_cascade([shared, own], num_qo_heads=2, num_kv_heads=1, page_size=PAGE,
                                     max_q_tokens=12, max_groups=[1, 3], max_pages=[20, 30])
        q = jax.random.normal(jax.random.key(len(traces) + prefix), (12, 2, 64), jnp.bfloat16)
        o0, s0 = reference.paged_attention(q, shared_cache, *shared, return_lse=True)
        o1, s1 = reference.paged_attention(q, suffix_cache, *own, causal=True, return_lse=True)
        want, _ = reference.merge_state(o0, s0, o1, s1)
        assert_close(step(q, [shared_cache, suffix_cache], plan), want, jnp.bfloat16)
    assert len(traces) == 1


def test_bad_levels():
    with pytest.raises(ValueError, match="^levels: expected at least one level"):
        jaxinfer.plan_cascade([], num_qo_heads=1, num_kv_heads=1, page_size=4, max_q_tokens=4,
                              max_groups=[], max_pages=[])
    level0 = ([0, 3], [0, 1], [0], [2])
    level1 = ([0, 1, 2], [0, 1, 2], [1, 2], [1, 1])
    with pytest.raises(ValueError, match=r"^levels\[1\]: its groups cover 2 query rows, level 0's 3"):
        jaxinfer.plan_cascade([level0, level1], num_qo_heads=1, num_kv_heads=1, page_size=4,
                              max_q_tokens=4, max_groups=[1, 2], max_pages=[4, 4])


@pytest.mark.gpu
@pytest.mark.parametrize("one_pool", [False, True])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_long_shared_prefix(group, one_pool):
    q_lens = [1] * 6 + [3]
    suffix = [1, 0, 16, 17, 300, 5, 64]
    case = make_cascade(q_lens, [[list(range(7))], [[i] for i in range(7)]], [[32768], suffix],
                        group=group, one_pool=one_pool)
    check(case, causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("used", [1, 5])
def test_gpu_one_launch_with_fewer_shared_splits(used, monkeypatch):
    """The one launch with the shared level re-cut into fewer slices than its static
    splits (as balanced_splits chooses when the suffixes are long), the rest empty."""
    monkeypatch.setattr(jaxinfer.cascade, "balanced_splits", lambda *args: used)
    q_lens = [1] * 6 + [3]
    suffix = [1, 0, 16, 17, 300, 5, 64]
    case = make_cascade(q_lens, [[list(range(7))], [[i] for i in range(7)]], [[32768], suffix],
                        group=4, one_pool=True)
    check(case, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("one_launch", [True, False])
def test_gpu_cascade_is_captured(one_launch):
    assert_captured(f"""
        one_launch = {one_launch}
        import jax, jax.numpy as jnp, numpy as np, jaxinfer
        k = jax.random.normal(jax.random.key(0), (40, 16, 2, 128), jnp.bfloat16)
        q = jax.random.normal(jax.random.key(2), (8, 8, 128), jnp.bfloat16)
        shared = (np.array([0, 6], np.int32), np.array([0, 20], np.int32), np.arange(20, dtype=np.int32),
                  np.array([16], np.int32))
        suffix = (np.array([0, 2, 4, 6], np.int32), np.array([0, 2, 4, 6], np.int32),
                  np.arange(20, 26, dtype=np.int32), np.array([3, 16, 1], np.int32))
        plan = jaxinfer.plan_cascade([shared, suffix], num_qo_heads=8, num_kv_heads=2, page_size=16,
                                     max_q_tokens=8, max_groups=[1, 4], max_pages=[40, 40])
        if not one_launch:
            plan = plan._replace(fused=None)

        @jax.jit
        def step(q, k, plan):
            return jaxinfer.cascade_attention(q * 2, [(k, k), (k, k)], plan, causal=True)

        jax.block_until_ready(step(q, k, plan))
    """, module="step", target="jaxinfer_")
