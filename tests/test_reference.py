"""The pure-jnp reference against jax.nn.dot_product_attention and brute-force loops."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from brute_force import numpy_attention
from conftest import assert_close

from jaxinfer import reference

RNG = np.random.default_rng()


def randn(*shape, dtype=np.float32):
    return jnp.asarray(RNG.standard_normal(shape).astype(np.float32), dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_single_matches_jax_dot_product_attention(causal, num_qo_heads, num_kv_heads):
    q, k, v = randn(19, num_qo_heads, 64), randn(19, num_kv_heads, 64), randn(19, num_kv_heads, 64)
    out = reference.single_attention(q, k, v, causal=causal)
    want = jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=causal,
                                        implementation="xla")[0]
    assert_close(out, want)


def test_single_custom_mask_matches_jax_dot_product_attention():
    q, k, v = randn(7, 4, 32), randn(23, 2, 32), randn(23, 2, 32)
    mask = RNG.random((7, 23)) < 0.5
    out = reference.single_attention(q, k, v, custom_mask=jnp.asarray(mask))
    want = jax.nn.dot_product_attention(q[None], k[None], v[None], mask=jnp.asarray(mask)[None, None],
                                        implementation="xla")[0]
    rows = mask.any(axis=1)  # jax returns the mean of v for fully masked rows; we return 0
    assert_close(out[rows], want[rows])
    np.testing.assert_array_equal(np.asarray(out[~rows]), 0)


OPTION_GRID = [
    dict(),
    dict(causal=True),
    dict(causal=True, window_left=5),
    dict(window_left=0),
    dict(logits_soft_cap=3.0, sm_scale=0.7),
    dict(causal=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32)),
]


@pytest.mark.parametrize("options", OPTION_GRID)
@pytest.mark.parametrize("qo_len,kv_len", [(1, 1), (1, 13), (5, 13), (13, 13)])
def test_single_matches_brute_force(options, qo_len, kv_len):
    q, k, v = randn(qo_len, 4, 16), randn(kv_len, 2, 16), randn(kv_len, 2, 16)
    o, lse = reference.single_attention(q, k, v, return_lse=True, **options)
    want_o, want_lse = numpy_attention(q, k, v, **options)
    assert_close(o, want_o)
    assert_close(lse, want_lse)


def test_fully_masked_rows_are_zero_with_lse_minus_inf():
    q, k, v = randn(3, 2, 8), randn(5, 2, 8), randn(5, 2, 8)
    mask = np.ones((3, 5), bool)
    mask[1] = False
    o, lse = reference.single_attention(q, k, v, custom_mask=jnp.asarray(mask), return_lse=True)
    np.testing.assert_array_equal(np.asarray(o[1]), 0)
    assert np.all(np.isneginf(np.asarray(lse[1])))
    assert np.all(np.isfinite(np.asarray(lse)[[0, 2]]))
    # No keys at all.
    o, lse = reference.single_attention(q, k[:0], v[:0], return_lse=True)
    np.testing.assert_array_equal(np.asarray(o), 0)
    assert np.all(np.isneginf(np.asarray(lse)))


def test_rope_matches_formula():
    x = np.asarray(randn(6, 2, 8))
    pos = np.array([0, 1, 2, 7, 100, 4095])
    out = np.asarray(reference.apply_rope(jnp.asarray(x), jnp.asarray(pos), rope_scale=2.0, rope_theta=500.0))
    want = np.empty_like(x)
    for t, h, i in itertools.product(range(6), range(2), range(4)):
        angle = pos[t] / 2.0 * 500.0 ** (-2 * i / 8)
        a, b = x[t, h, i], x[t, h, i + 4]
        want[t, h, i] = a * np.cos(angle) - b * np.sin(angle)
        want[t, h, i + 4] = b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_rope_on_the_fly_equals_pre_rotated_inputs():
    q, k, v = randn(4, 4, 16), randn(9, 2, 16), randn(9, 2, 16)
    out = reference.single_attention(q, k, v, causal=True, rope=True, rope_theta=1e4)
    q_rot = reference.apply_rope(q, jnp.arange(5, 9))
    k_rot = reference.apply_rope(k, jnp.arange(9))
    assert_close(out, reference.single_attention(q_rot, k_rot, v, causal=True))


def _lengths_to_indptr(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


@pytest.mark.parametrize("options", OPTION_GRID[:3])
def test_ragged_matches_brute_force(options):
    qo_lens = np.array([3, 0, 1, 4, 2])
    kv_lens = np.array([3, 5, 7, 4, 9])
    qo_indptr, kv_indptr = _lengths_to_indptr(qo_lens), _lengths_to_indptr(kv_lens)
    q, k, v = randn(qo_indptr[-1] + 2, 4, 16), randn(kv_indptr[-1], 2, 16), randn(kv_indptr[-1], 2, 16)
    o, lse = reference.ragged_attention(q, k, v, qo_indptr, kv_indptr, return_lse=True, **options)
    for b in range(len(qo_lens)):
        qs, ks = slice(qo_indptr[b], qo_indptr[b + 1]), slice(kv_indptr[b], kv_indptr[b + 1])
        want_o, want_lse = numpy_attention(q[qs], k[ks], v[ks], **options)
        assert_close(o[qs], want_o, name=f"o[{b}]")
        assert_close(lse[qs], want_lse, name=f"lse[{b}]")
    np.testing.assert_array_equal(np.asarray(o[qo_indptr[-1]:]), 0)  # padding rows


def test_ragged_custom_mask_matches_brute_force():
    qo_lens, kv_lens = np.array([2, 3]), np.array([4, 3])
    masks = [RNG.random((q, k)) < 0.6 for q, k in zip(qo_lens, kv_lens)]
    flat = np.concatenate([m.reshape(-1) for m in masks])
    qo_indptr, kv_indptr = _lengths_to_indptr(qo_lens), _lengths_to_indptr(kv_lens)
    q, k, v = randn(5, 2, 8), randn(7, 2, 8), randn(7, 2, 8)
    o = reference.ragged_attention(q, k, v, qo_indptr, kv_indptr, custom_mask=jnp.asarray(flat))
    for b in range(2):
        qs, ks = slice(qo_indptr[b], qo_indptr[b + 1]), slice(kv_indptr[b], kv_indptr[b + 1])
        assert_close(o[qs], numpy_attention(q[qs], k[ks], v[ks], custom_mask=masks[b])[0])


def make_paged_cache(kv_lens, page_size, num_kv_heads, head_dim, *, extra_pages=3, dtype=np.float32):
    """A random cache with the requests' pages scattered in random order.

    Returns (k_cache, v_cache) NHD, kv_indptr, kv_indices, kv_last_page_len and
    the dense per-request keys and values [(k [len, H, D], v), ...].
    """
    pages_per_req = [(n + page_size - 1) // page_size for n in kv_lens]
    num_pages = sum(pages_per_req) + extra_pages
    k_cache = randn(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = randn(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype)
    order = RNG.permutation(num_pages)[: sum(pages_per_req)].astype(np.int32)
    kv_indptr = _lengths_to_indptr(pages_per_req)
    last = np.array([(n - 1) % page_size + 1 if n else 1 for n in kv_lens], np.int32)
    dense = []
    for b, n in enumerate(kv_lens):
        pages = order[kv_indptr[b]:kv_indptr[b + 1]]
        k = np.asarray(k_cache)[pages].reshape(-1, num_kv_heads, head_dim)[:n]
        v = np.asarray(v_cache)[pages].reshape(-1, num_kv_heads, head_dim)[:n]
        dense.append((k, v))
    return (k_cache, v_cache), kv_indptr, order, last, dense


@pytest.mark.parametrize("layout", ["NHD", "HND", "combined"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_paged_matches_brute_force(layout, page_size):
    kv_lens = [0, 1, 4, 5, 11]
    qo_lens = np.array([0, 1, 2, 5, 3])
    cache, kv_indptr, kv_indices, last, dense = make_paged_cache(kv_lens, page_size, 2, 16)
    if layout == "HND":
        cache = tuple(c.swapaxes(1, 2) for c in cache)
    if layout == "combined":
        cache = jnp.stack(cache, axis=1)
    qo_indptr = _lengths_to_indptr(qo_lens)
    q = randn(qo_indptr[-1], 4, 16)
    o, lse = reference.paged_attention(q, cache, qo_indptr, kv_indptr, kv_indices, last,
                                       kv_layout="HND" if layout == "HND" else "NHD",
                                       causal=True, return_lse=True)
    for b, (k, v) in enumerate(dense):
        qs = slice(qo_indptr[b], qo_indptr[b + 1])
        want_o, want_lse = numpy_attention(q[qs], k, v, causal=True)
        assert_close(o[qs], want_o, name=f"o[{b}]")
        assert_close(lse[qs], want_lse, name=f"lse[{b}]")


def test_paged_decode_is_jittable_and_matches_brute_force():
    kv_lens = [1, 16, 17, 0, 33]
    cache, kv_indptr, kv_indices, last, dense = make_paged_cache(kv_lens, 16, 2, 32)
    q = randn(len(kv_lens), 8, 32)
    o = jax.jit(reference.paged_decode)(q, cache, kv_indptr, kv_indices, last)
    for b, (k, v) in enumerate(dense):
        assert_close(o[b:b + 1], numpy_attention(q[b:b + 1], k, v)[0], name=f"o[{b}]")


def test_merge_of_split_attention_equals_whole():
    q, k, v = randn(6, 8, 32), randn(40, 2, 32), randn(40, 2, 32)
    whole, whole_lse = reference.single_attention(q, k, v, return_lse=True)
    parts = [reference.single_attention(q, k[a:b], v[a:b], return_lse=True)
             for a, b in [(0, 13), (13, 13), (13, 40)]]  # the middle part is empty
    merged, merged_lse = reference.merge_states(jnp.stack([p[0] for p in parts], 1),
                                                jnp.stack([p[1] for p in parts], 1))
    assert_close(merged, whole)
    assert_close(merged_lse, whole_lse)
    two, two_lse = reference.merge_state(*parts[0], *parts[2])
    assert_close(two, whole)
    assert_close(two_lse, whole_lse)


def test_merge_of_empty_states_is_zero():
    v = randn(2, 3, 4, 8)
    s = jnp.full((2, 3, 4), -jnp.inf)
    o, lse = reference.merge_states(v, s)
    np.testing.assert_array_equal(np.asarray(o), 0)
    assert np.all(np.isneginf(np.asarray(lse)))


# ---------------------------------------------------------------- sampling


def test_softmax_temperature():
    logits = randn(3, 10)
    t = jnp.array([0.5, 1.0, 2.0])
    want = jax.nn.softmax(logits / t[:, None], axis=-1)
    assert_close(reference.softmax(logits, t), want)


def test_top_k_top_p_min_p_on_a_known_row():
    probs = jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15, 0.0]])
    np.testing.assert_allclose(reference.top_k_renorm_probs(probs, 2),
                               [[0, 0.4 / 0.7, 0, 0.3 / 0.7, 0, 0]], rtol=1e-6)
    # top_p = 0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins.
    np.testing.assert_allclose(reference.top_p_renorm_probs(probs, 0.75),
                               [[0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85, 0]], rtol=1e-6)
    np.testing.assert_allclose(reference.top_p_renorm_probs(probs, 1.0), probs, rtol=1e-6)
    np.testing.assert_allclose(reference.min_p_renorm_probs(probs, 0.5),
                               [[0, 0.4 / 0.7, 0, 0.3 / 0.7, 0, 0]], rtol=1e-6)
    masked = reference.top_k_mask_logits(jnp.log(probs + 1e-9), 3)
    assert np.isfinite(np.asarray(masked)).tolist() == [[False, True, False, True, True, False]]


def test_sampling_from_probs_statistics():
    probs = jnp.asarray(RNG.random((1, 12)).astype(np.float32)).at[0, 3].set(0.0)
    n = 200_000
    key = jax.random.key(1)
    draws = reference.sampling_from_probs(key, jnp.broadcast_to(probs, (n, 12)))
    again = reference.sampling_from_probs(key, jnp.broadcast_to(probs, (n, 12)))
    np.testing.assert_array_equal(np.asarray(draws), np.asarray(again))  # same key, same draws
    counts = np.bincount(np.asarray(draws), minlength=12)
    assert counts[3] == 0
    want = np.asarray(probs[0] / probs.sum())
    assert np.abs(counts / n - want).max() < 5e-3
