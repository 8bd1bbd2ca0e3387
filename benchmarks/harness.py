"""What the benchmark scripts share, the bottom layer of benchmarks/ (it imports mixpo and no
other module here): the device, its synchronisation and name, timing, peak memory, package
versions, JSON reports, worker processes and their environment, the DPO reference loss and
the one table of the logit-free loss's implementations (mixpo and its peers)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
if str(REPO) not in sys.path:      # mixpo from this checkout where none is installed
    sys.path.append(str(REPO))

from mixpo.loss_spec import IGNORE_INDEX  # noqa: E402 - the label of positions without a loss

BETA = 0.1                   # the DPO beta of the loss benchmarks
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# The device
# ----------------------------------------------------------------------------------------------
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=device()).manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Timing and peak memory
# ----------------------------------------------------------------------------------------------
def bench(fn, cpu_repeats: int = 2, warmed: bool = False) -> float:
    """Median seconds of fn(). On CUDA: one warm-up call (compiles; skipped when `warmed`),
    one timed call to size the run, then triton.testing.do_bench (L2 flushed between calls;
    its own warm-up and 5-call estimate, then 5 timed calls, or as many as fit in 50 ms for
    short ones). On a CPU: the warm-up, then the median of `cpu_repeats` calls."""
    if not warmed:
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=max(estimate_ms, 10.0),
                                       rep=max(5 * estimate_ms, 50.0),
                                       return_mode="median") / 1e3
    times = [estimate_ms / 1e3]
    for _ in range(cpu_repeats - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wall_times(run, repeats: int, fresh=tuple) -> list[float]:
    """Seconds of `repeats` calls of run(*fresh()), each timed between two synchronisations
    (fresh(), the call's new inputs, is not timed)."""
    times = []
    for _ in range(repeats):
        inputs = fresh()
        sync()
        start = time.perf_counter()
        run(*inputs)
        sync()
        times.append(time.perf_counter() - start)
    return times


def first_call(fn):
    """(fn()'s value as a float, the seconds it took): a warm-up that compiles."""
    start = time.perf_counter()
    value = float(fn())
    sync()
    return value, time.perf_counter() - start


def median_and_min_ms(times) -> dict:
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated - allocated before",
    "cpu": "VmHWM - VmRSS of a fresh process (reset via /proc/self/clear_refs)"}


class PeakMemory:
    """Memory above what was allocated at `reset()`: CUDA max_memory_allocated after a reset
    of the peak, or on a CPU the resident-set high-water mark (VmHWM, reset to the current
    RSS through /proc/self/clear_refs)."""

    def __init__(self):
        self.cuda, self.baseline = torch.cuda.is_available(), 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")                 # VmHWM := VmRSS
            self.baseline = _proc_status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _proc_status("VmHWM") - self.baseline


def peak_extra_bytes(run) -> int:
    """Memory above what is allocated now while run() executes (PeakMemory)."""
    meter = PeakMemory()
    meter.reset()
    run()
    return int(meter.peak())


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def versions(packages=("torch", "triton"), mixpo_path: bool = False) -> dict:
    """Python, `packages` (installed versions, None when missing), mixpo as imported (this
    checkout's version, an installed egg-info can be older; with `mixpo_path`, where it was
    imported from) and the checkout's commit."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    try:
        import mixpo
        found["mixpo"] = mixpo.__version__ + (f" ({pathlib.Path(mixpo.__file__).parent})"
                                              if mixpo_path else "")
    except Exception as error:                       # noqa: BLE001 - reported, not fatal
        found["mixpo"] = f"import failed: {error}"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True)
    found["mixpo_commit"] = commit.stdout.strip() or None
    return found


def write_json(path: pathlib.Path, data) -> None:
    """`data` as JSON at `path`, written whole or not at all (a temporary file renamed)."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, default=str, allow_nan=True))
    temporary.replace(path)


def write_report(report: dict, path: pathlib.Path, plot) -> None:
    """The JSON report and its PNG plot, plot(report, png_path), beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    plot(report, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------
def child_env(interpret: bool = False) -> dict:
    """The environment of a worker process: this checkout's mixpo and benchmarks/ importable,
    no network; with `interpret` and no GPU, Triton under TRITON_INTERPRET=1."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCHMARKS)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if interpret and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return env


def start_worker(script, name: str, spec: dict, work: pathlib.Path, log: pathlib.Path,
                 env: dict) -> dict:
    """Run `python script --worker SPEC` in a process of its own: the spec (with "result",
    the path the worker writes its JSON result to) at work/<name>.spec.json, the output in
    `log`."""
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    write_json(spec_path, {**spec, "result": str(result_path)})
    handle = log.open("w")
    process = subprocess.Popen([sys.executable, str(script), "--worker", str(spec_path)],
                               stdout=handle, stderr=subprocess.STDOUT, env=env)
    return {"name": name, "process": process, "handle": handle, "log": log,
            "result": result_path, "started": time.perf_counter()}


def finish_worker(run: dict, timeout: float) -> dict:
    """Wait up to `timeout` seconds (at least one) for a started worker: its result and its
    wall time, or {"error": ...} (a timeout, or the log's last error line and tail)."""
    process = run["process"]
    try:
        process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        run["handle"].close()
        return {"error": f"timeout after {time.perf_counter() - run['started']:.0f} s"}
    run["handle"].close()
    wall = round(time.perf_counter() - run["started"], 1)
    if process.returncode != 0 or not run["result"].exists():
        lines = [line for line in run["log"].read_text(errors="replace").splitlines()
                 if line.strip()]
        tail = next((line for line in reversed(lines) if "Error" in line), None)
        return {"error": (tail or (lines[-1] if lines else f"exit {process.returncode}"))[:500],
                "log_tail": lines[-30:], "wall_s": wall}
    return {**json.loads(run["result"].read_text()), "wall_s": wall}


def run_case(script, case: dict, timeout=None) -> dict:
    """`python script --worker CASE_JSON` in a fresh process (its peak memory its own): the
    JSON on its last line of output, or {"error": ...} (missing package: "skipped: ...")."""
    try:
        output = subprocess.run([sys.executable, str(script), "--worker", json.dumps(case)],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if output.returncode != 0:
        error = (output.stderr.strip().splitlines()[-1:] or ["no output"])[0]
        if "ModuleNotFoundError" in output.stderr or "ImportError" in output.stderr:
            error = f"skipped: {error}"
        elif "out of memory" in output.stderr.lower():
            error = "out of memory"
        return {"error": error[:500]}
    return json.loads(output.stdout.strip().splitlines()[-1])


def serve_case(worker, case_json: str) -> int:
    """The worker side of run_case: worker(case)'s result as JSON on the last line."""
    print(json.dumps(worker(json.loads(case_json))))
    return 0


def stop_workers(runs) -> None:
    """Kill the started workers that are still running."""
    for run in runs:
        if run["process"].poll() is None:
            run["process"].kill()
            run["process"].wait()


# ----------------------------------------------------------------------------------------------
# The DPO reference and the implementations of the logit-free loss
# ----------------------------------------------------------------------------------------------
def dpo_loss(logps, ref_logps, beta: float = BETA):
    """Sigmoid DPO from sequence log-probs [2B] (chosen rows first, then rejected)."""
    pairs = logps.shape[0] // 2
    ratio = logps - ref_logps
    return -F.logsigmoid(beta * (ratio[:pairs] - ratio[pairs:])).mean()


def trl_style_loss(logits, labels, ref_logps, beta: float = BETA):
    """TRL DPOTrainer's computation over materialised logits [2B, T, V] (the baseline): fp32
    log_softmax over the vocabulary, the labels' log-probs gathered, masked, summed per
    sequence, sigmoid DPO."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_logps = torch.gather(logprobs, 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return dpo_loss((token_logps * (labels != IGNORE_INDEX)).sum(-1), ref_logps, beta)


class LogitsProducer(torch.autograd.Function):
    """Stands for the lm_head matmul that produced the logits: it takes d loss / d logits
    and drops it, so the measurement covers the loss alone (a leaf tensor would add an
    accumulated .grad copy that no real training step has)."""

    @staticmethod
    def forward(ctx, logits):
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        return None


# Each builder takes beta and its options and returns loss(hidden [2B, T, H], weight [V, H],
# labels [2B, T], ref_logps [2B]) -> the scalar sigmoid DPO loss (Liger's: reference-free);
# it raises ImportError when its package is missing.
def _mixpo(beta, backend="auto", **options):
    import mixpo
    return lambda h, w, y, ref: mixpo.linear_preference_loss(
        h, w, y, ref_logps=ref, beta=beta, backend=backend, **options).loss


def _materialised(beta):
    """pre-1.16 TRL's DPOTrainer: logits = hidden @ W^T materialised, then trl_style_loss."""
    return lambda h, w, y, ref: trl_style_loss(h @ w.T, y, ref, beta)


def _trl_fused_head(beta, metrics=False):
    """trl 1.16's ChunkedLogProbFunction (add_fused_lm_head's) on the completion positions,
    compacted as on GPUs; `metrics`: also DPOTrainer's entropy, mean logits and top-1."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    outputs = ("entropy", "mean_logits", "is_top1") if metrics else ()
    chunk = 32768     # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE (slow to import)

    def loss(h, w, y, ref):
        mask = y != IGNORE_INDEX
        per_token = ChunkedLogProbFunction.apply(h[mask], w, None, y[mask], 1.0, chunk, None,
                                                 1.0, outputs)[0]
        return dpo_loss(per_token.new_zeros(mask.shape).masked_scatter(mask, per_token).sum(-1),
                        ref, beta)
    return loss


def _liger(beta, compiled=True):
    """LigerFusedLinearDPOLoss. It takes no precomputed reference log-probs, only a reference
    model it re-runs: use_ref_model=False, its cheapest setting, is a reference-free loss."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    module = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=False, compiled=compiled)
    return lambda h, w, y, ref: module(w, h, y)[0]


def _cce(beta, impl="cce"):
    """Cut Cross-Entropy's per-token losses, summed per sequence into log-probs, then DPO."""
    from cut_cross_entropy import linear_cross_entropy

    def loss(h, w, y, ref):
        token_nll = linear_cross_entropy(h, w, y, reduction="none", impl=impl)   # [2B, T]
        return dpo_loss(-token_nll.float().sum(-1), ref, beta)
    return loss


# The peers, installed as libraries: name -> (package, builder).
PEERS = {"trl": ("trl", _trl_fused_head), "liger": ("liger-kernel", _liger),
         "cce": ("cut-cross-entropy", _cce)}
PEER_PACKAGES = tuple(package for package, _ in PEERS.values())
LINEAR_LOSSES = {"mixpo": _mixpo, "materialised": _materialised,
                 **{name: builder for name, (_, builder) in PEERS.items()}}


def linear_loss(name: str, beta: float = BETA, **options):
    """The logit-free DPO loss of implementation `name` (LINEAR_LOSSES) as a callable
    (hidden, weight, labels, ref_logps) -> scalar loss."""
    return LINEAR_LOSSES[name](beta, **options)


def device_options(name: str, device_type: str) -> dict:
    """The options a loss of LINEAR_LOSSES runs with on `device_type` ("cuda" / "cpu"): CCE's
    Triton kernels need a GPU (its torch_compile implementation elsewhere); mixpo picks its
    backend itself (`backend="auto"`)."""
    if name == "cce":
        return {"impl": "cce" if device_type == "cuda" else "torch_compile"}
    return {}


def one_pair_workspace(seq_len: int, prompt_len: int, vocab: int) -> int:
    """Bytes of one pair's fp32 logits (2 sequences' completion tokens x V), rounded up to
    MiB: the smallest workspace that lets mixpo run one pass."""
    tokens = 2 * (seq_len - prompt_len)
    return -(-tokens * vocab * 4 // MIB) * MIB


def linear_inputs(rows, seq_len, prompt, hidden_size, vocab, dtype, ref_offset):
    """Seeded inputs of the logit-free loss (a worker process rebuilds the same ones): hidden
    [rows, T, H] ~ N(0, 1), weight [V, H] ~ N(0, 1/H) (logits std 1), random labels with
    `prompt` ignored positions a row, reference log-probs -U(0, 100) - ref_offset."""
    gen, where = generator(0), device()
    hidden = torch.randn(rows, seq_len, hidden_size, generator=gen, device=where)
    weight = torch.randn(vocab, hidden_size, generator=gen, device=where) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (rows, seq_len), generator=gen, device=where)
    labels[:, :prompt] = IGNORE_INDEX
    ref_logps = -torch.rand(rows, generator=gen, device=where) * 100 - ref_offset
    return hidden.to(dtype), weight.to(dtype), labels, ref_logps


def linear_step(loss_fn, inputs, backward: bool):
    """One call of a logit-free loss on fresh leaves of inputs (hidden, weight, labels,
    ref_logps): forward, or forward and backward; returns the detached loss."""
    hidden, weight, labels, ref = inputs

    def step():
        h = hidden.detach().requires_grad_(backward)
        w = weight.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            loss = loss_fn(h, w, labels, ref)
            if backward:
                loss.backward()
        return loss.detach()
    return step
