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
import importlib.metadata
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import roofline  # beside this script (sys.path[0])

from bench_preference_loss import (  # same folder: sys.path[0]
    PEAK_MEMORY_METHOD, device_name, measure_peak, write_report)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("trl_fused_head", "trl_fused_head_plain", "materialised", "mixpo",
                   "mixpo_one_pass", "mixpo_metrics", "mixpo_softcap", "liger", "cce")
BASELINE = "trl_fused_head"
PEER_PACKAGES = {"trl": "trl", "liger": "liger-kernel", "cce": "cut-cross-entropy"}
# (hidden size, vocab size) of the models the shapes are named after.
SHAPES = {name: (shape.hidden_size, shape.vocab_size) for name, shape in roofline.SHAPES.items()}
BETA = 0.1


# ----------------------------------------------------------------------------------------------
# The four losses
# ----------------------------------------------------------------------------------------------
def dpo_from_logps(logps, ref_logps):
    num_pairs = logps.shape[0] // 2
    ratio = logps - ref_logps
    return -F.logsigmoid(BETA * (ratio[:num_pairs] - ratio[num_pairs:])).mean()


def materialised_loss(hidden, weight, labels, ref_logps):
    """Materialised logits (pre-1.16 TRL's DPOTrainer)."""
    logits = hidden @ weight.T
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_logps = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return dpo_from_logps((token_logps * (labels != -100)).sum(-1), ref_logps)


def one_pair_workspace(case) -> int:
    """Bytes of one pair's fp32 logits (2 sequences' completion tokens x V), rounded up to
    MiB: the smallest workspace that lets mixpo run one pass."""
    tokens = 2 * (case["seq_len"] - case["prompt_len"])
    return -(-tokens * case["vocab"] * 4 // 2**20) * 2**20


def make_loss(implementation, device, liger_compiled, case=None):
    """A callable (hidden, weight, labels, ref_logps) -> scalar loss, or raises ImportError."""
    if implementation == "materialised":
        return materialised_loss
    if implementation.startswith("trl_fused_head"):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        outputs = ("log_probs",) if implementation.endswith("plain") else \
            ("log_probs", "entropy", "mean_logits", "is_top1")

        def trl_loss(h, w, y, ref):
            mask = y != -100
            per_token = ChunkedLogProbFunction.apply(h[mask], w, None, y[mask], 1.0, 32768,
                                                     None, 1.0, outputs)[0]
            logps = per_token.new_zeros(mask.shape).masked_scatter(mask, per_token).sum(-1)
            return dpo_from_logps(logps, ref)
        return trl_loss
    if implementation.startswith("mixpo"):
        import mixpo
        backend = "triton" if device == "cuda" else "torch"
        extra = {"mixpo_metrics": {"token_metrics": True},
                 "mixpo_softcap": {"softcap": 30.0},
                 "mixpo_one_pass": {"passes": 1, "workspace_bytes":
                                    one_pair_workspace(case) if case else None},
                 }.get(implementation, {})
        return lambda h, w, y, ref: mixpo.linear_preference_loss(
            h, w, y, ref_logps=ref, beta=BETA, backend=backend, **extra).loss
    if implementation == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        module = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False,
                                         compiled=liger_compiled)
        return lambda h, w, y, ref: module(w, h, y)[0]
    if implementation == "cce":
        from cut_cross_entropy import linear_cross_entropy
        impl = "cce" if device == "cuda" else "torch_compile"

        def cce_loss(h, w, y, ref):
            token_nll = linear_cross_entropy(h, w, y, reduction="none", impl=impl)   # [2B, T]
            return dpo_from_logps(-token_nll.float().sum(-1), ref)
        return cce_loss
    raise ValueError(implementation)


# ----------------------------------------------------------------------------------------------
# One case, in a fresh process
# ----------------------------------------------------------------------------------------------
def make_inputs(case, device):
    dtype = getattr(torch, case["dtype"])
    generator = torch.Generator(device=device).manual_seed(0)
    rows, seq_len, hidden_size, vocab = (case["rows"], case["seq_len"], case["hidden_size"],
                                         case["vocab"])
    hidden = torch.randn(rows, seq_len, hidden_size, generator=generator, device=device)
    weight = torch.randn(vocab, hidden_size, generator=generator, device=device)
    weight /= hidden_size ** 0.5
    labels = torch.randint(0, vocab, (rows, seq_len), generator=generator, device=device)
    labels[:, :case["prompt_len"]] = -100
    ref_logps = -torch.rand(rows, generator=generator, device=device) * 100 - seq_len * 10
    return hidden.to(dtype), weight.to(dtype), labels, ref_logps


def worker(case):
    device = case["device"]
    loss_fn = make_loss(case["implementation"], device, case["liger_compiled"], case)
    hidden, weight, labels, ref_logps = make_inputs(case, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {}
    for mode in ("forward", "forward_backward"):
        backward = mode == "forward_backward"

        def step():
            h = hidden.detach().requires_grad_(backward)
            w = weight.detach().requires_grad_(backward)
            with torch.set_grad_enabled(backward):
                loss = loss_fn(h, w, labels, ref_logps)
                if backward:
                    loss.backward()
            return loss.item()

        start = time.perf_counter()
        loss_value = step()                    # warm-up: compiles kernels / graphs
        sync()
        warmup_s = time.perf_counter() - start
        times = []
        for _ in range(case["repeats"]):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        peak = measure_peak(device, step)
        result[mode] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                        "warmup_s": warmup_s, "peak_extra_mib": peak / 2**20,
                        "loss": loss_value}
    return result


def run_case(case, timeout):
    """Run one case in a subprocess; errors (missing package, OOM, timeout) are recorded."""
    try:
        output = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if output.returncode != 0:
        tail = output.stderr.strip().splitlines()[-1:] or ["no output"]
        error = tail[0]
        if "ModuleNotFoundError" in output.stderr or "ImportError" in output.stderr:
            error = f"skipped: {error}"
        elif "out of memory" in output.stderr.lower():
            error = "out of memory"
        return {"error": error[:500]}
    return json.loads(output.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def versions():
    import triton
    import mixpo
    found = {"torch": torch.__version__, "triton": triton.__version__,
             "mixpo": mixpo.__version__, "python": platform.python_version()}
    for package in PEER_PACKAGES.values():
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


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


PEERS = ("trl_fused_head", "liger", "cce")


def peer_goal(row, rows) -> dict:
    """The goal of issue 19, fwd+bwd on the same shape and tokens: time over the fastest peer
    (trl's fused head, Liger, CCE) and peak memory over CCE's (goal: <= 1 and <= 0.5)."""
    peers = [r for r in rows if r["implementation"] in PEERS and "error" not in r
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
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    device = "cuda" if on_gpu else "cpu"
    rows = []
    for case in build_cases(args, device):
        case.update(run_case(case, args.timeout))
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
              "device": device_name(device), "versions": versions(),
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
