"""Where the logit-free loss's time goes: torch.profiler over one forward+backward of an
implementation of `harness.LINEAR_LOSSES` (bench_linear.py's inputs), ops grouped into the
[n x V x H] GEMMs (mm, addmm, addmm_) and the rest. On a CPU it shows why two passes cannot
reach a one-pass peer's time: they run four GEMMs where one pass and CCE run three.

    python benchmarks/profile_linear.py --json benchmarks/results/profile_linear_cpu.json
    python benchmarks/profile_linear.py --impl mixpo --passes 1
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

import harness

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")


def profile_step(step, repeats: int = 1) -> tuple:
    """({aten op: (self seconds, GEMM FLOPs)}, wall seconds) of the fastest of `repeats`
    profiled calls of `step`, after a warm-up call (the shared CPU's speed drifts); the FLOPs
    from the recorded input shapes (the profiler's own counter skips addmm_). Compiled code
    (CCE's torch_compile) runs its fused kernels outside aten: they are in the wall time
    only."""
    step()
    fastest = None
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            started = time.perf_counter()
            step()
            wall = time.perf_counter() - started
        if fastest is None or wall < fastest[1]:
            fastest = prof, wall
    prof, wall = fastest
    ops = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if not event.key.startswith("aten::") or event.self_cpu_time_total <= 0:
            continue
        seconds, flops = ops.get(event.key, (0.0, 0))
        ops[event.key] = (seconds + event.self_cpu_time_total / 1e6,
                          flops + event.count * _gemm_flops(event.key, event.input_shapes))
    return ops, wall


def _gemm_flops(name: str, shapes) -> int:
    """2 m k n of a matrix product from its inputs' shapes: mm (a, b), addmm / addmm_ (c, a,
    b); 0 for anything else."""
    if name not in GEMM_OPS:
        return 0
    a, b = shapes[:2] if name == "aten::mm" else shapes[1:3]
    if len(a) != 2 or len(b) != 2:
        return 0
    return 2 * a[0] * a[1] * b[1]


# The cases run without --impl: mixpo's defaults (two passes here), mixpo in one pass, CCE.
DEFAULT_CASES = (("mixpo", None), ("mixpo", 1), ("cce", None))


def case_options(impl: str, passes, args) -> dict:
    """The loss options of one case, as bench_linear.py builds them for this device; one
    pass with a workspace of one pair's fp32 logits."""
    options = harness.device_options(impl, "cuda" if torch.cuda.is_available() else "cpu")
    if impl == "liger":
        options["compiled"] = torch.cuda.is_available()
    if impl == "mixpo" and passes:
        options["passes"] = passes
        if passes == 1:
            options["workspace_bytes"] = harness.one_pair_workspace(args.seq_len, args.prompt,
                                                                    args.vocab)
    return options


def profile_case(impl: str, passes, args) -> dict:
    options = case_options(impl, passes, args)
    inputs = harness.linear_inputs(args.rows, args.seq_len, args.prompt, args.hidden_size,
                                   args.vocab, torch.float32, 0.0)
    ops, wall = profile_step(harness.linear_step(harness.linear_loss(impl, **options),
                                                 inputs, backward=True), args.repeats)
    gemm = sum(seconds for name, (seconds, _) in ops.items() if name in GEMM_OPS)
    gemm_flops = sum(flops for name, (_, flops) in ops.items() if name in GEMM_OPS)
    completion = args.rows * (args.seq_len - args.prompt)
    row = {"implementation": impl, "options": options,
           "op_seconds": {name: seconds for name, (seconds, _) in
                          sorted(ops.items(), key=lambda item: -item[1][0])},
           "wall_seconds": wall, "gemm_seconds": gemm, "other_seconds": wall - gemm,
           # The GEMMs' FLOPs in units of one [n x V x H] product (2nVH): 3 for one pass
           # and for CCE (logits, dHidden, dWeight), 4 for two passes (+ the recompute).
           "gemm_flops_over_2nvh": gemm_flops / (2 * completion * args.vocab
                                                * args.hidden_size)}
    print(f"{impl} {options}: {wall:.2f} s, GEMMs {gemm:.2f} s ({gemm / wall:.0%}; "
          f"{row['gemm_flops_over_2nvh']:.2f} x 2nVH FLOPs), the rest {wall - gemm:.2f} s",
          flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default=None, choices=sorted(harness.LINEAR_LOSSES),
                        help="one implementation (default: mixpo, mixpo in one pass, CCE)")
    parser.add_argument("--passes", type=int, choices=(1, 2), default=None,
                        help="mixpo only: force one or two passes (one: a workspace of one "
                             "pair's fp32 logits)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=3, help="profiled calls; the fastest "
                        "is reported")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    cases = [(args.impl, args.passes)] if args.impl else DEFAULT_CASES
    rows = [profile_case(impl, passes, args) for impl, passes in cases]
    if args.json:
        harness.write_json(args.json, {
            "benchmark": "profile_linear",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": harness.device_name(),
            "versions": harness.versions(("torch", "cut-cross-entropy")),
            "repeats": args.repeats,
            "shape": {"completion_tokens": args.rows * (args.seq_len - args.prompt),
                      "hidden_size": args.hidden_size, "vocab": args.vocab,
                      "dtype": "float32"},
            "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
