"""Sampling: from probabilities or logits, with top-k / top-p / min-p filters,
renormalisation, and chain speculative sampling.

Randomness comes only from the JAX PRNG key passed in (``jax.random.key`` or a
raw uint32[2] key): the same key gives the same tokens, nothing lives in
global state, and every op is safe inside ``jax.jit`` and ``lax.scan``.
Shapes: ``probs`` and ``logits`` are [B, V] (float32, bfloat16 or float16);
``top_k`` (int32), ``top_p``, ``min_p`` and ``temperature`` (float32) are a
scalar for every row or a [B] array with one value per row; draws are int32
[B], renormalised probabilities float32 [B, V], masked logits [B, V] in the
logits' dtype. A row with no drawable token (all probabilities 0, or all
logits -inf) returns the token -1.

The draws and the top-k / top-p renorm and mask filters have sorting-free
CUDA kernels (``csrc/sampling.h``: two-level exact draws, rejection with a
rising pivot, radix select of thresholds); ``implementation=None`` picks them
on a GPU and the jnp formulation of ``jaxinfer.reference`` (sort based)
elsewhere, "ffi" insists on the kernels, "reference" on the jnp path. The
two paths draw from the same distributions but not the same tokens for a
key.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import _ffi, reference
from jaxinfer._checks import Shapes

FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_key(key):
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key: expected one PRNG key (shape ()), got shape {key.shape}")
        return key
    if getattr(key, "shape", None) == (2,) and np.dtype(getattr(key, "dtype", None)) == np.uint32:
        return key
    raise ValueError("key: expected a JAX PRNG key (jax.random.key(seed)) or a uint32[2] raw key, "
                     f"got {type(key).__name__} {getattr(key, 'dtype', '')}{getattr(key, 'shape', '')}")


def _check_rows(name, x):
    dims = Shapes()
    dims.check(name, x, ("batch", "vocab"), FLOATS)
    if dims.dims["vocab"] == 0:
        raise ValueError(f"{name}: expected a vocabulary of at least one token, got shape {x.shape}")
    return dims


def _param(name, value, dims, dtype, low, high, low_open=False):
    """A scalar or [batch] parameter; concrete values are range-checked at trace time
    (traced values cannot be, and are clipped by the ops instead)."""
    if isinstance(value, numbers.Number):
        value = np.asarray(value)
    if getattr(value, "ndim", None) != 0:
        dims.check(name, value, ("batch",), (dtype,) if dtype is not None else None)
    try:
        concrete = np.asarray(value)
    except jax.errors.TracerArrayConversionError:
        return
    bad = ((concrete <= low) if low_open else (concrete < low)) | (concrete > high)
    if bad.any():
        bound = "(" if low_open else "["
        raise ValueError(f"{name}: expected a value in {bound}{low}, {high}], got {concrete[bad].flat[0]}")


PLAIN, TOP_K, TOP_P, MIN_P, TOP_K_TOP_P = range(5)  # csrc/sampling.h SamplingMode
TOP_K_RENORM, TOP_P_RENORM, TOP_K_MASK_LOGITS = range(3)  # csrc/sampling.h FilterMode


def _use_kernel(implementation):
    return _ffi.use_ffi("sampling", implementation)


def _kernel(key, probs, mode, top_k=1, param=0.0):
    """The sorting-free kernel: one token per row, -1 for a row with no positive probability."""
    batch = probs.shape[0]
    seed = jax.random.bits(key, (2,), jnp.uint32)
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))
    param = jnp.broadcast_to(jnp.asarray(param, jnp.float32), (batch,))
    out = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.ffi.ffi_call("jaxinfer_sample", out, vmap_method="sequential")(
        probs.astype(jnp.float32), seed, top_k, param, mode=np.int32(mode))


def _filter(x, mode, top_k=1, top_p=1.0):
    """The radix-select filter kernel: renormalised probabilities or masked logits (float32)."""
    batch = x.shape[0]
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (batch,))
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call("jaxinfer_filter", out, vmap_method="sequential")(
        x.astype(jnp.float32), top_k, top_p, mode=np.int32(mode))


def _draw(key, probs):
    """One token per row of nonnegative probs (any scale); -1 for a row of zeros."""
    tokens = reference.sampling_from_probs(key, probs)
    return jnp.where(jnp.sum(probs, axis=-1) > 0, tokens, -1)


def softmax(logits, temperature=1.0):
    """Softmax over the vocabulary of logits [B, V] / temperature (scalar or [B], > 0); float32."""
    dims = _check_rows("logits", logits)
    _param("temperature", temperature, dims, jnp.float32, 0.0, np.inf, low_open=True)
    return reference.softmax(logits, temperature)


def sampling_from_probs(key, probs, *, implementation=None):
    """One token per row of probs [B, V] (nonnegative; need not sum to 1). int32 [B]."""
    _check_key(key)
    _check_rows("probs", probs)
    if _use_kernel(implementation):
        return _kernel(key, probs, PLAIN)
    return _draw(key, probs.astype(jnp.float32))


def sampling_from_logits(key, logits, temperature=1.0, *, implementation=None):
    """One token per row of softmax(logits / temperature). int32 [B]."""
    return sampling_from_probs(key, softmax(logits, temperature), implementation=implementation)


def top_k_renorm_probs(probs, top_k, *, implementation=None):
    """probs [B, V] -> float32 [B, V]: each row's top_k largest kept (ties at the k-th kept),
    renormalised."""
    dims = _check_rows("probs", probs)
    _param("top_k", top_k, dims, jnp.int32, 1, np.iinfo(np.int32).max)
    if _use_kernel(implementation):
        return _filter(probs, TOP_K_RENORM, top_k=top_k)
    return reference.top_k_renorm_probs(probs, top_k)


def top_p_renorm_probs(probs, top_p, *, implementation=None):
    """probs [B, V] -> float32 [B, V]: the smallest set of largest probabilities whose mass
    reaches top_p of the row's, renormalised."""
    dims = _check_rows("probs", probs)
    _param("top_p", top_p, dims, jnp.float32, 0.0, 1.0, low_open=True)
    if _use_kernel(implementation):
        return _filter(probs, TOP_P_RENORM, top_p=top_p)
    return reference.top_p_renorm_probs(probs, top_p)


def min_p_renorm_probs(probs, min_p):
    """probs [B, V] -> float32 [B, V]: probabilities >= min_p * (the row's largest),
    renormalised."""
    dims = _check_rows("probs", probs)
    _param("min_p", min_p, dims, jnp.float32, 0.0, 1.0)
    return reference.min_p_renorm_probs(probs, min_p)


def top_k_mask_logits(logits, top_k, *, implementation=None):
    """logits [B, V] -> [B, V]: every logit below the row's top_k-th largest set to -inf
    (ties kept)."""
    dims = _check_rows("logits", logits)
    _param("top_k", top_k, dims, jnp.int32, 1, np.iinfo(np.int32).max)
    if _use_kernel(implementation):
        return _filter(logits, TOP_K_MASK_LOGITS, top_k=top_k).astype(logits.dtype)
    return reference.top_k_mask_logits(logits, top_k)


def top_k_sampling_from_probs(key, probs, top_k, *, implementation=None):
    """A token from each row's top_k largest probabilities (renormalised). int32 [B]."""
    _check_key(key)
    if _use_kernel(implementation):
        _param("top_k", top_k, _check_rows("probs", probs), jnp.int32, 1, np.iinfo(np.int32).max)
        return _kernel(key, probs, TOP_K, top_k=top_k)
    return _draw(key, top_k_renorm_probs(probs, top_k))


def top_p_sampling_from_probs(key, probs, top_p, *, implementation=None):
    """A token from each row's top-p nucleus (renormalised). int32 [B]."""
    _check_key(key)
    if _use_kernel(implementation):
        _param("top_p", top_p, _check_rows("probs", probs), jnp.float32, 0.0, 1.0, low_open=True)
        return _kernel(key, probs, TOP_P, param=top_p)
    return _draw(key, top_p_renorm_probs(probs, top_p))


def min_p_sampling_from_probs(key, probs, min_p, *, implementation=None):
    """A token among each row's probabilities >= min_p * max (renormalised). int32 [B]."""
    _check_key(key)
    if _use_kernel(implementation):
        _param("min_p", min_p, _check_rows("probs", probs), jnp.float32, 0.0, 1.0)
        return _kernel(key, probs, MIN_P, param=min_p)
    return _draw(key, min_p_renorm_probs(probs, min_p))


def top_k_top_p_sampling_from_probs(key, probs, top_k, top_p, *, implementation=None):
    """Top-k filter, then top-p on the renormalised result, then one draw. int32 [B]."""
    _check_key(key)
    if _use_kernel(implementation):
        dims = _check_rows("probs", probs)
        _param("top_k", top_k, dims, jnp.int32, 1, np.iinfo(np.int32).max)
        _param("top_p", top_p, dims, jnp.float32, 0.0, 1.0, low_open=True)
        return _kernel(key, probs, TOP_K_TOP_P, top_k=top_k, param=top_p)
    return _draw(key, top_p_renorm_probs(top_k_renorm_probs(probs, top_k), top_p))


def top_k_top_p_sampling_from_logits(key, logits, top_k, top_p, temperature=1.0, *,
                                     implementation=None):
    """top_k_top_p_sampling_from_probs of softmax(logits / temperature). int32 [B]."""
    return top_k_top_p_sampling_from_probs(key, softmax(logits, temperature), top_k, top_p,
                                           implementation=implementation)


def chain_speculative_sampling(key, draft_probs, draft_token_ids, target_probs):
    """Verifies a chain of draft tokens against the target model (Leviathan et al. 2023).

    Args:
      key: PRNG key.
      draft_probs: [B, n, V], the draft model's distribution at each drafted position.
      draft_token_ids: int32 [B, n], the drafted tokens.
      target_probs: [B, n + 1, V], the target model's distribution at each position,
        the last one after the whole draft.
    Draft token i is accepted with probability min(1, target(d_i) / draft(d_i)), in order;
    at the first rejection the emitted token is drawn from the normalised residual
    max(0, target - draft) at that position (from target itself if the residual is all
    zero), and after n acceptances a bonus token is drawn from target_probs[:, n]. The
    emitted tokens are then distributed exactly as the target model's samples.
    Returns:
      tokens int32 [B, n + 1] (the accepted drafts, then the drawn token, then -1),
      num_accepted int32 [B], num_emitted int32 [B] (= num_accepted + 1).
    """
    _check_key(key)
    dims = Shapes()
    dims.check("draft_probs", draft_probs, ("batch", "num_draft", "vocab"), FLOATS)
    dims.check("draft_token_ids", draft_token_ids, ("batch", "num_draft"), (jnp.int32,))
    dims.check("target_probs", target_probs, ("batch", dims.dims["num_draft"] + 1, "vocab"), FLOATS)
    batch, n = draft_token_ids.shape
    draft = draft_probs.astype(jnp.float32)
    target = target_probs.astype(jnp.float32)
    key_accept, key_draw = jax.random.split(key)

    ids = jnp.clip(draft_token_ids, 0, draft.shape[-1] - 1)[..., None]
    p_draft = jnp.take_along_axis(draft, ids, axis=-1)[..., 0]
    p_target = jnp.take_along_axis(target[:, :n], ids, axis=-1)[..., 0]
    u = jax.random.uniform(key_accept, (batch, n))
    accept = u * p_draft < p_target  # u < target / draft, without dividing by a zero draft
    num_accepted = jnp.sum(jnp.cumprod(accept, axis=-1), axis=-1).astype(jnp.int32)

    # The distribution of the one drawn token: the residual at the first rejection,
    # the target after the whole draft.
    rows = jnp.arange(batch)
    target_at = target[rows, num_accepted]
    draft_padded = jnp.concatenate([draft, jnp.zeros_like(draft[:, :1])], axis=1)
    residual = jnp.maximum(target_at - draft_padded[rows, num_accepted], 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, target_at)
    drawn = _draw(key_draw, residual)

    position = jnp.arange(n + 1)[None]
    padded_ids = jnp.concatenate([draft_token_ids, jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    tokens = jnp.where(position < num_accepted[:, None], padded_ids,
                       jnp.where(position == num_accepted[:, None], drawn[:, None], -1))
    return tokens.astype(jnp.int32), num_accepted, num_accepted + 1
