"""The framework the gpu_check stages share (gpu_stage_correctness, gpu_stage_speed,
gpu_stage_training, gpu_check_tables; benchmarks/gpu_check.py runs them): a stage's context
and clock, the correctness thresholds and run counts, NaN poisoning of kernel outputs, the
error measure, the roofline devices for the floors, the stage-aware bench, cache freeing,
number formatting, and the worker processes a stage starts (`gpu_check.py --worker SPEC`)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time

import torch

from harness import BENCHMARKS, bench, child_env, finish_worker, start_worker, write_json
import roofline  # after harness, which puts mixpo on the path

SCRIPT = BENCHMARKS / "gpu_check.py"
WRAP_UP_S = 3.0      # a stage stops starting new cases this long before its budget ends
# Max |kernel - twin| / max |twin| per output. bf16: the kernels feed 16-bit operands to the
# tensor cores and round the logit-free gradient tile to bf16 before its products; the twin
# computes from the same bf16 inputs in fp32 (tests/test_linear_kernels.py uses the same).
THRESHOLDS = {"float32": 1e-4, "bfloat16": 2e-2, "epilogue (fp32)": 1e-4}
RUNS = 3                   # fresh random inputs per case (an error that moves is a race)
QUICK_RUNS = 1             # --quick: interpreted kernels cost ~1 s a launch: one run


class StageContext:
    """What a stage function gets: its settings, its clock, and a record saved on demand."""

    def __init__(self, name: str, quick: bool, budget_s: float, result_path: pathlib.Path,
                 out_dir: pathlib.Path, environment: dict, started: float | None = None):
        self.name, self.quick, self.budget_s = name, quick, budget_s
        self.result_path, self.out_dir, self.environment = result_path, out_dir, environment
        # Wall-clock times: the parent started the budget when it started this process.
        self.started = time.time() if started is None else started
        self.deadline = self.started + budget_s - WRAP_UP_S
        self.result = {"stage": name, "verdict": "running", "details": {}}

    @property
    def details(self) -> dict:
        return self.result["details"]

    def remaining(self) -> float:
        return self.deadline - time.time()

    def has_time(self, needed_s: float) -> bool:
        return self.remaining() > needed_s

    def elapsed(self) -> float:
        return time.time() - self.started

    def save(self) -> None:
        write_json(self.result_path, self.result)


def _poison(tensor):
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    return tensor


@contextlib.contextmanager
def poisoned_outputs():
    """While active, torch.empty / torch.empty_like return NaN-filled float tensors, so an
    output element a kernel never writes shows up as NaN; on CUDA the caching allocator's free
    blocks are also filled with 0xFF bytes (NaN in every float dtype) first."""
    if torch.cuda.is_available():
        blocks = [torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda").fill_(255)]
        blocks += [torch.empty(2**19, dtype=torch.uint8, device="cuda").fill_(255)
                   for _ in range(32)]
        del blocks
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: _poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def rel_error(actual, expected):
    """(max |actual - expected| / max |expected|, count of non-finite elements of `actual`
    where `expected` is finite); inf when the shapes differ or anything is non-finite."""
    a, e = actual.detach().float(), expected.detach().float()
    if a.shape != e.shape:
        return math.inf, -1
    if a.numel() == 0:
        return 0.0, 0
    finite = torch.isfinite(e)
    bad = int((~torch.isfinite(a) & finite).sum())
    if bad:
        return math.inf, bad
    scale = max(float(torch.where(finite, e.abs(), 0.0).max()), 1e-30)
    return float(torch.where(finite, (a - e).abs(), 0.0).max()) / scale, 0


def device_peaks(environment: dict) -> dict:
    """Roofline devices for the floors: "h100" (roofline.py), "h200" (H100 compute, 4.8 TB/s,
    defined here, not in roofline.py) and "measured" (this machine's ceilings from stage 1:
    bf16 matmul TFLOP/s and copy bandwidth; the other rates of the H100)."""
    h100 = roofline.DEVICES["h100"]
    peaks = {"h100": h100, "h200": dataclasses.replace(
        h100, name="H200-SXM-141GB", hbm_bytes_per_s=4.8e12,
        source="H100 compute (H200 = same GH100 die and clocks), 4.8 TB/s HBM3e datasheet")}
    ceilings = environment.get("ceilings", {})
    if ceilings.get("matmul_tflops") and ceilings.get("copy_tb_s"):
        peaks["measured"] = dataclasses.replace(
            h100, name=f"measured on {environment.get('device_name')}",
            tensor_flops_16bit=ceilings["matmul_tflops"] * 1e12,
            hbm_bytes_per_s=ceilings["copy_tb_s"] * 1e12,
            source="stage 1: bf16 matmul and device-to-device copy, measured")
    return peaks


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bench(ctx, fn, warmed: bool = False) -> float:
    """harness.bench; --quick on a CPU: one timed call after the warm-up."""
    return bench(fn, cpu_repeats=1 if ctx.quick else 3, warmed=warmed)


def _free():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(value, spec) -> str:
    return "n/a" if value is None else format(value, spec)


def _start(ctx, name: str, spec: dict, work: pathlib.Path, started: list) -> dict:
    """Start worker `name` (a training run, the Liger peer) in a subprocess of its own."""
    run = start_worker(SCRIPT, name, {**spec, "worker": name}, work,
                       ctx.out_dir / f"{ctx.name}_{name}.log", child_env(ctx.quick))
    started.append(run)
    return run


def _finish(ctx, run: dict, reserve_s: float = 0.0) -> dict:
    """Wait for a worker until the stage's budget (less `reserve_s`) ends; its result, or
    the error."""
    result = finish_worker(run, ctx.remaining() - reserve_s)
    if result.get("error", "").startswith("timeout"):
        result["error"] += " (stage budget)"
    return result

