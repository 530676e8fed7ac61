#!/usr/bin/env bash
# The one GPU-machine script: builds jaxinfer from this working tree, runs the
# GPU tests and the benchmarks, and prints a short table last.
#
# From the repository root on the development machine (the nvidia-cutlass
# wheel is carried, since the GPU machine has no network):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0
#   device run: command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600
# Optional, to narrow the run: PYTEST_K="prefill or cascade" (a pytest -k expression),
# PYTEST_ARGS (more pytest arguments, no spaces inside one), BENCH="decode" (benchmarks
# to run; " " for none), BENCH_ARGS (e.g. --quick), SKIP_SANITIZER=1.
# The tests run in 6 processes where pytest-xdist is installed (the GPU machine has it):
# the 55 prefill and cascade tests took 154 s so, 470 s in one process, mostly compiling.
# PYTEST_WORKERS=1 runs them in one.
set -uo pipefail
OUT=${OUT:-/tmp/jaxinfer-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps --no-compile --target /tmp/jaxinfer . \
  > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
# PYTHONSAFEPATH keeps the source tree (which has no compiled modules) off sys.path.
export PYTHONPATH=/tmp/jaxinfer:/tmp/site PYTHONSAFEPATH=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, jaxinfer._ffi as f; print('jax', jax.__version__, jax.devices(), f.family_platforms('merge'))"

# Every test but the reference's own (CPU semantics, covered by CI) runs on the GPU.
pytest_options=()
[ -n "${PYTEST_K:-}" ] && pytest_options=(-k "$PYTEST_K")
workers=${PYTEST_WORKERS:-6}
[ "$workers" -gt 1 ] && python3 -c "import xdist" 2>/dev/null && pytest_options+=(-n "$workers" -p no:benchmark)  # its plugin warns in every worker
XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -x tests --ignore=tests/test_reference.py \
  ${pytest_options[@]+"${pytest_options[@]}"} ${PYTEST_ARGS:-} 2>&1 \
  | tee "$OUT/pytest.log" | tail -25
test_status=${PIPESTATUS[0]}

# Bad device data must never be read out of bounds: memcheck over the decode and prefill
# kernels fed corrupt tables (a standalone program: JAX does not start under
# the sanitizer).
if [ -z "${SKIP_SANITIZER:-}" ]; then
  for family in decode prefill; do
    nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -I. -DJAXINFER_WITH_CUDA \
      --expt-relaxed-constexpr tests/cuda/${family}_bounds.cu csrc/$family.cu csrc/${family}_inst/*.cu \
      -o /tmp/${family}_bounds > "$OUT/sanitizer_$family.log" 2>&1 &&
    compute-sanitizer --tool memcheck --error-exitcode 1 /tmp/${family}_bounds >> "$OUT/sanitizer_$family.log" 2>&1
    sanitizer_status=$?
    echo "compute-sanitizer memcheck ($family, corrupt tables): exit $sanitizer_status"
    [ "$sanitizer_status" = 0 ] || tail -30 "$OUT/sanitizer_$family.log"
  done
fi

for b in ${BENCH:-merge decode prefill cascade sampling}; do
  (cd benchmarks && env -u PYTHONSAFEPATH python3 "$b.py" --out "$OUT" ${BENCH_ARGS:-}) > "$OUT/bench_$b.log" 2>&1 || tail -30 "$OUT/bench_$b.log"
done
echo "=========================== summary ==========================="
cat "$OUT"/*.md 2>/dev/null
echo "pytest exit status: $test_status"
exit "$test_status"
