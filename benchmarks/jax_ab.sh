#!/usr/bin/env bash
# A/B of source trees through JAX in one device call: each tree is built into a
# folder of its own, then one benchmark script runs against each tree in turn,
# twice, so that drift within the call shows as spread within a tree rather than
# as a difference between trees (between calls the card itself varies by about 5%:
# benchmarks/NOTES.md, twenty-third session).
#
#   here:   mkdir -p scratch/alt && git archive experiment/x | tar -x -C scratch/alt
#   device: command="bash benchmarks/jax_ab.sh 'cascade.py --quick' . scratch/alt",
#           carry=[".whl", "scratch/alt"]
set -u
[ $# -ge 2 ] || { echo "usage: $0 'SCRIPT [ARGS]' TREE..." >&2; exit 2; }
bench=$1
shift
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site  # the build finds the CUTLASS headers through it
n=0
for tree in "$@"; do
  n=$((n + 1))
  python3 -m pip install --no-build-isolation --no-deps --no-compile --target "/tmp/ab$n" "$tree" \
    > "/tmp/ab$n.log" 2>&1 || { tail -30 "/tmp/ab$n.log"; exit 1; }
done
for round in 1 2; do
  n=0
  for tree in "$@"; do
    n=$((n + 1))
    echo "== $tree (round $round)"
    # shellcheck disable=SC2086  # the script and its arguments, split on purpose
    (cd benchmarks && PYTHONPATH="/tmp/ab$n:/tmp/site" python3 $bench --out "/tmp/ab$n") 2>&1 | grep -v '^$' | tail -8
  done
done
