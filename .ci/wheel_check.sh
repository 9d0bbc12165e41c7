#!/usr/bin/env bash
# CI: the package as a user receives it. Exits non-zero on failure.
#
#  1. OUT OF TREE (a copy of the sources in a temp dir, so this checkout's fusedlars/_C*.so is never
#     touched): build the sdist (setuptools' PEP 517 hook, what `python -m build --sdist
#     --no-isolation` calls) and check it holds every file under csrc/ plus what setup.py needs;
#  2. unpack the sdist and build the wheel FROM IT (`pip wheel --no-build-isolation`): proves the
#     sdist builds; check the wheel holds the compiled extension and its build record, and no sources;
#  3. install the wheel into a fresh venv (no system site-packages; torch==2.13.0 from pip, as CI does);
#  4. with a PATH that holds no C/C++ compiler (proved: `command -v gcc` etc. must fail) and from a
#     folder outside the source tree: `python -m fusedlars info` must show the cpu backend live and the
#     recorded build decision, and a smoke test runs LARS and LAMB steps on the cpu backend against the
#     reference backend.
#
# Environment: BUILD_PYTHON (default: python; must import torch: the build uses the torch you run,
# like the README's --no-build-isolation install), TORCH_SPEC (default torch==2.13.0), MAX_JOBS
# (default: nproc), KEEP=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
start=$(date +%s)
stamp() { echo "[wheel_check +$(( $(date +%s) - start ))s] $*"; }
fail() { stamp "FAIL: $*"; exit 1; }

PY=${BUILD_PYTHON:-python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
"$PY" -c "import torch, setuptools" 2>/dev/null || fail "$PY cannot import torch and setuptools (activate the CI venv first)"

WORK=$(mktemp -d /tmp/fusedlars-wheel.XXXXXX)
# removal of the temp dir (a ~1 GB venv: tens of seconds on a busy disk) runs in the background
if [[ "${KEEP:-0}" == 1 ]]; then trap 'echo "kept $WORK"' EXIT; else trap '(rm -rf "$WORK" >/dev/null 2>&1 &)' EXIT; fi
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run" "$WORK/home"

# --- 3a. (in the background, while the wheel compiles) a fresh venv with torch from pip, as CI installs it
# based on the build python's base interpreter (same ABI tag), not on its venv; no system site-packages
( "$PY" -m venv "$WORK/venv" && "$WORK/venv/bin/python" -m pip install -q "$TORCH_SPEC" ) > "$WORK/venv.log" 2>&1 &
pid_venv=$!

# --- 1. sdist, out of tree -------------------------------------------------------------------------
tar -C "$ROOT" --exclude='./.venv*' --exclude='./build' --exclude='./dist' --exclude='./.git' --exclude='*.so' \
    --exclude='__pycache__' --exclude='*.egg-info' --exclude='./fusedlars/_build_info.py' -cf - . | tar -C "$WORK/src" -xf -
stamp "1. sdist from a copy of the sources in $WORK/src"
sdist=$(cd "$WORK/src" && "$PY" -c "
import sys
from setuptools import build_meta
print(build_meta.build_sdist(sys.argv[1]))" "$WORK/dist" 2>"$WORK/sdist.log" | tail -1) || { cat "$WORK/sdist.log"; fail "sdist build"; }
tar -tzf "$WORK/dist/$sdist" | sed 's|^[^/]*/||' | sort > "$WORK/sdist.files"
missing=$(cd "$WORK/src" && { find csrc -type f; echo setup.py; echo pyproject.toml; echo README.md; echo MANIFEST.in;
                                find fusedlars -name '*.py' -not -path '*/__pycache__/*'; } | sort | comm -23 - "$WORK/sdist.files")
[[ -z "$missing" ]] || fail "the sdist lacks: $missing"
unwanted=$(grep -E '\.so$|_build_info\.py$|\.pyc$|^\.venv|^build/' "$WORK/sdist.files" || true)
[[ -z "$unwanted" ]] || fail "the sdist holds build outputs: $unwanted"
stamp "   $sdist: $(wc -l < "$WORK/sdist.files") entries, all $(cd "$WORK/src" && find csrc -type f | wc -l) files of csrc/ ($(cd "$WORK/src" && find csrc -name '*.h' | wc -l) headers)"

# --- 2. wheel from the sdist ---------------------------------------------------------------------
mkdir "$WORK/sdist" && tar -C "$WORK/sdist" -xzf "$WORK/dist/$sdist"
sdir=$(ls -d "$WORK"/sdist/*/)
stamp "2. wheel from the unpacked sdist (pip wheel --no-build-isolation, MAX_JOBS=${MAX_JOBS:-$(nproc)})"
t_build=$(date +%s)
( cd "$sdir" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" . ) \
  > "$WORK/wheel.log" 2>&1 || { tail -40 "$WORK/wheel.log"; fail "wheel build from the sdist"; }
grep -m1 '^fusedlars: ' "$WORK/wheel.log" | sed 's/^/   setup.py: /' || true
wheel=$(cd "$WORK/dist" && ls fusedlars-*.whl)
"$PY" - "$WORK/dist/$wheel" <<'EOF' || fail "wheel contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
so = [n for n in names if n.startswith("fusedlars/_C") and n.endswith(".so")]
assert len(so) == 1, f"no compiled extension in the wheel: {names}"
assert "fusedlars/_build_info.py" in names, "no build record (fusedlars/_build_info.py) in the wheel"
assert "fusedlars/backends/cpu.py" in names and "fusedlars/optim/__init__.py" in names, names
bad = [n for n in names if n.startswith(("csrc/", "tests/", "bench/")) or n.endswith((".cpp", ".cu", ".h"))]
assert not bad, f"sources in the wheel: {bad}"
info = zipfile.ZipFile(sys.argv[1]).getinfo(so[0])
print(f"   {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, {so[0]} {info.file_size / 2**20:.1f} MiB")
EOF
stamp "   built in $(( $(date +%s) - t_build ))s"

# --- 3. fresh venv (made in the background above): torch from pip, then the wheel -------------------
stamp "3. fresh venv (no system site-packages): pip install $TORCH_SPEC (done in the background), then the wheel"
wait $pid_venv || { cat "$WORK/venv.log"; fail "venv / $TORCH_SPEC install"; }
grep -q '^include-system-site-packages = false' "$WORK/venv/pyvenv.cfg" || fail "venv sees system site-packages"
"$WORK/venv/bin/python" -m pip install -q "$WORK/dist/$wheel" -c "$ROOT/ci-constraints.txt" 2>&1 | grep -v '^WARNING: Location' || true
"$WORK/venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|fusedlars) ' | sed 's/^/   /'

# --- 4. no compiler on PATH, outside the source tree ----------------------------------------------
# PATH = the venv's bin + a folder with only the text tools the checks use (no compiler, no /usr/bin)
mkdir "$WORK/tools"
for t in cat grep sed tee; do ln -s "$(command -v $t)" "$WORK/tools/$t"; done
stamp "4. checks in $WORK/run with PATH=$WORK/venv/bin:$WORK/tools ($(ls "$WORK/tools" | tr '\n' ' '))"
cat > "$WORK/run/smoke.py" <<'EOF'
"""A few LARS and LAMB steps on the installed wheel's cpu backend against the reference backend."""
import os
import shutil
import sys

import torch

import fusedlars
from fusedlars import kernels

venv = os.environ["WHEEL_VENV"]
assert fusedlars.__file__.startswith(venv), f"fusedlars imported from {fusedlars.__file__}, not from the venv"
compilers = {c: shutil.which(c) for c in ("gcc", "g++", "cc", "c++", "clang", "clang++")}
assert not any(compilers.values()), f"a compiler is on PATH: {compilers}"
import fusedlars._C  # noqa: F401,E402  (the prebuilt extension; nothing could compile it here)

ok, why = kernels.status("cpu")
assert ok, f"cpu backend not live: {why}"
build = fusedlars.info()["build"]
assert build is not None and build["kernels"] == torch.ops.fusedlars.build_info(), build

shapes = [(64, 32), (32,), (16, 8, 3, 3), (16,), (1000,), (3, 5)]


def run(cls, backend, **kw):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g, dtype=torch.float64).float().requires_grad_() for s in shapes]
    opt = cls(ps, backend=backend, **kw)
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).float()
        opt.step()
    return ps, opt


for cls, kw in ((fusedlars.LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
                (fusedlars.LAMB, dict(lr=1e-2, weight_decay=0.01))):
    got, opt = run(cls, "cpu", **kw)
    want, _ = run(cls, "reference", **kw)
    assert set(opt.backends_in_use()) == {"cpu"}, opt.backends_in_use()
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, i=i: f"{cls.__name__} tensor {i}: {m}")
    err = max((a.detach().double() - b.detach().double()).abs().max().item() for a, b in zip(got, want))
    print(f"smoke: {cls.__name__} 5 steps x {len(shapes)} tensors, backend cpu vs reference: max |diff| {err:.1e}")
print(f"smoke OK: fusedlars {fusedlars.__version__} from {os.path.dirname(fusedlars.__file__)}, torch {torch.__version__}")
EOF
# torch warns at import when numpy is absent (the wheel needs only torch, so the venv has no numpy)
(
  cd "$WORK/run"
  env -i PYTHONWARNINGS="ignore:Failed to initialize NumPy:UserWarning" HOME="$WORK/home" LANG=C.UTF-8 PATH="$WORK/venv/bin:$WORK/tools" WHEEL_VENV="$WORK/venv" FUSEDLARS_REQUIRE_EXT=1 \
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" /bin/bash -c '
    set -euo pipefail
    for c in gcc g++ cc c++ clang clang++; do
      if command -v "$c" >/dev/null; then echo "compiler on PATH: $(command -v "$c")"; exit 1; fi
    done
    echo "   PATH=$PATH: no gcc, g++, cc, c++, clang, clang++ (command -v gcc -> exit $(command -v gcc >/dev/null; echo $?))"
    python -m fusedlars info | tee info.txt | sed "s/^/   /"
    grep -qE "^  cpu +yes " info.txt || { echo "cpu backend not live"; exit 1; }
    grep -qE "^build: " info.txt || { echo "fusedlars info does not show the build record"; exit 1; }
    fusedlars info >/dev/null   # the console script too
    python smoke.py | sed "s/^/   /"
  '
) || fail "installed wheel checks"

stamp "OK: sdist + wheel built, installed without a compiler, info + smoke passed in $(( $(date +%s) - start )) s"
