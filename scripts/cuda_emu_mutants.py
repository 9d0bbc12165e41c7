"""Mutation check of the CUDA-on-CPU emulation job: does it catch real kernel bugs?

Each mutant plants one bug in csrc/cuda/fused_kernels.cu (the classes a GPU kernel of this shape gets
wrong: reductions, barriers, vector access, tile ranges, launch configuration, skips), builds it under
the emulation (tests/cuda_emu.py with FUSEDLARS_EMU_SOURCE) and runs the emulated CUDA tests on it.
A mutant is *killed* when the tests fail (a wrong number, an emulation error, or a UBSan abort);
every mutant must be killed. The unmutated source must pass first, or the check means nothing.

    python scripts/cuda_emu_mutants.py            # all mutants, 2 at a time
    python scripts/cuda_emu_mutants.py -k barrier,tile   # those whose name contains "barrier" or "tile"

Exit status 0 when every mutant was killed (and the original passed), 1 otherwise. A mutant whose
text no longer occurs exactly once in the source is an error of this script (the list is stale).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "fused_kernels.cu"
# the shared suite's cuda cases (-k cuda keeps every test of the test_cuda_* files: their module names match)
TESTS = ["tests/test_cuda_emulated.py", "tests/test_cuda_backend.py", "tests/test_fused_backends.py", "-k", "cuda"]

# (name, text, replacement, which occurrence (0-based) when the text occurs more than once)
MUTANTS: list[tuple[str, str, str, int]] = [
    # the classic CUDA bug classes: warp-shuffle offsets, missing barriers, vector overruns, skipped tiles
    (
        "warp tree starts at offset 8",
        "for (int off = 16; off > 0; off >>= 1)",
        "for (int off = 8; off > 0; off >>= 1)",
        0,
    ),
    (
        "no trailing __syncthreads before shared memory is reused",
        "  __syncthreads();  // sh is reused by the next call\n",
        "\n",
        0,
    ),
    ("vector loop overruns the tile", "const int nv = len / VEC;", "const int nv = (len + VEC - 1) / VEC;", 0),
    (
        "a tile of each block's range skipped (phase 1, both kinds)",
        "for (int64_t t = r.a; t < r.b; ++t) {",
        "for (int64_t t = r.a + 1; t < r.b; ++t) {",
        0,
    ),
    ("no grid barrier (both kinds)", "    if (phase == 0) grid_barrier();\n", "\n", 0),
    ("grid barrier replaced by __syncthreads", "  cg::this_grid().sync();", "  __syncthreads();", 0),
    ("vector lanes rotated", "x[k * E + j] = Cvt<T>::in(e[j]);", "x[k * E + j] = Cvt<T>::in(e[(j + 1) % E]);", 0),
    ("reads has_state that the same launch updates", "p.snap[2 * s + 1] != 0.f", "a.s.has_state[s] != 0.f", 0),
    (
        "no first __syncthreads in the block sum",
        "  __syncthreads();\n#pragma unroll\n  for (int k = 0; k < N; ++k) {",
        "\n#pragma unroll\n  for (int k = 0; k < N; ++k) {",
        0,
    ),
    ("128-bit-safe flag ignored", "if (vec && (st % VEC) == 0)", "if ((st % VEC) == 0)", 0),
    ("wrong vector chunk index", "reinterpret_cast<const uint4*>(p)[k]", "reinterpret_cast<const uint4*>(p)[0]", 0),
    # and a few more
    (
        "a tile of each block's range skipped (phase 2, both kinds)",
        "for (int64_t t = r.a; t < r.b; ++t) {",
        "for (int64_t t = r.a + 1; t < r.b; ++t) {",
        1,
    ),
    (
        "scalar tail writes one element past the tile",
        "i < len; i += kThreads) f.template run<1, false>",
        "i <= len; i += kThreads) f.template run<1, false>",
        0,
    ),
    ("segment reduction skips partials", "t < t1; t += kThreads) {", "t < t1; t += 2 * kThreads) {", 0),
    (
        "GradScaler skip ignored (both kinds)",
        "  if (a.found_inf.ptr && read(a.found_inf) != 0.0) return;  // GradScaler skip: nothing changes\n",
        "\n",
        0,
    ),
    (
        "global grad norm sums inactive tiles",
        "if (active[p.tile_seg[t]] != 0.f) x[0] += gpart[t];",
        "x[0] += gpart[t];",
        0,
    ),
    ("master weights not written back", "    if constexpr (MASTER) vstore<M, V>(m + i, w);\n", "\n", 0),
    (
        "LAMB pass 2 bias correction with the old step",
        "const double t_new = static_cast<double>(p.snap[2 * s]) + 1.0;",
        "const double t_new = static_cast<double>(p.snap[2 * s]);",
        0,
    ),
    (
        "cooperative grid not capped at the resident blocks",
        "const int64_t g = T < resident ? (T > 0 ? T : 1) : resident;",
        "const int64_t g = T > 0 ? T : 1;",
        0,
    ),
    # the address table (issue #14): per-segment bases at any offset, inactive segments, the FSDP2 split
    (
        "128-bit access decided from the param base alone",
        "vec = ((bp | bg | bm | b0 | b1) & 15) == 0;",
        "vec = (bp & 15) == 0;",
        0,
    ),
    (
        "inactive segment not skipped (phase 1, both kinds)",
        "if (a.s.active[s] == 0.f) continue;  // NOTE [Inactive segments]",
        "",
        0,
    ),
    (
        "segment's pointers from the wrong segment",
        "return row < b.rows ? b.base[row * b.num_segs + s] : 0;",
        "return row < b.rows ? b.base[row * b.num_segs + (s > 0 ? s - 1 : s)] : 0;",
        0,
    ),
    ("apply recomputes the sums from the partials", "  if (p.ssq_in) {", "  if (false) {", 0),
    (
        "split sums of inactive segments not zero",
        "if (!skip && active[s] != 0.f) segment_sums(p, s, x);",
        "if (!skip) segment_sums(p, s, x);",
        0,
    ),
    ("LAMB partial rows swapped", "  x[1] = f.su;\n  x[2] = f.sg;", "  x[1] = f.sg;\n  x[2] = f.su;", 0),
]


def mutate(src: str, text: str, repl: str, occurrence: int) -> str:
    parts = src.split(text)
    if len(parts) - 1 <= occurrence:
        raise SystemExit(f"mutant text not found (occurrence {occurrence}): {text!r}: the mutant list is stale")
    return text.join(parts[: occurrence + 1]) + repl + text.join(parts[occurrence + 1 :])


def run_tests(source: Path | None, build_dir: Path, timeout: int) -> tuple[int, str, float]:
    env = dict(os.environ, FUSEDLARS_EMU_BUILD_DIR=str(build_dir), PYTHONFAULTHANDLER="1")
    env.pop("FUSEDLARS_EMU_SOURCE", None)
    if source is not None:
        env["FUSEDLARS_EMU_SOURCE"] = str(source)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *TESTS]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = (r.stdout + r.stderr).strip().splitlines()
        return r.returncode, out[-1] if out else "", time.time() - t0
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s (a hang counts as caught)", time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutants whose name contains one of these (comma-separated)")
    ap.add_argument("-j", type=int, default=2, help="mutants at a time (default 2)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    ap.add_argument("--skip-original", action="store_true", help="do not run the unmutated source first")
    args = ap.parse_args()
    src = SOURCE.read_text()
    keys = [k.strip() for k in args.k.split(",")]
    chosen = [m for m in MUTANTS if any(k in m[0] for k in keys)]
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="fusedlars-mutants-") as tmp:
        tmpd = Path(tmp)
        if not args.skip_original:
            rc, last, dt = run_tests(None, tmpd / "build", args.timeout)
            print(f"original source: {'passes' if rc == 0 else 'FAILS'} ({dt:.0f} s): {last}", flush=True)
            if rc != 0:
                return 1
        files = []
        for i, (_name, text, repl, occ) in enumerate(chosen):
            f = tmpd / f"mutant_{i:02d}.cu"
            f.write_text(mutate(src, text, repl, occ))
            files.append(f)

        def one(i):
            return run_tests(files[i], tmpd / "build", args.timeout)

        with ThreadPoolExecutor(max_workers=max(1, args.j)) as ex:
            results = list(ex.map(one, range(len(chosen))))
    survived = 0
    width = max(len(m[0]) for m in chosen)
    for (name, *_), (rc, last, dt) in zip(chosen, results):
        killed = rc != 0
        survived += not killed
        print(f"{'caught  ' if killed else 'MISSED  '} {name:<{width}}  {dt:5.0f} s  {last[:110]}")
    print(f"{len(chosen) - survived} of {len(chosen)} mutants caught in {time.time() - t_all:.0f} s")
    return 0 if survived == 0 and chosen else 1


if __name__ == "__main__":
    sys.exit(main())
