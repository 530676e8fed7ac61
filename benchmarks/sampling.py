"""Sampling on the GPU: jaxinfer's sorting-free kernel vs the sort-based jnp path,
lax.top_k and a plain categorical draw, in one run.

fp32 probabilities, one token per row. top-p 0.9 and top-k 50 on random
rows (softmax of normal logits x 3: a peaked row, as real ones are).
Columns: time per call; the last two also in multiples of the jaxinfer
top-p time.
"""

import functools
import os

import jax
import jax.numpy as jnp
from common import parse_args, time_per_call, write_table

from jaxinfer import reference, sampling


def sort_top_p(key, probs, top_p=0.9):
    return reference.sampling_from_probs(key, reference.top_p_renorm_probs(probs, top_p))


def lax_top_k(key, probs, k=50):
    values, indices = jax.lax.top_k(probs, k)
    choice = jax.random.categorical(key, jnp.log(values), axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]


def main():
    args = parse_args(__doc__)
    batches = [1, 64, 128, 256, 512]
    vocabs = [128256] if args.quick else [32000, 128256, 151936]  # quick: the target shapes
    rows = []
    key = jax.random.key(0)
    for vocab in vocabs:
        for batch in batches:
            probs = jax.nn.softmax(3 * jax.random.normal(jax.random.key(batch + vocab), (batch, vocab)), -1)
            ffi = dict(implementation="ffi")
            t = {name: time_per_call(fn, [key, probs]) for name, fn in [
                ("top_p", functools.partial(sampling.top_p_sampling_from_probs, top_p=0.9, **ffi)),
                ("top_k", functools.partial(sampling.top_k_sampling_from_probs, top_k=50, **ffi)),
                ("min_p", functools.partial(sampling.min_p_sampling_from_probs, min_p=0.1, **ffi)),
                ("plain", functools.partial(sampling.sampling_from_probs, **ffi)),
                ("sort_top_p", sort_top_p), ("lax_top_k", lax_top_k)]}
            us = {k: f"{v * 1e6:.0f} us" for k, v in t.items()}
            row = [batch, vocab, us["top_p"], us["top_k"], us["min_p"], us["plain"],
                   f"{us['sort_top_p']} ({t['sort_top_p'] / t['top_p']:.0f}x)",
                   f"{us['lax_top_k']} ({t['lax_top_k'] / t['top_p']:.0f}x)"]
            rows.append(row)
            print(row, flush=True)
    write_table(os.path.join(args.out, "sampling.md"), "Sampling (fp32 probabilities)",
                "bash scripts/gpu_check.sh",
                ["batch", "vocab", "jaxinfer top-p 0.9", "jaxinfer top-k 50", "jaxinfer min-p 0.1",
                 "jaxinfer plain", "jnp sort-based top-p", "lax.top_k(50) + draw"], rows)


if __name__ == "__main__":
    main()
