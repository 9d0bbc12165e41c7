"""Compile every Triton kernel specialization of fusedlars ahead of time, without a GPU.

For each kernel x param dtype x constexpr combination the backend can launch
(``fusedlars._testing.aot_specializations``) and each target (sm_80, sm_90, sm_100),
``triton.compile`` produces PTX and a cubin (Triton's bundled ptxas); the cubin's resource
usage (registers, spilled local memory, stack, static shared memory) is read with Triton's
bundled ``cuobjdump``, and the atomic instructions of the PTX are listed (launch 1's kernels:
the int32 arrival counter of the segment reduction; no float atomics). Prints a table;
``--json`` prints JSON lines instead (with ``barrier_before_atomics`` and ``cg_loads``).

    python bench/triton_aot_report.py [--covering] [--json] [--targets 80,90,100] [-j 2]

TRITON_INTERPRET must not be in effect for the compile: when it is set, the script
re-runs itself in a subprocess with the variable removed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _work(args):
    idx, arch, covering = args
    from fusedlars import _testing as tb

    spec = tb.aot_specializations(covering)[idx]
    try:
        return tb.aot_compile(spec, arch)
    except Exception as e:  # reported, counted as a failure
        return dict(kernel=spec["name"], dtype=str(spec["dtype"]), arch=arch, error=f"{type(e).__name__}: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--covering", action="store_true", help="a covering subset instead of every specialization")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ap.add_argument("--targets", default="80,90,100")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences a warning)
    sys.path.insert(0, str(ROOT))
    from fusedlars import _testing as tb

    n = len(tb.aot_specializations(a.covering))
    jobs = [(i, int(t), a.covering) for t in a.targets.split(",") for i in range(n)]
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs) as ex:
            rows = list(ex.map(_work, jobs))
    else:
        rows = [_work(j) for j in jobs]
    bad = [r for r in rows if "error" in r or r.get("spill_bytes", 0) or r.get("stack", 0)]
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    hdr = (
        f"{'kernel':22} {'dtype':9} {'constexprs':28} {'sm':>4} {'regs':>5} {'spill B':>8} {'stack':>6} "
        f"{'shared B':>9}  atomics"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:22} {r['dtype']:9} {'':28} {r['arch']:>4} ERROR {r['error']}")
            continue
        cx = ",".join(f"{k}={int(v)}" for k, v in r["constexprs"].items())
        shared = max(r["triton_shared"], r["static_shared"])
        print(
            f"{r['kernel']:22} {r['dtype']:9} {cx:28} {r['arch']:>4} {r['regs']:>5} {r['spill_bytes']:>8} "
            f"{r['stack']:>6} {shared:>9}  {' '.join(r['atomics']) or '-'}"
        )
    ok = [r for r in rows if "error" not in r]
    print(
        f"\n{len(rows)} compiles ({n} specializations x {len(a.targets.split(','))} targets), "
        f"{len(rows) - len(ok)} failed, {len(bad)} with spills/stack or errors; "
        f"max registers {max((r['regs'] for r in ok), default=0)}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
