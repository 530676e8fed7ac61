"""Batch prefill / append: the planner, the API, and the CUDA kernel against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from capture import assert_captured
from conftest import assert_close
from test_decode import page_table, poison_allocator, random_cache

import jaxinfer
from jaxinfer import prefill as prefill_mod
from jaxinfer import reference

RNG = np.random.default_rng()
REQUEST, Q_BEGIN, Q_LEN, ROW_BEGIN, KV_LEN, KV_BEGIN, KV_END, MASK_BEGIN, SPLIT, SPLIT_BEGIN, SPLIT_END = range(11)


def make_case(q_lens, kv_lens, *, head_dim, group, num_kv_heads=1, page_size=16, paged=True,
              layout="NHD", dtype=jnp.bfloat16, max_batch=None, max_q_tokens=None, mask=False,
              kv_splits=1, page_runs=False):
    """Random inputs, the plan, and the pieces the per-request reference needs. page_runs:
    the pages run in order through the cache, in runs of random length (page_table_runs)."""
    batch = len(q_lens)
    max_batch = max_batch or batch
    max_q_tokens = max_q_tokens or sum(q_lens) + 3
    qo_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    key = jax.random.key(int(RNG.integers(1 << 30)))
    num_qo_heads = group * num_kv_heads
    q = jax.random.normal(key, (max_q_tokens, num_qo_heads, head_dim), dtype)
    case = dict(q=q, qo_indptr=qo_indptr, kv_lens=kv_lens, paged=paged, layout=layout)
    if paged:
        num_pages = sum((n + page_size - 1) // page_size for n in kv_lens) + 3
        case["cache"] = random_cache(num_pages, page_size, num_kv_heads, head_dim, dtype, layout)
        kv_indptr, kv_indices, last = page_table(kv_lens, page_size, num_pages)
        if page_runs:
            kv_indices = page_table_runs(num_pages)[:len(kv_indices)]
        case.update(kv_indptr=kv_indptr, kv_indices=kv_indices, last=last)
        plan = jaxinfer.plan_prefill(qo_indptr, kv_indptr, kv_indices, last, page_size=page_size,
                                     num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                                     max_batch=max_batch, max_q_tokens=max_q_tokens,
                                     max_pages=num_pages, kv_splits=kv_splits)
    else:
        kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
        k, v = random_cache(int(kv_indptr[-1]) + 5, 1, num_kv_heads, head_dim, dtype, "NHD")
        case.update(k=k[:, 0], v=v[:, 0], kv_indptr=kv_indptr)
        plan = jaxinfer.plan_prefill(qo_indptr, kv_indptr, num_qo_heads=num_qo_heads,
                                     num_kv_heads=num_kv_heads, max_batch=max_batch,
                                     max_q_tokens=max_q_tokens, kv_splits=kv_splits)
    case["plan"] = plan
    if mask:
        sizes = [a * b for a, b in zip(q_lens, kv_lens)]
        case["mask"] = jnp.asarray(RNG.random(sum(sizes) + 7) < 0.7)
    return case


def page_table_runs(num_pages, runs=6):
    """Every page of the cache once: in order, cut into `runs` runs of random length, the runs
    shuffled. Tiles inside a run load as one block (the kernel checks the table for runs);
    those across a cut or past a request's end take the copy row by row."""
    cuts = np.sort(RNG.choice(np.arange(1, num_pages), size=min(runs - 1, num_pages - 1), replace=False))
    pieces = np.split(np.arange(num_pages, dtype=np.int32), cuts)
    return np.concatenate([pieces[i] for i in RNG.permutation(len(pieces))])


def run(case, **options):
    mask = case.get("mask")
    if case["paged"]:
        fn = functools.partial(jaxinfer.batch_prefill, kv_layout=case["layout"], return_lse=True,
                               **options)
        return jax.jit(fn)(case["q"], case["cache"], case["plan"], custom_mask=mask)
    fn = functools.partial(jaxinfer.batch_prefill_ragged, return_lse=True, **options)
    return jax.jit(fn)(case["q"], case["k"], case["v"], case["plan"], custom_mask=mask)


def _bucket(n):
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.cache
def _reference_one(paged, layout, options_key):
    options = dict(options_key)
    if options.get("alibi_slopes") is not None:
        options["alibi_slopes"] = jnp.asarray(options["alibi_slopes"], jnp.float32)
    fn = reference.paged_attention if paged else reference.ragged_attention
    if paged:
        fn = functools.partial(fn, kv_layout=layout)
    return jax.jit(functools.partial(fn, return_lse=True, **options))


def reference_rows(case, **options):
    """The jnp reference one request at a time, every request's queries, keys (or pages)
    and mask padded to one power-of-two size, so that one compilation serves the batch
    (rows past the batch: zeros, -inf)."""
    q, qo = case["q"], case["qo_indptr"]
    key = tuple(sorted((k, tuple(v) if isinstance(v, np.ndarray) else v) for k, v in options.items()))
    fn = _reference_one(case["paged"], case["layout"], key)
    q_lens = np.diff(qo)
    kv_lens = np.asarray(case["kv_lens"])
    ip = case["kv_indptr"]
    q_size = _bucket(q_lens.max(initial=1))
    kv_size = _bucket(np.diff(ip).max(initial=1))  # pages (paged) or key rows (ragged)
    mask_size = _bucket((q_lens * kv_lens).max(initial=1))
    outs, lses = [], []
    mask_at = 0
    for b in range(len(qo) - 1):
        q_len, kv_len = int(q_lens[b]), int(kv_lens[b])
        qb = jnp.zeros((q_size, *q.shape[1:]), q.dtype).at[:q_len].set(q[qo[b]:qo[b + 1]])
        extra = {}
        if "mask" in case:
            mask = np.zeros(mask_size, bool)
            mask[:q_len * kv_len] = case["mask"][mask_at:mask_at + q_len * kv_len]
            extra["custom_mask"] = jnp.asarray(mask)
            mask_at += q_len * kv_len
        if case["paged"]:
            pages = case["kv_indices"][ip[b]:ip[b + 1]]
            padded = np.zeros(kv_size, np.int32)
            padded[:len(pages)] = pages
            o, lse = fn(qb, case["cache"], np.array([0, q_len], np.int32),
                        np.array([0, len(pages)], np.int32), padded, case["last"][b:b + 1], **extra)
        else:
            kb = jnp.zeros((kv_size, *case["k"].shape[1:]), q.dtype).at[:kv_len].set(case["k"][ip[b]:ip[b + 1]])
            vb = jnp.zeros((kv_size, *case["v"].shape[1:]), q.dtype).at[:kv_len].set(case["v"][ip[b]:ip[b + 1]])
            o, lse = fn(qb, kb, vb, np.array([0, q_len], np.int32), np.array([0, kv_len], np.int32),
                        **extra)
        outs.append(o[:q_len])
        lses.append(lse[:q_len])
    pad = q.shape[0] - int(qo[-1])
    outs.append(jnp.zeros((pad, *q.shape[1:]), q.dtype))
    lses.append(jnp.full((pad, q.shape[1]), -jnp.inf))
    return jnp.concatenate(outs), jnp.concatenate(lses)


def check(case, **options):
    q = case["q"]
    poison_allocator((q.shape, q.dtype), (q.shape[:2], jnp.float32))
    o, lse = run(case, **options)
    want_o, want_lse = reference_rows(case, **options)
    assert_close(o, want_o, q.dtype, name="o")
    assert_close(lse, want_lse, q.dtype, name="lse")


# ------------------------------------------------------------------ planner (CPU)


def test_plan_covers_every_row_once_heaviest_first():
    shapes = None
    for _ in range(20):
        batch = int(RNG.integers(0, 9))
        q_lens = RNG.integers(0, 300, batch)
        kv_lens = q_lens + RNG.integers(0, 500, batch)
        group = int(RNG.choice([1, 3, 4, 8]))
        qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        kv = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
        plan = jaxinfer.plan_prefill(qo, kv, num_qo_heads=group * 2, num_kv_heads=2, max_batch=8,
                                     max_q_tokens=2400)
        assert shapes in (None, (group, [a.shape for a in plan])) or shapes[0] != group
        shapes = (group, [a.shape for a in plan])
        items = plan.items[plan.items[:, REQUEST] >= 0]
        covered = np.zeros(2400 * group, int)
        for it in items:
            rows = min(prefill_mod.TILE_ROWS, it[Q_LEN] * group - it[ROW_BEGIN])
            start = it[Q_BEGIN] * group + it[ROW_BEGIN]
            covered[start:start + rows] += 1
            assert it[KV_LEN] == (kv_lens[it[REQUEST]] if it[REQUEST] < batch else 0)
        np.testing.assert_array_equal(covered, 1)  # padding rows included
        # Keys a causal tile sees (the planner's cost), never increasing along the items.
        visible = np.minimum(items[:, KV_LEN], items[:, KV_LEN] - items[:, Q_LEN]
                             + np.minimum(items[:, Q_LEN] * group, items[:, ROW_BEGIN] + prefill_mod.TILE_ROWS) // group + 1)
        visible = np.maximum(visible, 0)
        assert np.all(np.diff(visible) <= 0)


def test_plan_kv_splits_cover_each_tile_keys_once():
    q_lens, kv_lens = np.array([3, 70, 0]), np.array([1000, 70, 5])
    qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    plan = jaxinfer.plan_prefill(qo, kv, num_qo_heads=4, num_kv_heads=2, max_batch=3,
                                 max_q_tokens=80, kv_splits=3)
    assert plan.kv_splits.shape == (3,)
    items = plan.items[plan.items[:, REQUEST] >= 0]
    for key in {(it[REQUEST], it[ROW_BEGIN]) for it in items}:
        pieces = sorted((it[SPLIT], it[SPLIT_BEGIN], it[SPLIT_END]) for it in items
                        if (it[REQUEST], it[ROW_BEGIN]) == key)
        assert [p[0] for p in pieces] == [0, 1, 2]
        length = next(it[KV_LEN] for it in items if (it[REQUEST], it[ROW_BEGIN]) == key)
        covered = np.zeros(max(length, 1), int)
        for _, begin, end in pieces:
            covered[begin:max(begin, end)] += 1
            assert begin % 64 == 0
        np.testing.assert_array_equal(covered[:length], 1)


def test_plan_rejects_bad_tables():
    with pytest.raises(ValueError, match="^qo_indptr: expected shape"):
        jaxinfer.plan_prefill(np.zeros(6, np.int32), np.zeros(6, np.int32), num_qo_heads=1,
                              num_kv_heads=1, max_batch=4, max_q_tokens=8)
    with pytest.raises(ValueError, match="^qo_indptr: expected non-decreasing offsets up to"):
        jaxinfer.plan_prefill([0, 9], [0, 9], num_qo_heads=1, num_kv_heads=1, max_batch=4,
                              max_q_tokens=8)
    with pytest.raises(ValueError, match="^kv_indptr: request 0 has 3 keys for 5 queries"):
        jaxinfer.plan_prefill([0, 5], [0, 3], num_qo_heads=1, num_kv_heads=1, max_batch=4,
                              max_q_tokens=8)
    with pytest.raises(ValueError, match="^kv_indices: expected shape"):
        jaxinfer.plan_prefill([0, 5], [0, 3], np.zeros(2), [1], page_size=4, num_qo_heads=1,
                              num_kv_heads=1, max_batch=4, max_q_tokens=8, max_pages=8)


# ------------------------------------------------------------------ API (any device)


def test_prefill_small_on_default_device():
    for paged in (True, False):
        check(make_case([5, 0, 17], [9, 3, 17], head_dim=64, group=2, num_kv_heads=2, page_size=4,
                        paged=paged), causal=True)
        check(make_case([3, 12], [40, 12], head_dim=64, group=1, paged=paged, mask=True))


def test_prefill_one_array_as_both_k_and_v():
    """A (k, v) pair may hold one array twice: still a pair, not a combined cache."""
    case = make_case([5, 3], [9, 20], head_dim=64, group=2, num_kv_heads=2, page_size=4)
    k = case["cache"][0]
    same = jaxinfer.batch_prefill(case["q"], (k, k), case["plan"], causal=True)
    copied = jaxinfer.batch_prefill(case["q"], (k, k + 0), case["plan"], causal=True)
    np.testing.assert_array_equal(np.asarray(same, np.float32), np.asarray(copied, np.float32))


def test_prefill_variants_on_default_device():
    slopes = np.array([0.5, 0.25], np.float32)
    for options in [dict(logits_soft_cap=5.0, causal=True), dict(window_left=6, causal=True),
                    dict(alibi_slopes=slopes), dict(rope=True, rope_scale=2.0, causal=True),
                    dict(sm_scale=0.3)]:
        check(make_case([4, 9], [30, 9], head_dim=64, group=2, page_size=8), **options)


def test_bad_inputs_name_the_argument():
    case = make_case([3], [5], head_dim=64, group=2, page_size=4)
    q, cache, plan = case["q"], case["cache"], case["plan"]
    with pytest.raises(ValueError, match=r"^q: expected rank 3"):
        jaxinfer.batch_prefill(q[0], cache, plan)
    with pytest.raises(ValueError, match=r"^k_cache: expected dtype in \(bfloat16\)"):
        jaxinfer.batch_prefill(q, (cache[0].astype(jnp.float16), cache[1]), plan)
    with pytest.raises(ValueError, match=r"^plan.items: expected shape \[work_items, 11\]"):
        jaxinfer.batch_prefill(q, cache, plan._replace(items=plan.items[:, :4]))
    with pytest.raises(ValueError, match=r"^custom_mask: expected dtype in \(bool\)"):
        jaxinfer.batch_prefill(q, cache, plan, custom_mask=jnp.zeros(15, jnp.int32))
    with pytest.raises(ValueError, match=r"^plan.kv_indices: expected shape \[0\] \(a ragged plan\)"):
        jaxinfer.batch_prefill_ragged(q, q[:, :1], q[:, :1], plan)
    with pytest.raises(ValueError, match=r"^merge_with\[1\]: expected shape \[max_q_tokens="):
        jaxinfer.batch_prefill(q, cache, plan, merge_with=(q, jnp.zeros((2, 2), jnp.float32)))
    with pytest.raises(ValueError, match=r"^merge_with: expected a pair"):
        jaxinfer.batch_prefill(q, cache, plan, merge_with=q)
    ragged = make_case([3], [5], head_dim=64, group=2, paged=False)
    with pytest.raises(ValueError, match=r"^plan.kv_indices: empty; this plan is for ragged"):
        jaxinfer.batch_prefill(q, cache, ragged["plan"])
    with pytest.raises(ValueError, match=r"^v: expected shape \[max_kv_tokens="):
        jaxinfer.batch_prefill_ragged(ragged["q"], ragged["k"], ragged["v"][:2], ragged["plan"])


def test_one_compilation_for_many_length_mixes():
    traces = []

    @jax.jit
    def step(q, cache, plan):
        traces.append(1)
        return jaxinfer.batch_prefill(q, cache, plan, causal=True)

    max_batch, max_q, page_size, num_pages = 4, 64, 8, 60
    cache = random_cache(num_pages, page_size, 1, 64, jnp.bfloat16, "NHD")
    for _ in range(10):
        batch = int(RNG.integers(1, max_batch + 1))
        q_lens = RNG.integers(0, max_q // max_batch + 1, batch)
        kv_lens = (q_lens + RNG.integers(0, 40, batch)).tolist()
        kv_indptr, kv_indices, last = page_table(kv_lens, page_size, num_pages)
        qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        plan = jaxinfer.plan_prefill(qo, kv_indptr, kv_indices, last, page_size=page_size,
                                     num_qo_heads=2, num_kv_heads=1, max_batch=max_batch,
                                     max_q_tokens=max_q, max_pages=num_pages)
        q = jax.random.normal(jax.random.key(len(traces) + batch), (max_q, 2, 64), jnp.bfloat16)
        want = reference.paged_attention(q, cache, qo, kv_indptr, kv_indices, last, causal=True)
        assert_close(step(q, cache, plan), want, jnp.bfloat16)
    assert len(traces) == 1


# ------------------------------------------------------------------ GPU grid

LENGTH_MIXES = {  # batch 1, 3, 16; query lengths 1..4096; keys >= queries, odd sizes included
    1: ([4096], [4096 + 77]),
    3: ([1, 7, 1000], [1, 300, 1000]),
    16: ([1, 7, 128, 1000, 0, 3, 64, 65, 129, 1, 7, 128, 200, 17, 33, 5],
         [1, 70, 128, 1500, 9, 3, 64, 700, 129, 2000, 7, 200, 200, 17, 99, 16]),
}
GRID = [  # batch, head_dim, group, page_size (0 = ragged), causal, mask, dtype
    (1, 128, 4, 16, True, False, jnp.bfloat16),
    (1, 64, 8, 0, True, False, jnp.float16),
    (1, 256, 1, 1, False, False, jnp.bfloat16),
    (3, 64, 1, 16, False, True, jnp.bfloat16),
    (3, 128, 8, 1, True, False, jnp.float16),
    (3, 256, 4, 0, True, True, jnp.bfloat16),
    (16, 64, 4, 1, True, False, jnp.bfloat16),
    (16, 128, 1, 0, False, False, jnp.bfloat16),
    (16, 128, 8, 16, True, True, jnp.float16),
    (16, 256, 8, 16, False, False, jnp.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,head_dim,group,page_size,causal,mask,dtype", GRID)
def test_gpu_prefill_grid(batch, head_dim, group, page_size, causal, mask, dtype):
    q_lens, kv_lens = LENGTH_MIXES[batch]
    case = make_case(q_lens, kv_lens, head_dim=head_dim, group=group, num_kv_heads=2,
                     page_size=max(page_size, 1), paged=page_size > 0,
                     layout="HND" if page_size == 1 else "NHD", dtype=dtype, mask=mask)
    check(case, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,layout", [(16, "HND"), (32, "NHD"), (64, "HND"), (128, "NHD")])
def test_gpu_prefill_tma_page_boxes(page_size, layout):
    """Pages of 32 to 128 keys go to shared memory by TMA, one box per page (both layouts);
    pages of 16, beside them, by cp.async."""
    q_lens, kv_lens = LENGTH_MIXES[3]
    case = make_case(q_lens, kv_lens, head_dim=128, group=4, num_kv_heads=2, page_size=page_size,
                     layout=layout)
    check(case, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,causal,kv_splits", [(1, True, 1), (8, False, 3), (16, True, 1)])
def test_gpu_prefill_page_runs(page_size, causal, kv_splits):
    """Pages in order (NHD): the tiles of consecutive pages load as one block of cache rows,
    the rest row by row, in one work."""
    q_lens, kv_lens = LENGTH_MIXES[16]
    case = make_case(q_lens, kv_lens, head_dim=128, group=4, num_kv_heads=2, page_size=page_size,
                     kv_splits=kv_splits, page_runs=True)
    check(case, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [True, False])
def test_gpu_prefill_kv_splits(paged):
    """Few query tiles over long keys, split into slices and merged."""
    case = make_case([1, 7, 3], [5000, 70, 3], head_dim=128, group=4, num_kv_heads=2, paged=paged,
                     mask=not paged, kv_splits=5)
    check(case, causal=True)
    check(case, causal=False)


def test_prefill_kv_splits_on_default_device():
    check(make_case([2, 5], [200, 5], head_dim=64, group=2, page_size=8, kv_splits=3), causal=True)


@pytest.mark.parametrize("head_dim,kv_splits", [(64, 1), (64, 3), (256, 1), (256, 3)])
def test_merge_with_equals_merge_state(head_dim, kv_splits):
    """The result merged with another state as it is written (the padding rows, which see
    no key, return that state; one of its rows saw no key either)."""
    case = make_case([5, 17, 1], [9, 140, 1], head_dim=head_dim, group=2, num_kv_heads=2, page_size=4,
                     kv_splits=kv_splits)
    q = case["q"]
    other_o = jax.random.normal(jax.random.key(7), q.shape, q.dtype)
    other_lse = (4 * jax.random.normal(jax.random.key(8), q.shape[:2])).at[3].set(-jnp.inf)
    poison_allocator((q.shape, q.dtype), (q.shape[:2], jnp.float32))
    o, lse = run(case, causal=True, merge_with=(other_o, other_lse))
    want_o, want_lse = reference.merge_state(*reference_rows(case, causal=True), other_o, other_lse)
    assert_close(o, want_o.astype(q.dtype), q.dtype, name="o")
    assert_close(lse, want_lse, q.dtype, name="lse")


@pytest.mark.gpu
def test_gpu_prefill_variants():
    slopes = np.linspace(0.5, 0.01, 8).astype(np.float32)
    for options in [dict(logits_soft_cap=30.0, causal=True), dict(window_left=100, causal=True),
                    dict(alibi_slopes=slopes), dict(rope=True, rope_theta=1e4, causal=True)]:
        check(make_case([300, 5], [700, 5], head_dim=128, group=4, num_kv_heads=2), **options)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_prefill_rising_logits(causal):
    # Keys scaled up along each request: a row's running max moves far, and after its
    # first tiles.
    case = make_case([1000, 129], [1000, 700], head_dim=128, group=4, num_kv_heads=2, paged=False)
    rows = case["k"].shape[0]
    growth = 1 + 3.0 * jnp.arange(rows, dtype=jnp.float32) / rows
    case["k"] = (case["k"] * growth[:, None, None]).astype(case["k"].dtype)
    check(case, causal=causal)


@pytest.mark.gpu
def test_gpu_prefill_lowers_to_the_kernel():
    case = make_case([3], [5], head_dim=128, group=2, page_size=4)
    text = jax.jit(jaxinfer.batch_prefill).lower(case["q"], case["cache"], case["plan"]).as_text()
    assert "jaxinfer_batch_prefill" in text


@pytest.mark.gpu
def test_gpu_prefill_is_captured_and_replays_new_plans():
    assert_captured("""
        import jax, jax.numpy as jnp, numpy as np, jaxinfer
        from jaxinfer import reference
        rng = np.random.default_rng(0)
        k = jax.random.normal(jax.random.key(0), (300, 2, 128), jnp.bfloat16)
        v = jax.random.normal(jax.random.key(1), (300, 2, 128), jnp.bfloat16)
        q = jax.random.normal(jax.random.key(2), (200, 8, 128), jnp.bfloat16)

        @jax.jit
        def step(q, k, v, plan):
            o = jaxinfer.batch_prefill_ragged(q * 1.5, k, v, plan, causal=True)
            return jaxinfer.batch_prefill_ragged(o + q, k, v, plan, causal=True)   # two layers

        for _ in range(4):   # new lengths each replay: same executable, new plan data
            q_lens = rng.integers(0, 50, 4)
            kv_lens = q_lens + rng.integers(0, 25, 4)
            qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
            kv = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
            plan = jaxinfer.plan_prefill(qo, kv, num_qo_heads=8, num_kv_heads=2, max_batch=4,
                                         max_q_tokens=200)
            got = step(q, k, v, plan)
            ref = lambda x: reference.ragged_attention(x, k, v, qo, kv, causal=True)
            want = ref(ref(q * 1.5) + q)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            assert err < 0.1, err
    """, module="step", target="jaxinfer_batch_prefill")
