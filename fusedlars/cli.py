"""Command line: ``fusedlars info | presets``."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fusedlars", description="fused LARS / TVLARS / LAMB for PyTorch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="versions and which backends are live (and why not)")
    p_info.add_argument("--json", action="store_true")
    sub.add_parser("presets", help="list the presets, one line each")
    args = ap.parse_args(argv)
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
