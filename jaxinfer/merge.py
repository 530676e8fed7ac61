"""Merging partial attention states by their (base-2) log-sum-exp.

A state ``(v, s)`` is attention over a subset of the keys: ``v`` the
normalised output, ``s`` its log-sum-exp in BASE 2. States over disjoint key
sets merge exactly into the state over their union, which is what split-KV
decode and cascade attention rely on. A state with ``s = -inf`` (no keys)
contributes nothing; merging only such states gives ``v = 0, s = -inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer import _ffi, reference
from jaxinfer._checks import Shapes

FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
LSE_DTYPES = (jnp.float32,)


def _call(target, v_out_like, args, aliases=None):
    """Calls a merge target; on CPU the values travel as float32."""
    out_dtype = v_out_like.dtype
    if _ffi.current_platform() == "cpu":
        args = [a.astype(jnp.float32) for a in args]
    v_type = jax.ShapeDtypeStruct(v_out_like.shape, args[0].dtype)
    s_type = jax.ShapeDtypeStruct(v_out_like.shape[:-1], jnp.float32)
    v, s = jax.ffi.ffi_call(target, (v_type, s_type), vmap_method="broadcast_all",
                            input_output_aliases=aliases)(*args)
    return v.astype(out_dtype), s


def _check_pair(names, v_a, s_a, v_b, s_b):
    """Checks two states [tokens, heads, head_dim] and their lse, naming the arguments."""
    dims = Shapes()
    dims.check(names[0], v_a, ("tokens", "heads", "head_dim"), FLOAT_DTYPES)
    dims.check(names[1], s_a, ("tokens", "heads"), LSE_DTYPES)
    dims.check(names[2], v_b, ("tokens", "heads", "head_dim"), (v_a.dtype,))
    dims.check(names[3], s_b, ("tokens", "heads"), LSE_DTYPES)


def merge_state(v_a, s_a, v_b, s_b, *, implementation=None):
    """Merges two attention states.

    Args:
      v_a, v_b: [tokens, heads, head_dim], float32/float16/bfloat16 (same dtype).
      s_a, s_b: [tokens, heads] float32, base-2 log-sum-exp.
      implementation: None (custom call when available), "ffi" or "reference".
    Returns:
      (v [tokens, heads, head_dim] in v_a's dtype, s [tokens, heads] float32, base 2).
    """
    _check_pair(("v_a", "s_a", "v_b", "s_b"), v_a, s_a, v_b, s_b)
    if not _ffi.use_ffi("merge", implementation):
        return reference.merge_state(v_a, s_a, v_b, s_b)
    return _call("jaxinfer_merge_state", v_a, [v_a, s_a, v_b, s_b])


def merge_state_in_place(v, s, v_other, s_other, *, implementation=None):
    """merge_state whose result takes the place of ``(v, s)``.

    Functionally the same as ``merge_state(v, s, v_other, s_other)``; the custom
    call writes its result over v's and s's buffers (XLA input-output aliases),
    so a jitted step that donates them (or whose v, s are intermediates) merges
    without allocating. Without donation XLA copies first, as for any alias.

    Args:
      v, v_other: [tokens, heads, head_dim], float32/float16/bfloat16 (same dtype).
      s, s_other: [tokens, heads] float32, base-2 log-sum-exp.
    Returns:
      (v [tokens, heads, head_dim] in v's dtype, s [tokens, heads] float32, base 2).
    """
    _check_pair(("v", "s", "v_other", "s_other"), v, s, v_other, s_other)
    if not _ffi.use_ffi("merge", implementation):
        return reference.merge_state(v, s, v_other, s_other)
    return _call("jaxinfer_merge_state", v, [v, s, v_other, s_other], aliases={0: 0, 1: 1})


def merge_states(v, s, *, implementation=None):
    """Merges ``num_states`` attention states per row.

    Args:
      v: [tokens, num_states, heads, head_dim], float32/float16/bfloat16.
      s: [tokens, num_states, heads] float32, base-2 log-sum-exp.
      implementation: None (custom call when available), "ffi" or "reference".
    Returns:
      (v [tokens, heads, head_dim] in v's dtype, s [tokens, heads] float32, base 2).
    """
    dims = Shapes()
    dims.check("v", v, ("tokens", "num_states", "heads", "head_dim"), FLOAT_DTYPES)
    dims.check("s", s, ("tokens", "num_states", "heads"), LSE_DTYPES)
    if not _ffi.use_ffi("merge", implementation):
        return reference.merge_states(v, s)
    out_like = jax.ShapeDtypeStruct((v.shape[0],) + v.shape[2:], v.dtype)
    return _call("jaxinfer_merge_states", out_like, [v, s])
