"""Simulates the consumer warpgroups' named-barrier meetings of csrc/prefill_ws.cuh (the
prepaid meeting, NOTES P59) under random schedules: every generation of a barrier must
join one arrival of each warpgroup with equal meeting indices, and nothing may deadlock.
Runs on the development machine; edit it with the kernel's meeting code.

    python3 benchmarks/sim_meetings.py
"""

import random


def barrier_ops(warpgroup, works):
    """Warpgroup's barrier operations over works (a list of tile counts), in the kernel's
    order: (kind, barrier, meeting index), kind "sync" (wait) or "arrive" (no wait)."""
    ops, meeting = [], 0
    parity, prepaid = 0, False

    def meet(barrier):
        nonlocal meeting
        ops.append(("sync", barrier, meeting))
        meeting += 1

    if warpgroup == 1:  # starts a meeting behind
        meet(2)
        parity = 1
    for tiles in works:
        if tiles == 0:  # a work without tiles still meets once
            if prepaid:
                meeting += 1  # paid ahead at the last work's end
            else:
                meet(2 + parity)
            parity ^= 1
        after_s, before_pv = 2 + parity, 3 - parity
        for tile in range(tiles):
            if tile == 0 and prepaid:
                meeting += 1
            else:
                meet(after_s)
            meet(before_pv)
        prepaid = warpgroup == 0 and tiles > 0
        if prepaid:
            ops.append(("arrive", 2 + parity, meeting))  # counted where it is skipped
    if warpgroup == 0 and not prepaid:  # ends a meeting behind
        meet(2 + parity)
    return ops


def run(works, seed):
    """Plays both warpgroups' operations in a random interleaving; raises on a deadlock,
    a barrier generation that pairs different meetings, or an arrival left over."""
    rng = random.Random(seed)
    ops = [barrier_ops(0, works), barrier_ops(1, works)]
    done = [0, 0]
    waiting = [None, None]  # the (barrier, generation) a warpgroup waits on
    pending = {2: [], 3: []}  # the current generation's arrivals: (warpgroup, meeting)
    generation = {2: 0, 3: 0}
    while done[0] < len(ops[0]) or done[1] < len(ops[1]) or any(waiting):
        ready = [w for w in (0, 1) if waiting[w] is None and done[w] < len(ops[w])]
        if not ready:
            raise AssertionError(f"deadlock: waiting {waiting}, done {done}, works {works}")
        w = rng.choice(ready)
        kind, barrier, meeting = ops[w][done[w]]
        done[w] += 1
        pending[barrier].append((w, meeting))
        if kind == "sync":
            waiting[w] = (barrier, generation[barrier])
        if len(pending[barrier]) == 2:
            (w1, k1), (w2, k2) = pending[barrier]
            if {w1, w2} != {0, 1} or k1 != k2:
                raise AssertionError(f"bad pairing {pending[barrier]} on {barrier}, works {works}")
            pending[barrier] = []
            for x in (0, 1):
                if waiting[x] == (barrier, generation[barrier]):
                    waiting[x] = None
            generation[barrier] += 1
    if pending[2] or pending[3]:
        raise AssertionError(f"arrivals left over {pending}, works {works}")


def main():
    for trial in range(20000):
        r = random.Random(trial)
        works = [r.choice([0, 0, 1, 2, 3, 5]) for _ in range(r.randint(0, 8))]
        run(works, trial)
    print("ok: 20000 random work lists and schedules")


if __name__ == "__main__":
    main()
