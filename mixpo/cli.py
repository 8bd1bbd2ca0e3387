"""`mixpo` command line: demo | train | plan | data | bench.

Each command group lives beside the code it drives and exposes `register(subparsers)`, which
only builds argparse parsers (cheap) and sets `func`, a handler that imports the heavy modules
when the command actually runs. User errors (bad files, bad options) are reported as one line
on stderr with exit code 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# benchmarks/ of a source checkout (the roofline model lives there, not in the package).
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run_compile(args) -> int:
    """`mixpo bench compile`: mixpo.kernels.compile_check, with TRITON_INTERPRET removed
    (the kernels must load as JIT functions, so it runs in a subprocess when it is set)."""
    import os
    import subprocess

    from mixpo.kernels import configs

    argv = ["--arch", *map(str, args.arch)]
    if args.kernel:
        unknown = sorted(set(args.kernel) - set(configs.KERNELS))
        if unknown:
            raise ValueError(f"--kernel: unknown kernel(s) {unknown}; registered: "
                             f"{sorted(configs.KERNELS)}")
        argv += ["--kernel", *args.kernel]
    if args.json:
        argv += ["--json", args.json]
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "mixpo.kernels.compile_check", *argv],
                          env=environment).returncode


def _run_roofline(args) -> int:
    """`mixpo bench roofline ...`: benchmarks/roofline_report.py of the source checkout."""
    import subprocess

    script = BENCHMARKS / "roofline_report.py"
    if not script.is_file():
        raise ValueError("the roofline model lives in benchmarks/ of a source checkout: run "
                         "`python benchmarks/roofline_report.py` there")
    return subprocess.run([sys.executable, str(script), *args.roofline_args]).returncode


def _register_bench(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="GPU compile check of the kernels; roofline floors (source checkout)",
        description="Checks that need no GPU: compile every launch configuration of every "
                    "kernel for sm_80/sm_90, and the roofline model of the kernels.")
    commands = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    commands.required = True
    compile_parser = commands.add_parser(
        "compile", help="compile every kernel configuration for sm_80/sm_90 (no GPU needed)",
        description="Runs mixpo.kernels.compile_check: Triton's GPU pipeline on the CPU for "
                    "every launch configuration in mixpo.kernels.configs, with shared "
                    "memory, registers and spills. Exit code 1 if any fails.")
    compile_parser.add_argument("--arch", nargs="+", type=int, default=[80, 90],
                                help="compute capabilities to target")
    compile_parser.add_argument("--kernel", nargs="+", default=None, metavar="NAME",
                                help="only these kernels (names in mixpo.kernels.configs)")
    compile_parser.add_argument("--json", default=None, metavar="PATH",
                                help="write the per-variant records here")
    compile_parser.set_defaults(func=_run_compile)
    roofline = commands.add_parser(
        "roofline", add_help=False, prefix_chars="\0",  # every argument goes to the script
        help="FLOPs, HBM bytes and floor time of each kernel (benchmarks/roofline_report.py)")
    roofline.add_argument("roofline_args", nargs=argparse.REMAINDER)
    roofline.set_defaults(func=_run_roofline)


def build_parser() -> argparse.ArgumentParser:
    from mixpo import __version__
    from mixpo.data import cli as data_cli
    from mixpo.scoring import cli as scoring_cli
    from mixpo.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="mixpo",
        description="Difficulty-aware preference optimization with fused Triton kernels.")
    parser.add_argument("--version", action="version", version=f"mixpo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    train_cli.register(subparsers)                       # train, demo, export, plan
    scoring_cli.register(data_cli.register(subparsers))  # data pairs|prepare|inspect|score-*
    _register_bench(subparsers)                          # bench compile|roofline
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"mixpo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except TimeoutError as error:        # a collective timed out (mixpo.train.distributed)
        print(f"mixpo {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:             # a full disk, a read-only directory: the OS's words
        where = f"{error.filename}: " if error.filename else ""
        print(f"mixpo {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:   # Ctrl-C: outputs are atomic, nothing half-written
        print(f"mixpo {args.command}: {str(error) or 'interrupted; nothing was written'}",
              file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
