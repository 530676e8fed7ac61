"""Batch prefill on the GPU: jaxinfer (ragged and paged) vs cuDNN and XLA through
jax.nn.dot_product_attention and the Mosaic GPU Pallas attention, in one run.

bf16 (the Pallas kernel: fp16; jaxinfer ragged also in fp16, in the last
column), 32 query / 8 KV heads, head dim 128, causal unless said. FLOPs = 4 *
Hq * D * sum over requests of the visible (query, key) pairs (L(L+1)/2
causal, L^2 not), FlashInfer's convention. The ceiling is a bf16 8192^3
matmul measured in the same run. The competitors take a dense [batch, L, H,
D] batch of equal lengths; jaxinfer takes the same tokens as a ragged batch
(and as a paged cache, page 16).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from common import parse_args, time_per_call, write_table

import jaxinfer

HQ, HKV, D, PAGE = 32, 8, 128, 16


def matmul_ceiling():
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    t = time_per_call(lambda x: x @ x, [a], repeat=8, calls=5)
    return 2 * 8192**3 / t


def flops(batch, length, causal):
    pairs = length * (length + 1) // 2 if causal else length * length
    return 4 * HQ * D * batch * pairs


def fmt(t, f, ceiling):
    return f"{t * 1e3:.2f} ms, {f / t / 1e12:.0f} TFLOP/s ({f / t / ceiling:.0%})"


def mosaic_attention(q, k, v, causal):
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                         causal=causal)
    return attention_mgpu.attention(q, k, v, config)


CASES = [(1, 8192, True), (1, 16384, True), (4, 4096, True), (16, 1024, True), (4, 4096, False)]
HEADER = ["case", "jaxinfer ragged", "jaxinfer paged (page 16)", "jaxinfer paged (pages in order)",
          "cuDNN", "XLA", "Mosaic GPU Pallas (fp16)", "jaxinfer ragged (fp16)"]


def implementations(batch, length, causal, only_jaxinfer=False):
    """(column, fn, args) for each column of HEADER after the case, on one case's fresh
    random inputs; args None where the implementation cannot run the case."""
    kq, kk, kv_ = jax.random.split(jax.random.key(batch + length), 3)
    q = jax.random.normal(kq, (batch, length, HQ, D), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, length, HKV, D), jnp.bfloat16)
    v = jax.random.normal(kv_, (batch, length, HKV, D), jnp.bfloat16)
    tokens = batch * length
    indptr = np.arange(batch + 1, dtype=np.int32) * length
    plan = jax.device_put(jaxinfer.plan_prefill(indptr, indptr, num_qo_heads=HQ, num_kv_heads=HKV,
                                                max_batch=batch, max_q_tokens=tokens))
    flat = lambda x: x.reshape(tokens, *x.shape[2:])  # noqa: E731
    ragged = functools.partial(jaxinfer.batch_prefill_ragged, causal=causal)
    out = [(HEADER[1], ragged, [flat(q), flat(k), flat(v), plan])]

    # Paged: the same keys in a page-16 cache, pages in a random order; then in order, as a
    # cache fills when pages are allocated in order (the kernel copies such runs as blocks).
    pages = tokens // PAGE
    page_indptr = np.arange(batch + 1, dtype=np.int32) * (length // PAGE)
    paged = functools.partial(jaxinfer.batch_prefill, causal=causal)
    for column, order in ((HEADER[2], np.random.default_rng(0).permutation(pages)), (HEADER[3], np.arange(pages))):
        order = order.astype(np.int32)
        k_cache, v_cache = (jnp.zeros((pages, PAGE, HKV, D), jnp.bfloat16).at[order].set(
            flat(x).reshape(pages, PAGE, HKV, D)) for x in (k, v))
        paged_plan = jax.device_put(jaxinfer.plan_prefill(
            indptr, page_indptr, order, np.full(batch, PAGE, np.int32), page_size=PAGE,
            num_qo_heads=HQ, num_kv_heads=HKV, max_batch=batch, max_q_tokens=tokens, max_pages=pages))
        out.append((column, lambda q, k, v, p: paged(q, (k, v), p), [flat(q), k_cache, v_cache, paged_plan]))
    if only_jaxinfer:
        return out

    for column, implementation in ((HEADER[4], "cudnn"), (HEADER[5], "xla")):
        fits = implementation != "xla" or tokens * length <= 8192 * 8192  # the dense logits
        fn = functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                               implementation=implementation)
        out.append((column, fn, [q, k, v] if fits else None))
    out.append((HEADER[6], functools.partial(mosaic_attention, causal=causal),
                [x.astype(jnp.float16) for x in (q, k, v)]))
    # In the Pallas kernel's dtype too: under the card's power cap the dtype may
    # matter as well as the schedule (benchmarks/NOTES.md P53).
    out.append((HEADER[7], ragged, [flat(x).astype(jnp.float16) for x in (q, k, v)] + [plan]))
    return out


def main():
    args = parse_args(__doc__)
    ceiling = matmul_ceiling()
    print(f"bf16 matmul ceiling: {ceiling / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for batch, length, causal in CASES[:1] if args.quick else CASES:
        f = flops(batch, length, causal)
        row = [f"{batch} x {length}" + ("" if causal else " non-causal")]
        for column, fn, fn_args in implementations(batch, length, causal, args.only_jaxinfer):
            if fn_args is None:
                row.append("-")
                continue
            try:
                row.append(fmt(time_per_call(fn, fn_args), f, ceiling))
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                row.append(f"error: {type(e).__name__}: {str(e)[:60]}")
            # One line per measurement, as it ends (benchmarks/with_clocks.sh splits by line).
            print(f"{row[0]}, {column}: {row[-1]}", flush=True)
        rows.append(row)

    write_table(os.path.join(args.out, "prefill.md"), "Batch prefill (bf16, 32/8 heads, D=128)",
                "bash scripts/gpu_check.sh", HEADER[:4] if args.only_jaxinfer else HEADER, rows,
                f"bf16 matmul ceiling measured in the same run: {ceiling / 1e12:.0f} TFLOP/s. "
                "On sm_90 jaxinfer runs its warp-specialised Hopper kernel (csrc/prefill_ws.cuh).")


if __name__ == "__main__":
    main()
