#!/usr/bin/env bash
# CI: what can be proved about the CUDA kernels without a GPU. Called from .ci/run; exits non-zero on failure.
#
#  (a) plain nvcc compiles csrc/cuda/fused_kernels.cu (torch-free) for sm_80, sm_90, sm_100 and
#      scripts/cuda_compile_check.py prints registers / spills per kernel, failing on any spill;
#  (b) in a separate venv with the CUDA torch wheel, the torch extension (CPU + CUDA kernels) is built
#      and linked OUT OF TREE (a copy of the sources in a temp dir, so the CPU build's fusedlars/_C*.so
#      in this checkout is untouched), its ops load and register, calling them with CPU tensors fails
#      with a clear error, and `fusedlars info` reports the CUDA build (tests/test_cuda_build.py).
#
# Environment: CUDA_VENV (default .venv-cuda, created if missing), CUDA_TORCH (default torch==2.14.1),
# CUDA_HOME (default: the toolkit root of the nvcc on PATH), TORCH_CUDA_ARCH_LIST (default 8.0;9.0;10.0),
# MAX_JOBS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
start=$(date +%s)
stamp() { echo "[cuda_check +$(( $(date +%s) - start ))s] $*"; }

# toolkit root = the folder above the real nvcc's bin/ (nvcc on PATH may be a wrapper script)
if [[ -z "${CUDA_HOME:-}" ]]; then
  nvcc_path=$(command -v nvcc || true)
  [[ -n "$nvcc_path" ]] || { echo "cuda_check: nvcc not on PATH and CUDA_HOME unset" >&2; exit 1; }
  real=$(readlink -f "$nvcc_path")
  if [[ -f "$real" ]] && head -c 2 "$real" | grep -q '#!'; then  # a wrapper: find the exec'd nvcc
    inner=$(grep -oE '/[^" ]*/bin/nvcc' "$real" | head -1 || true)
    [[ -n "$inner" ]] && real=$(readlink -f "$inner")
  fi
  CUDA_HOME=$(dirname "$(dirname "$real")")
fi
export CUDA_HOME
[[ -x "$CUDA_HOME/bin/nvcc" ]] || { echo "cuda_check: $CUDA_HOME/bin/nvcc not found" >&2; exit 1; }
stamp "CUDA_HOME=$CUDA_HOME"

# --- (a) standalone kernel compile + register/spill report (runs while the venv installs) ---------
stamp "(a) nvcc sm_80 / sm_90 / sm_100, -Xptxas -v"
NVCC="$CUDA_HOME/bin/nvcc" python3 scripts/cuda_compile_check.py --arch 80 90 100 > /tmp/cuda_check_a.$$ 2>&1 &
pid_a=$!

# --- (b) CUDA torch venv ----------------------------------------------------------------------------
CUDA_VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
if [[ ! -x "$CUDA_VENV/bin/python" ]] || ! "$CUDA_VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  stamp "(b) creating $CUDA_VENV with ${CUDA_TORCH:-torch==2.14.1}"
  python3 -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/pip" install -q "${CUDA_TORCH:-torch==2.14.1}" ninja setuptools wheel numpy pytest 2>&1 | grep -v "^WARNING: Location" || true
fi
"$CUDA_VENV/bin/python" -c "import torch; assert torch.version.cuda, 'not a CUDA torch'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

wait $pid_a && rc_a=0 || rc_a=$?
cat /tmp/cuda_check_a.$$; rm -f /tmp/cuda_check_a.$$
[[ $rc_a -eq 0 ]] || { stamp "FAIL (a): kernel compile / spill check"; exit 1; }
stamp "(a) OK"

# out-of-tree copy of the sources (no build outputs, no venvs)
BUILD=$(mktemp -d /tmp/fusedlars-cuda-build.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
tar -C "$ROOT" --exclude='./.venv*' --exclude='./build' --exclude='./.git' --exclude='*.so' \
    --exclude='__pycache__' --exclude='*.egg-info' -cf - . | tar -C "$BUILD" -xf -
stamp "(b) building the torch CUDA extension in $BUILD (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0;10.0})"
t_build=$(date +%s)
(
  cd "$BUILD"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0;10.0}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  "$CUDA_VENV/bin/python" setup.py -q build_ext --inplace 2>&1 | grep -v 'warning #3189-D\|^ *module\|^ *\^\|^$\|Remark: The warnings can be suppressed' | tail -40
  ls fusedlars/_C*.so >/dev/null
) || { stamp "FAIL (b): build"; exit 1; }
stamp "(b) built in $(( $(date +%s) - t_build ))s: $(ls "$BUILD"/fusedlars/_C*.so | xargs -n1 basename)"

# embedded cubins (triton's wheel ships cuobjdump; the minimal toolkit may not)
CUOBJDUMP=$(command -v cuobjdump || ls "$CUDA_HOME/bin/cuobjdump" 2>/dev/null || ls "$CUDA_VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null || true)
if [[ -n "$CUOBJDUMP" ]]; then
  "$CUOBJDUMP" --list-elf "$BUILD"/fusedlars/_C*.so | sed 's/^/  /' | head -20
fi

stamp "(b) load / register / CPU-tensor errors / info"
(
  cd "$BUILD"
  FUSEDLARS_EXPECT_CUDA_BUILD=1 FUSEDLARS_REQUIRE_EXT=1 "$CUDA_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    -o addopts="" tests/test_cuda_build.py
  FUSEDLARS_REQUIRE_EXT=1 "$CUDA_VENV/bin/python" -m fusedlars info
) || { stamp "FAIL (b): tests"; exit 1; }

stamp "OK: CUDA checks passed in $(( $(date +%s) - start )) s"
