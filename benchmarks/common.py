"""Timing helpers shared by the benchmark scripts (GPU machine).

Each measured call runs ``repeat`` times in sequence inside one jitted
function, separated by ``lax.optimization_barrier`` (so XLA can neither merge
identical calls nor fuse one repeat's reads into another's), and that
function is dispatched back to back. The time per call is the slope of wall
time against calls: each round times ``calls`` dispatches and 2 dispatches,
and the difference is divided by the (calls - 2) * repeat calls between
them; the median over rounds is reported. The slope leaves out what a round
pays once (the first dispatch's latency, the final synchronisation: about
0.5-1 ms, which as a plain average added 15 us to a 370 us call), and the
dispatch gaps, without CUDA events. Inputs are re-read each repeat: working
sets under the 50 MB L2 are measured warm, so benchmarks use larger ones or
say so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return jax.devices()[0].device_kind


def repeated(fn, repeat):
    """One jitted program that calls ``fn`` ``repeat`` times in sequence."""
    def many(*a):
        outs = []
        for _ in range(repeat):
            # The barrier makes each repeat's inputs new values that depend on the
            # previous output; returning every output keeps each repeat alive.
            a, outs = jax.lax.optimization_barrier((a, outs))
            outs = outs + [fn(*a)]
        return outs

    return jax.jit(many)


def time_per_call(fn, args, *, repeat=None, calls=10, rounds=5) -> float:
    """Seconds per call of ``fn(*args)`` on the default device.

    ``repeat`` defaults to enough calls per dispatch for about 2 ms of device
    work, so the host's dispatch cost never sets the pace.
    """

    if calls < 3:
        raise ValueError(f"calls: the slope needs at least 3 dispatches per round, got {calls}")

    def timed(repeat, calls, rounds):
        f = repeated(fn, repeat)
        jax.block_until_ready(f(*args))

        def wall(n):
            t0 = time.perf_counter()
            for _ in range(n):
                out = f(*args)
            jax.block_until_ready(out)
            return time.perf_counter() - t0

        samples = [(wall(calls) - wall(2)) / ((calls - 2) * repeat) for _ in range(rounds)]
        return statistics.median(samples)

    if repeat is None:
        estimate = timed(8, 4, 1)
        repeat = int(min(64, max(4, 2e-3 / estimate)))
    return timed(repeat, calls, rounds)


def copy_bandwidth(nbytes=2 << 30) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus written."""
    x = jnp.zeros(nbytes // 4, jnp.uint32)
    t = time_per_call(lambda a: a ^ jnp.uint32(0x5A5A5A5A), [x], repeat=4, calls=5)
    return 2 * nbytes / t


def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the markdown table")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--only-jaxinfer", action="store_true",
                   help="decode, prefill: skip the competitors (A/B runs of jaxinfer's kernels)")
    p.add_argument("--breakdown", action="store_true",
                   help="cascade: also time each part alone, for the issue's two cases")
    p.add_argument("--kv-layout", choices=("NHD", "HND"), default="NHD",
                   help="cascade: the paged cache's layout (both flat and cascade)")
    return p.parse_args()


def write_table(path, title, command, header, rows, notes=""):
    """Writes one markdown section (title, date, device, command, table) and prints it."""
    lines = [f"## {title}", "",
             f"{datetime.date.today().isoformat()}, {device_name()}, jax {jax.__version__}, "
             f"python {platform.python_version()}; command: `{command}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(text)
