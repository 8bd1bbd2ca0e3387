"""mixpo.preference_loss vs a TRL-style torch loss on the same logits: time and peak memory.

The baseline is what TRL's DPOTrainer does with materialised logits: log_softmax over the
vocabulary in fp32, gather the labels' log-probs, mask, sum per sequence, sigmoid DPO loss.
mixpo runs backend "auto" (Triton kernels on a GPU, the chunked torch twin on a CPU), with and
without in-place backward. Each case is measured in its own subprocess so that peak memory is
not polluted by earlier cases: on CUDA torch.cuda.max_memory_allocated, on CPU the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs). Reported peak is
the extra memory above the inputs (logits + labels) during forward+backward.

    python benchmarks/bench_preference_loss.py                 # shapes for this device
    python benchmarks/bench_preference_loss.py --pairs 8 --seq-len 1024 --vocab 128256
Writes benchmarks/results/preference_loss_<device>.json and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

from harness import (IGNORE_INDEX, MIB, PEAK_MEMORY_METHOD, RESULTS, LogitsProducer,
                     device_name, median_and_min_ms, peak_extra_bytes, run_case, serve_case,
                     trl_style_loss, versions, wall_times, write_report)

IMPLEMENTATIONS = ("trl_torch", "mixpo", "mixpo_inplace")


def make_inputs(pairs, seq_len, vocab, dtype, device, prompt_len):
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(2 * pairs, seq_len, vocab, generator=generator, dtype=torch.float32)
    logits = logits.to(dtype).to(device)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), generator=generator)
    labels[:, :prompt_len] = IGNORE_INDEX
    ref_logps = -torch.rand(2 * pairs, generator=generator) * 100
    return logits, labels.to(device), ref_logps.to(device)


def _prepare(implementation, logits, forward_only):
    """A fresh leaf for one step; in-place backward consumes its buffer, so it gets a copy."""
    source = logits.detach().clone() if implementation == "mixpo_inplace" else logits.detach()
    return source.requires_grad_(not forward_only)


def _step(implementation, leaf, labels, ref_logps, forward_only):
    import mixpo

    logits = LogitsProducer.apply(leaf) if leaf.requires_grad else leaf
    if implementation == "trl_torch":
        loss = trl_style_loss(logits, labels, ref_logps)
    else:
        loss = mixpo.preference_loss(logits, labels, ref_logps=ref_logps,
                                     inplace_backward=implementation == "mixpo_inplace").loss
    if not forward_only:
        loss.backward()
    return loss


def worker(case: dict) -> dict:
    """Measure one (implementation, shape) in this fresh process."""
    device = case["device"]
    dtype = getattr(torch, case["dtype"])
    logits, labels, ref_logps = make_inputs(case["pairs"], case["seq_len"], case["vocab"],
                                            dtype, device, case["prompt_len"])
    implementation = case["implementation"]
    result = {}
    for mode in ("forward", "forward_backward"):
        forward_only = mode == "forward"

        def run(leaf):
            return _step(implementation, leaf, labels, ref_logps, forward_only)

        def fresh():
            return (_prepare(implementation, logits, forward_only),)
        run(*fresh())                          # warm-up (compiles kernels)
        times = wall_times(run, case["repeats"], fresh)
        leaf = _prepare(implementation, logits, forward_only)
        peak = peak_extra_bytes(lambda leaf=leaf: run(leaf))
        del leaf
        result[mode] = {**median_and_min_ms(times), "peak_extra_mib": peak / MIB}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--pairs", type=int, default=8 if on_gpu else 2)
    parser.add_argument("--seq-len", type=int, default=1024 if on_gpu else 512)
    parser.add_argument("--vocab", type=int, default=128256 if on_gpu else 32000)
    parser.add_argument("--prompt-share", type=float, default=0.25)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"] if on_gpu else
                        ["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10 if on_gpu else 3)
    parser.add_argument("--hbm-tb-s", type=float, default=3.0,
                        help="HBM bandwidth for the memory floor (H100 measured ~3.0 TB/s)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return serve_case(worker, args.worker)

    device = "cuda" if on_gpu else "cpu"
    rows = []
    for dtype in args.dtypes:
        for implementation in IMPLEMENTATIONS:
            case = {"implementation": implementation, "device": device, "dtype": dtype,
                    "pairs": args.pairs, "seq_len": args.seq_len, "vocab": args.vocab,
                    "prompt_len": int(args.prompt_share * args.seq_len),
                    "repeats": args.repeats}
            case.update(run_case(__file__, case))
            if "error" in case:
                raise RuntimeError(f"{dtype} {implementation}: {case['error']}")
            rows.append(case)
            print(f"{dtype:9s} {implementation:14s} fwd {case['forward']['median_ms']:9.1f} ms "
                  f"fwd+bwd {case['forward_backward']['median_ms']:9.1f} ms  peak extra "
                  f"{case['forward_backward']['peak_extra_mib']:9.1f} MiB", flush=True)
    for dtype in args.dtypes:  # ratios measured side by side in this run
        by_impl = {row["implementation"]: row for row in rows if row["dtype"] == dtype}
        for implementation in ("mixpo", "mixpo_inplace"):
            ours, base = by_impl[implementation], by_impl["trl_torch"]
            ours["vs_trl"] = {
                "speedup_forward_backward": base["forward_backward"]["median_ms"]
                / ours["forward_backward"]["median_ms"],
                "memory_ratio_forward_backward": ours["forward_backward"]["peak_extra_mib"]
                / max(base["forward_backward"]["peak_extra_mib"], 1e-9)}
        if device == "cuda":  # time as a multiple of two logits reads (+ one write) at HBM speed
            element = torch.finfo(getattr(torch, dtype)).bits // 8
            logits_bytes = 2 * args.pairs * args.seq_len * args.vocab * element
            for row in by_impl.values():
                row["floor_two_reads_ms"] = 2 * logits_bytes / (args.hbm_tb_s * 1e12) * 1e3
                seconds_per_read = logits_bytes / (args.hbm_tb_s * 1e12)
                row["floor_two_reads_one_write_ms"] = 3 * seconds_per_read * 1e3
                row["x_floor_two_reads"] = (row["forward_backward"]["median_ms"]
                                            / row["floor_two_reads_ms"])
    report = {"benchmark": "preference_loss", "date": datetime.datetime.now().isoformat(),
              "device": device_name(), "versions": versions(),
              "shape": {"rows_2B": 2 * args.pairs, "seq_len": args.seq_len,
                        "vocab": args.vocab, "prompt_share": args.prompt_share},
              "peak_memory_method": PEAK_MEMORY_METHOD[device], "rows": rows}
    write_report(report, RESULTS / f"preference_loss_{device}.json", plot)
    return 0


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [f"{row['implementation']}\n{row['dtype']}" for row in rows]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    time_axis.bar(labels, [row["forward_backward"]["median_ms"] for row in rows])
    time_axis.set_ylabel("forward+backward, ms (median)")
    memory_axis.bar(labels, [row["forward_backward"]["peak_extra_mib"] for row in rows])
    memory_axis.set_ylabel("peak memory above inputs, MiB")
    for axis in (time_axis, memory_axis):
        axis.tick_params(axis="x", labelsize=7)
    shape = report["shape"]
    figure.suptitle(f"preference_loss on {report['device']}: 2B={shape['rows_2B']}, "
                    f"T={shape['seq_len']}, V={shape['vocab']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
