"""`mixpo plan --measure`: the planned configuration's training step run on fake tensors
(`FakeTensorMode`: shapes and dtypes, no memory, no GPU) under torch's own memory tracker,
which counts every parameter, gradient, optimizer state, activation and temporary the step
creates (torchtitan's memory estimation does the same for its models).

The step is the trainer's (`mixpo.train.trainer.train_step`): the model built from its
config, gradient checkpointing as `mixpo.hf.loading.load_causal_lm` enables it, the
`PreferenceModel` forward with the logit-free loss on a `PreferenceCollator` batch of pairs
whose every token but the first is a completion token (the plan's assumption), backward, then
clipping and the optimizer step (or step-in-backward's per-parameter updates): a first step
untracked, then the measured one, which runs with the optimizer states in place (and, for
gradient accumulation, two micro-batches). With --gpus N > 1 the model is sharded by FSDP2
(`mixpo.train.distributed.shard`) over a fake process group of N ranks and rank 0's memory
is tracked (`FSDPMemTracker`); on one GPU under mixed precision the step runs under autocast
with fp32 master weights, as the trainer does.

What the fake tensors stand for: the GPU path (backend "triton": its 16-bit softmax-gradient
workspace), on the CPU device (fake CUDA tensors need a CUDA build): attention is sdpa's CPU
choice (flash, no [T, T] scores, as flash-attn and sdpa's GPU kernels), AdamW is the fused
one (as on a GPU). Not counted: the CUDA context, NCCL buffers, cuBLAS workspaces and the
allocator's fragmentation (the plan's runtime reserve).
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

GIB = 2 ** 30
# The trackers' categories (MemTracker's and FSDPMemTracker's enum names) as the plan's
# components.
CATEGORY_COMPONENTS = {
    "PARAM": "weights", "SHARDED_PARAM": "weights", "UNSHARDED_PARAM": "weights",
    "BUFFER": "weights", "ALL_GATHER": "weights",
    "GRAD": "gradients", "SHARDED_GRAD": "gradients", "UNSHARDED_GRAD": "gradients",
    "REDUCE_SCATTER": "gradients",
    "OPT": "optimizer states",
    "ACT": "activations, temporaries", "TEMP": "activations, temporaries",
    "INP": "inputs, other", "OTH": "inputs, other",
}
COMPONENTS = ("weights", "gradients", "optimizer states", "activations, temporaries",
              "inputs, other")


@dataclass
class Measurement:
    """Rank 0's tracked peak (bytes) over the measured step, its split by component at that
    moment and by the tracker's own categories; seconds the measurement took."""
    peak: int
    components: dict
    categories: dict
    seconds: float = 0.0


def _fake_parameters(model: torch.nn.Module, device) -> None:
    """Every parameter and buffer of a model built on 'meta' replaced by a fake tensor on
    `device` (tied parameters stay tied)."""
    fakes = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in fakes:
                    fakes[id(param)] = torch.nn.Parameter(
                        torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                module._parameters[name] = fakes[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def build_causal_lm(config, dtype: torch.dtype, device, gradient_checkpointing: bool,
                    trainable: bool = True):
    """The model `config` describes, with fake weights on `device` (call inside
    FakeTensorMode), set up for training as `load_causal_lm` does it."""
    from transformers import AutoModelForCausalLM

    from mixpo.hf.loading import enable_gradient_checkpointing

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation="sdpa")
    _fake_parameters(model, device)
    model.config.use_cache = False
    if gradient_checkpointing and trainable:
        enable_gradient_checkpointing(model)
    if trainable:
        model.train()
    else:
        model.requires_grad_(False).eval()
    return model


def _batch(work, vocab_size: int):
    """A `PreferenceCollator` batch of `work.micro_batch_size` pairs of `work.seq_len` tokens,
    every label but the first a completion token (real CPU tensors)."""
    from mixpo.data.collate import PreferenceCollator

    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(work.micro_batch_size):
        pair = {}
        for side in ("chosen", "rejected"):
            ids = torch.randint(0, vocab_size, (work.seq_len,), generator=generator).tolist()
            pair[f"{side}_input_ids"] = ids
            pair[f"{side}_labels"] = [-100] + ids[1:]
        examples.append(pair)
    return PreferenceCollator(pad_token_id=0)(examples)


@contextlib.contextmanager
def _fake_process_group(world_size: int):
    """A fake process group of `world_size` ranks (this process is rank 0) and its 1-D mesh;
    no-op for one rank."""
    import torch.distributed as dist

    if world_size == 1:
        yield None
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ValueError("--measure with --gpus > 1 needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def measure_plan(model: str, work, optim: str = "adamw_bf16", step_in_backward: bool = False,
                 reference: str = "precomputed", master_weights: bool = False,
                 workspace_bytes=None, backend: str = "triton", steps: int = 2,
                 micro_batches: int = 1, device: str = "cpu",
                 fake: bool = True) -> Measurement:
    """Measure one rank's memory over the last of `steps` training steps of the
    configuration `mixpo plan` models (its arguments; `model` a KNOWN_SHAPES name or a
    config path); `micro_batches` per step (2 stands for any gradient accumulation: the
    second runs with the first's gradients in place). `fake=False` runs the same step on
    real tensors (tiny models only: tests compare it with the fake run)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from mixpo.hf.policy import PreferenceModel, decoder_layers
    from mixpo.loss_config import LossConfig
    from mixpo.train import distributed
    from mixpo.train.optim import attach_step_in_backward, build_optimizers
    from mixpo.train.plan import _load_config

    started = time.perf_counter()
    config = _load_config(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    device = torch.device(device)
    weights_dtype = torch.float32 if master_weights else torch.bfloat16
    compute = torch.bfloat16 if master_weights else None
    real_batch = _batch(work, text.vocab_size)
    options = SimpleNamespace(optim=optim, learning_rate=1e-6, adam_beta1=0.9, adam_beta2=0.999,
                              adam_epsilon=1e-8, weight_decay=0.0,
                              step_in_backward=step_in_backward)
    eager_8bit = _eager_8bit() if optim == "adamw_8bit" else contextlib.nullcontext()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    gc.collect()
    with _fake_process_group(work.gpus) as mesh, eager_8bit, mode:
        env = distributed.DistributedEnv(0, work.gpus, 0, device, mesh)
        causal_lm = build_causal_lm(config, weights_dtype, device, work.gradient_checkpointing)
        policy = distributed.shard(PreferenceModel(causal_lm, LossConfig(), backend=backend,
                                                   workspace_bytes=workspace_bytes),
                                   decoder_layers(causal_lm), env, compute)
        reference_model = None
        if reference == "live":
            frozen = build_causal_lm(config, torch.bfloat16, device, False, trainable=False)
            reference_model = distributed.shard(PreferenceModel(frozen, backend=backend,
                                                                workspace_bytes=workspace_bytes),
                                                decoder_layers(frozen), env)
        # The trainer's optimizers: fused AdamW as on a GPU (`device` is the CPU here).
        optimizers = build_optimizers(policy, options, torch.device("cuda"))
        grad_sq_sum = attach_step_in_backward(optimizers, device) if step_in_backward else None
        batch = {name: mode.from_tensor(tensor) if fake else tensor
                 for name, tensor in real_batch.items()}
        ref_logps = torch.full((2 * work.micro_batch_size,), -1000.0, device=device)
        autocast = torch.autocast(device.type, dtype=compute, enabled=compute is not None
                                  and work.gpus == 1)

        def step(between=None):
            _train_step(policy, reference_model, batch, ref_logps, optimizers, autocast,
                        step_in_backward, grad_sq_sum, micro_batches, between)

        # The first step untracked: it creates the optimizer states and fills DTensor's
        # sharding-propagation cache, whose misses build fake copies of the arguments at
        # their global shapes (no memory on a GPU, but seen by the tracker).
        for _ in range(max(0, steps - 1)):
            step()
        if work.gpus > 1:
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            tracker = FSDPMemTracker(policy, optimizers[0])
            tracker.track_inputs((batch,))
        else:
            tracker = MemTracker()
            tracker.track_external(policy, *optimizers, *batch.values())
        with tracker:
            # Per-module statistics allow one forward per module: cleared between
            # micro-batches (the peak is kept).
            step(tracker.reset_mod_stats)
        snapshot = tracker.get_tracker_snapshot("peak")[device]
    categories = {category.name: value for category, value in snapshot.items()
                  if category != "Total" and value}
    components = dict.fromkeys(COMPONENTS, 0)
    for name, value in categories.items():
        components[CATEGORY_COMPONENTS[name]] += value
    return Measurement(snapshot["Total"], components, categories,
                       time.perf_counter() - started)


@contextlib.contextmanager
def _eager_8bit():
    """torchao's 8-bit AdamW on fake tensors under the tracker: its quantisation maps (built
    on first use with `.tolist()`) built before any tensor is fake, and its per-parameter
    step run eagerly: torch.compile, which fuses it on a GPU, cannot run under a memory
    tracker. The eager step's temporaries bound the fused kernel's from above."""
    try:
        from torchao.optim import subclass_8bit
    except ImportError:
        raise ValueError("optim 'adamw_8bit' needs torchao (pip install torchao)") from None
    subclass_8bit.get_qmap_signed()
    subclass_8bit.get_qmap_unsigned()
    compile_ = torch.compile
    torch.compile = lambda function, *args, **kwargs: function
    try:
        yield
    finally:
        torch.compile = compile_


def _train_step(policy, reference_model, batch, ref_logps, optimizers, autocast,
                step_in_backward, grad_sq_sum, micro_batches=1, between=None) -> None:
    """`mixpo.train.trainer.train_step`; `between()` runs between micro-batches."""
    from mixpo.train.config import TrainConfig
    from mixpo.train.optim import apply_updates

    for index in range(micro_batches):
        if index and between is not None:
            between()
        if reference_model is not None:
            with torch.no_grad(), autocast:
                ref_logps = reference_model(batch, logps_only=True)
            if hasattr(reference_model, "reshard"):     # FSDP2, as `_batch_reference` does
                reference_model.reshard()
        with autocast:
            loss, _ = policy(batch, ref_logps=ref_logps, validate=False)
        (loss / micro_batches).backward()
    apply_updates([p for p in policy.parameters() if p.requires_grad], optimizers,
                  TrainConfig.max_grad_norm, grad_sq_sum if step_in_backward else None)


def format_measurement(measured: Measurement, phases: dict) -> str:
    """The measured peak by part beside the plan's peak phase (`peak_phases`), both without
    the runtime reserve."""
    from mixpo.train.plan import peak_phase

    name = peak_phase(phases)
    parts = phases[name]
    estimate = sum(parts.values()) - parts["runtime reserve"]
    lines = ["", f"measured: the step on fake tensors under torch's memory tracker "
             f"({measured.seconds:.0f} s); planned peak: {name}",
             f"{'per GPU, at the peak':26s}{'planned':>12s}{'measured':>12s}"]
    for component in COMPONENTS:
        lines.append(f"{component:26s}{parts.get(component, 0) / GIB:>8.2f} GiB"
                     f"{measured.components[component] / GIB:>8.2f} GiB")
    lines.append(f"{'total (without reserve)':26s}{estimate / GIB:>8.2f} GiB"
                 f"{measured.peak / GIB:>8.2f} GiB   measured / planned "
                 f"{measured.peak / estimate:.3f}")
    return "\n".join(lines)


# The configurations the README's memory claims quote: (label, model, GPUs, optimizer,
# step-in-backward, fp32 master weights).
README_CONFIGURATIONS = (
    ("Llama-3-8B, 1 GPU, adamw_bf16, step-in-backward", "llama-3-8b", 1, "adamw_bf16", True,
     False),
    ("Llama-3-8B, 1 GPU, adamw_8bit, step-in-backward", "llama-3-8b", 1, "adamw_8bit", True,
     False),
    ("Llama-3-8B, 1 GPU, adamw_bf16, gradients kept", "llama-3-8b", 1, "adamw_bf16", False,
     False),
    ("Llama-3-8B, 2 GPUs, adamw_bf16", "llama-3-8b", 2, "adamw_bf16", False, False),
    ("Llama-3-8B, 2 GPUs, fp32 master weights + AdamW (papers' setup)", "llama-3-8b", 2,
     "adamw", False, True),
    ("Llama-3-8B, 8 GPUs, adamw_bf16", "llama-3-8b", 8, "adamw_bf16", False, False),
    ("Llama-3-70B, 8 GPUs, adamw_bf16", "llama-3-70b", 8, "adamw_bf16", False, False),
)


def measure_configurations(configurations=README_CONFIGURATIONS, seq_len: int = 1024) -> dict:
    """Each configuration measured and planned (1 pair of `seq_len` tokens per micro-batch,
    gradient checkpointing, precomputed reference; with kept gradients a second
    micro-batch accumulates): the record `benchmarks/results/plan_measured.json` holds."""
    import datetime
    import importlib.metadata
    import platform

    from mixpo.train.plan import (RUNTIME_RESERVE_BYTES, Workload, mixpo_plan, model_shape,
                                  peak_phase, peak_phases, plan_total)

    rows = []
    for label, model, gpus, optim, step_in_backward, master in configurations:
        shape, work = model_shape(model), Workload(gpus=gpus, seq_len=seq_len)
        plan = mixpo_plan(shape, work, optim=optim, step_in_backward=step_in_backward,
                          master_weights=master)
        phases = peak_phases(shape, work, plan, step_in_backward, master)
        planned = plan_total(phases) - RUNTIME_RESERVE_BYTES
        measured = measure_plan(model, work, optim=optim, step_in_backward=step_in_backward,
                                master_weights=master,
                                micro_batches=1 if step_in_backward else 2)
        rows.append({
            "configuration": label, "model": model, "gpus": gpus, "optim": optim,
            "step_in_backward": step_in_backward, "master_weights": master,
            "seq_len": seq_len, "micro_batch_size": 1,
            "measured_gib": measured.peak / GIB, "planned_gib": planned / GIB,
            "measured_over_planned": measured.peak / planned,
            "planned_peak_phase": peak_phase(phases),
            "measured_categories_gib": {name: value / GIB
                                        for name, value in measured.categories.items()},
            "planned_with_reserve_gib": plan_total(phases) / GIB,
            "seconds": measured.seconds})
        print(f"{label}: measured {measured.peak / GIB:.2f} GiB, planned {planned / GIB:.2f}"
              f" GiB ({measured.peak / planned:.3f}), {measured.seconds:.0f} s", flush=True)
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "torchao"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"benchmark": "plan_measured",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": f"fake tensors (FakeTensorMode) on a CPU, {platform.machine()}; "
                      "FSDP2 over a fake process group, rank 0 tracked",
            "method": "torch.distributed._tools MemTracker / FSDPMemTracker peak over the "
                      "second training step (the first untracked), without the runtime "
                      "reserve; the Triton backend's workspace; fused AdamW; adamw_8bit's "
                      "torchao step run eagerly (torch.compile cannot run under the tracker:"
                      " an upper bound of the fused step's temporaries)",
            "versions": versions, "rows": rows}


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Measure the README's memory configurations "
                                     "on fake tensors and write them as JSON.")
    parser.add_argument("--json", required=True, help="output path")
    parser.add_argument("--only", nargs="*", default=None,
                        help="configuration labels (substrings) to measure")
    args = parser.parse_args(argv)
    chosen = [c for c in README_CONFIGURATIONS
              if not args.only or any(part in c[0] for part in args.only)]
    record = measure_configurations(chosen)
    with open(args.json, "w") as handle:
        json.dump(record, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
