"""Logit-free preference loss from hidden states: mixpo vs trl 1.16's fused LM head, Liger-Kernel
and Cut Cross-Entropy (and a materialised baseline). Time and peak memory, forward and
forward+backward.

Implementations (all compute the sigmoid DPO loss of B pairs from hidden [2B, T, H] and the
LM-head weight [V, H], prompt tokens labelled -100):
  trl_fused_head  trl 1.16's DPOTrainer head (`trl.kernels.chunked_logprob.
             ChunkedLogProbFunction`, what `add_fused_lm_head` runs): the completion
             positions compacted (as trl does on GPUs), the head projected in [4096, 32768]
             tiles, per-token log-probs plus the outputs DPOTrainer asks for (entropy, mean
             logits, top-1), summed per sequence, DPO loss.
  trl_fused_head_plain  the same with log-probs only.
  materialised  logits = hidden @ W^T materialised, fp32 log_softmax, gather, mask, sums.
  mixpo      mixpo.linear_preference_loss with its defaults: backend "triton" on a GPU, the
             torch twin (backend "torch") on a CPU, where the Triton interpreter is no speed
             path; passes="auto" and the 256 MiB workspace (two passes here: one pair's fp32
             logits need more).
  mixpo_one_pass  the same with passes=1 and a workspace that holds one pair's fp32 logits
             (forward and exact gradient in one pass, 6nVH instead of 8nVH).
  mixpo_metrics  the same with token_metrics=True (TRL's logits/entropy/accuracy metrics
             from the same pass): the like-for-like comparison with trl_fused_head.
  mixpo_softcap  Gemma-2's final softcap 30 applied in the kernels (their cost vs mixpo).
  liger      Liger-Kernel's LigerFusedLinearDPOLoss (chunk = one pair, full logits of every
             position). Its API takes no precomputed reference log-probs, only a reference
             model it re-runs; it runs with use_ref_model=False here (its cheapest setting, a
             reference-free loss). torch.compile'd on a GPU; eager on a CPU unless
             --liger-compiled (compiling takes minutes per shape on a CPU).
  cce        Cut Cross-Entropy's linear_cross_entropy(reduction="none") -> per-token losses,
             summed per sequence into log-probs, then the DPO loss; impl "cce" (Triton) on a
             GPU, "torch_compile" on a CPU.
Peers are optional: an implementation whose package is missing is recorded as skipped.

Each (implementation, shape) runs in its own subprocess so peak memory is not polluted by
earlier cases: on CUDA torch.cuda.max_memory_allocated, on CPU the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs); reported as the extra above the inputs.

    python benchmarks/bench_linear.py                          # default grid for this device
    python benchmarks/bench_linear.py --shapes llama3 --tokens 8192 16384 --impls mixpo cce
Writes benchmarks/results/linear_<cpu|cuda>.json and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import torch

import roofline  # beside this script (sys.path[0])
from harness import (BETA, MIB, PEAK_MEMORY_METHOD, PEER_PACKAGES, RESULTS, device_name,
                     device_options, first_call, linear_inputs, linear_loss, linear_step,
                     median_and_min_ms, one_pair_workspace, peak_extra_bytes, run_case,
                     serve_case, versions, wall_times, write_report)

IMPLEMENTATIONS = ("trl_fused_head", "trl_fused_head_plain", "materialised", "mixpo",
                   "mixpo_one_pass", "mixpo_metrics", "mixpo_softcap", "liger", "cce")
PEER_IMPLEMENTATIONS = ("trl_fused_head", "liger", "cce")      # the issue-19 goal's peers
BASELINE = "trl_fused_head"
# (hidden size, vocab size) of the models the shapes are named after.
SHAPES = {name: (shape.hidden_size, shape.vocab_size) for name, shape in roofline.SHAPES.items()}


# ----------------------------------------------------------------------------------------------
# The losses (harness.LINEAR_LOSSES)
# ----------------------------------------------------------------------------------------------
def make_loss(case):
    """The case's loss: a callable (hidden, weight, labels, ref_logps) -> scalar loss, or
    raises ImportError."""
    implementation, device = case["implementation"], case["device"]
    if implementation.startswith("trl_fused_head"):
        return linear_loss("trl", metrics=not implementation.endswith("plain"))
    if implementation.startswith("mixpo"):
        extra = {"mixpo_metrics": {"token_metrics": True},
                 "mixpo_softcap": {"softcap": 30.0},
                 "mixpo_one_pass": {"passes": 1, "workspace_bytes": one_pair_workspace(
                     case["seq_len"], case["prompt_len"], case["vocab"])},
                 }.get(implementation, {})
        return linear_loss("mixpo", **extra)
    if implementation == "liger":
        return linear_loss("liger", compiled=case["liger_compiled"])
    return linear_loss(implementation, **device_options(implementation, device))


# ----------------------------------------------------------------------------------------------
# One case, in a fresh process
# ----------------------------------------------------------------------------------------------
def case_inputs(case):
    """The case's inputs (`harness.linear_inputs`)."""
    return linear_inputs(case["rows"], case["seq_len"], case["prompt_len"],
                         case["hidden_size"], case["vocab"], getattr(torch, case["dtype"]),
                         ref_offset=case["seq_len"] * 10)


def worker(case):
    loss_fn = make_loss(case)
    inputs = case_inputs(case)
    result = {}
    for mode in ("forward", "forward_backward"):
        step = linear_step(loss_fn, inputs, backward=mode == "forward_backward")
        loss_value, warmup_s = first_call(step)      # compiles kernels / graphs
        times = wall_times(step, case["repeats"])
        result[mode] = {**median_and_min_ms(times), "warmup_s": warmup_s,
                        "peak_extra_mib": peak_extra_bytes(step) / MIB, "loss": loss_value}
    return result


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def build_cases(args, device):
    cases = []
    for shape in args.shapes:
        hidden_size, vocab = SHAPES[shape]
        hidden_size = args.hidden_size or hidden_size
        for tokens in args.tokens:
            rows = max(2, tokens // args.seq_len // 2 * 2)        # 2B rows, an even number
            for implementation in args.impls:
                cases.append({"implementation": implementation, "device": device,
                              "shape": shape, "dtype": args.dtype, "tokens": rows * args.seq_len,
                              "rows": rows, "seq_len": args.seq_len,
                              "prompt_len": int(args.prompt_share * args.seq_len),
                              "hidden_size": hidden_size, "vocab": vocab,
                              "repeats": args.repeats, "liger_compiled": args.liger_compiled})
    return cases


def summarise(rows):
    """Ratios against trl 1.16's fused head measured side by side, per shape and tokens."""
    for row in rows:
        base = next((r for r in rows if r["implementation"] == BASELINE
                     and r["shape"] == row["shape"] and r["tokens"] == row["tokens"]), None)
        if row is base or base is None or "error" in row or "error" in base:
            continue
        row["vs_trl_fused_head"] = {
            mode: {"speedup": base[mode]["median_ms"] / row[mode]["median_ms"],
                   "memory_ratio": row[mode]["peak_extra_mib"]
                   / max(base[mode]["peak_extra_mib"], 1e-9),
                   "loss_diff": abs(row[mode]["loss"] - base[mode]["loss"])}
            for mode in ("forward", "forward_backward")}
    for row in rows:
        if row["implementation"].startswith("mixpo") and "error" not in row:
            row["vs_peers"] = peer_goal(row, rows)


def peer_goal(row, rows) -> dict:
    """The goal of issue 19, fwd+bwd on the same shape and tokens: time over the fastest peer
    (trl's fused head, Liger, CCE) and peak memory over CCE's (goal: <= 1 and <= 0.5)."""
    peers = [r for r in rows if r["implementation"] in PEER_IMPLEMENTATIONS and "error" not in r
             and r["shape"] == row["shape"] and r["tokens"] == row["tokens"]]
    if not peers:
        return {}
    mode = "forward_backward"
    fastest = min(peers, key=lambda r: r[mode]["median_ms"])
    goal = {"fastest_peer": fastest["implementation"],
            "time_vs_fastest_peer": row[mode]["median_ms"] / fastest[mode]["median_ms"]}
    cce = next((r for r in peers if r["implementation"] == "cce"), None)
    if cce is not None:
        goal["memory_vs_cce"] = row[mode]["peak_extra_mib"] / max(cce[mode]["peak_extra_mib"],
                                                                  1e-9)
        goal["met"] = goal["time_vs_fastest_peer"] <= 1.0 and goal["memory_vs_cce"] <= 0.5
    return goal


def main(argv=None):
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(roofline.DEFAULT_SHAPES),
                        choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int,
                        default=[2048, 4096, 8192, 16384, 32768] if on_gpu else [1024, 2048],
                        help="tokens per batch (2B x T), prompt included")
    parser.add_argument("--seq-len", type=int, default=1024 if on_gpu else 512)
    parser.add_argument("--prompt-share", type=float, default=0.25)
    parser.add_argument("--hidden-size", type=int, default=None if on_gpu else 256,
                        help="override the shapes' H (reduced on CPU to keep matmuls short)")
    parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=10 if on_gpu else 2)
    parser.add_argument("--liger-compiled", action=argparse.BooleanOptionalAction,
                        default=on_gpu)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    parser.add_argument("--output", default=None, help="JSON path (default results/...)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return serve_case(worker, args.worker)

    device = "cuda" if on_gpu else "cpu"
    rows = []
    for case in build_cases(args, device):
        case.update(run_case(__file__, case, args.timeout))
        rows.append(case)
        label = f"{case['shape']:7s} {case['tokens']:6d} tok {case['implementation']:10s}"
        if "error" in case:
            print(f"{label} {case['error']}", flush=True)
        else:
            print(f"{label} fwd {case['forward']['median_ms']:9.1f} ms "
                  f"{case['forward']['peak_extra_mib']:9.1f} MiB | fwd+bwd "
                  f"{case['forward_backward']['median_ms']:9.1f} ms "
                  f"{case['forward_backward']['peak_extra_mib']:9.1f} MiB | loss "
                  f"{case['forward_backward']['loss']:.5f}", flush=True)
    summarise(rows)
    report = {"benchmark": "linear_preference_loss", "baseline": BASELINE,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": device_name(), "versions": versions(("torch", "triton", *PEER_PACKAGES)),
              "settings": {"dtype": args.dtype, "seq_len": args.seq_len,
                           "prompt_share": args.prompt_share, "beta": BETA,
                           "hidden_size_override": args.hidden_size,
                           "repeats": args.repeats, "liger_compiled": args.liger_compiled,
                           "mixpo_backend": "triton" if on_gpu else "torch",
                           "liger_reference": "use_ref_model=False (reference-free loss)"},
              "shapes": {name: {"hidden_size": args.hidden_size or h, "vocab": v}
                         for name, (h, v) in SHAPES.items() if name in args.shapes},
              "peak_memory_method": PEAK_MEMORY_METHOD[device], "rows": rows}
    write_report(report, pathlib.Path(args.output) if args.output
                 else RESULTS / f"linear_{device}.json", plot)
    return 0


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report["rows"] if "error" not in row]
    groups = sorted({(row["shape"], row["tokens"]) for row in rows},
                    key=lambda group: (list(SHAPES).index(group[0]), group[1]))
    impls = [impl for impl in IMPLEMENTATIONS if any(r["implementation"] == impl for r in rows)]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / max(len(impls), 1)
    panels = (("forward_backward", "median_ms", "forward+backward, ms (median)"),
              ("forward", "median_ms", "forward, ms (median)"),
              ("forward_backward", "peak_extra_mib", "fwd+bwd peak memory above inputs, MiB"))
    for axis, (mode, key, title) in zip(axes, panels):
        for index, impl in enumerate(impls):
            values = [next((r[mode][key] for r in rows if r["implementation"] == impl
                            and (r["shape"], r["tokens"]) == group), 0) for group in groups]
            axis.bar([g + index * width for g in range(len(groups))], values, width, label=impl)
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        axis.set_xticklabels([f"{shape}\n{tokens} tok" for shape, tokens in groups], fontsize=7)
        axis.set_ylabel(title)
    axes[0].legend(fontsize=8)
    settings = report["settings"]
    figure.suptitle(f"linear preference loss on {report['device']} ({settings['dtype']}, "
                    f"prompt share {settings['prompt_share']}, "
                    f"H override {settings['hidden_size_override']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
