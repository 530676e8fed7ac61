#!/usr/bin/env bash
# A/B of prefill kernel builds (benchmarks/prefill_kernel.cu binaries) in one device
# call: every binary twice, in alternating order, so that drift during the call shows
# as spread within a build rather than as a difference between builds. Ends with one
# line per build: each case's TFLOP/s (decode-shaped cases: us) over both rounds (min-max),
# and a failed check.
#
#   device run: command="bash benchmarks/prefill_ab.sh scratch/bin/pk_main scratch/bin/pk_new",
#               carry=["scratch/bin"]
#
# PREFILL_PAGE_SIZE=N in the environment times K/V through a page table of N-key pages
# (TMA for N = 32-128, cp.async for others) instead of ragged K/V.
set -u
[ $# -ge 1 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
runs=$(mktemp -d)
status=0
for round in 1 2; do
  for binary in "$@"; do
    echo "== $binary (round $round)"
    out="$runs/$(basename "$binary").$round"
    "$binary" > "$out" 2>&1 || status=1  # a failed check line still prints its timings
    cat "$out"
  done
done
echo "== summary: TFLOP/s over both rounds (min-max)"
for binary in "$@"; do
  name=$(basename "$binary")
  cat "$runs/$name".* | awk -v name="$name" '
    match($0, /[0-9]+ x +[0-9]+ (non-)?causal|[0-9]+ x +[0-9]+ keys/) {
      c = substr($0, RSTART, RLENGTH); gsub(/ +/, " ", c); sub(/ causal/, "", c); sub(/ non-causal/, " nc", c)
      v = $(NF - 1) + 0
      if (c ~ /keys/) { sub(/ keys/, " us", c); v = $(NF - 3) + 0 }  # decode-shaped: microseconds
      if (!(c in lo)) { order[++n] = c; lo[c] = hi[c] = v }
      if (v < lo[c]) lo[c] = v
      if (v > hi[c]) hi[c] = v
    }
    /^check/ && !/ ok$/ { failed = "  CHECK FAILED" }
    END { line = sprintf("%-18s", name); for (i = 1; i <= n; i++) line = line sprintf("  %s: %d-%d", order[i], lo[order[i]], hi[order[i]]); print line failed }'
done
rm -rf "$runs"
exit $status
