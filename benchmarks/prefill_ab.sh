#!/usr/bin/env bash
# A/B of prefill kernel builds (benchmarks/prefill_kernel.cu binaries) in one device
# call: every binary twice, in alternating order, so that drift during the call shows
# as spread within a build rather than as a difference between builds.
#
#   device run: command="bash benchmarks/prefill_ab.sh scratch/bin/pk_main scratch/bin/pk_new",
#               carry=["scratch/bin"]
#
# PREFILL_PAGE_SIZE=N in the environment times K/V through a page table of N-key pages
# (TMA for N = 32-128, cp.async for others) instead of ragged K/V.
set -u
[ $# -ge 1 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
status=0
for round in 1 2; do
  for binary in "$@"; do
    echo "== $binary (round $round)"
    "$binary" || status=1  # a failed check line still prints its timings
  done
done
exit $status
