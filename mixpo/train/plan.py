"""`mixpo plan`: memory per GPU for full-parameter preference training, mixpo vs TRL defaults.

Parameter counts are exact: the model is built from its config on the meta device (no
memory, no download). Everything else is arithmetic with the assumptions listed below, in
GiB (2^30 bytes), per GPU, with the model sharded over N GPUs by FSDP (ZeRO-3 for TRL), and
checked against torch's memory tracker running the same step on fake tensors
(`mixpo plan --measure`, `mixpo.train.measure`; benchmarks/results/plan_measured.json).

mixpo column (the trainer's options), each component at its largest:
  weights      bf16, 2 B/param / N
  gradients    bf16, 2 B/param / N; with step-in-backward (one GPU) only the largest
               parameter's gradient is alive at once
  optimizer    AdamW moments: 4 B/param (adamw / adamw_bf16: two bf16 moments),
               2 B/param + an fp32 scale per 256 values (adamw_8bit, torchao) / N
  optimizer step  the temporaries of the largest parameter's update (its shard under FSDP):
               32 B per element for adamw_bf16 (`STEP_TEMPORARY_BYTES`), at most
               UPDATE_CHUNK elements at a time; none for torch's fused AdamW and torchao's
               compiled 8-bit step
  reference    0 when precomputed (a file of 2 floats per pair), bf16 copy / N when live
  loss head    logit-free, two passes: the softmax-gradient workspace (at most
               `--head-workspace-mib`, default DEFAULT_WORKSPACE_BYTES = 256 MiB; smaller when
               [tokens, V] bf16 fits in less), the backward's fp32 dHidden accumulator and
               bf16 copy of the completion rows ([tokens, H], 4 + 2 B); one pass (the
               micro-batch's fp32 logits fit the workspace): those logits and their bf16
               gradient, row copies and the head's gradient from the forward on
               (`loss_head_bytes`); both: the final hidden states and their gradient; on one
               GPU with fp32 master weights, autocast's bf16 copy of the head and its bf16
               gradient (2 + 2 B per head entry)
  FSDP buffers the unsharded root unit (embeddings, head) and two decoder layers in flight,
               or the root unit's gradient reduce: its unsharded gradients, their fp32
               copy and the fp32 output shard (`root_reduce_parts`)
  fp32 master weights (`mixed_precision: bf16`, the papers' setup): weights 4 B, gradients
  4 B, AdamW fp32 moments 8 B per param / N.
The mixpo total is the largest of the moments a step peaks at (`peak_phases`): the forward
and backward, FSDP's last gradient reduce, the optimizer step.
TRL-default column (trl 1.16 DPOTrainer with bf16 mixed precision, as usually launched; not
measured, its total the sum of its components):
  weights 4 B (fp32 master) + gradients 4 B + AdamW fp32 moments 8 B per param / N;
  a live bf16 reference model 2 B/param / N; trl 1.16's fused LM head (add_fused_lm_head):
  the head projected in [4096 tokens x 32768 vocab] fp32 tiles (one alive at a time, turned
  into its gradient in place), the head's gradient accumulated in fp32 [V, H], the final
  hidden states and their gradient (no [tokens x vocab] logits; older TRL materialised
  them: 8 B per (token, vocab) entry, the "logits materialised" variant of mixpo).
Both: activations of the same micro-batch (2 sequences per pair); with gradient checkpointing
the bf16 input of every decoder layer plus one layer recomputed with its gradients (2x its
saved tensors); without, every layer's saved tensors. A Llama-style layer saves per token
4H (norms, residuals) + q + k + v + rotated q, k + attention output + 4I (MLP) values.
A fixed 3 GiB covers the CUDA context, NCCL buffers and allocator slack (not measured).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixpo.kernels.configs import DEFAULT_WORKSPACE_BYTES
from mixpo.kernels.linear_logps_torch import workspace_rows

GIB = 2 ** 30
RUNTIME_RESERVE_BYTES = 3 * GIB

# Shapes of popular checkpoints (their config.json values), so planning needs no download.
# The one model-shape table: `mixpo plan`, the roofline model and the benchmarks read it.
KNOWN_SHAPES = {
    "llama-3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, tie_word_embeddings=False)),
    "llama-3-70b": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                  num_hidden_layers=80, num_attention_heads=64,
                                  num_key_value_heads=8, tie_word_embeddings=False)),
    "qwen-2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                  num_hidden_layers=28, num_attention_heads=28,
                                  num_key_value_heads=4, tie_word_embeddings=False)),
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, tie_word_embeddings=False)),
    "gemma-2-9b": ("gemma2", dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                                  num_hidden_layers=42, num_attention_heads=16,
                                  num_key_value_heads=8, head_dim=256, tie_word_embeddings=True)),
}

# Earlier spellings (the roofline's), still accepted.
SHAPE_ALIASES = {"llama3": "llama-3-8b", "qwen25": "qwen-2.5-7b", "gemma2": "gemma-2-9b"}


def canonical_shape_name(name: str) -> str:
    """`name` as a KNOWN_SHAPES key: old spellings (SHAPE_ALIASES) map to the current ones."""
    return SHAPE_ALIASES.get(name, name)


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_params: int
    largest_param: int       # elements of the biggest single tensor (embedding / LM head)
    layer_params: int        # elements of one decoder layer
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    q_dim: int               # heads * head_dim
    kv_dim: int              # key/value heads * head_dim
    logit_transform: str = ""  # e.g. "final_logit_softcapping=30.0" (not a plain head)

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers (embeddings, final norm, head)."""
        return self.num_params - self.num_layers * self.layer_params

    @property
    def layer_activation_values(self) -> int:
        """Values a Llama-style decoder layer saves for backward, per token."""
        return (4 * self.hidden_size + 2 * self.q_dim + 3 * self.kv_dim + self.q_dim
                + 4 * self.intermediate_size)


def _load_config(name_or_path: str):
    from transformers import AutoConfig, CONFIG_MAPPING

    from mixpo.hf.loading import load_pretrained

    name_or_path = canonical_shape_name(name_or_path)
    if name_or_path in KNOWN_SHAPES:
        model_type, values = KNOWN_SHAPES[name_or_path]
        return CONFIG_MAPPING[model_type](**values)
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"--model {name_or_path!r}: not a config.json, a model directory, or "
                         f"one of {', '.join(KNOWN_SHAPES)}")
    return load_pretrained(AutoConfig, str(path), "model config")


def model_shape(name_or_path: str) -> ModelShape:
    """Exact parameter counts of the model `name_or_path` describes (built on 'meta')."""
    import torch
    from transformers import AutoModelForCausalLM

    from mixpo.hf.loading import LOGIT_TRANSFORMS
    from mixpo.hf.policy import decoder_layers

    config = _load_config(name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    transforms = [f"{name}={getattr(text, name)}" for name in LOGIT_TRANSFORMS
                  if getattr(text, name, None) not in (None, 0, 1, 1.0)]
    return ModelShape(
        name=name_or_path, logit_transform=", ".join(transforms),
        num_params=sum(p.numel() for p in model.parameters()),
        largest_param=max(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layers[0].parameters()), num_layers=len(layers),
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim)


@dataclass(frozen=True)
class Workload:
    gpus: int = 1
    seq_len: int = 1024
    micro_batch_size: int = 1          # pairs per forward on one GPU
    gradient_checkpointing: bool = True

    @property
    def tokens(self) -> int:
        """Positions per forward on one GPU (chosen + rejected sequences)."""
        return 2 * self.micro_batch_size * self.seq_len


def activation_bytes(shape: ModelShape, work: Workload) -> int:
    per_layer = work.tokens * shape.layer_activation_values * 2          # bf16
    if work.gradient_checkpointing:
        layer_inputs = shape.num_layers * work.tokens * shape.hidden_size * 2
        return layer_inputs + 2 * per_layer
    return shape.num_layers * per_layer


def fsdp_transient_bytes(shape: ModelShape, work: Workload) -> int:
    """What FSDP holds at once in the backward: the unsharded root unit (embeddings, norm,
    head) and two decoder layers in the compute dtype, and the last layer's gradient
    reduce-scatter (its unsharded gradients and their fp32 copy)."""
    if work.gpus == 1:
        return 0
    return (shape.root_params + 2 * shape.layer_params) * 2 + shape.layer_params * (2 + 4)


def root_reduce_parts(shape: ModelShape, work: Workload, weight_bytes: int = 2) -> tuple:
    """The root unit's gradient reduce-scatter, the last of the backward, at its largest as
    torch's tracker sees FSDP2's `foreach_reduce` on fake tensors: (unsharded gradients held,
    temporaries). Before the copy-in: every unsharded root gradient (compute dtype) beside
    the fp32 reduce-scatter input (the trainer reduces in fp32, `mixpo.train.distributed.
    shard`); after it: one unsharded gradient of the embedding's size still held, the input,
    the fp32 output shard and its cast to the parameters' dtype (none for fp32 master
    weights). Llama-3-8B on 2 GPUs: the second, 2 GiB more than the first."""
    if work.gpus == 1:
        return 0, 0
    root, gpus = shape.root_params, work.gpus
    reduce_input = root * 4
    before = (root * 2, reduce_input)
    output = root * 4 // gpus + (root * weight_bytes // gpus if weight_bytes != 4 else 0)
    after = (min(root, shape.vocab_size * shape.hidden_size) * 2,
             reduce_input + output)
    return max(before, after, key=sum)


# Bytes per element of the largest parameter that one update holds at once, per optimizer:
# BF16StateAdamW (mixpo.train.optim) computes in fp32 copies of the gradient, both moments, the
# denominator and the updated weights (20 B), and its stochastic rounding holds three int32
# temporaries (12 B); torch's fused AdamW (on GPUs) and torchao's compiled 8-bit step keep
# theirs in registers (run eagerly, mixpo's slices bound them to a fraction of a GiB).
STEP_TEMPORARY_BYTES = {"adamw_bf16": 32, "adamw": 0, "adamw_8bit": 0}


def optimizer_step_bytes(shape: ModelShape, work: Workload, optim: str) -> int:
    """The temporaries of one parameter's update, the largest parameter's (its shard under
    FSDP): the update runs parameter by parameter, and BF16StateAdamW's in slices of
    UPDATE_CHUNK elements."""
    from mixpo.train.optim import UPDATE_CHUNK

    elements = -(-shape.largest_param // work.gpus)
    if optim == "adamw_bf16":
        elements = min(elements, UPDATE_CHUNK)
    return elements * STEP_TEMPORARY_BYTES[optim]


def materialised_logits_bytes(shape: ModelShape, work: Workload) -> int:
    """bf16 logits + saved bf16 log-softmax + both gradients: 8 B per (position, vocab)."""
    return work.tokens * shape.vocab_size * 8


TRL_TILE_BYTES = 4096 * 32768 * 4     # trl 1.16's fused head: one fp32 logits tile


def head_workspace_bytes(shape: ModelShape, work: Workload, workspace_bytes=None) -> int:
    """The logit-free head's workspace: the budget, or less when the [tokens, V] 16-bit
    softmax gradient of the whole micro-batch fits in less."""
    budget = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    return min(budget, work.tokens * shape.vocab_size * 2)


def one_pass(shape: ModelShape, work: Workload, workspace_bytes=None) -> bool:
    """Whether the logit-free loss takes its one pass: a per-pair loss (the default) whose
    micro-batch's fp32 logits fit the workspace (`mixpo.functions.plan_linear_passes`)."""
    return work.tokens <= workspace_rows(shape.vocab_size, 4, workspace_bytes)


def loss_head_bytes(shape: ModelShape, work: Workload, workspace_bytes=None) -> int:
    """The logit-free head's memory: two passes hold the bf16 softmax-gradient workspace
    (`head_workspace_bytes`), the fp32 dHidden accumulator and a bf16 copy of the
    completion rows ([tokens, H], 4 + 2 B); the one pass holds the whole micro-batch's fp32
    logits and their bf16 gradient (6 B per token and vocab entry), fp32 and bf16 copies of
    the rows and an fp32 dHidden (10 B per token and hidden unit), and the head's gradient
    [V, H] from the forward on. Both: the final hidden states and their gradient (bf16)."""
    tokens, hidden_size = work.tokens, shape.hidden_size
    hidden = 2 * tokens * hidden_size * 2
    if one_pass(shape, work, workspace_bytes):
        return tokens * shape.vocab_size * 6 + tokens * hidden_size * 10 \
            + shape.vocab_size * hidden_size * 2 + hidden
    return head_workspace_bytes(shape, work, workspace_bytes) + tokens * hidden_size * 6 \
        + hidden


def mixpo_plan(shape: ModelShape, work: Workload, optim: str = "adamw_bf16",
               step_in_backward: bool = False, reference: str = "precomputed",
               logit_free: bool = True, master_weights: bool = False,
               workspace_bytes=None) -> dict:
    """Bytes per GPU of each component of a mixpo run, each at its largest (the peak is
    `peak_phases`' largest phase, not their sum); `master_weights`: fp32 weights, gradients
    and AdamW states under bf16 compute (mixed_precision: bf16); `workspace_bytes`: the
    logit-free head's budget (default DEFAULT_WORKSPACE_BYTES)."""
    params, gpus = shape.num_params, work.gpus
    weight_bytes = 4 if master_weights else 2
    states = params * (8 if master_weights and optim == "adamw" else 4) // gpus
    if optim == "adamw_8bit":    # torchao: 1-byte codes and an fp32 scale per 256 values
        states = (params * 2 + params * 2 * 4 // 256) // gpus
    head = loss_head_bytes(shape, work, workspace_bytes) if logit_free \
        else materialised_logits_bytes(shape, work)
    if logit_free and master_weights and gpus == 1:
        # Under autocast the head runs on a bf16 copy of its weight (as F.linear would) and
        # returns a bf16 gradient before it reaches the fp32 master gradient.
        head += shape.vocab_size * shape.hidden_size * (2 + 2)
    return {
        "weights": params * weight_bytes // gpus,
        "gradients": shape.largest_param * weight_bytes if step_in_backward
        else params * weight_bytes // gpus,
        "optimizer states": states,
        "optimizer step": optimizer_step_bytes(shape, work, optim),
        "activations": activation_bytes(shape, work),
        "loss head": head,
        "FSDP buffers": max(fsdp_transient_bytes(shape, work),
                            sum(root_reduce_parts(shape, work, weight_bytes))),
        "reference model": params * 2 // gpus if reference == "live" else 0,
        "runtime reserve": RUNTIME_RESERVE_BYTES,
    }


def checkpoint_input_bytes(shape: ModelShape, work: Workload) -> int:
    """What the forward leaves for the backward before any layer's backward ran: the bf16
    input of every decoder layer (gradient checkpointing), or all their saved tensors."""
    if work.gradient_checkpointing:
        return shape.num_layers * work.tokens * shape.hidden_size * 2
    return activation_bytes(shape, work)


def peak_phases(shape: ModelShape, work: Workload, plan: dict,
                step_in_backward: bool = False, master_weights: bool = False) -> dict:
    """What a GPU holds at the moments a step peaks, {phase: {part: bytes}} (the plan's
    total is the largest phase's sum; the parts are those `mixpo plan --measure` reports):
    - forward and backward: weights, optimizer states, gradients (all of them, or with
      step-in-backward the largest), FSDP's unsharded root unit and two layers, and the
      larger of the loss head and the recomputed layers beside the layers' saved inputs
      (both at once without gradient checkpointing);
    - (FSDP) the root unit's gradient reduce-scatter, at the end of the backward: every
      gradient plus the root unit's unsharded gradients and the reduce's fp32 buffers
      (`root_reduce_parts`; `master_weights`: fp32 parameters, no cast of the output
      shard), activations gone;
    - the optimizer step: every gradient and the largest update's temporaries, activations
      gone; with step-in-backward that update (the LM head's, the first gradient of the
      backward) runs while the decoder layers' saved inputs are still alive.
    Each holds the reference model and the runtime reserve too. Checked against torch's
    memory tracker on fake tensors (`mixpo plan --measure`, benchmarks/results/
    plan_measured.json)."""
    def phase(weights=0, gradients=0, states=0, activations=0):
        # The parts as the tracker sorts them: an update's temporaries are optimizer
        # states, FSDP's fp32 copy of the gradients for the reduce a temporary.
        return {"weights": plan["weights"] + plan["reference model"] + weights,
                "gradients": plan["gradients"] + gradients,
                "optimizer states": plan["optimizer states"] + states,
                "activations, temporaries": activations,
                "runtime reserve": plan["runtime reserve"]}

    # The head runs between the forward and the first layer's backward: with checkpointing
    # beside the layers' saved inputs only, then the recomputed layers take its place.
    inputs = checkpoint_input_bytes(shape, work)
    activations = inputs + max(plan["loss head"], plan["activations"] - inputs) \
        if work.gradient_checkpointing else plan["activations"] + plan["loss head"]
    phases = {"forward and backward": phase(weights=fsdp_transient_bytes(shape, work),
                                            activations=activations)}
    if work.gpus > 1:
        held, temporaries = root_reduce_parts(shape, work, 4 if master_weights else 2)
        phases["root unit's gradient reduce"] = phase(gradients=held, activations=temporaries)
    phases["optimizer step"] = phase(
        states=plan["optimizer step"],
        activations=inputs if step_in_backward else 0)
    return phases


def peak_phase(phases: dict) -> str:
    """The name of the plan's largest phase (the first of equals)."""
    return max(phases, key=lambda name: sum(phases[name].values()))


def plan_total(phases: dict) -> int:
    """The plan's total per GPU: its largest phase."""
    return sum(phases[peak_phase(phases)].values())


def trl_default_plan(shape: ModelShape, work: Workload) -> dict:
    """Bytes per GPU for TRL's DPOTrainer defaults (module docstring): its total is the sum
    of its components."""
    params, gpus = shape.num_params, work.gpus
    return {
        "weights": params * 4 // gpus,
        "gradients": params * 4 // gpus,
        "optimizer states": params * 8 // gpus,
        "optimizer step": 0,
        "activations": activation_bytes(shape, work),
        "loss head": shape.vocab_size * shape.hidden_size * 4 + TRL_TILE_BYTES
        + 2 * work.tokens * shape.hidden_size * 2,
        "FSDP buffers": fsdp_transient_bytes(shape, work),
        "reference model": params * 2 // gpus,
        "runtime reserve": RUNTIME_RESERVE_BYTES,
    }


NOTES = {  # (mixpo, TRL default) column notes
    "weights": ("bf16", "fp32 master weights"),
    "gradients": ("bf16", "fp32"),
    "optimizer states": ("bf16 or 8-bit moments", "fp32 moments"),
    "optimizer step": ("the largest update's temporaries", "fused AdamW"),
    "activations": ("the same micro-batch in both", ""),
    "loss head": ("logit-free, workspace + fp32 dHidden", "fused head (trl 1.16)"),
    "FSDP buffers": ("unsharded units; root's fp32 reduce", "unsharded units"),
    "reference model": ("precomputed or live", "live bf16 copy"),
    "runtime reserve": ("CUDA context, buffers, slack", ""),
}


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def _verdict(total: int, gpu_memory_gib: float) -> str:
    room = gpu_memory_gib * GIB - total
    return f"yes, {room / GIB:.1f} GiB free" if room >= 0 else f"no, {-room / GIB:.1f} GiB over"


def format_plan(shape: ModelShape, work: Workload, gpu_memory_gib: float, mixpo: dict,
                trl: dict, mixpo_options: str, variants: list[tuple[str, int]],
                phases: dict) -> str:
    """The report: a per-component table, the peak phases, the verdicts, and each mixpo
    option's effect."""
    lines = [
        f"model {shape.name}: {shape.num_params / 1e9:.2f} B parameters, hidden "
        f"{shape.hidden_size}, {shape.num_layers} layers, vocab {shape.vocab_size}",
        f"{work.gpus} GPU(s) x {gpu_memory_gib:g} GiB; micro-batch {work.micro_batch_size} "
        f"pair(s) = {work.tokens} tokens per forward; gradient checkpointing "
        f"{'on' if work.gradient_checkpointing else 'off'}",
        f"mixpo: {mixpo_options}",
        "",
        f"{'per GPU':18s}{'mixpo':>12s}{'TRL default':>14s}   mixpo | TRL default",
    ]
    for component in mixpo:
        ours, theirs = NOTES[component]
        note = f"{ours} | {theirs}" if theirs else ours
        lines.append(f"{component:18s}{_gib(mixpo[component]):>12s}{_gib(trl[component]):>14s}"
                     f"   {note}")
    mixpo_total, trl_total = plan_total(phases), sum(trl.values())
    lines.append(f"{'total':18s}{_gib(mixpo_total):>12s}{_gib(trl_total):>14s}"
                 "   mixpo: its largest phase (below) | TRL default: the sum")
    for phase, parts in phases.items():
        value = sum(parts.values())
        mark = "  <- peak" if value == mixpo_total else ""
        lines.append(f"  {phase:30s}{_gib(value):>12s}{mark}")
    lines += [f"fits? mixpo: {_verdict(mixpo_total, gpu_memory_gib)}; "
              f"TRL default: {_verdict(trl_total, gpu_memory_gib)}",
              "", "mixpo with one option changed (total per GPU):"]
    for label, total in variants:
        lines.append(f"  {label:58s}{_gib(total):>12s}  ({_verdict(total, gpu_memory_gib)})")
    if shape.logit_transform:
        lines.append(f"note: this model's config sets {shape.logit_transform}; the logit-free "
                     "loss applies that transform in its kernels (no extra memory)")
    return "\n".join(lines)


def check_plan_arguments(args) -> None:
    """One-line errors for `mixpo plan`'s arguments, before any model is built."""
    for name in ("gpus", "gpu_memory", "seq_len", "micro_batch_size", "global_batch_size",
                 "head_workspace_mib"):
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.global_batch_size % (args.micro_batch_size * args.gpus):
        raise ValueError("--global-batch-size must be a multiple of --micro-batch-size x --gpus")
    no_accumulation = args.global_batch_size == args.micro_batch_size and args.gpus == 1
    if args.step_in_backward and not no_accumulation:
        raise ValueError("step-in-backward needs one backward per step on one GPU: "
                         "--gpus 1 and --global-batch-size equal to --micro-batch-size")


def plan_command(args) -> str:
    """The `mixpo plan` report for parsed arguments (see mixpo.train.cli); with
    `args.measure`, the planned step measured on fake tensors beside it
    (`mixpo.train.measure`)."""
    check_plan_arguments(args)
    shape = model_shape(args.model)
    work = Workload(args.gpus, args.seq_len, args.micro_batch_size, args.gradient_checkpointing)
    workspace_mib = getattr(args, "head_workspace_mib", None)
    workspace = None if workspace_mib is None else workspace_mib * 2**20
    options = dict(optim=args.optim, step_in_backward=args.step_in_backward,
                   reference=args.reference, logit_free=True, workspace_bytes=workspace)
    mixpo = mixpo_plan(shape, work, **options)

    def total(**changes) -> int:
        changed = {**options, **changes}
        return plan_total(peak_phases(shape, work, mixpo_plan(shape, work, **changed),
                                      changed["step_in_backward"],
                                      changed.get("master_weights", False)))

    variants = [("reference live (a frozen bf16 copy)", total(reference="live")),
                ("logits materialised instead of logit-free", total(logit_free=False)),
                ("fp32 master weights + AdamW fp32 states (papers' setup)",
                 total(master_weights=True, optim="adamw"))]
    for optim in ("adamw_bf16", "adamw_8bit"):
        if optim != args.optim:
            variants.append((f"optimizer {optim}", total(optim=optim)))
    if not args.step_in_backward and args.gpus == 1:
        variants.append(("step-in-backward (needs global batch = micro-batch)",
                         total(step_in_backward=True)))
    accumulation = args.global_batch_size // (args.micro_batch_size * args.gpus)
    gradients = "step-in-backward" if args.step_in_backward else "gradients kept"
    head_mib = head_workspace_bytes(shape, work, workspace) / 2**20
    budget_mib = (workspace or DEFAULT_WORKSPACE_BYTES) / 2**20
    description = (f"{args.optim}, {gradients}, reference {args.reference}, logit-free loss "
                   f"(head workspace {head_mib:.0f} MiB of a {budget_mib:.0f} MiB budget: "
                   "linear_preference_loss(workspace_bytes=...)); global batch "
                   f"{args.global_batch_size} pairs = {accumulation} accumulated "
                   f"micro-batch(es) x {args.gpus} GPU(s)")
    phases = peak_phases(shape, work, mixpo, args.step_in_backward)
    report = format_plan(shape, work, args.gpu_memory, mixpo, trl_default_plan(shape, work),
                         description, variants, phases)
    if getattr(args, "measure", False):
        from mixpo.train.measure import format_measurement, measure_plan

        measured = measure_plan(args.model, work, optim=args.optim,
                                step_in_backward=args.step_in_backward,
                                reference=args.reference, workspace_bytes=workspace,
                                micro_batches=min(accumulation, 2))
        report += "\n" + format_measurement(measured, phases)
    return report
