"""Paged-KV batch decode: the planner, the API, and the CUDA kernel against the reference."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from capture import assert_captured
from conftest import assert_close

import jaxinfer
from jaxinfer import reference

RNG = np.random.default_rng()
LENGTHS = [0, 1, 15, 16, 17, 1000, 4096, 32768]


def page_table(kv_lens, page_size, num_pages):
    """A CSR page table with each request's pages drawn at random from the cache."""
    pages = [(n + page_size - 1) // page_size for n in kv_lens]
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    assert kv_indptr[-1] <= num_pages
    kv_indices = RNG.permutation(num_pages)[: kv_indptr[-1]].astype(np.int32)
    last = np.array([(n - 1) % page_size + 1 if n else 1 for n in kv_lens], np.int32)
    return kv_indptr, kv_indices, last


def random_cache(num_pages, page_size, num_kv_heads, head_dim, dtype, layout):
    shape = ((num_pages, page_size, num_kv_heads, head_dim) if layout == "NHD"
             else (num_pages, num_kv_heads, page_size, head_dim))
    key_k, key_v = jax.random.split(jax.random.key(int(RNG.integers(1 << 30))))
    return jax.random.normal(key_k, shape, dtype), jax.random.normal(key_v, shape, dtype)


@functools.cache
def _reference_one(layout, options_key):
    options = dict(options_key)
    if options.get("alibi_slopes") is not None:
        options["alibi_slopes"] = jnp.asarray(options["alibi_slopes"], jnp.float32)
    return jax.jit(functools.partial(reference.paged_decode, kv_layout=layout, return_lse=True,
                                     **options))


def reference_decode(q, cache, kv_indptr, kv_indices, last, layout, **options):
    """The jnp reference, one request at a time (page lists padded to powers of two,
    so a handful of compilations serve any batch)."""
    key = tuple(sorted((k, tuple(v) if isinstance(v, np.ndarray) else v) for k, v in options.items()))
    fn = _reference_one(layout, key)
    outs, lses = [], []
    for b in range(q.shape[0]):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        bucket = 1 << max(int(len(pages)) - 1, 0).bit_length()
        padded = np.zeros(bucket, np.int32)
        padded[: len(pages)] = pages
        o, lse = fn(q[b:b + 1], cache, np.array([0, len(pages)], np.int32), padded, last[b:b + 1])
        outs.append(o)
        lses.append(lse)
    return jnp.concatenate(outs), jnp.concatenate(lses)


def poison_allocator(*arrays_like):
    """Fills and frees device memory the size of the outputs with NaN, so an element the
    kernel fails to write most likely reads back as NaN."""
    for shape, dtype in arrays_like:
        jax.block_until_ready(jnp.full(shape, jnp.nan, dtype)).delete()


def run_case(batch, head_dim, group, page_size, layout, dtype, num_kv_heads=2, lengths=None,
             max_batch=None, key_growth=0.0, **options):
    """key_growth: each request's keys scaled by 1 + key_growth * (its page's place in the
    request's table) / (the table's length), so that logits grow along the request and its
    running max moves after its first tiles."""
    kv_lens = lengths if lengths is not None else RNG.choice(LENGTHS[:-1], batch).tolist()
    if lengths is None and batch >= 7:  # every awkward length (the longest once, from batch 8 on)
        every = LENGTHS[: min(batch, len(LENGTHS))]
        kv_lens[: len(every)] = RNG.permutation(every).tolist()
    max_batch = max_batch or batch
    num_pages = sum((n + page_size - 1) // page_size for n in kv_lens) + 5
    cache = random_cache(num_pages, page_size, num_kv_heads, head_dim, dtype, layout)
    kv_indptr, kv_indices, last = page_table(kv_lens, page_size, num_pages)
    if key_growth:
        growth = np.ones(num_pages, np.float32)
        for b in range(len(kv_lens)):
            table = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
            growth[table] = 1 + key_growth * np.arange(len(table)) / max(len(table), 1)
        cache = ((cache[0] * growth[:, None, None, None]).astype(dtype), cache[1])
    plan = jaxinfer.plan_decode(kv_indptr, kv_indices, last, page_size=page_size,
                                num_kv_heads=num_kv_heads, head_dim=head_dim,
                                max_batch=max_batch, max_pages=num_pages)
    num_qo_heads = group * num_kv_heads
    q = jax.random.normal(jax.random.key(int(RNG.integers(1 << 30))),
                          (max_batch, num_qo_heads, head_dim), dtype)
    poison_allocator((q.shape, dtype), ((max_batch, num_qo_heads), jnp.float32))
    decode = jax.jit(functools.partial(jaxinfer.batch_decode, kv_layout=layout, return_lse=True,
                                       **options))
    o, lse = decode(q, cache, plan)
    want_o, want_lse = reference_decode(q[:batch], cache, kv_indptr, kv_indices, last, layout,
                                        **options)
    assert_close(o[:batch], want_o, dtype, name="o")
    assert_close(lse[:batch], want_lse, dtype, name="lse")  # q.k sees inputs rounded to dtype
    np.testing.assert_array_equal(np.asarray(o[batch:], np.float32), 0)  # padding rows


# ------------------------------------------------------------------ planner (CPU)


def items_of(plan, b):
    """Rows of plan.items for request b, as (kv_start, kv_end) pairs in order."""
    rows = plan.items[plan.merge_indptr[b]:plan.merge_indptr[b + 1]]
    assert np.all(rows[:, jaxinfer.decode.ITEM_REQUEST] == b)
    return rows[:, jaxinfer.decode.ITEM_KV_START], rows[:, jaxinfer.decode.ITEM_KV_END]


def test_plan_shapes_are_static_and_items_tile_each_request():
    shapes = None
    for _ in range(10):
        batch = int(RNG.integers(1, 33))
        kv_lens = RNG.choice(LENGTHS, batch)
        kv_indptr, kv_indices, last = page_table(kv_lens, 16, 70000)
        plan = jaxinfer.plan_decode(kv_indptr, kv_indices, last, page_size=16, num_kv_heads=8,
                                    max_batch=32, max_pages=70000)
        assert shapes in (None, [a.shape for a in plan])
        shapes = [a.shape for a in plan]
        assert all(a.dtype == np.int32 for a in plan)
        num_items = plan.merge_indptr[-1]
        for b in range(32):
            start, end = items_of(plan, b)
            if b >= batch:
                assert len(start) == 0
                continue
            assert len(start) >= 1 and start[0] == 0 and end[-1] == kv_lens[b]
            np.testing.assert_array_equal(start[1:], end[:-1])
            rows = plan.items[plan.merge_indptr[b]:plan.merge_indptr[b + 1]]
            assert np.all(rows[:, jaxinfer.decode.ITEM_KV_LEN] == kv_lens[b])
            assert np.all(rows[:, jaxinfer.decode.ITEM_PAGE_BEGIN] == kv_indptr[b])
            assert np.all(rows[:, jaxinfer.decode.ITEM_PAGE_END] == kv_indptr[b + 1])
        assert np.all(plan.items[num_items:, jaxinfer.decode.ITEM_REQUEST] == -1)
        # The CTA slots take the items in order, all of them, each slot about the same keys.
        assert plan.cta_items[0] == 0 and plan.cta_items[-1] == num_items
        assert np.all(np.diff(plan.cta_items) >= 0)
        keys = plan.items[:, jaxinfer.decode.ITEM_KV_END] - plan.items[:, jaxinfer.decode.ITEM_KV_START]
        tiles = np.maximum(1, -(-keys // 64))[:num_items]
        cumulative = np.concatenate([[0], np.cumsum(tiles)])
        per_slot = cumulative[plan.cta_items[1:]] - cumulative[plan.cta_items[:-1]]
        assert per_slot.max() <= -(-tiles.sum() // (len(plan.cta_items) - 1))


def test_plan_splits_long_requests_and_packs_short_ones():
    one = jaxinfer.plan_decode([0, 1024], np.arange(1024), [16], page_size=16, num_kv_heads=8,
                               max_batch=1, max_pages=1024)
    assert one.merge_indptr[1] >= 16  # b=1 x 16384 keys: spread over the GPU
    kv_lens = [4096] * 256
    kv_indptr, kv_indices, last = page_table(kv_lens, 16, 256 * 256)
    big = jaxinfer.plan_decode(kv_indptr, kv_indices, last, page_size=16, num_kv_heads=8,
                               max_batch=256, max_pages=256 * 256)
    slots = len(big.cta_items) - 1
    assert big.merge_indptr[-1] <= 256 + slots  # 256 / slots whole requests per slot, a few cut
    assert np.all(np.diff(big.cta_items) >= 256 // slots)


def test_plan_rejects_bad_tables():
    with pytest.raises(ValueError, match="^kv_indptr: expected shape"):
        jaxinfer.plan_decode(np.zeros(6, np.int32), [], np.ones(5), page_size=16, num_kv_heads=1,
                             max_batch=4, max_pages=8)
    with pytest.raises(ValueError, match="^kv_last_page_len: expected shape"):
        jaxinfer.plan_decode([0, 1, 2], [0, 1], [1], page_size=16, num_kv_heads=1, max_batch=4,
                             max_pages=8)
    with pytest.raises(ValueError, match="^kv_indices: expected shape"):
        jaxinfer.plan_decode([0, 1, 20], [0, 1], [1, 1], page_size=16, num_kv_heads=1,
                             max_batch=4, max_pages=30)


# ------------------------------------------------------------------ API (any device)


def test_decode_on_default_device_small():
    run_case(5, 64, 4, 4, "NHD", jnp.bfloat16, lengths=[0, 1, 5, 17, 40], max_batch=7)
    run_case(3, 128, 2, 16, "HND", jnp.float16, lengths=[33, 0, 100])


def test_decode_variants_on_default_device():
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    for options in [dict(logits_soft_cap=5.0), dict(window_left=20), dict(alibi_slopes=slopes),
                    dict(rope=True, rope_theta=1e4, rope_scale=2.0), dict(sm_scale=0.3)]:
        run_case(4, 64, 2, 8, "NHD", jnp.bfloat16, lengths=[1, 70, 130, 9], **options)


def test_combined_cache_matches_separate():
    kv_lens = [3, 40, 17]
    k, v = random_cache(12, 8, 2, 64, jnp.bfloat16, "NHD")
    kv_indptr, kv_indices, last = page_table(kv_lens, 8, 12)
    plan = jaxinfer.plan_decode(kv_indptr, kv_indices, last, page_size=8, num_kv_heads=2,
                                max_batch=3, max_pages=12)
    q = jax.random.normal(jax.random.key(0), (3, 4, 64), jnp.bfloat16)
    separate = jax.jit(jaxinfer.batch_decode)(q, (k, v), plan)
    combined = jax.jit(jaxinfer.batch_decode)(q, jnp.stack([k, v], axis=1), plan)
    np.testing.assert_array_equal(np.asarray(separate, np.float32), np.asarray(combined, np.float32))


def test_one_array_as_both_k_and_v():
    """A (k, v) pair may hold one array twice: still a pair, not a combined cache."""
    k, _ = random_cache(12, 8, 2, 64, jnp.bfloat16, "NHD")
    kv_indptr, kv_indices, last = page_table([3, 40, 17], 8, 12)
    plan = jaxinfer.plan_decode(kv_indptr, kv_indices, last, page_size=8, num_kv_heads=2,
                                max_batch=3, max_pages=12)
    q = jax.random.normal(jax.random.key(0), (3, 4, 64), jnp.bfloat16)
    same = jaxinfer.batch_decode(q, (k, k), plan)
    copied = jaxinfer.batch_decode(q, (k, k + 0), plan)
    np.testing.assert_array_equal(np.asarray(same, np.float32), np.asarray(copied, np.float32))


def test_bad_inputs_name_the_argument():
    k, v = random_cache(8, 4, 2, 64, jnp.bfloat16, "NHD")
    plan = jaxinfer.plan_decode([0, 1, 2], [0, 1], [1, 1], page_size=4, num_kv_heads=2,
                                max_batch=2, max_pages=8)
    q = jnp.zeros((2, 4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"^q: expected rank 3"):
        jaxinfer.batch_decode(q[0], (k, v), plan)
    with pytest.raises(ValueError, match=r"^k_cache: expected dtype in \(bfloat16\), got float16"):
        jaxinfer.batch_decode(q, (k.astype(jnp.float16), v), plan)
    with pytest.raises(ValueError, match=r"^v_cache: expected shape \[num_pages=8, page_size=4, "):
        jaxinfer.batch_decode(q, (k, v[:, :2]), plan)
    with pytest.raises(ValueError, match=r"^k_cache: expected shape \[num_pages, page_size, "
                                         r"num_kv_heads, head_dim=64\]"):
        jaxinfer.batch_decode(q, (k[..., :32], v), plan)
    with pytest.raises(ValueError, match=r"^q: num_qo_heads=3 must be a multiple of num_kv_heads=2"):
        jaxinfer.batch_decode(q[:, :3], (k, v), plan)
    with pytest.raises(ValueError, match=r"^plan.kv_indptr: expected shape \[3\]"):
        jaxinfer.batch_decode(q, (k, v), plan._replace(kv_indptr=plan.kv_indptr[:2]))
    with pytest.raises(ValueError, match=r"^plan.items: expected shape \[work_items, 6\], got \(\d+, 5\)"):
        jaxinfer.batch_decode(q, (k, v), plan._replace(items=plan.items[:, :5]))
    with pytest.raises(ValueError, match=r"^paged_kv_cache: expected at least one page"):
        jaxinfer.batch_decode(q, (k[:0], v[:0]), plan)
    with pytest.raises(ValueError, match=r"^kv_layout: expected 'NHD' or 'HND'"):
        jaxinfer.batch_decode(q, (k, v), plan, kv_layout="NDH")
    with pytest.raises(ValueError, match=r"^alibi_slopes: expected shape \[num_qo_heads=4\]"):
        jaxinfer.batch_decode(q, (k, v), plan, alibi_slopes=jnp.zeros(2))


def test_one_compilation_for_many_length_mixes():
    traces = []

    @jax.jit
    def step(q, cache, plan):
        traces.append(1)
        return jaxinfer.batch_decode(q, cache, plan) * 2

    max_batch, page_size, num_pages = 6, 4, 80
    cache = random_cache(num_pages, page_size, 2, 64, jnp.bfloat16, "NHD")
    for _ in range(20):
        batch = int(RNG.integers(1, max_batch + 1))
        kv_lens = RNG.integers(0, 50, batch).tolist()
        kv_indptr, kv_indices, last = page_table(kv_lens, page_size, num_pages)
        plan = jaxinfer.plan_decode(kv_indptr, kv_indices, last, page_size=page_size,
                                    num_kv_heads=2, head_dim=64, max_batch=max_batch,
                                    max_pages=num_pages)
        q = jax.random.normal(jax.random.key(len(traces) + batch), (max_batch, 4, 64), jnp.bfloat16)
        out = step(q, cache, plan)
        want, _ = reference_decode(q[:batch], cache, kv_indptr, kv_indices, last, "NHD")
        assert_close(out[:batch], want * 2, jnp.bfloat16)
    assert len(traces) == 1


def test_out_of_range_pages_are_ignored():
    kv_lens = [40, 40]
    k, v = random_cache(30, 8, 2, 64, jnp.bfloat16, "NHD")
    kv_indptr, kv_indices, last = page_table(kv_lens, 8, 20)
    kv_indices[1], kv_indices[7] = 1000, -3  # corrupt two entries
    plan = jaxinfer.plan_decode(kv_indptr, kv_indices, last, page_size=8, num_kv_heads=2,
                                max_batch=2, max_pages=20)
    q = jax.random.normal(jax.random.key(3), (2, 4, 64), jnp.bfloat16)
    out = jax.jit(jaxinfer.batch_decode)(q, (k, v), plan)
    want, _ = reference_decode(q, (k, v), kv_indptr, kv_indices, last, "NHD")
    assert_close(out, want, jnp.bfloat16)


def test_corrupt_plan_and_page_table_stay_in_bounds():
    """Garbage in the device-side tables must not fault or read outside the buffers
    (run under compute-sanitizer on the GPU machine); the rows they touch are garbage."""
    k, v = random_cache(16, 8, 2, 64, jnp.bfloat16, "NHD")
    kv_indptr, kv_indices, last = page_table([40, 17, 9], 8, 16)
    plan = jaxinfer.plan_decode(kv_indptr, kv_indices, last, page_size=8, num_kv_heads=2,
                                max_batch=3, max_pages=16)
    items = plan.items.copy()
    items[1, 0] = 10**6       # a request past the batch
    items[:, 2] = 10**7       # endless key ranges
    items[0, 3] = 2**31 - 1   # a length past the pages
    items[2, 4:] = [-5, 10**6]  # a page range outside kv_indices
    slots = np.where(np.arange(plan.cta_items.size) % 2, 10**6, -3).astype(np.int32)  # overlapping
    bad = plan._replace(items=items, cta_items=slots, merge_indptr=np.array([0, 10**6, -4, 2], np.int32))
    q = jax.random.normal(jax.random.key(4), (3, 4, 64), jnp.bfloat16)
    jax.block_until_ready(jax.jit(jaxinfer.batch_decode)(q, (k, v), bad))


# ------------------------------------------------------------------ GPU grid

GRID = [
    # batch, head_dim, group, page_size, layout, dtype
    (b, d, g, [1, 16, 64][i % 3], ["NHD", "HND"][i % 2], [jnp.bfloat16, jnp.float16][(i // 2) % 2])
    for i, ((d, g), b) in enumerate(zip(itertools.product([64, 128, 256], [1, 4, 8]),
                                        itertools.cycle([1, 7, 64, 256, 7])))
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,head_dim,group,page_size,layout,dtype", GRID)
def test_gpu_decode_grid(batch, head_dim, group, page_size, layout, dtype):
    lengths = [32768] if batch == 1 else None
    run_case(batch, head_dim, group, page_size, layout, dtype, num_kv_heads=2, lengths=lengths)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8, 32])
def test_gpu_decode_long_and_wide(group):
    run_case(3, 128, group, 16, "NHD", jnp.bfloat16, num_kv_heads=1, lengths=[32768, 0, 4097],
             max_batch=4)


@pytest.mark.gpu
def test_gpu_decode_rising_logits():
    # Large logits deep into the rows: the running max moves far, and late.
    run_case(3, 128, 4, 16, "NHD", jnp.bfloat16, lengths=[5000, 700, 17], key_growth=3.0)


@pytest.mark.gpu
def test_gpu_decode_lowers_to_the_kernel():
    k, v = random_cache(8, 4, 2, 128, jnp.bfloat16, "NHD")
    plan = jaxinfer.plan_decode([0, 1, 2], [0, 1], [1, 1], page_size=4, num_kv_heads=2,
                                max_batch=2, max_pages=8)
    q = jnp.zeros((2, 4, 128), jnp.bfloat16)
    assert "jaxinfer_batch_decode" in jax.jit(jaxinfer.batch_decode).lower(q, (k, v), plan).as_text()


@pytest.mark.gpu
def test_gpu_decode_is_captured_and_replays_new_plans():
    assert_captured("""
        import functools, jax, jax.numpy as jnp, numpy as np, jaxinfer
        from jaxinfer import reference
        rng = np.random.default_rng(0)
        k = jax.random.normal(jax.random.key(0), (64, 16, 2, 128), jnp.bfloat16)
        v = jax.random.normal(jax.random.key(1), (64, 16, 2, 128), jnp.bfloat16)
        q = jax.random.normal(jax.random.key(2), (4, 8, 128), jnp.bfloat16)

        @jax.jit
        def step(q, k, v, plan):
            o = jaxinfer.batch_decode(q * 1.5, (k, v), plan)
            return jaxinfer.batch_decode(o + q, (k, v), plan)   # two layers

        for _ in range(4):   # new lengths each replay: same executable, new plan data
            lens = rng.integers(0, 200, 4)
            pages = (lens + 15) // 16
            indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
            indices = rng.permutation(64)[: indptr[-1]].astype(np.int32)
            last = np.where(lens > 0, (lens - 1) % 16 + 1, 1).astype(np.int32)
            plan = jaxinfer.plan_decode(indptr, indices, last, page_size=16, num_kv_heads=2,
                                        max_batch=4, max_pages=64)
            got = step(q, k, v, plan)
            ref = functools.partial(reference.paged_decode, kv_indptr=indptr, kv_indices=indices,
                                    kv_last_page_len=last)
            want = ref(ref(q * 1.5, (k, v)) + q, (k, v))
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            assert err < 0.1, err
    """, module="step", target="jaxinfer_batch_decode")
