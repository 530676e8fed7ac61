"""Sampling ops: statistics against the renormalised distributions (10^6 draws per
case), edge cases, determinism under a key, trace-time errors, speculative sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from capture import assert_captured

from jaxinfer import reference, sampling

RNG = np.random.default_rng()
DRAWS = 1_000_000
CHUNK = 250_000  # rows per call: 4 calls of one row broadcast, each with its own key


def row(vocab=37, zeros=(3, 11)):
    """One random probability row with some exact zeros (37: not a multiple of any block)."""
    p = RNG.random(vocab).astype(np.float32) ** 3
    p[list(zeros)] = 0.0
    return p / p.sum()


def frequencies(op, p, *params, draws=DRAWS):
    """Empirical token frequencies of op(key, probs, *params) over `draws` rows of p."""
    fn = jax.jit(lambda key: op(key, jnp.broadcast_to(jnp.asarray(p), (CHUNK, p.shape[-1])), *params))
    counts = np.zeros(p.shape[-1], np.int64)
    for i in range(draws // CHUNK):
        tokens = np.asarray(fn(jax.random.key(1000 + i)))
        assert tokens.min() >= 0
        counts += np.bincount(tokens, minlength=p.shape[-1])
    return counts / counts.sum()


def assert_distribution(freq, want):
    """Zero-probability tokens never drawn; cosine similarity > 0.99 and every frequency
    within 5 standard errors of its probability."""
    want = np.asarray(want, np.float64)
    assert np.all(freq[want == 0] == 0), np.nonzero(freq[want == 0])
    cosine = freq @ want / np.linalg.norm(freq) / np.linalg.norm(want)
    assert cosine > 0.99, cosine
    sigma = np.sqrt(want * (1 - want) / DRAWS) + 1e-9
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-6), np.max(np.abs(freq - want) / sigma)


def renormalised(p, keep):
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def case_op_and_want(case, p, implementation=None):
    """(op(key, probs), the distribution it must draw from) for one filter case."""
    order = np.sort(p)[::-1]
    kw = dict(implementation=implementation) if implementation else {}
    if case == "plain":
        return functools.partial(sampling.sampling_from_probs, **kw), p
    if case == "top_k":
        return (lambda key, x: sampling.top_k_sampling_from_probs(key, x, 5, **kw)), renormalised(p, p >= order[4])
    if case == "top_p":
        threshold = order[(np.cumsum(order) - order) < 0.6].min()
        return (lambda key, x: sampling.top_p_sampling_from_probs(key, x, 0.6, **kw)), renormalised(p, p >= threshold)
    if case == "min_p":
        return (lambda key, x: sampling.min_p_sampling_from_probs(key, x, 0.2, **kw)), renormalised(p, p >= 0.2 * p.max())
    top = renormalised(p, p >= order[7])
    sorted_top = np.sort(top)[::-1]
    threshold = sorted_top[(np.cumsum(sorted_top) - sorted_top) < 0.5].min()
    return ((lambda key, x: sampling.top_k_top_p_sampling_from_probs(key, x, 8, 0.5, **kw)),
            renormalised(top, top >= threshold))


@pytest.mark.parametrize("case", ["plain", "top_k", "top_p", "min_p", "top_k_top_p"])
def test_sampling_matches_the_renormalised_distribution(case):
    p = row()
    op, want = case_op_and_want(case, p)
    assert_distribution(frequencies(op, p), want)


def test_sampling_from_logits_with_temperature():
    logits = RNG.normal(size=37).astype(np.float32) * 2
    logits[[4, 20]] = -np.inf  # masked tokens are never drawn
    want = np.asarray(jax.nn.softmax(jnp.asarray(logits) / 0.7))
    op = functools.partial(sampling.sampling_from_logits, temperature=0.7)
    assert_distribution(frequencies(op, logits), want)


def test_same_key_same_tokens_and_jit_scan():
    probs = jnp.asarray(RNG.random((64, 1000)), jnp.float32)
    key = jax.random.key(7)
    a = sampling.top_p_sampling_from_probs(key, probs, 0.9)
    b = jax.jit(sampling.top_p_sampling_from_probs)(key, probs, 0.9)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def step(key, _):
        key, sub = jax.random.split(key)
        return key, sampling.top_k_top_p_sampling_from_probs(sub, probs, 50, 0.9)

    _, scanned = jax.lax.scan(step, key, None, length=3)
    _, again = jax.lax.scan(step, key, None, length=3)
    np.testing.assert_array_equal(np.asarray(scanned), np.asarray(again))
    assert not np.array_equal(np.asarray(scanned[0]), np.asarray(scanned[1]))


def test_edge_cases():
    key = jax.random.key(3)
    probs = jnp.asarray(RNG.random((512, 301)), jnp.float32)  # batch 512, odd vocab
    argmax = np.asarray(jnp.argmax(probs, axis=-1))
    np.testing.assert_array_equal(np.asarray(sampling.top_k_sampling_from_probs(key, probs, 1)), argmax)
    plain = np.asarray(sampling.sampling_from_probs(key, probs))
    for op, param in [(sampling.top_k_sampling_from_probs, 301), (sampling.top_k_sampling_from_probs, 10**6),
                      (sampling.top_p_sampling_from_probs, 1.0), (sampling.min_p_sampling_from_probs, 0.0)]:
        np.testing.assert_array_equal(np.asarray(op(key, probs, param)), plain)  # no-op filters
    per_row = jnp.asarray(RNG.integers(1, 5, 512), jnp.int32)  # a parameter per row
    tokens = np.asarray(sampling.top_k_sampling_from_probs(key, probs, per_row))
    rank = np.sum(np.asarray(probs) > np.asarray(probs)[np.arange(512), tokens][:, None], axis=1)
    assert np.all(rank < np.asarray(per_row))
    one = sampling.sampling_from_probs(key, probs[:1])  # batch 1
    assert one.shape == (1,) and one.dtype == jnp.int32
    empty = jnp.zeros((2, 5)).at[1, 2].set(1.0)  # a row of zeros has no token: -1
    np.testing.assert_array_equal(np.asarray(sampling.sampling_from_probs(key, empty)), [-1, 2])
    logits = jnp.full((2, 5), -jnp.inf).at[1, 4].set(0.0)
    np.testing.assert_array_equal(np.asarray(sampling.sampling_from_logits(key, logits)), [-1, 4])


def test_renorm_and_mask_match_the_reference():
    probs = jnp.asarray(RNG.random((8, 100)), jnp.float32)
    probs = probs / probs.sum(-1, keepdims=True)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5)  # kernels sum in another order
    close(sampling.top_k_renorm_probs(probs, 7), reference.top_k_renorm_probs(probs, 7))
    close(sampling.top_p_renorm_probs(probs, 0.3), reference.top_p_renorm_probs(probs, 0.3))
    close(sampling.min_p_renorm_probs(probs, 0.5), reference.min_p_renorm_probs(probs, 0.5))
    logits = jnp.log(probs)
    np.testing.assert_array_equal(sampling.top_k_mask_logits(logits, 3), reference.top_k_mask_logits(logits, 3))
    np.testing.assert_allclose(sampling.softmax(logits, 2.0), reference.softmax(logits, 2.0))


def test_bad_arguments_name_themselves():
    key, probs = jax.random.key(0), jnp.ones((4, 10)) / 10
    with pytest.raises(ValueError, match=r"^probs: expected rank 2"):
        sampling.sampling_from_probs(key, probs[0])
    with pytest.raises(ValueError, match=r"^probs: expected dtype in"):
        sampling.sampling_from_probs(key, probs.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"^top_p: expected a value in \(0.0, 1.0\], got 1.5"):
        sampling.top_p_sampling_from_probs(key, probs, 1.5)
    with pytest.raises(ValueError, match=r"^top_k: expected a value in \[1, "):
        sampling.top_k_sampling_from_probs(key, probs, 0)
    with pytest.raises(ValueError, match=r"^top_k: expected shape \[batch=4\]"):
        sampling.top_k_sampling_from_probs(key, probs, jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match=r"^min_p: expected a value in \[0.0, 1.0\]"):
        sampling.min_p_sampling_from_probs(key, probs, -0.1)
    with pytest.raises(ValueError, match=r"^temperature: expected a value in \(0.0, inf\]"):
        sampling.softmax(probs, 0.0)
    with pytest.raises(ValueError, match=r"^key: expected a JAX PRNG key"):
        sampling.sampling_from_probs(7, probs)
    with pytest.raises(ValueError, match=r"^target_probs: expected shape \[batch=4, 3, vocab=10\]"):
        sampling.chain_speculative_sampling(key, jnp.ones((4, 2, 10)), jnp.zeros((4, 2), jnp.int32),
                                            jnp.ones((4, 2, 10)))


# ---------------------------------------------------------------- speculative sampling


def spec_reference(u, draft_probs, draft_ids, target_probs):
    """The acceptance rule, one row at a time in numpy: (num_accepted, distribution of the
    drawn token) given the uniforms u."""
    n = draft_ids.shape[0]
    for i in range(n):
        d = draft_ids[i]
        if not u[i] * draft_probs[i, d] < target_probs[i, d]:
            residual = np.maximum(target_probs[i] - draft_probs[i], 0)
            return i, (residual / residual.sum() if residual.sum() > 0 else target_probs[i])
    return n, target_probs[n]


def test_speculative_sampling_follows_the_acceptance_rule():
    batch, n, vocab = 64, 4, 20
    draft = RNG.random((batch, n, vocab)).astype(np.float32)
    draft /= draft.sum(-1, keepdims=True)
    target = RNG.random((batch, n + 1, vocab)).astype(np.float32)
    target /= target.sum(-1, keepdims=True)
    ids = np.stack([[RNG.choice(vocab, p=draft[b, i]) for i in range(n)] for b in range(batch)]).astype(np.int32)
    key = jax.random.key(11)
    tokens, accepted, emitted = sampling.chain_speculative_sampling(key, draft, ids, target)
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    u = np.asarray(jax.random.uniform(jax.random.split(key)[0], (batch, n)))  # the op's uniforms
    for b in range(batch):
        want_accepted, dist = spec_reference(u[b], draft[b], ids[b], target[b])
        assert accepted[b] == want_accepted
        np.testing.assert_array_equal(tokens[b, :accepted[b]], ids[b, :accepted[b]])
        assert dist[tokens[b, accepted[b]]] > 0  # drawn from the right distribution's support
        assert np.all(tokens[b, accepted[b] + 1:] == -1)
    np.testing.assert_array_equal(np.asarray(emitted), accepted + 1)


def test_speculative_sampling_emits_the_target_distribution():
    """One drafted position: the first emitted token is distributed as the target."""
    vocab = 12
    draft_row, target_row = row(vocab, zeros=(2,)), row(vocab, zeros=(5,))
    draft = jnp.broadcast_to(jnp.asarray(draft_row), (CHUNK, 1, vocab))
    target = jnp.broadcast_to(jnp.asarray(np.stack([target_row, row(vocab, zeros=())])), (CHUNK, 2, vocab))
    counts = np.zeros(vocab, np.int64)
    op = jax.jit(sampling.chain_speculative_sampling)
    for i in range(DRAWS // CHUNK):
        # The drafts' key is unrelated to the op's (fold_in and split can share streams).
        ids = jax.random.categorical(jax.random.key(90_000 + i), jnp.log(draft[:, 0]))
        tokens, _, _ = op(jax.random.key(50 + i), draft, ids[:, None].astype(jnp.int32), target)
        counts += np.bincount(np.asarray(tokens[:, 0]), minlength=vocab)
    assert_distribution(counts / counts.sum(), target_row)


# ---------------------------------------------------------------- the sorting-free kernel (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["plain", "top_k", "top_p", "min_p", "top_k_top_p"])
def test_gpu_kernel_matches_the_renormalised_distribution(case):
    p = row()
    op, want = case_op_and_want(case, p, implementation="ffi")
    assert_distribution(frequencies(op, p), want)


@pytest.mark.gpu
def test_gpu_kernel_edge_cases():
    key = jax.random.key(3)
    ffi = dict(implementation="ffi")
    for batch, vocab in [(512, 301), (1, 128256), (3, 151936)]:
        probs = jnp.asarray(RNG.random((batch, vocab)) ** 4, jnp.float32)
        argmax = np.asarray(jnp.argmax(probs, axis=-1))
        np.testing.assert_array_equal(np.asarray(sampling.top_k_sampling_from_probs(key, probs, 1, **ffi)), argmax)
        plain = np.asarray(sampling.sampling_from_probs(key, probs, **ffi))
        np.testing.assert_array_equal(np.asarray(sampling.sampling_from_probs(key, probs, **ffi)), plain)
        for op, param in [(sampling.top_k_sampling_from_probs, vocab), (sampling.top_p_sampling_from_probs, 1.0),
                          (sampling.min_p_sampling_from_probs, 0.0)]:
            np.testing.assert_array_equal(np.asarray(op(key, probs, param, **ffi)), plain)  # no-op filters
        per_row = jnp.asarray(RNG.integers(1, 5, batch), jnp.int32)
        tokens = np.asarray(sampling.top_k_sampling_from_probs(key, probs, per_row, **ffi))
        host = np.asarray(probs)
        rank = np.sum(host > host[np.arange(batch), tokens][:, None], axis=1)
        assert np.all(rank < np.asarray(per_row))
    empty = jnp.zeros((3, 5)).at[1, 2].set(1.0).at[2, 4].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(sampling.sampling_from_probs(key, empty, **ffi)), [-1, 2, -1])


@pytest.mark.gpu
@pytest.mark.parametrize("batch,vocab", [(64, 1000), (3, 128256), (1, 37)])
def test_gpu_filters_match_the_reference(batch, vocab):
    probs = jnp.asarray(RNG.random((batch, vocab)) ** 6, jnp.float32)
    probs = probs / probs.sum(-1, keepdims=True)
    logits = jnp.log(probs)
    ffi = dict(implementation="ffi")
    per_row = jnp.asarray(RNG.integers(1, 60, batch), jnp.int32)
    for k in (1, 50, per_row, 10**6):
        np.testing.assert_allclose(sampling.top_k_renorm_probs(probs, k, **ffi),
                                   reference.top_k_renorm_probs(probs, k), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(sampling.top_k_mask_logits(logits, k, **ffi),
                                      reference.top_k_mask_logits(logits, k))
    for top_p in (0.05, 0.5, 0.95, 1.0):
        got = np.asarray(sampling.top_p_renorm_probs(probs, top_p, **ffi))
        want = np.asarray(reference.top_p_renorm_probs(probs, top_p))
        # Sums in another order may move a boundary token whose mass ties top_p to float precision.
        assert np.mean((got > 0) != (want > 0)) < 1e-3
        np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_kernel_is_captured():
    assert_captured("""
        import jax, jax.numpy as jnp, jaxinfer
        probs = jax.random.uniform(jax.random.key(0), (8, 1000))

        @jax.jit
        def step(key, probs):
            a = jaxinfer.sampling.top_p_sampling_from_probs(key, probs * 2, 0.9, implementation="ffi")
            return a + jaxinfer.sampling.top_k_sampling_from_probs(key, probs, 5, implementation="ffi")

        jax.block_until_ready(step(jax.random.key(1), probs))
    """, module="step", target="jaxinfer_sample")
