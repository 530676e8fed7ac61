"""Pure-jnp reference implementations: the CPU fallback and the test oracle.

Obvious rather than fast: every function upcasts to float32, materialises the
full logits and masks, and is jittable (index arrays may be traced). Kernels
are judged against these functions, never against each other.

Conventions (FlashInfer's, see README "Conventions"):

* Queries are aligned to the END of the keys: query row ``i`` of a request
  with ``qo_len`` queries and ``kv_len`` keys sits at absolute position
  ``kv_len - qo_len + i``. The same function therefore covers prefill
  (``qo_len == kv_len``), append and decode (``qo_len == 1``).
* Causal: key ``j`` is visible to query ``i`` when ``j <= kv_len - qo_len + i``.
* Sliding window ``window_left`` (inclusive, ``-1`` = off): key ``j`` is
  visible when ``j >= kv_len - qo_len + i - window_left``.
* Logits: ``s = sm_scale * q.k`` (``sm_scale`` defaults to ``1/sqrt(D)``),
  then the soft cap ``cap * tanh(s / cap)`` when ``logits_soft_cap > 0``, then
  the ALiBi bias ``slope[h] * (j - q_pos)``, then the masks.
* RoPE on the fly (``rope=True``): Llama's rotate-half form applied to q and k
  at their absolute positions, frequency ``rope_theta ** (-2k / D) / rope_scale``.
* The log-sum-exp is BASE 2: ``lse = log2(sum_j 2^(s_j * log2(e)))``, i.e.
  the natural-log LSE divided by ``ln 2``. A row that sees no key returns
  zeros and ``lse = -inf`` (never NaN).
* GQA: query head ``h`` reads KV head ``h // (num_qo_heads // num_kv_heads)``.
* Paged KV cache: ``k_cache``, ``v_cache`` of shape
  ``[num_pages, page_size, num_kv_heads, head_dim]`` (layout ``"NHD"``,
  canonical) or ``[num_pages, num_kv_heads, page_size, head_dim]`` (``"HND"``);
  one array ``[num_pages, 2, ...]`` holding both is accepted too. The page
  table is CSR: request ``b`` owns pages
  ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` and its last page holds
  ``kv_last_page_len[b]`` keys (``1..page_size``), so
  ``kv_len = page_size * (num_pages - 1) + last_page_len`` (0 with no page).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LN2 = math.log(2.0)


class AttentionOptions(NamedTuple):
    """Options shared by every attention entry point (see module docstring)."""

    causal: bool = False
    sm_scale: float | None = None
    logits_soft_cap: float = 0.0
    window_left: int = -1
    alibi_slopes: jax.Array | None = None  # [num_qo_heads] float32
    rope: bool = False
    rope_scale: float = 1.0
    rope_theta: float = 1e4


# ----------------------------------------------------------------------------
# The one core: attention of tagged queries against tagged keys.
# ----------------------------------------------------------------------------


def apply_rope(x, pos, *, rope_scale=1.0, rope_theta=1e4):
    """Llama-style (rotate-half) rotary embedding of ``x [T, H, D]`` at ``pos [T]``."""
    half = x.shape[-1] // 2
    inv_freq = rope_theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angle = (pos.astype(jnp.float32) / rope_scale)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    x = x.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attend(q, k, v, q_seq, q_pos, k_seq, k_pos, k_valid, opts: AttentionOptions, extra_mask=None):
    """Attention where each query and key carries (sequence id, absolute position).

    q [Tq, Hq, D]; k, v [Tk, Hkv, D]; q_seq, q_pos [Tq]; k_seq, k_pos, k_valid [Tk];
    extra_mask [Tq, Tk] bool or None. Query t sees key u when both belong to the
    same sequence, u is valid and every enabled mask admits it.
    Returns o [Tq, Hq, D] float32 and lse [Tq, Hq] float32 (base 2).
    """
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    group = num_qo_heads // k.shape[1]
    q = q.astype(jnp.float32)
    k = k.astype(jnp.float32)
    v = v.astype(jnp.float32)
    if opts.rope:
        q = apply_rope(q, q_pos, rope_scale=opts.rope_scale, rope_theta=opts.rope_theta)
        k = apply_rope(k, k_pos, rope_scale=opts.rope_scale, rope_theta=opts.rope_theta)
    k = jnp.repeat(k, group, axis=1)
    v = jnp.repeat(v, group, axis=1)

    sm_scale = opts.sm_scale if opts.sm_scale is not None else 1.0 / math.sqrt(head_dim)
    s = jnp.einsum("thd,uhd->htu", q, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    if opts.logits_soft_cap > 0:
        s = opts.logits_soft_cap * jnp.tanh(s / opts.logits_soft_cap)
    if opts.alibi_slopes is not None:
        rel = (k_pos[None, :] - q_pos[:, None]).astype(jnp.float32)  # [Tq, Tk]
        s = s + jnp.asarray(opts.alibi_slopes, jnp.float32)[:, None, None] * rel[None]

    visible = (q_seq[:, None] == k_seq[None, :]) & k_valid[None, :]
    if opts.causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
    if opts.window_left >= 0:
        visible &= k_pos[None, :] >= q_pos[:, None] - opts.window_left
    if extra_mask is not None:
        visible &= extra_mask
    s = jnp.where(visible[None], s, -jnp.inf)

    m = jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)  # exp(-inf) = 0 for masked keys
    denom = jnp.sum(p, axis=-1)  # [Hq, Tq]
    o = jnp.einsum("htu,uhd->thd", p, v, precision=jax.lax.Precision.HIGHEST)
    o = o / jnp.where(denom > 0, denom, 1.0).T[:, :, None]
    lse = jnp.where(denom > 0, (m_safe[..., 0] + jnp.log(denom)) / LN2, -jnp.inf).T
    return o, lse


def _finish(o, lse, dtype, return_lse):
    o = o.astype(dtype)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------
# Public reference entry points.
# ----------------------------------------------------------------------------


def single_attention(q, k, v, *, custom_mask=None, return_lse=False, **options):
    """Attention for one request over dense keys.

    q [qo_len, Hq, D]; k, v [kv_len, Hkv, D]; custom_mask [qo_len, kv_len] bool
    (True = visible) or None. Options: see ``AttentionOptions``.
    Returns o [qo_len, Hq, D] in q's dtype, and lse [qo_len, Hq] float32 (base 2)
    when ``return_lse``.
    """
    opts = AttentionOptions(**options)
    qo_len, kv_len = q.shape[0], k.shape[0]
    q_pos = jnp.arange(qo_len, dtype=jnp.int32) + (kv_len - qo_len)
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)
    o, lse = _attend(q, k, v, jnp.zeros(qo_len, jnp.int32), q_pos, jnp.zeros(kv_len, jnp.int32),
                     k_pos, jnp.ones(kv_len, bool), opts, custom_mask)
    return _finish(o, lse, q.dtype, return_lse)


def _segments(indptr, total):
    """For each of ``total`` packed rows: its segment id and offset in the segment.

    Rows past ``indptr[-1]`` (padding) get segment id ``len(indptr) - 1``.
    """
    rows = jnp.arange(total, dtype=jnp.int32)
    seg = jnp.searchsorted(indptr, rows, side="right").astype(jnp.int32) - 1
    seg = jnp.where(rows < indptr[-1], seg, indptr.shape[0] - 1)
    start = jnp.concatenate([indptr, indptr[-1:]])[seg]
    return seg, rows - start


def _flat_mask(custom_mask, qo_indptr, kv_lens, q_seq, q_off, k_seq, k_off):
    """Gathers a flattened per-request boolean mask into [Tq, Tk].

    Request b's mask is ``custom_mask[mask_indptr[b]:...]`` reshaped to
    [qo_len_b, kv_len_b] (row major), ``mask_indptr`` = cumsum of qo_len * kv_len.
    """
    qo_lens = qo_indptr[1:] - qo_indptr[:-1]
    mask_indptr = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(qo_lens * kv_lens)])
    qs = jnp.minimum(q_seq, qo_lens.shape[0] - 1)
    idx = mask_indptr[qs][:, None] + q_off[:, None] * kv_lens[qs][:, None] + k_off[None, :]
    # One trailing False keeps the gather in bounds for rows of no request.
    padded = jnp.concatenate([jnp.asarray(custom_mask, bool).reshape(-1), jnp.zeros(1, bool)])
    idx = jnp.clip(idx, 0, padded.shape[0] - 1)
    return (q_seq[:, None] == k_seq[None, :]) & padded[idx]


def ragged_attention(q, k, v, qo_indptr, kv_indptr, *, custom_mask=None, return_lse=False,
                     **options):
    """Batch attention over ragged (packed) K/V.

    q [total_q, Hq, D]; k, v [total_kv, Hkv, D]; qo_indptr, kv_indptr int32 [B + 1]:
    request b owns query rows ``qo_indptr[b]:qo_indptr[b+1]`` and key rows
    ``kv_indptr[b]:kv_indptr[b+1]``. custom_mask: flattened bool
    [sum_b qo_len_b * kv_len_b] or None. Rows past ``qo_indptr[-1]`` return zeros.
    Returns o [total_q, Hq, D] (and lse [total_q, Hq], base 2).
    """
    opts = AttentionOptions(**options)
    qo_indptr = jnp.asarray(qo_indptr, jnp.int32)
    kv_indptr = jnp.asarray(kv_indptr, jnp.int32)
    q_seq, q_off = _segments(qo_indptr, q.shape[0])
    k_seq, k_off = _segments(kv_indptr, k.shape[0])
    qo_lens = qo_indptr[1:] - qo_indptr[:-1]
    kv_lens = kv_indptr[1:] - kv_indptr[:-1]
    q_pos = kv_lens.at[q_seq].get(mode="fill", fill_value=0) - qo_lens.at[q_seq].get(
        mode="fill", fill_value=0) + q_off
    mask = None
    if custom_mask is not None:
        mask = _flat_mask(custom_mask, qo_indptr, kv_lens, q_seq, q_off, k_seq, k_off)
    o, lse = _attend(q, k, v, q_seq, q_pos, k_seq, k_off, k_seq < kv_lens.shape[0], opts, mask)
    return _finish(o, lse, q.dtype, return_lse)


def split_paged_cache(paged_kv_cache):
    """Returns (k_cache, v_cache) from a (k, v) pair or one [num_pages, 2, ...] array."""
    if isinstance(paged_kv_cache, (tuple, list)):
        k_cache, v_cache = paged_kv_cache
        return k_cache, v_cache
    return paged_kv_cache[:, 0], paged_kv_cache[:, 1]


def paged_kv_lens(kv_indptr, kv_last_page_len, page_size):
    """kv_len per request from the CSR page table (0 for a request with no page)."""
    num_pages = kv_indptr[1:] - kv_indptr[:-1]
    return jnp.where(num_pages > 0, (num_pages - 1) * page_size + kv_last_page_len, 0)


def paged_attention(q, paged_kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, *,
                    kv_layout="NHD", custom_mask=None, return_lse=False, **options):
    """Batch attention over a paged KV cache (prefill, append and decode).

    q [total_q, Hq, D]; paged_kv_cache: (k_cache, v_cache) or one array, see the
    module docstring; qo_indptr [B + 1], kv_indptr [B + 1], kv_indices
    [num_used_pages], kv_last_page_len [B], all int32. Keys in a page whose index
    lies outside the cache are ignored (as in the kernels).
    Returns o [total_q, Hq, D] (and lse [total_q, Hq], base 2).
    """
    opts = AttentionOptions(**options)
    k_cache, v_cache = split_paged_cache(paged_kv_cache)
    if kv_layout == "HND":
        k_cache, v_cache = k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2)
    elif kv_layout != "NHD":
        raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
    page_size = k_cache.shape[1]
    qo_indptr = jnp.asarray(qo_indptr, jnp.int32)
    kv_indptr = jnp.asarray(kv_indptr, jnp.int32)
    kv_indices = jnp.asarray(kv_indices, jnp.int32)
    kv_lens = paged_kv_lens(kv_indptr, jnp.asarray(kv_last_page_len, jnp.int32), page_size)

    # Keys in page-table order: entry e of kv_indices holds keys e * page_size + slot.
    k = k_cache[kv_indices].reshape(-1, *k_cache.shape[2:])
    v = v_cache[kv_indices].reshape(-1, *v_cache.shape[2:])
    page_seq, page_off = _segments(kv_indptr, kv_indices.shape[0])
    page_ok = (kv_indices >= 0) & (kv_indices < k_cache.shape[0])
    k_seq = jnp.repeat(page_seq, page_size)
    k_pos = (jnp.repeat(page_off, page_size) * page_size
             + jnp.tile(jnp.arange(page_size, dtype=jnp.int32), kv_indices.shape[0]))
    k_valid = (k_pos < kv_lens.at[k_seq].get(mode="fill", fill_value=0)) & jnp.repeat(page_ok, page_size)

    q_seq, q_off = _segments(qo_indptr, q.shape[0])
    qo_lens = qo_indptr[1:] - qo_indptr[:-1]
    q_pos = kv_lens.at[q_seq].get(mode="fill", fill_value=0) - qo_lens.at[q_seq].get(
        mode="fill", fill_value=0) + q_off
    mask = None
    if custom_mask is not None:
        mask = _flat_mask(custom_mask, qo_indptr, kv_lens, q_seq, q_off, k_seq, k_pos)
    o, lse = _attend(q, k, v, q_seq, q_pos, k_seq, k_pos, k_valid, opts, mask)
    return _finish(o, lse, q.dtype, return_lse)


def paged_decode(q, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, *, kv_layout="NHD",
                 return_lse=False, **options):
    """Decode: one query per request over a paged KV cache.

    q [B, Hq, D]; the rest as in ``paged_attention``.
    Returns o [B, Hq, D] (and lse [B, Hq], base 2).
    """
    qo_indptr = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return paged_attention(q, paged_kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                           kv_layout=kv_layout, return_lse=return_lse, **options)


# ----------------------------------------------------------------------------
# Merging attention states (lse base 2).
# ----------------------------------------------------------------------------


def merge_states(v, s):
    """Merges states stacked on axis -3: v [..., n, H, D], s [..., n, H] -> ([..., H, D], [..., H])."""
    s = jnp.asarray(s, jnp.float32)
    m = jnp.max(s, axis=-2, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(s - m_safe)  # [..., n, H]; 0 for lse = -inf
    total = jnp.sum(w, axis=-2)
    o = jnp.sum(w[..., None] * v.astype(jnp.float32), axis=-3)
    o = o / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, m_safe[..., 0, :] + jnp.log2(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return o.astype(v.dtype), lse


def merge_state(v_a, s_a, v_b, s_b):
    """Merges two states: v [..., H, D], s [..., H] (base-2 lse) -> (v, s)."""
    return merge_states(jnp.stack([v_a, v_b], axis=-3), jnp.stack([s_a, s_b], axis=-2))


# ----------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------


def _per_row(param, batch, dtype):
    """A scalar or [batch] parameter as a [batch, 1] column."""
    return jnp.broadcast_to(jnp.asarray(param, dtype), (batch,))[:, None]


def softmax(logits, temperature=1.0):
    """Softmax of logits [B, V] / temperature (scalar or [B], > 0), in float32."""
    t = _per_row(temperature, logits.shape[0], jnp.float32)
    return jax.nn.softmax(logits.astype(jnp.float32) / t, axis=-1)


def _renorm(probs, keep):
    p = jnp.where(keep, probs, 0.0)
    return p / jnp.sum(p, axis=-1, keepdims=True)


def top_k_threshold(x, top_k):
    """The k-th largest value of each row of x [B, V]; top_k scalar or [B] (clipped to 1..V)."""
    k = jnp.clip(_per_row(top_k, x.shape[0], jnp.int32), 1, x.shape[-1])
    return jnp.take_along_axis(-jnp.sort(-x, axis=-1), k - 1, axis=-1)


def top_k_renorm_probs(probs, top_k):
    """Keeps each row's top_k largest probabilities (ties at the k-th value are kept), renormalised."""
    probs = probs.astype(jnp.float32)
    return _renorm(probs, probs >= top_k_threshold(probs, top_k))


def top_k_mask_logits(logits, top_k):
    """Sets every logit below the row's top_k-th largest to -inf (ties kept)."""
    return jnp.where(logits >= top_k_threshold(logits, top_k), logits, -jnp.inf)


def top_p_renorm_probs(probs, top_p):
    """Keeps the smallest set of largest probabilities whose mass reaches top_p, renormalised.

    Mass is relative to the row's total (probs need not sum to 1). Every token
    whose probability equals the smallest kept one is kept too; top_p >= 1 keeps all.
    """
    probs = probs.astype(jnp.float32)
    p = _per_row(top_p, probs.shape[0], jnp.float32)
    desc = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(desc, axis=-1) - desc
    total = jnp.sum(probs, axis=-1, keepdims=True)
    # The threshold is the smallest sorted value whose preceding mass is still < top_p.
    threshold = jnp.min(jnp.where(mass_before < p * total, desc, jnp.inf), axis=-1, keepdims=True)
    return _renorm(probs, (probs >= threshold) | (p >= 1.0))


def min_p_renorm_probs(probs, min_p):
    """Keeps probabilities >= min_p * (row max), renormalised."""
    probs = probs.astype(jnp.float32)
    scale = _per_row(min_p, probs.shape[0], jnp.float32)
    return _renorm(probs, probs >= scale * jnp.max(probs, axis=-1, keepdims=True))


def sampling_from_probs(key, probs):
    """One token per row of probs [B, V] (need not be normalised); int32 [B]."""
    logp = jnp.log(probs.astype(jnp.float32))
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def top_k_top_p_sampling_from_probs(key, probs, top_k, top_p):
    """Top-k filtering, then top-p on the renormalised result, then one draw per row."""
    return sampling_from_probs(key, top_p_renorm_probs(top_k_renorm_probs(probs, top_k), top_p))
