"""Paged decode on the GPU: jaxinfer vs jnp gather+einsum, the Pallas paged kernel
that ships with jax, and cuDNN on a contiguous copy of the cache, in one run.

bf16, head dim 128, page size 16, NHD, every request of one length. Bytes
counted: K and V read once (B x L x Hkv x D x 2 x 2). The ceiling is the
device copy bandwidth measured in the same run (bytes read + written).
Competitors run where the cache and its copies fit comfortably (<= 1M keys).
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import copy_bandwidth, parse_args, time_per_call, write_table

import jaxinfer

PAGE = 16
HEAD_DIM = 128


def make_case(batch, kv_len, num_kv_heads):
    pages_per_seq = kv_len // PAGE
    num_pages = batch * pages_per_seq
    key = jax.random.key(batch * 7 + kv_len)
    k = jax.random.normal(key, (num_pages, PAGE, num_kv_heads, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 1), k.shape, jnp.bfloat16)
    table = np.random.default_rng(0).permutation(num_pages).astype(np.int32).reshape(batch, pages_per_seq)
    return k, v, table


def jnp_decode(q, k_cache, v_cache, table):
    """Gather each request's pages, then einsum in bf16 with an fp32 softmax."""
    batch, heads, dim = q.shape
    k = k_cache[table].reshape(batch, -1, *k_cache.shape[2:])  # [B, L, Hkv, D]
    v = v_cache[table].reshape(batch, -1, *v_cache.shape[2:])
    group = heads // k.shape[2]
    qg = q.reshape(batch, k.shape[2], group, dim)
    s = jnp.einsum("bhgd,blhd->bhgl", qg, k, preferred_element_type=jnp.float32) / np.sqrt(dim)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bhgl,blhd->bhgd", p, v).reshape(batch, heads, dim)


def pallas_decode(q, k_pages, v_pages, table, lengths):
    from jax.experimental.pallas.ops.gpu import paged_attention
    return paged_attention.paged_attention(q, k_pages, v_pages, table, lengths,
                                           pages_per_compute_block=8)


def cudnn_decode(q, k, v):
    return jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")[:, 0]


def fmt(t, nbytes, ceiling):
    return f"{t * 1e6:.0f} us, {nbytes / t / 1e12:.2f} TB/s ({nbytes / t / ceiling:.0%})"


def main():
    args = parse_args(__doc__)
    ceiling = copy_bandwidth()
    batches, lengths = ([1, 64], [16384, 4096]) if args.quick else ([1, 16, 64, 256], [1024, 4096, 16384])
    rows = []
    for num_qo_heads, num_kv_heads in [(32, 8), (64, 8)]:
        for batch in batches:
            for kv_len in lengths:
                k, v, table = make_case(batch, kv_len, num_kv_heads)
                nbytes = 2 * k.nbytes
                q = jax.random.normal(jax.random.key(5), (batch, num_qo_heads, HEAD_DIM), jnp.bfloat16)
                indptr = np.arange(batch + 1, dtype=np.int32) * table.shape[1]
                last = np.full(batch, PAGE, np.int32)
                plan = jaxinfer.plan_decode(indptr, table.reshape(-1), last, page_size=PAGE,
                                            num_kv_heads=num_kv_heads, max_batch=batch,
                                            max_pages=table.size)
                plan = jax.device_put(plan)
                row = [f"{num_qo_heads}/{num_kv_heads}", batch, kv_len]
                row.append(fmt(time_per_call(lambda q, k, v, p: jaxinfer.batch_decode(q, (k, v), p),
                                             [q, k, v, plan]), nbytes, ceiling))
                if args.only_jaxinfer:
                    row += ["-", "-", "-"]
                elif batch * kv_len <= (1 << 20):
                    t = time_per_call(jnp_decode, [q, k, v, jnp.asarray(table)], calls=4)
                    row.append(fmt(t, nbytes, ceiling))
                    try:
                        kp, vp = (jnp.moveaxis(x, 2, 0) for x in (k, v))  # [Hkv, pages, P, D]
                        lens = jnp.full((batch,), kv_len, jnp.int32)
                        t = time_per_call(pallas_decode, [q, kp, vp, jnp.asarray(table), lens])
                        row.append(fmt(t, nbytes, ceiling))
                        del kp, vp
                    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                        row.append(f"error: {type(e).__name__}")
                    try:
                        kc = k[table.reshape(-1)].reshape(batch, kv_len, num_kv_heads, HEAD_DIM)
                        vc = v[table.reshape(-1)].reshape(batch, kv_len, num_kv_heads, HEAD_DIM)
                        row.append(fmt(time_per_call(cudnn_decode, [q, kc, vc]), nbytes, ceiling))
                        del kc, vc
                    except Exception as e:  # noqa: BLE001
                        row.append(f"error: {type(e).__name__}")
                else:
                    row += ["-", "-", "-"]
                rows.append(row)
                print(row, flush=True)
                del k, v

    # Host planning cost at batch 256 (mixed lengths, page table at its static capacity).
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 16384, 256)
    pages = (lens + PAGE - 1) // PAGE
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    indices = np.zeros(1 << 20, np.int32)
    last = ((lens - 1) % PAGE + 1).astype(np.int32)
    plan = lambda: jaxinfer.plan_decode(indptr, indices, last, page_size=PAGE, num_kv_heads=8,  # noqa: E731
                                        max_batch=256, max_pages=indices.size)
    plan()
    rounds = []
    for _ in range(5):  # best of 5 rounds: the host is shared with the benchmark's own threads
        t0 = time.perf_counter()
        for _ in range(500):
            plan()
        rounds.append((time.perf_counter() - t0) / 500 * 1e6)
    plan_us = min(rounds)

    write_table(os.path.join(args.out, "decode.md"), "Paged decode (bf16, D=128, page 16, NHD)",
                "bash scripts/gpu_check.sh", ["heads", "batch", "kv len", "jaxinfer", "jnp gather+einsum",
                                              "Pallas paged (jax)", "cuDNN, contiguous copy"], rows,
                f"Copy ceiling measured in the same run: {ceiling / 1e12:.2f} TB/s (read + write). "
                f"Host plan_decode at batch 256 (mixed lengths up to 16384): {plan_us:.0f} us.")


if __name__ == "__main__":
    main()
