"""Two implementations of the logit-free loss timed call by call in alternation: the fair
ratio on a shared machine whose speed drifts between runs (bench_linear.py measures each
implementation minutes apart).

Each implementation runs in a worker process of its own (its peak memory its own, measured
as in bench_linear.py), warmed up, then idle while the other works: the driver asks them for
one forward+backward each, in turn, `--rounds` times (the first of each round alternating),
and reports every call's time, the per-round ratio (A's time over B's, the two calls
adjacent in time) and its median.

    python benchmarks/bench_linear_duel.py                       # mixpo's defaults vs CCE
    python benchmarks/bench_linear_duel.py --impls mixpo_one_pass cce --rounds 20
Writes benchmarks/results/linear_duel_<cpu|cuda>.json and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import time

import torch

import bench_linear  # beside this script (sys.path[0])
from harness import (MIB, PEAK_MEMORY_METHOD, PEER_PACKAGES, RESULTS, child_env, device_name,
                     first_call, linear_step, peak_extra_bytes, sync, versions, write_report)


def worker(case_json: str) -> int:
    """Build the case's loss, warm it up, measure its peak memory, print a "ready" line, then
    time one forward+backward per "step" line on stdin until "stop"."""
    case = json.loads(case_json)
    step = linear_step(bench_linear.make_loss(case), bench_linear.case_inputs(case),
                       backward=True)
    loss, warmup_s = first_call(step)
    peak_mib = peak_extra_bytes(step) / MIB
    print(json.dumps({"ready": True, "loss": loss, "warmup_s": warmup_s,
                      "peak_extra_mib": peak_mib}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        sync()
        start = time.perf_counter()
        step()
        sync()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    return 0


def _ask(process) -> dict:
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"a duel worker exited (code {process.wait()})")
    return json.loads(line)


def duel(cases, rounds: int) -> dict:
    """Per implementation: its ready line and its call times; per round: A / B."""
    processes = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(case)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=child_env()) for case in cases]
    try:
        ready = [_ask(process) for process in processes]
        times = [[], []]
        for round_index in range(rounds):
            order = (0, 1) if round_index % 2 == 0 else (1, 0)
            for index in order:
                processes[index].stdin.write("step\n")
                processes[index].stdin.flush()
                times[index].append(_ask(processes[index])["seconds"])
    finally:
        for process in processes:
            if process.poll() is None:
                process.stdin.write("stop\n")
                process.stdin.close()
                process.wait(timeout=60)
    ratios = [a / b for a, b in zip(*times)]
    return {"ready": ready, "seconds": times, "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "median_seconds": [statistics.median(t) for t in times]}


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name, seconds in zip(report["implementations"], report["seconds"]):
        left.plot(range(1, len(seconds) + 1), seconds, marker="o", label=name)
    left.set_xlabel("round")
    left.set_ylabel("forward+backward, s")
    left.legend()
    right.plot(range(1, len(report["ratios"]) + 1), report["ratios"], marker="o")
    right.axhline(1.0, color="gray", linewidth=0.8)
    right.set_xlabel("round")
    right.set_ylabel(f"{report['implementations'][0]} / {report['implementations'][1]}")
    figure.suptitle(f"{report['implementations'][0]} vs {report['implementations'][1]}, "
                    f"median ratio {report['median_ratio']:.3f} ({report['device']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", nargs=2, default=["mixpo", "cce"],
                        choices=bench_linear.IMPLEMENTATIONS)
    parser.add_argument("--shape", default="llama-3-8b", choices=list(bench_linear.SHAPES))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=1024 if on_gpu else 512)
    parser.add_argument("--prompt-share", type=float, default=0.25)
    parser.add_argument("--hidden-size", type=int, default=None if on_gpu else 256)
    parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--output", default=None, help="JSON path (default results/...)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    device = "cuda" if on_gpu else "cpu"
    # bench_linear.py's cases for these settings (one shape, one token count, one repeat).
    cases = bench_linear.build_cases(argparse.Namespace(
        shapes=[args.shape], tokens=[args.tokens], seq_len=args.seq_len,
        prompt_share=args.prompt_share, hidden_size=args.hidden_size, dtype=args.dtype,
        impls=args.impls, repeats=1, liger_compiled=on_gpu), device)
    result = duel(cases, args.rounds)
    for name, ready, median in zip(args.impls, result["ready"], result["median_seconds"]):
        print(f"{name:16s} median {median * 1e3:8.1f} ms  peak {ready['peak_extra_mib']:7.1f} "
              f"MiB  loss {ready['loss']:.5f}")
    print(f"median ratio {args.impls[0]} / {args.impls[1]}: {result['median_ratio']:.3f} "
          f"(rounds: {', '.join(f'{ratio:.2f}' for ratio in result['ratios'])})")
    report = {"benchmark": "linear_preference_loss_duel",
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": device_name(), "versions": versions(("torch", "triton",
                                                             *PEER_PACKAGES)),
              "implementations": args.impls,
              "case": {key: value for key, value in cases[0].items()
                       if key not in ("implementation", "repeats")},
              "peak_memory_method": PEAK_MEMORY_METHOD[device], **result}
    write_report(report, pathlib.Path(args.output) if args.output
                 else RESULTS / f"linear_duel_{device}.json", plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
