#!/usr/bin/env bash
# The prepared first-GPU check: everything we want to learn from a GPU machine, in one command of at
# most ~8 minutes, for the rare session that is lent one (an H200 with torch 2.11 + CUDA 13.0, triton,
# nvcc, pytest, no network). Run from the repository root:
#
#   bash bench/gpu_check.sh OUT            # on the GPU machine
#   bash bench/gpu_check.sh --dry-run OUT  # on a CPU machine (CI): every step that can run without a GPU
#
# Steps (each with its own time limit, logs in OUT/<step>.log, statuses in OUT/summary.json):
#   versions   torch / triton / CUDA / driver / nvcc / compute-sanitizer versions, the device
#   build      the extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), in place
#   tests      the CUDA and Triton test suites on the GPU (junit XML in OUT/tests.xml)
#   fused      the suite every fused backend passes (tests/test_fused_backends.py), its cuda and
#              triton cases (junit XML in OUT/fused.xml)
#   lowbit     bf16 / int8 state and remainder masters on the GPU: the cuda, triton and torch backends
#              bitwise against the CPU reference (tests/test_gpu_lowbit.py, OUT/lowbit.xml); on the
#              dry run its CPU harness test
#   lowbit-helpers  the Triton helpers of that arithmetic (tests/test_lowbit.py -k triton) on the device,
#              pow and exp against torch's there
#   selftest   `fusedlars selftest` on the GPU (OUT/selftest.json)
#   launches   kernel launches per step per fused backend, low-bit state included (profiler events, OUT/launches.json)
#   sanitizer  compute-sanitizer memcheck, racecheck, synccheck on a small step of every kernel, the
#              low-bit (exact) kernels included
#   grad-passes  issue #25's ratios on the GPU (fusedlars.tools.grad_passes): LARS with norms from
#              backward, clipping, LAMB max_grad_norm against torch's fused steps; backward + step of a
#              real ResNet-50 (batch 32, 224x224) with and without the hooks
#   bench      first ResNet-50 LARS and LAMB with fp32 / bf16 / int8 state on cuda, triton and torch (and
#              LARS with norms from backward: issues #25, #26), then ResNet-50 / ViT-B/16 / BERT-large
#              shapes, fp32 and bf16, LARS / TVLARS / LAMB on cuda and triton vs torch fused SGD / AdamW
#              and the unfused references, HBM probe (OUT/bench/)
# A missing tool or a refusal (compute-sanitizer may not be allowed on the device) is recorded as
# "skipped" with the reason; the script goes on. Exit status: 0 when no step failed.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT=${1:?usage: bash bench/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_BUDGET_S:-460} ))   # leave the caller's 8-minute limit some slack
STATUS="$OUT/steps.tsv"
: > "$STATUS"

left() { echo $(( DEADLINE - $(date +%s) )); }
note() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATUS"; echo "[gpu_check +$(( $(date +%s) - START ))s] $1: $2 ${4:+($4)}"; }

# step NAME LIMIT_S CMD...: runs CMD with a time limit (cut to what is left), logs to OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  if (( l < 15 )); then note "$name" skipped 0 "no time left"; return 0; fi
  (( limit > l )) && limit=$l
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then note "$name" ok "$dt" ""
  elif (( rc == 124 || rc == 137 )); then note "$name" failed "$dt" "timed out after ${limit}s"
  else note "$name" failed "$dt" "exit $rc, see $name.log"; fi
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}

export FUSEDLARS_NO_PROGRESS=1 PYTHONUNBUFFERED=1
# the checkout itself is the package (the GPU machine has no install of it; bench/*.py run as scripts)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
HAVE_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if (( DRY )); then
  DEV=cpu
  echo "gpu_check: --dry-run (GPU visible: $HAVE_GPU): every step that runs without a GPU, on the CPU"
else
  DEV=cuda
  if [[ "$HAVE_GPU" != 1 ]]; then echo "gpu_check: no CUDA device visible (use --dry-run on a CPU machine)" >&2; exit 2; fi
fi

# --- versions --------------------------------------------------------------------------------------
step versions 60 $PY bench/gpu_kernels.py versions "$OUT/versions.json"

# --- build (sm_90 only) -----------------------------------------------------------------------------
if (( DRY )); then
  if $PY -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
    step build 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" $PY setup.py -q build_ext --inplace
  else
    note build skipped 0 "this torch has no CUDA; CI builds the CUDA extension in .ci/cuda_check.sh"
  fi
else
  step build 240 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" FUSEDLARS_REQUIRE_EXT=1 $PY setup.py -q build_ext --inplace
  $PY -m fusedlars info > "$OUT/info.txt" 2>&1 || true
fi

# --- tests ------------------------------------------------------------------------------------------
TESTS=(tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_compile.py tests/test_no_host_sync.py tests/test_cuda_build.py)
[[ -f tests/test_triton_order.py ]] && TESTS+=(tests/test_triton_order.py)
if (( DRY )); then
  step tests 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" --collect-only "${TESTS[@]}"
else
  step tests 150 env FUSEDLARS_REQUIRE_EXT=1 $PY -m pytest -q -p no:cacheprovider -o addopts="" --maxfail=25 --junitxml="$OUT/tests.xml" "${TESTS[@]}"
fi
FUSED=(tests/test_fused_backends.py -k "cuda or triton")
if (( DRY )); then
  step fused 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" --collect-only "${FUSED[@]}"
else
  step fused 120 env FUSEDLARS_REQUIRE_EXT=1 $PY -m pytest -q -p no:cacheprovider -o addopts="" --maxfail=25 --junitxml="$OUT/fused.xml" "${FUSED[@]}"
fi

# --- low-bit state (issue #26) on the hardware: cuda, triton and torch backends against the reference --
LOWBIT=(tests/test_gpu_lowbit.py)
if (( DRY )); then
  step lowbit 90 $PY -m pytest -q -p no:cacheprovider -o addopts="" "${LOWBIT[@]}"
else
  step lowbit 150 env FUSEDLARS_REQUIRE_EXT=1 $PY -m pytest -q -p no:cacheprovider -o addopts="" --maxfail=25 --junitxml="$OUT/lowbit.xml" "${LOWBIT[@]}"
fi
# the Triton helpers of the low-bit arithmetic on the device: Philox, the roundings, the quantization, and
# pow / exp against torch's on the same device (triton_lowbit NOTE [Device libm in the kernels])
step lowbit-helpers 60 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_lowbit.py -k triton

# --- selftest ---------------------------------------------------------------------------------------
step selftest 90 $PY -m fusedlars selftest --device "$DEV" --json "$OUT/selftest.json"

# --- launches per step ------------------------------------------------------------------------------
step launches 60 $PY bench/gpu_kernels.py launches --device "$DEV" --json "$OUT/launches.json"

# --- compute-sanitizer ------------------------------------------------------------------------------
if (( DRY )); then
  step sanitizer-step 120 $PY bench/gpu_kernels.py step --device cpu
  note sanitizer skipped 0 "no GPU: compute-sanitizer needs one (the kernel step above ran on the CPU)"
elif ! command -v compute-sanitizer > /dev/null 2>&1; then
  note sanitizer skipped 0 "compute-sanitizer not found on PATH"
else
  for tool in memcheck racecheck synccheck; do
    step "sanitizer-$tool" 90 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
      $PY bench/gpu_kernels.py step --device cuda
    if grep -q -i -E "not supported|unable to|could not|permission" "$OUT/sanitizer-$tool.log" 2>/dev/null \
       && ! grep -q "ERROR SUMMARY: [1-9]" "$OUT/sanitizer-$tool.log"; then
      note "sanitizer-$tool" skipped 0 "compute-sanitizer refused the device, see sanitizer-$tool.log"
    fi
  done
fi

# --- issue #25 on the GPU: the steps with norms from backward, and backward + step with the hooks ------
if (( DRY )); then
  step grad-passes 60 $PY -m fusedlars.tools.grad_passes --device cpu --shapes tiny --rounds 3
  step grad-passes-backward 60 $PY -m fusedlars.tools.grad_passes --device cpu --shapes tiny --rounds 3 --backward
else
  step grad-passes 60 $PY -m fusedlars.tools.grad_passes --device cuda --rounds 30
  step grad-passes-backward 60 $PY -m fusedlars.tools.grad_passes --device cuda --rounds 15 --backward --network 32 224
fi

# --- bench ------------------------------------------------------------------------------------------
if (( DRY )); then
  step bench 120 $PY bench/gpu_kernels.py bench --device cpu --out "$OUT/bench" --budget 60 --quick
else
  b=$(( $(left) - 20 )); (( b > 200 )) && b=200
  step bench $(( b + 30 )) $PY bench/gpu_kernels.py bench --device cuda --out "$OUT/bench" --budget "$b"
fi

# --- summary ----------------------------------------------------------------------------------------
$PY - "$STATUS" "$OUT/summary.json" "$DRY" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
steps = {}
for name, status, secs, why in rows:
    steps[name] = dict(status=status, seconds=int(secs), detail=why)  # a later verdict on a step wins
out = dict(dry_run=sys.argv[3] == "1", seconds=int(sys.argv[4]), steps=steps,
           failed=[k for k, v in steps.items() if v["status"] == "failed"])
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(json.dumps(out, indent=1))
sys.exit(1 if out["failed"] else 0)
EOF
