"""`mixpo bench`: roofline floors of the kernels and the GPU compile check.

    mixpo bench roofline [--shapes llama3 qwen25 gemma2] [--tokens 2048 ... 32768]
                         [--prompt-share 0 0.25 0.5] [--pairs-per-batch B ...] [--dtype bf16]
                         [--devices a100 h100] [-o benchmarks/results/roofline.json]
    mixpo bench compile [--arch 80 90] [--kernel NAME ...] [--json PATH]

Registration builds argparse parsers only; the handlers import what they run.
"""
from __future__ import annotations

import argparse

DEFAULT_ROOFLINE_OUTPUT = "benchmarks/results/roofline.json"


def register(subparsers) -> None:
    """Add the `bench` command group (roofline, compile) to the top-level subparsers."""
    bench = subparsers.add_parser(
        "bench", help="roofline floors and GPU compile check of the kernels",
        description="Benchmarks that need no GPU: the roofline model of every kernel and the "
                    "sm_80/sm_90 compile check of every launch configuration.")
    commands = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    commands.required = True

    roofline = commands.add_parser(
        "roofline", help="FLOPs, HBM bytes and floor time of each kernel on A100/H100",
        description="For each model shape, token count and prompt share: every kernel's "
                    "matmul FLOPs, vector and SFU operations, HBM bytes and floor time "
                    "max(work / peak, bytes / bandwidth) per device, as JSON and a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    roofline.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                          help="model shapes by name (mixpo.roofline.SHAPES; default: all)")
    roofline.add_argument("--tokens", nargs="+", type=int, default=None, metavar="N",
                          help="tokens per batch, prompt and padding included (default: "
                               "2048 4096 8192 16384 32768)")
    roofline.add_argument("--prompt-share", nargs="+", type=float, default=None,
                          metavar="SHARE", help="share of tokens without a label, in [0, 1) "
                                                "(default: 0 0.25 0.5)")
    roofline.add_argument("--pairs-per-batch", nargs="+", type=int, default=None,
                          metavar="B", help="pairs per batch: one value, or one per --tokens "
                                            "value (default: tokens / (2 x --seq-len))")
    roofline.add_argument("--seq-len", type=int, default=1024,
                          help="positions per sequence when pairs per batch are derived")
    roofline.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                          help="dtype of logits, hidden states and weight")
    roofline.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                          help="device peaks by name (mixpo.roofline.DEVICES; default: all)")
    roofline.add_argument("--kept-tile-fraction", type=float, default=1.0,
                          help="share of the logit-free backward's tiles that pass its "
                               "softmax-mass filter (filter_eps) and run the dHidden/dWeight "
                               "products (1 = none skipped, a random-weight head)")
    roofline.add_argument("-o", "--output", default=DEFAULT_ROOFLINE_OUTPUT,
                          help="JSON output path")
    roofline.set_defaults(func=run_roofline)

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
    compile_parser.set_defaults(func=run_compile)


def run_roofline(args) -> int:
    """Handler of `mixpo bench roofline`: writes the JSON report and prints the table."""
    import pathlib

    from mixpo import roofline, roofline_report

    report = roofline_report.build_report(
        shapes=tuple(args.shapes or roofline.SHAPES),
        tokens=tuple(args.tokens or roofline.DEFAULT_TOKENS),
        prompt_shares=tuple(roofline.DEFAULT_PROMPT_SHARES if args.prompt_share is None
                            else args.prompt_share),
        pairs_per_batch=args.pairs_per_batch, dtype=args.dtype,
        devices=tuple(args.devices or roofline.DEVICES), seq_len=args.seq_len,
        kept_tile_fraction=args.kept_tile_fraction)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(roofline_report.report_json(report))
    print(roofline_report.format_table(report))
    print(f"\nwrote {output}")
    return 0


def run_compile(args) -> int:
    """Handler of `mixpo bench compile`: mixpo.kernels.compile_check, with TRITON_INTERPRET
    removed (kernels must load as JIT functions): in a subprocess when it is set."""
    import os
    import subprocess
    import sys

    argv = ["--arch", *map(str, args.arch)]
    if args.kernel:
        known = _registered_kernels()
        unknown = sorted(set(args.kernel) - known)
        if unknown:
            raise ValueError(f"--kernel: unknown kernel(s) {unknown}; registered: "
                             f"{sorted(known)}")
        argv += ["--kernel", *args.kernel]
    if args.json:
        argv += ["--json", args.json]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        environment = {key: value for key, value in os.environ.items()
                       if key != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "mixpo.kernels.compile_check", *argv],
                              env=environment).returncode
    from mixpo.kernels import compile_check

    return compile_check.main(argv)


def _registered_kernels() -> set:
    """Names in mixpo.kernels.configs.KERNELS after importing every module of
    mixpo.kernels (kernel modules may register their own specs when imported)."""
    import importlib
    import pkgutil

    import mixpo.kernels
    from mixpo.kernels import configs

    for module in pkgutil.iter_modules(mixpo.kernels.__path__):
        if module.name != "compile_check":
            importlib.import_module(f"mixpo.kernels.{module.name}")
    return set(configs.KERNELS)
