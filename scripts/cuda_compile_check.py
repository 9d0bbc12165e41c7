#!/usr/bin/env python3
"""Compile the fused CUDA kernels with plain nvcc (no torch, no GPU) and report registers and spills.

    python scripts/cuda_compile_check.py [--arch 80 90 100] [--allow-spills]

Compiles csrc/cuda/fused_kernels.cu (torch-free by design, see csrc/cuda/launch.h) once per
architecture with ``-Xptxas -v``, prints one row per kernel and architecture (registers, stack frame,
spill stores / loads, shared memory) and exits 1 when a compile fails, any kernel spills, or the PTX
holds a contractible float op (setup.py NOTE [No FMA contraction in the CUDA kernels]: every f32/f64
add, sub and mul must carry its rounding mode, which ptxas never fuses into an FMA).
nvcc: $NVCC, else $CUDA_HOME/bin/nvcc, else nvcc on PATH. Architectures run in parallel.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "fused_kernels.cu")
# the same device flags as setup.py's nvcc_flags (minus torch's; tests/test_cuda_build.py compares them)
FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-Xptxas", "-v", "--resource-usage"]
# a float add / sub / mul without a rounding mode: ptxas may fuse it with its neighbour into an FMA
_CONTRACTIBLE = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:add|sub|mul)(?:\.ftz)?(?:\.sat)?\.f(?:32|64))\s", re.M)

_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?")
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def find_nvcc() -> str:
    for cand in (
        os.environ.get("NVCC"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
        shutil.which("nvcc"),
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    sys.exit("cuda_compile_check: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """'void fusedlars::cuda::(anonymous namespace)::lamb_kernel<__half, true>(LambArgs, int)' -> 'lamb_kernel<__half, true>'"""
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    if name.endswith(")"):
        name = name[: name.rfind("(")]
    head, sep, tail = name.partition("<")
    return head.rsplit("::", 1)[-1] + sep + tail


def compile_arch(nvcc: str, arch: int, out_dir: str) -> tuple[int, str, float, str]:
    """(rc, ptxas log, seconds, the PTX nvcc generated: kept with --keep, no second compile)"""
    keep = os.path.join(out_dir, f"keep{arch}")
    os.makedirs(keep, exist_ok=True)
    cmd = [nvcc, "-c", SOURCE, "-o", os.path.join(out_dir, f"k{arch}.o"), f"-arch=sm_{arch}", *FLAGS, "--keep", "--keep-dir", keep]  # fmt: skip
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    ptx = ""
    for name in sorted(os.listdir(keep)):
        if name.endswith(".ptx"):
            with open(os.path.join(keep, name)) as f:
                ptx += f.read()
    return p.returncode, p.stdout + p.stderr, time.time() - t0, ptx


def contractible_ops(ptx: str) -> dict[str, int]:
    """Count of each float add / sub / mul without a rounding mode in ``ptx``."""
    out: dict[str, int] = {}
    for m in _CONTRACTIBLE.finditer(ptx):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def parse(log: str) -> list[dict]:
    rows: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = rows.setdefault(
                m.group(1), {"name": m.group(1), "regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            )
            continue
        if cur is None:
            continue
        if m := _REGS.search(line):
            cur["regs"] = int(m.group(1))
            if s := _SMEM.search(line):
                cur["smem"] = int(s.group(1))
        if m := _SPILL.search(line):
            cur["stack"], cur["spill_st"], cur["spill_ld"] = (int(x) for x in m.groups())
    return [r for r in rows.values() if r["regs"] is not None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100])
    ap.add_argument("--allow-spills", action="store_true")
    args = ap.parse_args(argv)
    nvcc = find_nvcc()
    print(f"nvcc: {nvcc}")
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    ok = True
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=len(args.arch)) as ex:
        results = dict(zip(args.arch, ex.map(lambda a: compile_arch(nvcc, a, tmp), args.arch)))
    table = []
    for arch, (rc, log, secs, ptx) in results.items():
        if rc != 0:
            print(f"sm_{arch}: nvcc FAILED (rc={rc}) after {secs:.1f} s\n{log}")
            ok = False
            continue
        if not ptx:
            print(f"sm_{arch}: no PTX kept by nvcc --keep")
            ok = False
        elif bad := contractible_ops(ptx):
            print(f"sm_{arch}: FAIL: contractible float ops in the PTX (FMA contraction possible): {bad}")
            ok = False
        rows = parse(log)
        if not rows:
            print(f"sm_{arch}: no kernels found in the ptxas output\n{log}")
            ok = False
        names = demangle([r["name"] for r in rows])
        for r in rows:
            table.append((arch, short(names[r["name"]]), r))
        print(f"sm_{arch}: compiled in {secs:.1f} s, {len(rows)} kernels")
    print(f"\n{'arch':<7}{'kernel':<42}{'regs':>5}{'stack':>7}{'spill st':>10}{'spill ld':>10}{'smem':>6}")
    spills = []
    for arch, name, r in sorted(table, key=lambda x: (x[1], x[0])):
        flag = ""
        if r["spill_st"] or r["spill_ld"]:
            spills.append(f"sm_{arch} {name}")
            flag = "  <-- SPILLS"
        print(
            f"sm_{arch:<4}{name:<42}{r['regs']:>5}{r['stack']:>7}{r['spill_st']:>10}{r['spill_ld']:>10}{r['smem']:>6}{flag}"
        )
    print(f"\ntotal {time.time() - t0:.1f} s")
    if spills and not args.allow_spills:
        print(f"FAIL: {len(spills)} kernel(s) spill registers: {', '.join(spills)}")
        ok = False
    if ok:
        print(
            "OK: every kernel compiled for " + ", ".join(f"sm_{a}" for a in args.arch)
            + " without spills, and no float op in the PTX can be contracted into an FMA"
        )  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
