"""GPU truth in one call: the environment, every kernel against its torch twin, the logit-free
loss against its peers, the fused loss over materialised logits and a real training step, each
stage time-boxed, with JSON + a markdown table written and a summary table printed last.

    python benchmarks/gpu_check.py --out DIR            # the GPU machine: < 8 minutes on an H200
    python benchmarks/gpu_check.py --quick --out DIR    # CPU (CI): tiny shapes, Triton interpreted

On the GPU machine (no network; the wheels come from `bash scripts/device_wheels.sh` run here,
and the git-ignored .wheels/ folder must travel with the working tree; mixpo is imported from
this checkout, no install):
    bash scripts/device_wheels.sh install && python benchmarks/gpu_check.py --out $OUT

Stages, in this order (the docstrings of the stage functions say how each one measures):
  1. environment  GPU name, SMs, driver, package versions; the two ceilings measured once:
                  bf16 8192^3 matmul TFLOP/s on random data, device-to-device copy TB/s.
  2. correctness  every kernel vs its torch twin at real shapes (V 128256 / 151936 / 256000,
                  H 4096, fp32 and bf16, ragged rows, all-prompt rows, in-place backward,
                  softcap and logit_scale, stats=True), the pair-loss kernel for every loss type
                  with a kernel code, the margin solve, and the public API on both backends;
                  three runs on fresh random inputs, kernel outputs poisoned with NaN first.
  3. linear_loss  the logit-free loss at Llama-3 shape (16k completion tokens, H 4096,
                  V 128256, bf16), forward and forward+backward: mixpo vs trl 1.16's fused head,
                  Liger's fused-linear DPO, Cut Cross-Entropy and materialised logits; time,
                  peak memory, ratios to mixpo and to the roofline floor; then what settles
                  the defaults: the GEMM backward (and its cuBLAS share) vs the atomic one,
                  exact and with CCE's filter (kept-tile fraction on random and Zipf 1 / 1.5 /
                  2.5 heads), one pass vs two passes.
  4. logits_loss  mixpo.preference_loss over materialised logits (2B 16, T 1024, V 128256,
                  bf16, in-place backward) vs two reads of the logits at the measured bandwidth.
  5. training     a ~1B Llama built from a config: MixDPO + gamma-PO steps with mixpo's trainer
                  vs trl's DPOTrainer on the same synthetic data (tokens/s, peak memory), and
                  mixpo's peak vs what `mixpo plan` predicts.

How a stage runs: in its own subprocess (its own CUDA context, so peak memory and a crashed
context stay inside it), with a time budget. The stage saves its JSON after every case, checks
the clock before starting the next one and records what it left out; at the budget it is killed
and recorded as failed ("timeout"), keeping what it had saved, and the next stage starts. A
stage that raises is recorded as failed with the error. Verdicts: pass, fail, skipped. On a
GPU the stages run one after the other; --quick on a CPU runs the training stage beside the
others (it needs nothing from them), which keeps the CI test short.

Output under --out: gpu_check.json (everything), gpu_check.md (the tables), <stage>.json and
<stage>.log (each stage's record and its own output). Printed: one verdict line per stage as it
ends, then the summary table, last (a caller that keeps only the tail of the output sees it).

Budgets (STAGES): 20 + 110 + 140 + 40 + 140 = 450 s on the GPU machine, under 8 minutes with
the offline wheel install; --budget-scale multiplies them, --stages picks some.

--quick (CPU, CI): vocabularies of 1000-4000, hidden 64, a few dozen tokens, a 2-layer model
and 2 training steps; one run per correctness case and one dtype per vocabulary and kernel
(an interpreted launch costs about a second); without a GPU the Triton kernels run under
TRITON_INTERPRET=1 (set here before anything imports them), triton.testing.do_bench is
replaced by a median of wall-clock runs, and peers that need CUDA (Liger, CCE) or are missing
are recorded as "skipped: reason".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from gpu_check_common import StageContext
from gpu_check_common import poisoned_outputs, rel_error  # noqa: F401 - tested as gpu_check's
from gpu_check_tables import markdown_tables, summary_table
from gpu_stage_correctness import stage_correctness
from gpu_stage_speed import _worker_linear_peer, stage_linear_loss, stage_logits_loss
from gpu_stage_training import _worker_mixpo, _worker_trl, stage_training
from harness import (PEER_PACKAGES, REPO, bench, child_env, device, device_name, versions,
                     write_json)

SCRIPT = pathlib.Path(__file__).resolve()

# name, budget in seconds on the GPU machine, budget in --quick mode, what it checks.
STAGES = (
    ("environment", 20, 40, "GPU, versions, matmul and copy ceilings"),
    ("correctness", 110, 90, "every kernel vs its torch twin"),
    ("linear_loss", 140, 75, "logit-free loss vs peers, backward variants, one vs two passes"),
    ("logits_loss", 40, 30, "preference_loss over materialised logits"),
    ("training", 140, 120, "MixDPO + gamma-PO steps vs trl DPOTrainer, plan error"),
)
PACKAGES = ("torch", "triton", "transformers", *PEER_PACKAGES, "datasets", "pyarrow",
            "accelerate", "numpy")


# ----------------------------------------------------------------------------------------------
# Stage 1: environment
# ----------------------------------------------------------------------------------------------
def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return f"CUDA driver API {torch._C._cuda_getDriverVersion()}"
    except Exception:                                # noqa: BLE001
        return None


def _matmul_tflops(size: int, dtype) -> float:
    """[size x size] @ [size x size] on random data into a preallocated output."""
    a, b = (torch.randn(size, size, device=device(), dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device(), dtype=dtype)
    return 2 * size**3 / bench(lambda: torch.mm(a, b, out=out)) / 1e12


def _copy_tb_s(nbytes: int) -> float:
    """Device-to-device copy_ of `nbytes`: bytes read + bytes written per second."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src)) / 1e12


def stage_environment(ctx: StageContext):
    """What the machine is and what it can do.

    Device: name, SM count, memory, compute capability, driver (nvidia-smi, else the CUDA
    driver API version), CUDA runtime; versions of torch, triton, transformers, trl, liger,
    CCE, datasets, and where mixpo is imported from. Ceilings, measured once with `bench`:
    a bf16 [8192 x 8192] @ [8192 x 8192] matmul into a preallocated output on random data
    (2 * 8192^3 FLOP / median time), and a 2 GiB device-to-device copy_ (bytes read + bytes
    written / median time). --quick on a CPU: fp32 512^3 and a 64 MiB copy.
    """
    details = ctx.details
    details["versions"] = versions(PACKAGES, mixpo_path=True)
    details["interpreter"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    details["device_name"] = device_name()
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        details.update(sms=props.multi_processor_count,
                       memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", driver=_driver_version(),
                       cuda_runtime=torch.version.cuda)
    else:
        details.update(sms=None, cpu_cores=os.cpu_count(), driver=None, cuda_runtime=None)
    ctx.save()
    size, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    nbytes = 2 * 2**30 if cuda else 64 * 2**20
    details["ceilings"] = ceilings = {
        "matmul_shape": [size] * 3, "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_tflops": _matmul_tflops(size, dtype), "copy_bytes": nbytes,
        "copy_tb_s": _copy_tb_s(nbytes)}
    missing = [name for name in (*PEER_PACKAGES, "datasets")
               if details["versions"].get(name) is None]
    v = details["versions"]
    headline = (f"{details['device_name']}" + (f", {details['sms']} SMs, driver "
                                                f"{details['driver']}" if cuda else "")
                + f"; torch {v['torch']}, triton {v['triton']}, transformers "
                f"{v['transformers']}; {ceilings['matmul_dtype']} matmul "
                f"{ceilings['matmul_tflops']:.3g} TFLOP/s, copy {ceilings['copy_tb_s']:.3g} TB/s"
                + (f"; missing: {', '.join(missing)}" if missing else ""))
    return "pass", headline


# ----------------------------------------------------------------------------------------------
# Running the stages
# ----------------------------------------------------------------------------------------------
STAGE_FUNCTIONS = {"environment": stage_environment, "correctness": stage_correctness,
                   "linear_loss": stage_linear_loss, "logits_loss": stage_logits_loss,
                   "training": stage_training}
# Worker name -> function: the subprocesses a stage starts (`--worker SPEC`).
WORKERS = {"train_mixpo": _worker_mixpo, "train_trl": _worker_trl,
           "linear_peer": _worker_linear_peer}


def run_worker(spec_path: str) -> int:
    spec = json.loads(pathlib.Path(spec_path).read_text())
    write_json(pathlib.Path(spec["result"]), WORKERS[spec["worker"]](spec))
    return 0


def run_stage_here(args) -> int:
    """Child process: run one stage, saving its record as it goes."""
    context = json.loads(pathlib.Path(args.context).read_text())
    ctx = StageContext(args.run_stage, args.quick, args.budget, pathlib.Path(args.stage_result),
                       pathlib.Path(context["out_dir"]), context.get("environment", {}),
                       args.started)
    ctx.save()
    try:
        verdict, headline = STAGE_FUNCTIONS[args.run_stage](ctx)
    except Exception as error:                       # noqa: BLE001 - recorded as a failure
        traceback.print_exc()
        verdict, headline = "fail", f"raised {type(error).__name__}: {str(error)[:300]}"
        ctx.result["error"] = traceback.format_exc()[-4000:]
    ctx.result.update(verdict=verdict, headline=headline, seconds=round(ctx.elapsed(), 2))
    ctx.save()
    return 0


def _last_error_line(log_path: pathlib.Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def start_stage(name: str, budget: float, quick: bool, out_dir: pathlib.Path,
                context_path: pathlib.Path) -> dict:
    """Parent: start stage `name` in a subprocess (its own session, so that a kill at the
    budget also ends the workers it started)."""
    result_path, log_path = out_dir / f"{name}.json", out_dir / f"{name}.log"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(SCRIPT), "--run-stage", name, "--stage-result",
               str(result_path), "--budget", str(budget), "--context", str(context_path),
               "--started", repr(time.time())]
    if quick:
        command.append("--quick")
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env=child_env(interpret=quick), start_new_session=True, cwd=REPO)
    return {"name": name, "budget": budget, "process": process, "log": log,
            "log_path": log_path, "result_path": result_path, "started": time.monotonic()}


def finish_stage(stage: dict) -> dict:
    """Parent: wait for a started stage until its budget ends (then kill it); its record."""
    name, budget, process = stage["name"], stage["budget"], stage["process"]
    try:
        returncode = process.wait(timeout=max(budget - (time.monotonic() - stage["started"]),
                                              0.1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)   # the stage and any workers it started
        process.wait()
        returncode = None
    stage["log"].close()
    elapsed = time.monotonic() - stage["started"]
    log_path, result_path = stage["log_path"], stage["result_path"]
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"stage": name, "details": {}}
    if returncode is None:
        result.update(verdict="fail", error=f"timeout: overran its {budget:.0f} s budget",
                      headline=f"timeout after {budget:.0f} s (partial results kept); "
                      + str(result.get("headline", "")))
    elif result.get("verdict") in (None, "running"):
        result.update(verdict="fail", headline=f"exit {returncode}: "
                      f"{_last_error_line(log_path)}", error=_last_error_line(log_path))
    result["seconds"] = round(elapsed, 1)
    result["budget_s"] = budget
    write_json(result_path, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default a temp folder)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes for a CPU (CI); Triton under TRITON_INTERPRET=1")
    parser.add_argument("--stages", nargs="+", choices=[s[0] for s in STAGES],
                        default=[s[0] for s in STAGES], help="run only these (in order)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every stage's time budget")
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-result", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:                      # a subprocess a stage starts (training runs)
        return run_worker(args.worker)
    if args.run_stage:
        return run_stage_here(args)

    if not args.quick and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run with --quick for the CPU mode",
              file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out) if args.out else pathlib.Path(
        tempfile.mkdtemp(prefix="gpu_check_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    context_path = out_dir / "context.json"
    context = {"out_dir": str(out_dir), "quick": args.quick, "environment": {}}
    write_json(context_path, context)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "quick": args.quick, "device": "?", "argv": sys.argv[1:], "stages": []}
    started = time.monotonic()
    print(f"gpu_check{' --quick' if args.quick else ''}: writing to {out_dir}", flush=True)
    budgets = {name: (quick if args.quick else gpu) * args.budget_scale
               for name, gpu, quick, _ in STAGES}
    # --quick on a CPU: the training stage (which needs nothing from the others) runs beside
    # them, to keep CI short; on a GPU every stage has the device to itself.
    early = {}
    if args.quick and not torch.cuda.is_available() and "training" in args.stages \
            and len(args.stages) > 1:
        early["training"] = start_stage("training", budgets["training"], True, out_dir,
                                        context_path)
    for index, (name, _, _, _) in enumerate(STAGES, 1):
        if name not in args.stages:
            continue
        budget = budgets[name]
        stage = early.pop(name, None) or start_stage(name, budget, args.quick, out_dir,
                                                     context_path)
        result = finish_stage(stage)
        report["stages"].append(result)
        if name == "environment":
            context["environment"] = result.get("details", {})
            report["device"] = context["environment"].get("device_name", "?")
            report["versions"] = context["environment"].get("versions")
            write_json(context_path, context)
        print(f"[{index}/{len(STAGES)}] {name:<12} {result['verdict'].upper():<5} "
              f"{result['seconds']:6.1f} s / {budget:.0f} s  {result.get('headline', '')}",
              flush=True)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    report["thresholds"] = next((s["details"].get("thresholds") for s in report["stages"]
                                 if s["stage"] == "correctness"), None)
    write_json(out_dir / "gpu_check.json", report)
    try:
        markdown = markdown_tables(report)
    except Exception as error:                       # noqa: BLE001 - the summary still prints
        markdown = summary_table(report) + f"\n\n(detail tables failed: {error!r})\n"
    (out_dir / "gpu_check.md").write_text(markdown)
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'} "
          f"({report['total_seconds']:.0f} s)", flush=True)
    print(summary_table(report), flush=True)
    return 1 if any(stage["verdict"] == "fail" for stage in report["stages"]) else 0


if __name__ == "__main__":
    sys.exit(main())
