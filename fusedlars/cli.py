"""Command line: ``fusedlars info | presets | bench | selftest | demo | reproduce | plot``."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fusedlars", description="fused LARS / TVLARS / LAMB for PyTorch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="versions and which backends are live (and why not)")
    p_info.add_argument(
        "--json", action="store_true", help="print the same as JSON (versions, build, each backend's status and why)"
    )
    sub.add_parser("presets", help="list the presets, one line each")
    from .tools import bench as _bench

    p_bench = sub.add_parser(
        "bench",
        help="time fusedlars against unfused references (default: ResNet-50 shapes, LARS, fp32)",
        description="Time one optimizer step of fusedlars and of unfused references, interleaved, "
        "with an in-run memory-bandwidth probe; every comparison is a ratio within this run.",
    )
    _bench.add_arguments(p_bench)
    from .tools import demo as _demo
    from .tools import plot as _plot

    _demo.add_arguments(
        sub.add_parser(
            "demo", help="train a small CNN on sklearn digits at batch 512 with SGD, LARS, TVLARS, LAMB (CPU, minutes)"
        )
    )
    from .tools import reproduce as _reproduce

    _reproduce.add_arguments(
        sub.add_parser(
            "reproduce",
            help="the TVLARS paper in miniature: LARS, TVLARS (2 forms), LAMB, Nesterov SGD over batch sizes, "
            "tuned on validation (CPU, ~15 min; --quick: a few)",
        )
    )
    _plot.add_arguments(sub.add_parser("plot", help="plot a StatsLogger CSV: one line per layer over steps"))
    from . import selftest as _selftest

    _selftest.add_arguments(
        sub.add_parser(
            "selftest",
            help="every live backend against the float64 reference; exit 1 on any FAIL",
            description="Run every live backend (LARS, TVLARS, LAMB, LAMB with max_grad_norm; fp32 and bf16 with "
            "master weights) for a few steps on odd shapes and compare it with the float64 reference. "
            "Exit status 0 only when nothing fails.",
        )
    )
    args = ap.parse_args(argv)
    if args.cmd == "selftest":
        return _selftest.main(args)
    if args.cmd == "demo":
        return _demo.main(args)
    if args.cmd == "reproduce":
        return _reproduce.main(args)
    if args.cmd == "plot":
        return _plot.main(args)
    if args.cmd == "bench":
        return _bench.main(args)
    if args.cmd == "info":
        from .info import format_info, info

        print(json.dumps(info(), indent=2) if args.json else format_info())
        return 0
    if args.cmd == "presets":
        from .optim.options import presets

        for kind, table in presets().items():
            print(kind)
            for name, line in table.items():
                print(f"  {name:<18} {line}")
        return 0
    return 2
