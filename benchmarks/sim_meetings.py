"""Simulates the consumer warpgroups' named-barrier meetings of csrc/prefill_ws.cuh (the
prepaid meeting, NOTES P59) under random schedules: every generation of a barrier must
join one arrival of each warpgroup with equal meeting indices, and nothing may deadlock.

    python3 benchmarks/sim_meetings.py
"""
import random

def ops(wg, works):
    """The barrier operations of warpgroup wg over works (list of tile counts), as the kernel
    issues them: ('sync'|'arrive', barrier, meeting index)."""
    out, k = [], 0
    parity, prepaid = 0, False
    def meet(b, kind='sync'):
        nonlocal k
        out.append((kind, b, k)); k += 1
    if wg == 1:
        meet(2); parity = 1
    for n in works:
        if n == 0:
            if not prepaid: meet(2 + parity)
            else: k += 1  # the prepaid arrival was this meeting
            parity ^= 1
        after_s, before_pv = 2 + parity, 3 - parity
        for t in range(n):
            if t > 0 or not prepaid: meet(after_s)
            else: k += 1
            meet(before_pv)
        prepaid = wg == 0 and n > 0
        if prepaid:
            out.append(('arrive', 2 + parity, k))  # meeting k, paid ahead (k counted when skipped)
    if wg == 0:
        if not prepaid: meet(2 + parity)
    return out

def run(works, seed):
    rng = random.Random(seed)
    seqs = [ops(0, works), ops(1, works)]
    pos = [0, 0]
    waiting = [None, None]  # (barrier, generation) a warpgroup blocks on
    pending = {2: [], 3: []}  # arrivals of the current generation: (wg, meeting)
    gen = {2: 0, 3: 0}
    while pos[0] < len(seqs[0]) or pos[1] < len(seqs[1]) or any(waiting):
        ready = [w for w in (0, 1) if waiting[w] is None and pos[w] < len(seqs[w])]
        if not ready:
            raise AssertionError(f"deadlock: {waiting}, pos {pos}, works {works}")
        w = rng.choice(ready)
        kind, b, k = seqs[w][pos[w]]; pos[w] += 1
        pending[b].append((w, k))
        if kind == 'sync': waiting[w] = (b, gen[b])
        if len(pending[b]) == 2:
            (w1, k1), (w2, k2) = pending[b]
            assert {w1, w2} == {0, 1} and k1 == k2, f"bad pairing {pending[b]} on {b}, works {works}"
            pending[b] = []
            for x in (0, 1):
                if waiting[x] == (b, gen[b]): waiting[x] = None
            gen[b] += 1
    assert not pending[2] and not pending[3], f"dangling arrivals {pending}, works {works}"

for trial in range(20000):
    r = random.Random(trial)
    works = [r.choice([0, 0, 1, 2, 3, 5]) for _ in range(r.randint(0, 8))]
    run(works, trial)
print("ok")
