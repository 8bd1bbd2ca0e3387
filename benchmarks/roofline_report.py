"""The roofline report: every kernel of the roofline model (`roofline.py` beside this file) on
every benchmark workload, as JSON rows (with date, versions and the device peaks used) and as a
readable table.

    python benchmarks/roofline_report.py [--shapes llama-3-8b qwen-2.5-7b gemma-2-9b]
        [--tokens 2048 ... 32768] [--prompt-share 0 0.25 0.5] [--pairs-per-batch B ...]
        [--dtype bf16] [--devices a100 h100] [-o/--json PATH]

prints the table and writes the JSON only where -o / --json says, so a run never changes the
checkout. The tracked benchmarks/results/roofline.json is the default grid:

    python benchmarks/roofline_report.py --json benchmarks/results/roofline.json

(`mixpo bench roofline ...` runs this script from a source checkout.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from roofline import (ASSUMPTIONS, DEFAULT_PROMPT_SHARES, DEFAULT_SEQ_LEN,  # noqa: E402
                      DEFAULT_SHAPES, DEFAULT_TOKENS, DEVICES, GEMM_EFFICIENCY, KERNEL_MODELS,
                      SHAPES, ULTRAFEEDBACK_MEANS, KernelCost, Workload, device_peaks,
                      make_workload, matmul_flop_floor_fwd_bwd, predictions,
                      prefix_sharing_body)

from harness import versions  # noqa: E402
from mixpo.train.plan import SHAPE_ALIASES, canonical_shape_name  # noqa: E402


def cost_row(cost: KernelCost, workload: Workload, devices: dict) -> dict:
    """One JSON row: a kernel on a workload, its counts and its floor on each device."""
    floor = matmul_flop_floor_fwd_bwd(workload).matmul_flops
    return {
        "shape": workload.shape.name, "hidden_size": workload.shape.hidden_size,
        "vocab_size": workload.shape.vocab_size, "tokens": workload.tokens,
        "prompt_share": round(workload.prompt_share, 6),
        "completion_tokens": workload.completion_tokens, "pairs": workload.pairs,
        "dtype": workload.dtype, "kernel": cost.kernel, "role": cost.role,
        "matmul_flops": cost.matmul_flops, "vector_ops": cost.vector_ops,
        "special_ops": cost.special_ops, "bytes": cost.total_bytes,
        "l2_bytes": cost.total_l2_bytes, "engine": cost.engine,
        "matmul_flops_over_6nvh": cost.matmul_flops / floor if cost.matmul_flops else 0.0,
        "floor_seconds": {key: cost.floor_seconds(peaks, workload.dtype)
                          for key, peaks in devices.items()},
        "predicted_seconds": {key: cost.predict_seconds(peaks, workload.dtype)
                              for key, peaks in devices.items()},
        "bound": {key: cost.bound(peaks, workload.dtype) for key, peaks in devices.items()},
        # A total lists its parts (their rows itemize the bytes) instead of repeating them.
        **({"parts": [part.kernel for part in cost.parts]} if cost.parts
           else {"bytes_moved": dict(cost.bytes_moved), "l2_bytes_moved": dict(cost.l2_bytes)}),
    }


# The headline problem: Llama-3-8B's head, 16k tokens of which 25 % prompt, bf16.
PREDICTION_WORKLOAD = ("llama-3-8b", 16384, 0.25)


def workloads(shapes, tokens, prompt_shares, pairs_per_batch=None, dtype="bf16",
              seq_len=DEFAULT_SEQ_LEN, kept_tile_fraction=1.0, workspace_bytes=None,
              vocab_sorted=False) -> list:
    """Every (shape, tokens, prompt share) Workload. pairs_per_batch: None (derived from
    seq_len), one value for all token counts, or one value per token count."""
    if pairs_per_batch is not None and len(pairs_per_batch) not in (1, len(tokens)):
        raise ValueError(f"--pairs-per-batch takes one value or one per --tokens value "
                         f"({len(tokens)}), got {len(pairs_per_batch)}")
    result = []
    for shape in shapes:
        for index, count in enumerate(tokens):
            pairs = None if pairs_per_batch is None else \
                pairs_per_batch[index if len(pairs_per_batch) > 1 else 0]
            for share in prompt_shares:
                result.append(make_workload(shape, count, share, pairs, dtype, seq_len,
                                            kept_tile_fraction, workspace_bytes,
                                            vocab_sorted))
    return result


def build_report(shapes=DEFAULT_SHAPES, tokens=DEFAULT_TOKENS,
                 prompt_shares=DEFAULT_PROMPT_SHARES, pairs_per_batch=None, dtype="bf16",
                 devices=tuple(DEVICES), seq_len=DEFAULT_SEQ_LEN,
                 kept_tile_fraction=1.0, workspace_bytes=None, vocab_sorted=False) -> dict:
    """The roofline report as a JSON-ready dict: metadata, device peaks, shapes, rows."""
    peaks = {name: device_peaks(name) for name in devices}
    shapes = tuple(canonical_shape_name(name) for name in shapes)
    for name in shapes:
        if name not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {name!r}")
    problems = workloads(shapes, tokens, prompt_shares, pairs_per_batch, dtype, seq_len,
                         kept_tile_fraction, workspace_bytes, vocab_sorted)
    if not problems:
        raise ValueError("shapes, tokens and prompt_shares must each name at least one value")
    rows = [cost_row(model(workload), workload, peaks)
            for workload in problems for model in KERNEL_MODELS.values()]
    example = problems[0]
    headline = make_workload(*PREDICTION_WORKLOAD, seq_len=seq_len,
                             workspace_bytes=workspace_bytes)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "dtype": dtype, "seq_len_for_derived_pairs": seq_len,
        "kept_tile_fraction": kept_tile_fraction, "vocab_sorted": vocab_sorted,
        "devices": {name: device.as_dict() for name, device in peaks.items()},
        "shapes": {name: {"name": SHAPES[name].name, "hidden_size": SHAPES[name].hidden_size,
                          "vocab_size": SHAPES[name].vocab_size} for name in shapes},
        "units": {"matmul_flops": "FLOP", "vector_ops": "instructions",
                  "special_ops": "SFU results", "bytes": "bytes", "floor_seconds": "seconds"},
        "assumptions": list(ASSUMPTIONS),
        "gemm_efficiency": dict(GEMM_EFFICIENCY),
        "workspace_bytes": headline.workspace_bytes,
        "predictions": {"workload": {"shape": headline.shape.name, "tokens": headline.tokens,
                                     "prompt_share": headline.prompt_share,
                                     "completion_tokens": headline.completion_tokens,
                                     "dtype": headline.dtype},
                        "rows": predictions(headline, tuple(devices))},
        "kernel_notes": {name: model(example).note for name, model in KERNEL_MODELS.items()
                         if model(example).note},
        "prefix_sharing": {"ultrafeedback": prefix_sharing_body(**ULTRAFEEDBACK_MEANS),
                           "long_prompt_70pct": prefix_sharing_body(700.0, 300.0, 300.0)},
        "rows": rows,
    }


def report_json(report: dict) -> str:
    """The report as JSON text: metadata indented, one line per row (diff-friendly)."""
    head = json.dumps({key: value for key, value in report.items() if key != "rows"},
                      indent=1)
    rows = ",\n".join("  " + json.dumps(row) for row in report["rows"])
    return f'{head[:-2]},\n "rows": [\n{rows}\n ]\n}}\n'


def _engineering(value: float) -> str:
    """A count with a G/T suffix, 3 significant digits (0 as '-')."""
    if value == 0:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds >= 1e-5 else f"{seconds * 1e3:.1e}"


def format_table(report: dict) -> str:
    """The report's rows as a text table, one block per workload."""
    devices = list(report["devices"])
    header = f"{'kernel':<27} {'role':<7} {'matmul FLOP':>11} {'vector op':>9} " \
             f"{'SFU op':>8} {'bytes':>8} {'x6nVH':>6}" \
             + "".join(f" {name + ' ms':>10} {'bound':<7}" for name in devices)
    lines, workload_key = [], None
    for row in report["rows"]:
        key = (row["shape"], row["tokens"], row["prompt_share"], row["pairs"])
        if key != workload_key:
            workload_key = key
            lines += ["", f"{row['shape']} (H {row['hidden_size']}, V {row['vocab_size']}), "
                      f"{row['tokens']} tokens, {100 * row['prompt_share']:.0f} % prompt -> "
                      f"{row['completion_tokens']} completion tokens, {row['pairs']} pairs, "
                      f"{row['dtype']}", header, "-" * len(header)]
        ratio = f"{row['matmul_flops_over_6nvh']:.3f}" if row["matmul_flops"] else "-"
        lines.append(
            f"{row['kernel']:<27} {row['role']:<7} {_engineering(row['matmul_flops']):>11} "
            f"{_engineering(row['vector_ops']):>9} {_engineering(row['special_ops']):>8} "
            f"{_engineering(row['bytes']) + ('B' if row['bytes'] else ''):>8} {ratio:>6}"
            + "".join(f" {_milliseconds(row['floor_seconds'][name]):>10} "
                      f"{row['bound'][name]:<7}" for name in devices))
    peaks = "; ".join(
        f"{name}: {device['tensor_flops_16bit'] / 1e12:.0f} TFLOP/s 16-bit, "
        f"{device['fp32_flops'] / 1e12:.1f} TFLOP/s fp32, "
        f"{device['hbm_bytes_per_s'] / 1e12:.1f} TB/s" for name, device in
        report["devices"].items())
    head = report["predictions"]["workload"]
    predicted = ["", f"predicted fwd+bwd, {head['shape']}, {head['tokens']} tokens, "
                 f"{100 * head['prompt_share']:.0f} % prompt, {head['dtype']} (GEMM efficiency "
                 f"{report['gemm_efficiency']}, workspace {report['workspace_bytes'] / 2**20:.0f}"
                 f" MiB; a model, not a measurement)",
                 f"{'device':<7} {'design':<31} {'predicted ms':>12} {'FLOP floor':>23} "
                 f"{'x floor':>7} bound"]
    floor_names = {"matmul_flop_floor_8nvh": "8nVH", "matmul_flop_floor_fwd_bwd": "6nVH"}
    for row in report["predictions"]["rows"]:
        floor = f"{floor_names[row['flop_floor']]} {row['flop_floor_ms']:.1f} ms"
        predicted.append(f"{row['device']:<7} {row['design']:<31} {row['predicted_ms']:>12.1f} "
                         f"{floor:>23} {row['x_flop_floor']:>7.2f} {row['bound']}")
    sharing = ["", "prefix sharing, the model body per pair (the LM head is unchanged):"]
    for name, row in report.get("prefix_sharing", {}).items():
        lengths = row["lengths"]
        sharing.append(f"  {name}: prompt {lengths['prompt']:.0f}, completions "
                       f"{lengths['chosen']:.0f} / {lengths['rejected']:.0f} tokens -> "
                       f"{row['body_tokens_unshared']:.0f} -> {row['body_tokens_shared']:.0f} "
                       f"body tokens: linear-layer FLOPs -{100 * row['linear_flop_saving']:.1f} "
                       f"%, causal attention -{100 * row['attention_flop_saving']:.1f} %")
    return "\n".join([f"roofline floors ({peaks})", *lines, *predicted, *sharing])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="For each model shape, token count and prompt share: every kernel's matmul "
        "FLOPs, vector and SFU operations, HBM bytes and floor time max(work / peak, bytes / "
        "bandwidth) per device, as JSON and a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="SHAPE",
                        help=f"model shapes by name: {', '.join(SHAPES)} (mixpo.train.plan."
                        f"KNOWN_SHAPES; old names {', '.join(SHAPE_ALIASES)} still work)")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS),
                        metavar="N", help="tokens per batch, prompt and padding included")
    parser.add_argument("--prompt-share", nargs="+", type=float,
                        default=list(DEFAULT_PROMPT_SHARES), metavar="SHARE",
                        help="share of tokens without a label, in [0, 1)")
    parser.add_argument("--pairs-per-batch", nargs="+", type=int, default=None, metavar="B",
                        help="pairs per batch: one value, or one per --tokens value (default: "
                        "tokens / (2 x --seq-len))")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help="positions per sequence when pairs per batch are derived")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="dtype of logits, hidden states and weight")
    parser.add_argument("--devices", nargs="+", default=list(DEVICES), metavar="DEVICE",
                        help=f"device peaks by name: {', '.join(DEVICES)}")
    parser.add_argument("--kept-tile-fraction", type=float, default=1.0,
                        help="share of the atomic backward's tiles that CCE's gradient filter "
                        "keeps (filter_eps; 1 = none skipped, a random-weight head)")
    parser.add_argument("--vocab-sorted", action="store_true",
                        help="the atomic backward over CCE's sorted vocabulary (vocab_sorted)")
    parser.add_argument("--workspace-mib", type=int, default=None,
                        help="the logit-free head's workspace budget (default: mixpo's, "
                        "DEFAULT_WORKSPACE_BYTES)")
    parser.add_argument("-o", "--output", "--json", default=None, metavar="PATH",
                        help="write the JSON report here (default: only print the table; "
                        "the tracked one: --json benchmarks/results/roofline.json)")
    args = parser.parse_args(argv)
    for name in args.shapes:
        if name in SHAPE_ALIASES:
            print(f"note: shape {name!r} is now called {SHAPE_ALIASES[name]!r}")
    try:
        report = build_report(shapes=tuple(args.shapes), tokens=tuple(args.tokens),
                              prompt_shares=tuple(args.prompt_share),
                              pairs_per_batch=args.pairs_per_batch, dtype=args.dtype,
                              devices=tuple(args.devices), seq_len=args.seq_len,
                              kept_tile_fraction=args.kept_tile_fraction,
                              workspace_bytes=args.workspace_mib and args.workspace_mib * 2**20,
                              vocab_sorted=args.vocab_sorted)
    except ValueError as error:
        print(f"roofline: error: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.output:
        output = pathlib.Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report_json(report))
        print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
