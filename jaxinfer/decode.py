"""Paged-KV batch decode: plan once per step on the host, run per layer in jit.

>>> plan = jaxinfer.plan_decode(kv_indptr, kv_indices, kv_last_page_len, page_size=16,
...                             num_kv_heads=8, max_batch=256, max_pages=65536)
>>> out = jax.jit(step)(q, kv_cache, plan)   # step calls jaxinfer.batch_decode(q, kv_cache, plan)

The plan is a pytree of int32 numpy arrays whose shapes depend only on the
static capacities (``max_batch``, ``max_pages`` and one wave of CTAs), so a
jitted step compiles once and replays for any mix of sequence lengths. It
carries the padded page table and the work: the batch's keys are cut into
one wave of equal runs, one per CTA (``csrc/decode_plan.h``); a request cut by a
CTA boundary leaves partial outputs that a merge kernel combines by their
log-sum-exp.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import _ffi, reference
from jaxinfer._checks import Shapes

TILE_KEYS = 64  # keys per kernel pipeline stage: chunk sizes are multiples of it
KERNEL_HEAD_DIMS = (64, 128, 256)
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
H100_SMS = 132


class DecodePlan(NamedTuple):
    """Static-shape decode plan (all int32). ``B = max_batch``, ``W`` = work-item capacity,
    ``C`` = CTA slots per KV head (one wave)."""

    kv_indptr: np.ndarray         # [B + 1], padded with its last value
    kv_indices: np.ndarray        # [max_pages], zero past kv_indptr[-1]
    kv_last_page_len: np.ndarray  # [B], 1 for padding requests
    items: np.ndarray             # [W, ITEM_FIELDS]: one key range of one request (see ITEM_*)
    cta_items: np.ndarray         # [C + 1]: CTA slot c runs items cta_items[c]..cta_items[c+1]
    merge_indptr: np.ndarray      # [B + 1]: items of request b are merge_indptr[b]..[b+1]


# Columns of DecodePlan.items (csrc/decode.h has the same list). Each item
# carries what the kernel would otherwise look up through the request, so
# its first key loads wait on one read of the plan, not three.
ITEM_REQUEST, ITEM_KV_START, ITEM_KV_END, ITEM_KV_LEN, ITEM_PAGE_BEGIN, ITEM_PAGE_END = range(6)
ITEM_FIELDS = 6


def ctas_per_sm(head_dim: int) -> int:
    """CTAs of the decode kernel resident per SM (csrc/decode.cuh Config: registers and
    shared memory)."""
    return {64: 2, 128: 3}.get(head_dim, 1)


def wave_ctas(num_kv_heads: int, *, num_sms: int = H100_SMS, head_dim: int = 128) -> int:
    """CTA slots per KV head that fill the GPU once (each slot runs one CTA per KV head)."""
    return max(1, num_sms * ctas_per_sm(head_dim) // num_kv_heads)


def work_capacity(max_batch: int, num_ctas: int) -> int:
    """Static number of work items: every request starts one, every CTA boundary cuts one."""
    return max_batch + num_ctas


def plan_decode(kv_indptr, kv_indices, kv_last_page_len, *, page_size: int, num_kv_heads: int,
                max_batch: int, max_pages: int, head_dim: int = 128,
                num_sms: int = H100_SMS) -> DecodePlan:
    """Builds a DecodePlan on the host (numpy only, no device work).

    Args:
      kv_indptr: int [B + 1], kv_indices: int [>= kv_indptr[-1]], kv_last_page_len: int [B]:
        the step's CSR page table (see ``jaxinfer.reference``), B <= max_batch. An int32
        kv_indices already of length max_pages is used without a copy (the cheap way).
      page_size, num_kv_heads, head_dim: of the cache (they set the CTAs per wave).
      max_batch, max_pages: static capacities; the plan's shapes depend on nothing else.
      num_sms: multiprocessors of the GPU (132 on an H100 SXM).
    """
    indptr = np.ascontiguousarray(kv_indptr, np.int32)  # the C++ split reads them in place
    last = np.ascontiguousarray(kv_last_page_len, np.int32)
    indices = np.asarray(kv_indices, np.int32)
    batch = indptr.shape[0] - 1
    if indptr.ndim != 1 or batch < 0 or batch > max_batch:
        raise ValueError(f"kv_indptr: expected shape [B + 1] with B <= max_batch={max_batch}, "
                         f"got {indptr.shape}")
    if last.shape != (batch,):
        raise ValueError(f"kv_last_page_len: expected shape [B={batch}], got {last.shape}")
    if indices.ndim != 1 or indices.shape[0] > max_pages or indices.shape[0] < indptr[-1]:
        raise ValueError(f"kv_indices: expected shape [>= kv_indptr[-1]={indptr[-1]}, "
                         f"<= max_pages={max_pages}], got {indices.shape}")

    num_ctas = wave_ctas(num_kv_heads, num_sms=num_sms, head_dim=head_dim)
    items = np.empty((work_capacity(max_batch, num_ctas), ITEM_FIELDS), np.int32)
    cta_items = np.empty(num_ctas + 1, np.int32)
    merge_indptr = np.empty(max_batch + 1, np.int32)
    # The per-request loop runs in C++ (csrc/decode_plan.h has the rule): a few
    # microseconds, where numpy's per-call overhead made it tens.
    num_items = _ffi.module("decode").split_work(indptr, last, page_size, TILE_KEYS, items,
                                                 cta_items, merge_indptr)
    assert 0 <= num_items <= items.shape[0], num_items

    padded_indptr = np.full(max_batch + 1, indptr[-1], np.int32)
    padded_indptr[:batch + 1] = indptr
    padded_indices = indices  # a page table kept at its static capacity is used as is
    if indices.shape[0] < max_pages:
        padded_indices = np.zeros(max_pages, np.int32)
        padded_indices[:indices.shape[0]] = indices
    padded_last = np.ones(max_batch, np.int32)
    padded_last[:batch] = last
    return DecodePlan(padded_indptr, padded_indices, padded_last, items, cta_items, merge_indptr)


def _split_cache(paged_kv_cache, kv_layout, dims: Shapes, q):
    """Checks the cache; returns (k, v), both the same array for a combined cache."""
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
    page = ("page_size", "num_kv_heads") if kv_layout == "NHD" else ("num_kv_heads", "page_size")
    if isinstance(paged_kv_cache, (tuple, list)):
        k, v = paged_kv_cache
        dims.check("k_cache", k, ("num_pages", *page, "head_dim"), (q.dtype,))
        dims.check("v_cache", v, ("num_pages", *page, "head_dim"), (q.dtype,))
    else:
        k = v = dims.check("paged_kv_cache", paged_kv_cache, ("num_pages", 2, *page, "head_dim"),
                           (q.dtype,))
    if dims.dims["num_pages"] == 0:
        raise ValueError("paged_kv_cache: expected at least one page, got num_pages=0")
    return k, v


def batch_decode(q, paged_kv_cache, plan: DecodePlan, *, kv_layout="NHD", sm_scale=None,
                 logits_soft_cap=0.0, window_left=-1, alibi_slopes=None, rope=False,
                 rope_scale=1.0, rope_theta=1e4, return_lse=False, implementation=None):
    """Decode attention: one query token per request over a paged KV cache.

    Args:
      q: [max_batch, num_qo_heads, head_dim], bfloat16 or float16 (float32 runs the reference).
      paged_kv_cache: (k_cache, v_cache), each [num_pages, page_size, num_kv_heads, head_dim]
        ("NHD") or [num_pages, num_kv_heads, page_size, head_dim] ("HND"), or one array
        [num_pages, 2, ...]; q's dtype.
      plan: from ``plan_decode`` (numpy or device arrays; a pytree, pass it through jit).
      sm_scale (default 1/sqrt(head_dim)), logits_soft_cap, window_left, alibi_slopes
        [num_qo_heads] float32, rope / rope_scale / rope_theta: see ``jaxinfer.reference``.
      return_lse: also return the log-sum-exp, BASE 2.
      implementation: None (custom call when available), "ffi" or "reference".
    Returns:
      o [max_batch, num_qo_heads, head_dim] in q's dtype (zeros for padding rows and
      requests with no keys), and lse [max_batch, num_qo_heads] float32 (-inf there).
    Keys in pages whose index lies outside the cache are ignored, as are keys a
    request's page list does not hold; nothing is read out of bounds.
    """
    dims = Shapes()
    dims.check("q", q, ("max_batch", "num_qo_heads", "head_dim"),
               (jnp.bfloat16, jnp.float16, jnp.float32))
    k, v = _split_cache(paged_kv_cache, kv_layout, dims, q)
    if dims.dims["num_qo_heads"] % dims.dims["num_kv_heads"]:
        raise ValueError(f"q: num_qo_heads={dims.dims['num_qo_heads']} must be a multiple of "
                         f"num_kv_heads={dims.dims['num_kv_heads']}")
    int32 = (jnp.int32,)
    dims.check("plan.kv_indptr", plan.kv_indptr, (dims.dims["max_batch"] + 1,), int32)
    dims.check("plan.kv_indices", plan.kv_indices, ("max_pages",), int32)
    dims.check("plan.kv_last_page_len", plan.kv_last_page_len, ("max_batch",), int32)
    dims.check("plan.items", plan.items, ("work_items", ITEM_FIELDS), int32)
    dims.check("plan.cta_items", plan.cta_items, ("cta_slots",), int32)
    dims.check("plan.merge_indptr", plan.merge_indptr, (dims.dims["max_batch"] + 1,), int32)
    if alibi_slopes is not None:
        dims.check("alibi_slopes", alibi_slopes, ("num_qo_heads",), (jnp.float32,))
    if rope and dims.dims["head_dim"] % 2:
        raise ValueError(f"rope: needs an even head_dim, got {dims.dims['head_dim']}")
    head_dim = dims.dims["head_dim"]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    options = dict(sm_scale=sm_scale, logits_soft_cap=float(logits_soft_cap),
                   window_left=int(window_left), alibi_slopes=alibi_slopes, rope=bool(rope),
                   rope_scale=float(rope_scale), rope_theta=float(rope_theta))

    kernel_ok = head_dim in KERNEL_HEAD_DIMS and np.dtype(q.dtype) in map(np.dtype, KERNEL_DTYPES)
    if implementation == "ffi" and not kernel_ok:
        raise ValueError(f"implementation='ffi': the decode kernel takes head_dim in "
                         f"{KERNEL_HEAD_DIMS} and bfloat16/float16, got {head_dim}, {q.dtype}")
    if not (_ffi.use_ffi("decode", implementation) and kernel_ok):
        return reference.paged_decode(q, paged_kv_cache, plan.kv_indptr, plan.kv_indices,
                                      plan.kv_last_page_len, kv_layout=kv_layout,
                                      return_lse=return_lse, **options)

    batch, heads = q.shape[:2]
    items = plan.items.shape[0]
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads), jnp.float32),
                 jax.ShapeDtypeStruct((items, heads, head_dim), jnp.float32),  # workspace
                 jax.ShapeDtypeStruct((items, heads), jnp.float32))            # workspace
    # Unused operands are empty: a materialised jnp.zeros costs a kernel launch per call.
    slopes = np.zeros((0,), np.float32) if alibi_slopes is None else alibi_slopes
    o, lse, _, _ = jax.ffi.ffi_call("jaxinfer_batch_decode", out_types, vmap_method="sequential")(
        q, k, v, slopes, plan.kv_indices, plan.items, plan.cta_items, plan.merge_indptr,
        kv_layout=np.int32(kv_layout == "HND"), sm_scale=np.float32(sm_scale),
        logits_soft_cap=np.float32(logits_soft_cap), window_left=np.int32(window_left),
        use_alibi=np.int32(alibi_slopes is not None), rope=np.int32(bool(rope)),
        rope_scale=np.float32(rope_scale), rope_theta=np.float32(rope_theta))
    return (o, lse) if return_lse else o
