#!/usr/bin/env bash
# One call that checks fusedopt's CUDA path on a GPU machine, everything written under
# one results folder with a SUMMARY.txt. From the repository root:
#   OUT=/path/to/results bash benchmarks/gpu_check.sh        (DEADLINE_S=540 by default)
# Needs nvcc, torch with CUDA, pybind11, setuptools, pytest, hypothesis, numpy in the
# active Python. Without a GPU it still builds and runs the self-test on the CPU, and
# marks the GPU steps SKIP (no GPU), so the script itself can be tried anywhere.
#
# Every step runs under `timeout`, limited to min(its budget, time left - reserve); a
# step that would get under 10 s is skipped. Steps, with what they take on an H200:
#   build            pip install, FUSEDOPT_CUDA_ARCHS (default 90), MAX_JOBS=nproc   ~60 s / 180 s
#   self-test        python -m fusedopt: every optimizer x dtype, kernel vs reference ~15 s /  60 s
#   pytest-cuda      pytest -m cuda tests                                       60-120 s / 200 s
#   memcheck         compute-sanitizer on small cases, caching allocator off    30-60 s /  90 s
#   bench            benchmarks/bench_step.py --device cuda --quick --json      60-120 s / 150 s
#   initcheck        uninitialized device reads (SGDW's first step: none)        20-40 s /  45 s
#   racecheck        shared-memory hazards (the kernels use none)                10-30 s /  30 s
#   resource-usage   cuobjdump --dump-resource-usage of the built module                5 s
set -u
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-540}
RESERVE_S=10
OUT=${OUT:-/tmp/fusedopt_gpu_check}
mkdir -p "$OUT/py"
SUMMARY="$OUT/SUMMARY.txt"
: > "$SUMMARY"
PY=${PYTHON:-python}
PYTEST=${PYTEST:-pytest}  # not `python -m pytest`: that would import ./fusedopt, unbuilt
REPO=$(pwd)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

left() { echo $(( DEADLINE_S - ($(date +%s) - START) - RESERVE_S )); }

# step NAME BUDGET_S LOG CMD...: CMD under `timeout`; one summary line with verdict and seconds.
step() {
  local name=$1 budget=$2 log=$3; shift 3
  local remaining; remaining=$(left)
  local limit=$(( budget < remaining ? budget : remaining ))
  if [ "$limit" -lt 10 ]; then
    echo "SKIP     $name (only ${remaining}s left)" | tee -a "$SUMMARY"; return 99
  fi
  local t0; t0=$(date +%s)
  echo "=== $name: timeout ${limit}s: $*" >> "$log"
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; elif [ $rc -ne 0 ]; then verdict=FAIL; fi
  printf '%-8s %-16s rc=%-3s %4ss (limit %ss)  %s\n' "$verdict" "$name" "$rc" "$(( $(date +%s) - t0 ))" \
    "$limit" "$(basename "$log")" | tee -a "$SUMMARY"
  return $rc
}
skip() { echo "SKIP     $1 ($2)" | tee -a "$SUMMARY"; }

# --- environment ------------------------------------------------------------------------
{
  date -u; uname -a; nproc; free -g
  nvidia-smi || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  command -v nvcc && nvcc --version
  $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -m pip list 2>/dev/null | grep -i -E "torch|pybind|pytest|hypothesis|numpy|setuptools|matplotlib"
  git -C "$REPO" log -1 --format='%H %s' 2>/dev/null; git -C "$REPO" status --short 2>/dev/null | head -20
} > "$OUT/env.log" 2>&1
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
CUDA_BIN=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")
SAN=$(command -v compute-sanitizer || ls "$CUDA_BIN/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer \
  /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
CUOBJDUMP=$(command -v cuobjdump || ls "$CUDA_BIN/cuobjdump" /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
echo "GPU visible to torch: $GPU; compute-sanitizer: ${SAN:-not found}; cuobjdump: ${CUOBJDUMP:-not found}" \
  | tee -a "$SUMMARY"

# --- build --------------------------------------------------------------------------------
export FUSEDOPT_CUDA=1 FUSEDOPT_CUDA_ARCHS=${FUSEDOPT_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! step build 180 "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps -v .; then
  tail -n 30 "$OUT/build.log" >> "$SUMMARY"; echo "build failed: nothing else can run" | tee -a "$SUMMARY"; exit 1
fi
# From $OUT, not the checkout: the installed build, never the source tree.
SO=$(cd "$OUT" && $PY -c "import fusedopt._C as C; print(C.__file__)" 2>/dev/null)
echo "built module: ${SO:-?}" >> "$SUMMARY"

# --- self-test (CPU, and every GPU) ------------------------------------------------------------
(cd "$OUT" && step self-test 60 "$OUT/self_test.log" $PY -m fusedopt)
grep -E "^(FAIL|note)|cases match" "$OUT/self_test.log" >> "$SUMMARY"

# Small problems for compute-sanitizer: every kernel family and dtype, sizes around the
# vector width and the chunk size, misaligned views, 300 tensors (two launches), complex64.
cat > "$OUT/py/sanitize_case.py" <<'PYEOF'
import sys, torch, fusedopt
torch.manual_seed(0)
full = sys.argv[1:] == ["full"]
SIZES = [1, 7, 9, 15, 17, 65535, 65537, 131073] if full else [1, 7, 9, 65537]
def params(dtype, sizes, offset=0):
    out = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n + offset, device="cuda").to(dtype)[offset:])
        p.grad = torch.randn(n + offset, device="cuda").to(dtype)[offset:]; out.append(p)
    return out
makers = [lambda ps: fusedopt.AdamW(ps, lr=1e-2, amsgrad=True, backend="kernel"),
          lambda ps: fusedopt.Adam(ps, lr=1e-2, weight_decay=0.1, maximize=True, backend="kernel"),
          lambda ps: fusedopt.SGDW(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2, backend="kernel"),
          lambda ps: fusedopt.SGDW(ps, lr=1e-2, backend="kernel")]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for offset in ((0, 3) if full else (0,)):
        for make in makers:
            opt = make(params(dtype, SIZES, offset))
            for _ in range(2):
                opt.step()
fusedopt.AdamW(params(torch.float32, [5] * 300), lr=1e-2, backend="kernel").step()
z = torch.nn.Parameter(torch.randn(8, 3, device="cuda", dtype=torch.complex64)); z.grad = torch.randn_like(z)
fusedopt.AdamW([z], lr=1e-2, backend="kernel").step()
torch.cuda.synchronize(); print("sanitize_case done")
PYEOF

# sanitizer TOOL BUDGET SIZE: compute-sanitizer --tool TOOL on the small cases.
sanitizer() {
  local tool=$1 budget=$2 size=$3
  if [ "$GPU" != 1 ]; then skip "$tool" "no GPU"; return; fi
  if [ -z "$SAN" ]; then skip "$tool" "compute-sanitizer not found"; return; fi
  (cd "$OUT" && step "$tool" "$budget" "$OUT/$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool "$tool" --error-exitcode 3 --print-limit 50 --log-file "$OUT/${tool}_tool.log" \
    $PY "$OUT/py/sanitize_case.py" "$size")
  grep -m 5 -E "ERROR SUMMARY|Uninitialized|Invalid|Race" "$OUT/${tool}_tool.log" >> "$SUMMARY" 2>/dev/null
}

# --- GPU steps ---------------------------------------------------------------------------------
if [ "$GPU" = 1 ]; then
  step pytest-cuda 200 "$OUT/pytest_cuda.log" $PYTEST -q -m cuda -rfEs -p no:cacheprovider \
    --durations=15 --junitxml="$OUT/pytest_cuda.xml" tests
  tail -n 15 "$OUT/pytest_cuda.log" >> "$SUMMARY"
else
  skip pytest-cuda "no GPU"
fi
sanitizer memcheck 90 full
if [ "$GPU" = 1 ]; then
  step bench 150 "$OUT/bench.log" $PY benchmarks/bench_step.py --device cuda --quick --json "$OUT/bench_quick.json"
  grep -E "^\|" "$OUT/bench.log" > "$OUT/bench_table.md" 2>/dev/null
else
  skip bench "no GPU"
fi
sanitizer initcheck 45 small
sanitizer racecheck 30 small

# --- resource usage of what was built ------------------------------------------------------
if [ -n "$CUOBJDUMP" ] && [ -n "${SO:-}" ]; then
  timeout 20 "$CUOBJDUMP" --dump-resource-usage "$SO" > "$OUT/resource_usage.txt" 2>&1
  echo "resource usage: $(grep -c 'REG:' "$OUT/resource_usage.txt") kernels; max REG: $(grep -o 'REG:[0-9]*' "$OUT/resource_usage.txt" | cut -d: -f2 | sort -n | tail -1); nonzero STACK/LOCAL: $(grep -cE 'STACK:[1-9]|LOCAL:[1-9]' "$OUT/resource_usage.txt")" \
    | tee -a "$SUMMARY"
else
  skip resource-usage "cuobjdump or the built module not found"
fi
echo "total $(( $(date +%s) - START ))s of ${DEADLINE_S}s" | tee -a "$SUMMARY"
! grep -qE "^(FAIL|TIMEOUT)" "$SUMMARY"
