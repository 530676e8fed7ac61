"""Batch prefill and append attention over a paged or a ragged KV cache.

>>> plan = jaxinfer.plan_prefill(qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
...                              page_size=16, num_qo_heads=32, num_kv_heads=8,
...                              max_batch=16, max_q_tokens=8192, max_pages=65536)
>>> o = jax.jit(step)(q, kv_cache, plan)   # step calls jaxinfer.batch_prefill(q, kv_cache, plan)

Each request has its own query and key counts, and its queries are the LAST
``q_len`` positions of its keys (prefill: q_len == kv_len; append / chunked
prefill: q_len < kv_len). ``q`` is ragged: ``[max_q_tokens, num_qo_heads,
head_dim]`` with request b's queries at rows ``qo_indptr[b]:qo_indptr[b+1]``;
rows past ``qo_indptr[-1]`` come back as zeros.

The plan is a pytree of int32 numpy arrays shaped by the static capacities
only (``max_batch``, ``max_q_tokens``, ``max_pages``, the GQA group), so a
jitted step compiles once and replays for any mix of lengths. Its work items
are tiles of 128 query rows (a request's tokens x the heads of one GQA group),
heaviest first; ``csrc/prefill_plan.h`` has the rule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import _ffi, reference
from jaxinfer._checks import Shapes
from jaxinfer.decode import KERNEL_DTYPES, KERNEL_HEAD_DIMS, _split_cache

TILE_ROWS = 128  # packed query rows per work item (csrc/prefill.h kPrefillTileRows)
# Columns of PrefillPlan.items (csrc/prefill.h PrefillItemField), and their count.
(ITEM_REQUEST, ITEM_Q_BEGIN, ITEM_Q_LEN, ITEM_ROW_BEGIN, ITEM_KV_LEN, ITEM_KV_BEGIN, ITEM_KV_END,
 ITEM_MASK_BEGIN, ITEM_SPLIT, ITEM_SPLIT_BEGIN, ITEM_SPLIT_END, ITEM_FIELDS) = range(12)


class PrefillPlan(NamedTuple):
    """Static-shape prefill plan (all int32). ``B = max_batch``, ``W`` = work-item capacity."""

    qo_indptr: np.ndarray         # [B + 1], padded with its last value
    kv_indptr: np.ndarray         # [B + 1]: pages (paged) or key rows (ragged) of each request
    kv_indices: np.ndarray        # [max_pages] (paged), [0] (ragged)
    kv_last_page_len: np.ndarray  # [B] (paged; ragged: kv lengths, unused by the kernel)
    items: np.ndarray             # [W, ITEM_FIELDS]: one tile of query rows (csrc/prefill.h)
    kv_splits: np.ndarray         # [S] = 0..S-1: its LENGTH is the static number of KV splits


def work_capacity(max_batch: int, max_q_tokens: int, group: int, kv_splits: int = 1) -> int:
    """Items: the tiles of every request, of the padding rows, and one partial tile each,
    times the KV splits."""
    return (-(-max_q_tokens * group // TILE_ROWS) + max_batch + 1) * kv_splits


def plan_prefill(qo_indptr, kv_indptr, kv_indices=None, kv_last_page_len=None, *,
                 num_qo_heads: int, num_kv_heads: int, max_batch: int, max_q_tokens: int,
                 page_size: int = 1, max_pages: int | None = None,
                 queries_after_keys: bool = True, kv_splits: int = 1) -> PrefillPlan:
    """Builds a PrefillPlan on the host (numpy and a C++ loop; no device work).

    Args:
      qo_indptr: int [B + 1], B <= max_batch: request b's queries are rows
        qo_indptr[b]:qo_indptr[b+1] of q; qo_indptr[-1] <= max_q_tokens.
      kv_indptr: int [B + 1]. Paged (kv_indices given): the CSR page table with
        kv_indices [>= kv_indptr[-1]] and kv_last_page_len [B], as for decode.
        Ragged (kv_indices None): request b's keys are rows kv_indptr[b]:kv_indptr[b+1]
        of k and v.
      num_qo_heads, num_kv_heads: of q and the cache (the GQA group packs query rows).
      max_batch, max_q_tokens, max_pages: static capacities; the plan's shapes depend on
        nothing else.
      page_size: of the paged cache.
      queries_after_keys: every request's queries are its last kv positions, so
        kv_len >= q_len (checked). False for keys that several queries share without
        a position order (a cascade's shared level): any lengths, and then only the
        position-free options apply (no causal, window, ALiBi or RoPE).
      kv_splits: static; > 1 cuts every request's keys into that many slices, each its
        own work item, and merges their states: for batches whose query tiles alone
        leave the GPU idle (few, short query sets over long keys, such as a cascade's
        shared level). Costs a [max_q_tokens, kv_splits, heads, head_dim] fp32 workspace.
    """
    qo = np.ascontiguousarray(qo_indptr, np.int32)  # the C++ split reads them in place
    kv = np.ascontiguousarray(kv_indptr, np.int32)
    batch = qo.shape[0] - 1
    if qo.ndim != 1 or batch < 0 or batch > max_batch:
        raise ValueError(f"qo_indptr: expected shape [B + 1] with B <= max_batch={max_batch}, "
                         f"got {qo.shape}")
    if qo[-1] > max_q_tokens or np.any(np.diff(qo) < 0):
        raise ValueError(f"qo_indptr: expected non-decreasing offsets up to max_q_tokens="
                         f"{max_q_tokens}, got last {qo[-1]}")
    if kv.shape != qo.shape or np.any(np.diff(kv) < 0):
        raise ValueError(f"kv_indptr: expected non-decreasing offsets of shape [B + 1={batch + 1}], "
                         f"got shape {kv.shape}")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads={num_qo_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    paged = kv_indices is not None
    padded_kv = np.full(max_batch + 1, kv[-1], np.int32)
    padded_kv[:batch + 1] = kv
    if paged:
        indices = np.asarray(kv_indices, np.int32)
        last = np.asarray(kv_last_page_len, np.int32)
        if max_pages is None or indices.ndim != 1 or not kv[-1] <= indices.shape[0] <= max_pages:
            raise ValueError(f"kv_indices: expected shape [>= kv_indptr[-1]={kv[-1]}, <= max_pages="
                             f"{max_pages}], got {indices.shape}")
        if last.shape != (batch,):
            raise ValueError(f"kv_last_page_len: expected shape [B={batch}], got {last.shape}")
        pages = kv[1:] - kv[:-1]
        kv_lens = np.where(pages > 0, (pages - 1) * page_size + last, 0).astype(np.int32)
        padded_indices = indices
        if indices.shape[0] < max_pages:
            padded_indices = np.zeros(max_pages, np.int32)
            padded_indices[:indices.shape[0]] = indices
    else:
        kv_lens = (kv[1:] - kv[:-1]).astype(np.int32)
        last = kv_lens
        padded_indices = np.zeros(0, np.int32)
    q_lens = qo[1:] - qo[:-1]
    if queries_after_keys and np.any(kv_lens < q_lens):
        bad = int(np.argmax(kv_lens < q_lens))
        raise ValueError(f"kv_indptr: request {bad} has {kv_lens[bad]} keys for {q_lens[bad]} "
                         f"queries; queries are the last positions of the keys (kv_len >= q_len)")
    mask_begin = np.zeros(batch, np.int64)
    np.cumsum((q_lens.astype(np.int64) * kv_lens)[:-1], out=mask_begin[1:])
    if batch and mask_begin[-1] + int(q_lens[-1]) * int(kv_lens[-1]) >= 2**31:
        raise ValueError("custom masks past 2**31 elements are not supported")

    if kv_splits < 1:
        raise ValueError(f"kv_splits: expected at least 1, got {kv_splits}")
    group = num_qo_heads // num_kv_heads
    items = np.empty((work_capacity(max_batch, max_q_tokens, group, kv_splits), ITEM_FIELDS), np.int32)
    num_items = _ffi.module("prefill").split_work(
        qo, kv_lens, np.ascontiguousarray(kv[:-1]), np.ascontiguousarray(kv[1:]),
        mask_begin.astype(np.int32), group, kv_splits, max_q_tokens, items)
    assert 0 <= num_items <= items.shape[0], num_items

    padded_qo = np.full(max_batch + 1, qo[-1], np.int32)
    padded_qo[:batch + 1] = qo
    padded_last = np.ones(max_batch, np.int32)
    padded_last[:batch] = last
    return PrefillPlan(padded_qo, padded_kv, padded_indices, padded_last, items,
                       np.arange(kv_splits, dtype=np.int32))


def _options(dims, head_dim, causal, sm_scale, logits_soft_cap, window_left, alibi_slopes, rope,
             rope_scale, rope_theta):
    if alibi_slopes is not None:
        dims.check("alibi_slopes", alibi_slopes, ("num_qo_heads",), (jnp.float32,))
    return dict(causal=bool(causal),
                sm_scale=1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale),
                logits_soft_cap=float(logits_soft_cap), window_left=int(window_left),
                alibi_slopes=alibi_slopes, rope=bool(rope), rope_scale=float(rope_scale),
                rope_theta=float(rope_theta))


def _run(q, k, v, plan, kv_layout, custom_mask, merge_with, return_lse, implementation,
         reference_fn, dims, options):
    int32 = (jnp.int32,)
    dims.check("plan.qo_indptr", plan.qo_indptr, ("max_batch_plus_1",), int32)
    dims.check("plan.kv_indptr", plan.kv_indptr, ("max_batch_plus_1",), int32)
    dims.check("plan.items", plan.items, ("work_items", ITEM_FIELDS), int32)
    dims.check("plan.kv_splits", plan.kv_splits, ("kv_splits",), int32)
    if custom_mask is not None:
        dims.check("custom_mask", custom_mask, ("mask_len",), (jnp.bool_,))
    if merge_with is not None:
        if not isinstance(merge_with, (tuple, list)) or len(merge_with) != 2:
            raise ValueError("merge_with: expected a pair (o, lse)")
        dims.check("merge_with[0]", merge_with[0], ("max_q_tokens", "num_qo_heads", "head_dim"),
                   (q.dtype,))
        dims.check("merge_with[1]", merge_with[1], ("max_q_tokens", "num_qo_heads"),
                   (jnp.float32,))
    _check_group(dims)
    if implementation == "ffi" and not _kernel_takes(q):
        raise ValueError(f"implementation='ffi': the prefill kernel takes head_dim in "
                         f"{KERNEL_HEAD_DIMS} and bfloat16/float16, got {q.shape[2]}, {q.dtype}")
    if not kernel_runs(q, implementation):
        if merge_with is None:
            return reference_fn(custom_mask=custom_mask, return_lse=return_lse, **options)
        o, lse = reference_fn(custom_mask=custom_mask, return_lse=True, **options)
        o, lse = reference.merge_state(o, lse, *merge_with)
        return (o, lse) if return_lse else o

    return _kernel(q, k, v, plan.kv_indices, plan.items, plan.kv_splits.shape[0], kv_layout,
                   options, custom_mask=custom_mask, merge_with=merge_with, return_lse=return_lse)


def _kernel(q, k, v, kv_indices, items, splits, kv_layout, options, *, custom_mask=None,
            merge_with=None, return_lse=True, heads_inner=False):
    """The custom call, on checked operands; splits: the static number of KV splits.
    heads_inner: the persistent kernel claims every head of an item together, so that
    the items' order holds across heads (csrc/prefill.h)."""
    workspace = (q.shape[0], splits, *q.shape[1:]) if splits > 1 else (1, 1, 1, 1)
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(q.shape[:2], jnp.float32),
                 jax.ShapeDtypeStruct(workspace, jnp.float32),
                 jax.ShapeDtypeStruct(workspace[:3], jnp.float32),
                 jax.ShapeDtypeStruct((2,), jnp.int32))  # the kernel's work counter
    slopes = options["alibi_slopes"]
    # Unused operands are empty: a materialised jnp.zeros costs a kernel launch per call.
    slopes = np.zeros((0,), np.float32) if slopes is None else slopes
    mask = np.zeros((0,), np.bool_) if custom_mask is None else custom_mask
    merge_o, merge_lse = ((np.zeros((0,), q.dtype), np.zeros((0,), np.float32))
                          if merge_with is None else merge_with)
    o, lse, *_ = jax.ffi.ffi_call("jaxinfer_batch_prefill", out_types, vmap_method="sequential")(
        q, k, v, slopes, kv_indices, items, mask, merge_o, merge_lse,
        kv_splits=np.int32(splits),
        kv_layout=np.int32(kv_layout == "HND"), causal=np.int32(options["causal"]),
        sm_scale=np.float32(options["sm_scale"]),
        logits_soft_cap=np.float32(options["logits_soft_cap"]),
        window_left=np.int32(options["window_left"]),
        use_alibi=np.int32(options["alibi_slopes"] is not None),
        use_mask=np.int32(custom_mask is not None), use_merge=np.int32(merge_with is not None),
        rope=np.int32(options["rope"]),
        rope_scale=np.float32(options["rope_scale"]), rope_theta=np.float32(options["rope_theta"]),
        heads_inner=np.int32(heads_inner))
    return (o, lse) if return_lse else o


def _check_group(dims):
    if dims.dims["num_qo_heads"] % dims.dims["num_kv_heads"]:
        raise ValueError(f"q: num_qo_heads={dims.dims['num_qo_heads']} must be a multiple of "
                         f"num_kv_heads={dims.dims['num_kv_heads']}")


def _kernel_takes(q) -> bool:
    return q.shape[2] in KERNEL_HEAD_DIMS and np.dtype(q.dtype) in map(np.dtype, KERNEL_DTYPES)


def kernel_runs(q, implementation) -> bool:
    """Whether batch_prefill on q runs the custom call (else the reference)."""
    return _ffi.use_ffi("prefill", implementation) and q.ndim == 3 and _kernel_takes(q)


def prefill_items(q, paged_kv_cache, kv_indices, items, splits, *, kv_layout, causal, sm_scale,
                  logits_soft_cap):
    """The kernel on a list of items that plan_prefill did not make (a fused cascade's:
    jaxinfer/cascade.py), claimed every head of an item together, in the list's order.
    Returns (o, lse); the caller has checked that kernel_runs."""
    dims = Shapes()
    dims.check("q", q, ("max_q_tokens", "num_qo_heads", "head_dim"), KERNEL_DTYPES)
    k, v = _split_cache(paged_kv_cache, kv_layout, dims, q)
    dims.check("kv_indices", kv_indices, ("max_pages",), (jnp.int32,))
    dims.check("items", items, ("work_items", ITEM_FIELDS), (jnp.int32,))
    _check_group(dims)
    options = _options(dims, dims.dims["head_dim"], causal, sm_scale, logits_soft_cap, -1, None,
                       False, 1.0, 1e4)
    return _kernel(q, k, v, kv_indices, items, splits, kv_layout, options, heads_inner=True)


_OPTIONS_DOC = """
      causal: mask keys after each query's position. sm_scale (default 1/sqrt(head_dim)),
        logits_soft_cap, window_left, alibi_slopes [num_qo_heads] float32, rope /
        rope_scale / rope_theta: see ``jaxinfer.reference``.
      custom_mask: bool [mask_len] or None: request b's [q_len, kv_len] mask (row major)
        flattened and concatenated in request order; mask_len may exceed the total
        (a static size; the tail is ignored). True = visible, combined with the other masks.
      merge_with: None, or (o, lse) of the same query rows over OTHER keys (o like q,
        lse float32 [max_q_tokens, num_qo_heads], base 2): the result is then the merge
        of both states, as ``merge_state`` would give, without a separate merge pass (a
        cascade chains its levels this way). Rows that see no key here return it as is.
      return_lse: also return the log-sum-exp [max_q_tokens, num_qo_heads], BASE 2.
      implementation: None (custom call when available), "ffi" or "reference".
    Returns o [max_q_tokens, num_qo_heads, head_dim] in q's dtype: zeros for rows past
    qo_indptr[-1] and rows that see no key (lse -inf there). Keys in pages outside the
    cache are ignored; nothing is read out of bounds."""


def batch_prefill(q, paged_kv_cache, plan: PrefillPlan, *, kv_layout="NHD", causal=False,
                  sm_scale=None, logits_soft_cap=0.0, window_left=-1, alibi_slopes=None,
                  rope=False, rope_scale=1.0, rope_theta=1e4, custom_mask=None, merge_with=None,
                  return_lse=False, implementation=None):
    """Prefill / append attention over a paged KV cache.

    Args:
      q: [max_q_tokens, num_qo_heads, head_dim], bfloat16 or float16 (float32 runs the reference).
      paged_kv_cache: (k_cache, v_cache), each [num_pages, page_size, num_kv_heads, head_dim]
        ("NHD") or [num_pages, num_kv_heads, page_size, head_dim] ("HND"), or one array
        [num_pages, 2, ...]; q's dtype. It must already hold the new tokens' keys.
      plan: from ``plan_prefill`` with a page table.""" + _OPTIONS_DOC
    dims = Shapes()
    dims.check("q", q, ("max_q_tokens", "num_qo_heads", "head_dim"),
               (jnp.bfloat16, jnp.float16, jnp.float32))
    k, v = _split_cache(paged_kv_cache, kv_layout, dims, q)
    dims.check("plan.kv_indices", plan.kv_indices, ("max_pages",), (jnp.int32,))
    if dims.dims["max_pages"] == 0:
        raise ValueError("plan.kv_indices: empty; this plan is for ragged K/V "
                         "(use batch_prefill_ragged)")
    options = _options(dims, dims.dims["head_dim"], causal, sm_scale, logits_soft_cap, window_left,
                       alibi_slopes, rope, rope_scale, rope_theta)

    def reference_fn(**kw):
        return reference.paged_attention(q, paged_kv_cache, plan.qo_indptr, plan.kv_indptr,
                                         plan.kv_indices, plan.kv_last_page_len, kv_layout=kv_layout,
                                         **kw)

    return _run(q, k, v, plan, kv_layout, custom_mask, merge_with, return_lse, implementation,
                reference_fn, dims, options)


def batch_prefill_ragged(q, k, v, plan: PrefillPlan, *, causal=False, sm_scale=None,
                         logits_soft_cap=0.0, window_left=-1, alibi_slopes=None, rope=False,
                         rope_scale=1.0, rope_theta=1e4, custom_mask=None, merge_with=None,
                         return_lse=False, implementation=None):
    """Prefill / append attention over ragged (packed) K/V.

    Args:
      q: [max_q_tokens, num_qo_heads, head_dim], bfloat16 or float16 (float32 runs the reference).
      k, v: [max_kv_tokens, num_kv_heads, head_dim], q's dtype; request b's keys are rows
        plan.kv_indptr[b]:plan.kv_indptr[b+1].
      plan: from ``plan_prefill`` without a page table.""" + _OPTIONS_DOC
    dims = Shapes()
    dims.check("q", q, ("max_q_tokens", "num_qo_heads", "head_dim"),
               (jnp.bfloat16, jnp.float16, jnp.float32))
    dims.check("k", k, ("max_kv_tokens", "num_kv_heads", "head_dim"), (q.dtype,))
    dims.check("v", v, ("max_kv_tokens", "num_kv_heads", "head_dim"), (q.dtype,))
    if plan.kv_indices.shape != (0,):
        raise ValueError(f"plan.kv_indices: expected shape [0] (a ragged plan), got "
                         f"{tuple(plan.kv_indices.shape)}; use batch_prefill for a paged plan")
    options = _options(dims, dims.dims["head_dim"], causal, sm_scale, logits_soft_cap, window_left,
                       alibi_slopes, rope, rope_scale, rope_theta)

    def reference_fn(**kw):
        return reference.ragged_attention(q, k, v, plan.qo_indptr, plan.kv_indptr, **kw)

    return _run(q, k, v, plan, "NHD", custom_mask, merge_with, return_lse, implementation,
                reference_fn, dims, options)
