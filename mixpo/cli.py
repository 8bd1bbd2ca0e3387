"""`mixpo` command line: demo | train | data | bench | plan.

Each command group lives beside the code it drives and exposes `register(subparsers)`, which
only builds argparse parsers (cheap) and sets `func`, a handler that imports the heavy modules
when the command actually runs. User errors (bad files, bad options) are reported as one line
on stderr with exit code 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Command groups; each module defines `register(subparsers)`.
COMMAND_MODULES = (
    "mixpo.train.cli",   # demo, train, plan
    "mixpo.data.cli",    # data pairs | prepare | score-validation | score-reward | inspect
    "mixpo.bench",       # bench roofline | compile
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixpo",
        description="Difficulty-aware preference optimization with fused Triton kernels.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"mixpo {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
