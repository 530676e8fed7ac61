"""A toy serving loop: prefill a batch of prompts into a paged KV cache, then
decode token by token with one jitted step, new plans every step, one compile.

The "model" is one attention layer with random weights, enough to show how
the pieces fit: the host owns the page table and plans; the jitted step
writes the new token's K/V into its page slot, attends, and samples.

Run: python examples/decode_loop.py  (CPU or GPU)
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer

VOCAB, HEADS, KV_HEADS, DIM, PAGE = 512, 8, 2, 64, 16
MAX_BATCH, MAX_PAGES, MAX_Q = 4, 64, 128
keys = iter(jax.random.split(jax.random.key(0), 8))
embed = jax.random.normal(next(keys), (VOCAB, HEADS * DIM)) * 0.05
w_kv = jax.random.normal(next(keys), (HEADS * DIM, 2 * KV_HEADS * DIM)) * 0.05
w_out = jax.random.normal(next(keys), (HEADS * DIM, VOCAB)) * 0.05
cache = jnp.zeros((MAX_PAGES, 2, PAGE, KV_HEADS, DIM), jnp.bfloat16)  # one combined K/V array


def project(tokens):
    """Token ids [T] -> q [T, HEADS, DIM], k and v [T, KV_HEADS, DIM] (bf16)."""
    x = embed[tokens]
    kv = (x @ w_kv).reshape(-1, 2, KV_HEADS, DIM)
    return (x.reshape(-1, HEADS, DIM).astype(jnp.bfloat16), kv[:, 0].astype(jnp.bfloat16),
            kv[:, 1].astype(jnp.bfloat16))


def write_kv(cache, k, v, page, slot):
    """Writes token rows of k, v [T, KV_HEADS, DIM] at (page[t], slot[t]); padding rows carry page -1."""
    page = jnp.where(page < 0, MAX_PAGES, page)  # out of range: dropped
    cache = cache.at[page, 0, slot].set(k, mode="drop")
    return cache.at[page, 1, slot].set(v, mode="drop")


@jax.jit
def prefill_step(cache, tokens, page, slot, plan, key):
    q, k, v = project(tokens)
    cache = write_kv(cache, k, v, page, slot)
    o = jaxinfer.batch_prefill(q, cache, plan, causal=True)               # [MAX_Q, HEADS, DIM]
    last = plan.qo_indptr[1:] - 1                                         # each prompt's last row
    logits = o[jnp.maximum(last, 0)].reshape(MAX_BATCH, -1).astype(jnp.float32) @ w_out
    return cache, jaxinfer.sampling.top_k_top_p_sampling_from_logits(key, logits, 40, 0.9)


traces = []  # one entry per trace of decode_step: new lengths must not add any


@jax.jit
def decode_step(cache, tokens, page, slot, plan, key):
    traces.append(1)
    q, k, v = project(tokens)                                             # one token per request
    cache = write_kv(cache, k, v, page, slot)
    o = jaxinfer.batch_decode(q, cache, plan)
    logits = o.reshape(MAX_BATCH, -1).astype(jnp.float32) @ w_out
    return cache, jaxinfer.sampling.top_k_top_p_sampling_from_logits(key, logits, 40, 0.9)


# Host side: a page allocator and the CSR page table of each request.
prompt_lens = [5, 17, 9]
free_pages = list(range(MAX_PAGES))
pages = [[] for _ in prompt_lens]
lens = [0] * len(prompt_lens)


def reserve(b, n):
    """Makes room for n more tokens of request b; returns their (page, slot) lists."""
    out_page, out_slot = [], []
    for _ in range(n):
        if lens[b] % PAGE == 0:
            pages[b].append(free_pages.pop(0))
        out_page.append(pages[b][-1])
        out_slot.append(lens[b] % PAGE)
        lens[b] += 1
    return out_page, out_slot


def page_table():
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in pages])]).astype(np.int32)
    last = np.array([(n - 1) % PAGE + 1 for n in lens], np.int32)
    return indptr, np.concatenate(pages).astype(np.int32), last


rng = np.random.default_rng(0)
prompts = [rng.integers(0, VOCAB, n) for n in prompt_lens]
tokens, page, slot = np.zeros(MAX_Q, np.int32), np.full(MAX_Q, -1, np.int32), np.zeros(MAX_Q, np.int32)
qo_indptr = np.concatenate([[0], np.cumsum(prompt_lens)]).astype(np.int32)
for b, prompt in enumerate(prompts):
    p, s = reserve(b, len(prompt))
    rows = slice(qo_indptr[b], qo_indptr[b + 1])
    tokens[rows], page[rows], slot[rows] = prompt, p, s
indptr, indices, last = page_table()
plan = jaxinfer.plan_prefill(qo_indptr, indptr, indices, last, page_size=PAGE, num_qo_heads=HEADS,
                             num_kv_heads=KV_HEADS, max_batch=MAX_BATCH, max_q_tokens=MAX_Q,
                             max_pages=MAX_PAGES)
key = jax.random.key(1)
cache, next_tokens = prefill_step(cache, tokens, page, slot, plan, jax.random.fold_in(key, 0))
generated = [[int(t)] for t in np.asarray(next_tokens)[:len(prompts)]]

for step in range(1, 9):
    tokens, page, slot = np.zeros(MAX_BATCH, np.int32), np.full(MAX_BATCH, -1, np.int32), np.zeros(MAX_BATCH, np.int32)
    for b in range(len(prompts)):
        (p,), (s,) = reserve(b, 1)
        tokens[b], page[b], slot[b] = generated[b][-1], p, s
    indptr, indices, last = page_table()
    plan = jaxinfer.plan_decode(indptr, indices, last, page_size=PAGE, num_kv_heads=KV_HEADS,
                                head_dim=DIM, max_batch=MAX_BATCH, max_pages=MAX_PAGES)
    cache, next_tokens = decode_step(cache, tokens, page, slot, plan, jax.random.fold_in(key, step))
    for b in range(len(prompts)):
        generated[b].append(int(next_tokens[b]))

print("backend:", jax.default_backend())
for b, g in enumerate(generated):
    print(f"request {b}: prompt of {prompt_lens[b]} tokens -> generated {g}")
print(f"decode_step traced {len(traces)} time(s) for 8 steps of new lengths")
