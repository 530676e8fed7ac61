"""Brute-force float64 loops, written straight from the conventions in
jaxinfer.reference, used to test the jnp reference itself."""

import math

import numpy as np

LN2 = math.log(2.0)


def numpy_attention(q, k, v, *, causal=False, sm_scale=None, window_left=-1,
                    logits_soft_cap=0.0, alibi_slopes=None, custom_mask=None):
    """Brute-force float64 loops for one request, written straight from the conventions.

    For tests of the jnp reference itself. Returns (o [qo, Hq, D], lse [qo, Hq] base 2).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    qo_len, num_qo_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[:2]
    group = num_qo_heads // num_kv_heads
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    o = np.zeros_like(q)
    lse = np.full((qo_len, num_qo_heads), -np.inf)
    for i in range(qo_len):
        for h in range(num_qo_heads):
            logits, values = [], []
            for j in range(kv_len):
                if causal and j > kv_len - qo_len + i:
                    continue
                if window_left >= 0 and j + qo_len + window_left < kv_len + i:
                    continue
                if custom_mask is not None and not custom_mask[i][j]:
                    continue
                x = scale * float(q[i, h] @ k[j, h // group])
                if logits_soft_cap > 0:
                    x = logits_soft_cap * math.tanh(x / logits_soft_cap)
                if alibi_slopes is not None:
                    x += float(alibi_slopes[h]) * (j - (kv_len - qo_len + i))
                logits.append(x)
                values.append(v[j, h // group])
            if logits:
                m = max(logits)
                w = np.exp(np.array(logits) - m)
                o[i, h] = (w[:, None] * np.array(values)).sum(0) / w.sum()
                lse[i, h] = (m + math.log(w.sum())) / LN2
    return o, lse
