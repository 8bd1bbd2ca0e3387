"""Helpers and constants the gpu_check stage modules share (gpu_stage_correctness,
gpu_stage_speed, gpu_stage_training, gpu_check_tables): the ignore index, units, the DPO beta,
the correctness thresholds and run counts, seeded generators, the stage-aware bench, cache
freeing, number formatting, and the worker processes a stage starts (_start / _finish here,
run_worker for `gpu_check.py --worker SPEC`, dispatching to the stage module that defines the
worker)."""
from __future__ import annotations

import importlib
import json
import pathlib
import subprocess
import sys
import time

import torch

from gpu_check import SCRIPT, bench, child_env, device, write_json

IGNORE = -100
MIB = 2**20
# Max |kernel - twin| / max |twin| per output. bf16: the kernels feed 16-bit operands to the
# tensor cores and round the logit-free gradient tile to bf16 before its products; the twin
# computes from the same bf16 inputs in fp32 (tests/test_linear_kernels.py uses the same).
THRESHOLDS = {"float32": 1e-4, "bfloat16": 2e-2, "epilogue (fp32)": 1e-4}
RUNS = 3                   # fresh random inputs per case (an error that moves is a race)
QUICK_RUNS = 1             # --quick: interpreted kernels cost ~1 s a launch: one run
BETA = 0.1


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _generator(seed: int):
    return torch.Generator(device=device()).manual_seed(seed)


def _bench(ctx, fn, warmed: bool = False) -> float:
    """gpu_check.bench; --quick on a CPU: one timed call after the warm-up."""
    return bench(fn, cpu_repeats=1 if ctx.quick else 3, warmed=warmed)


def _free():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(value, spec) -> str:
    return "n/a" if value is None else format(value, spec)


# Worker name -> (module, function): each stage module defines the workers it starts.
WORKERS = {"train_mixpo": ("gpu_stage_training", "_worker_mixpo"),
           "train_trl": ("gpu_stage_training", "_worker_trl"),
           "linear_peer": ("gpu_stage_speed", "_worker_linear_peer")}


def run_worker(spec_path: str) -> int:
    spec = json.loads(pathlib.Path(spec_path).read_text())
    module, function = WORKERS[spec["worker"]]
    result = getattr(importlib.import_module(module), function)(spec)
    write_json(pathlib.Path(spec["result"]), result)
    return 0


def _start(ctx, name: str, spec: dict, work: pathlib.Path, started: list) -> dict:
    """Start worker `name` (a training run, the Liger peer) in a subprocess of its own."""
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    write_json(spec_path, {**spec, "worker": name, "result": str(result_path)})
    log = ctx.out_dir / f"{ctx.name}_{name}.log"
    handle = log.open("w")
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--worker", str(spec_path)],
                               stdout=handle, stderr=subprocess.STDOUT, env=child_env(ctx.quick))
    run = {"process": process, "handle": handle, "log": log, "result": result_path,
           "started": time.perf_counter()}
    started.append(run)
    return run


def _finish(ctx, run: dict, reserve_s: float = 0.0) -> dict:
    """Wait for a worker until the stage's budget (less `reserve_s`) ends; its result, or
    the error."""
    process = run["process"]
    try:
        process.wait(timeout=max(ctx.remaining() - reserve_s, 1))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        run["handle"].close()
        return {"error": f"timeout after {time.perf_counter() - run['started']:.0f} s "
                         "(stage budget)"}
    run["handle"].close()
    wall = round(time.perf_counter() - run["started"], 1)
    if process.returncode != 0 or not run["result"].exists():
        lines = [line for line in run["log"].read_text(errors="replace").splitlines()
                 if line.strip()]
        return {"error": (lines[-1] if lines else f"exit {process.returncode}")[:300],
                "wall_s": wall}
    return {**json.loads(run["result"].read_text()), "wall_s": wall}
