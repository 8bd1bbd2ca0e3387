"""Launch configurations: the one table that dispatch and the GPU compile check both read.

Every Triton kernel of mixpo is registered here as a `KernelSpec`: where its @triton.jit
function lives, its argument types per input dtype, the constexpr flags dispatch can pass,
the GPU launch configurations, the rule that picks one of them for a problem, and the single
configuration used under TRITON_INTERPRET=1 (the CPU interpreter: few programs, big blocks).
`choose()` is the only way launch helpers get a configuration, so every configuration reachable
at run time is in `KernelSpec.gpu_configs` and is compiled for sm_80/sm_90 by
`mixpo.kernels.compile_check` (run in the test suite).

The GPU configurations follow the usual shapes for these kernel kinds (flash-attention's
cross-entropy, Cut Cross-Entropy); they compile and fit in shared memory on A100 and H100, but
have not been tuned on hardware yet.
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from mixpo.kernels.dispatch import INTERPRET

# Logit-free head: the most bytes of logits / softmax-gradient workspace alive at once (the
# default of `workspace_bytes`): the backward's [n, C] gradient chunk, the torch forward's
# [t, V] logits chunk, the one-pass group's [t, V] logits. At Llama-3-8B with 12,288 bf16
# completion tokens: C = 10,880 vocab rows, 12 chunks.
DEFAULT_WORKSPACE_BYTES = 256 * 2**20
# The atomic backward (linear_logps_atomic) with 16-bit weights: its fp32 weight-gradient
# accumulator covers this many bytes, one vocab chunk at a time.
DWEIGHT_CHUNK_BYTES = 256 * 2**20


def dweight_chunk_rows(vocab_size: int, hidden_size: int, block_v: int,
                       vocab_chunk=None) -> int:
    """Vocab rows of one fp32 dWeight chunk of the atomic backward with 16-bit weights:
    `vocab_chunk` or DWEIGHT_CHUNK_BYTES' worth, a multiple of the vocab tile `block_v`, at
    most the vocabulary."""
    rows = vocab_chunk or DWEIGHT_CHUNK_BYTES // (4 * hidden_size)
    return min(vocab_size, max(block_v, rows // block_v * block_v))


DTYPE_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class LaunchConfig:
    """Constexpr block sizes plus num_warps / num_stages of one launch."""
    blocks: tuple  # ((constexpr name, value), ...)
    num_warps: int = 4
    num_stages: int = 1

    def launch_kwargs(self) -> dict:
        return {**dict(self.blocks), "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    def block(self, name: str) -> int:
        return dict(self.blocks)[name]


def config(num_warps=4, num_stages=1, **blocks) -> LaunchConfig:
    return LaunchConfig(tuple(sorted(blocks.items())), num_warps, num_stages)


@dataclass(frozen=True)
class KernelSpec:
    """One @triton.jit kernel as dispatch and the compile check see it.

    The argument types of a compile (`signature`) come from the kernel's own argument names:
    `*_ptr` arguments are fp32 pointers unless `pointers` says otherwise ("{dtype}" = the input
    dtype tag), other non-constexpr arguments are i32 unless `scalars` says otherwise.
    `select` picks a launch configuration for a problem; a kernel with one GPU configuration
    needs none.
    """
    name: str
    module: str                       # module defining the @triton.jit function
    function: str                     # its name there
    gpu_configs: tuple                # LaunchConfig, ...
    interpreter_config: LaunchConfig
    pointers: dict = field(default_factory=dict)   # pointer argument -> "*{dtype}", "*i64", ...
    scalars: dict = field(default_factory=dict)    # scalar argument -> "fp32", "i64", ...
    select: Optional[Callable[..., LaunchConfig]] = None  # (gpu_configs, **problem) -> config
    flags: dict = field(default_factory=dict)  # constexpr flag -> values dispatch may pass
    dtypes: tuple = ("fp32", "bf16", "fp16")

    def kernel(self):
        return getattr(importlib.import_module(self.module), self.function)

    def signature(self, dtype: str) -> dict:
        """{argument: triton type} of the non-constexpr arguments for inputs of `dtype`."""
        kernel = self.kernel()
        types = {}
        for param in kernel.params:
            if param.is_constexpr:
                continue
            name = param.name
            if name.endswith("_ptr"):
                types[name] = self.pointers.get(name, "*fp32").format(dtype=dtype)
            else:
                types[name] = self.scalars.get(name, "i32")
        unknown = (set(self.pointers) | set(self.scalars)) - set(types)
        if unknown:
            raise ValueError(f"{self.name}: {sorted(unknown)} are not arguments of "
                             f"{self.function}")
        return types

    def variants(self):
        """Every (dtype tag, flags dict, config) the dispatcher can launch on a GPU."""
        names = sorted(self.flags)
        for dtype in self.dtypes:
            for values in itertools.product(*(self.flags[name] for name in names)):
                for launch in self.gpu_configs:
                    yield dtype, dict(zip(names, values)), launch


KERNELS: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    if spec.select is None and len(spec.gpu_configs) != 1:
        raise ValueError(f"{spec.name}: several GPU configurations need a select rule")
    KERNELS[spec.name] = spec
    return spec


def choose(name: str, **problem) -> LaunchConfig:
    """The launch configuration for kernel `name` and this problem (sizes, dtype)."""
    spec = KERNELS[name]
    if INTERPRET:
        return spec.interpreter_config
    if spec.select is None:
        return spec.gpu_configs[0]
    chosen = spec.select(spec.gpu_configs, **problem)
    assert chosen in spec.gpu_configs, f"{name}: selected config not in the table"
    return chosen


# ----------------------------------------------------------------------------------------------
# Token log-probs over materialised logits (kernels/logits_logps.py)
# ----------------------------------------------------------------------------------------------
def _select_by_vocab(configs, vocab_size, **_):
    # One row per program; wider vocab blocks (and more warps) for large vocabularies.
    return configs[0] if vocab_size <= 32768 else configs[1]


_LOGITS_GPU_CONFIGS = (config(BLOCK_N=1, BLOCK_V=4096, num_warps=8),
                       config(BLOCK_N=1, BLOCK_V=8192, num_warps=16))
_LOGITS_INTERPRETER_CONFIG = config(BLOCK_N=16, BLOCK_V=8192)
# Sequence strides of [S, T, V] logits pass 2^31 at LLM sizes.
_LOGITS_POINTERS = {"logits_ptr": "*{dtype}", "dlogits_ptr": "*{dtype}", "labels_ptr": "*i64"}
_LOGITS_SCALARS = {"stride_seq": "i64", "dstride_seq": "i64", "logit_scale": "fp32",
                   "softcap": "fp32"}
# The logit transform (softcap) and the per-token statistics are constexpr variants.
_TRANSFORM_FLAGS = {"SOFTCAP": (False, True)}
_FORWARD_FLAGS = {**_TRANSFORM_FLAGS, "STATS": (False, True)}

for _name, _function in (("token_logps_fwd", "_token_logps_fwd_kernel"),
                         ("token_logps_bwd", "_token_logps_bwd_kernel")):
    register(KernelSpec(
        name=_name, module="mixpo.kernels.logits_logps", function=_function,
        pointers={k: v for k, v in _LOGITS_POINTERS.items()
                  if _name.endswith("bwd") or k != "dlogits_ptr"},
        scalars={k: v for k, v in _LOGITS_SCALARS.items()
                 if _name.endswith("bwd") or k != "dstride_seq"},
        gpu_configs=_LOGITS_GPU_CONFIGS, interpreter_config=_LOGITS_INTERPRETER_CONFIG,
        select=_select_by_vocab,
        flags=_TRANSFORM_FLAGS if _name.endswith("bwd") else _FORWARD_FLAGS))

# ----------------------------------------------------------------------------------------------
# gamma-PO margin solve (kernels/margin_solve.py): one program holds the whole solve set.
# ----------------------------------------------------------------------------------------------
MAX_SOLVE_SET = 8192


def _select_by_solve_set(configs, num, **_):
    for launch in configs:
        if num <= launch.block("BLOCK"):
            return launch
    raise ValueError(f"reward_gaps: solve set of {num} exceeds {MAX_SOLVE_SET}")


register(KernelSpec(
    name="margin_solve", module="mixpo.kernels.margin_solve", function="_margin_solve_kernel",
    scalars={"gamma0": "fp32", "tau": "fp32", "eta": "fp32"},
    gpu_configs=(config(BLOCK=256, num_warps=4), config(BLOCK=1024, num_warps=4),
                 config(BLOCK=MAX_SOLVE_SET, num_warps=8)),
    interpreter_config=config(BLOCK=MAX_SOLVE_SET),
    select=_select_by_solve_set, dtypes=("fp32",)))

# ----------------------------------------------------------------------------------------------
# Logit-free token log-probs (kernels/linear_logps.py, linear_logps_atomic.py): tiles of tokens x
# vocab, tl.dot over H. The tiled kernels have separate 16-bit and fp32 entries (fp32 tiles take
# twice the shared memory per BLOCK_H); the launch helpers pick the entry by dtype. UPCAST (fp32
# tl.dot operands) is True only under the interpreter. ptxas registers / spill bytes / shared
# memory, sm_80 | sm_90, compiled as the JIT specialises real launches (16-byte aligned
# pointers, H, row strides multiples of 16; without those hints Triton neither vectorises nor
# pipelines them), from `mixpo bench compile` (benchmarks/results/compile_report.json):
#   linear_lse_fwd 128x128x64        bf16  255 / 0 /  64 KB | 230 / 0 /  96 KB
#   linear_lse_fwd 256x128x32        bf16  255 / 0 /  48 KB | 254 / 0 /  72 KB  (STATS: spills)
#   linear_lse_fwd_fp32 64x64x32     fp32  255 / 0 /  32 KB | 164 / 0 /  48 KB
#   linear_softmax_grad 128x128x64   bf16  255 / 0 /  64 KB | 226 / 0 /  96 KB
#   linear_softmax_grad_fp32         fp32  254 / 0 /  32 KB | 158 / 0 /  48 KB
#   linear_atomic_bwd 128x128x32     bf16  255 / 0 /  80 KB | 241 / 0 /  96 KB
# The forward picks the 256-token tile from 4096 tokens on (without token statistics, whose
# registers spill at 256): a third less L2 traffic per FLOP than 128 x 128 (benchmarks/
# roofline.py). The gradient kernel keeps 128 x 128: its 256-wide tiles spill (176-764 B).
# ----------------------------------------------------------------------------------------------
_LINEAR_POINTERS = {"hidden_ptr": "*{dtype}", "weight_ptr": "*{dtype}", "labels_ptr": "*i64",
                    "rows_ptr": "*i64", "grad_ptr": "*{dtype}", "kept_ptr": "*i32",
                    "order_ptr": "*i32"}
_LINEAR_SCALARS = {"logit_scale": "fp32", "softcap": "fp32", "filter_eps": "fp32"}
_LINEAR_KERNELS = {"linear_lse_fwd": ("_linear_lse_fwd_kernel", "mixpo.kernels.linear_logps"),
                   "linear_softmax_grad": ("_linear_softmax_grad_kernel",
                                           "mixpo.kernels.linear_logps"),
                   "linear_atomic_bwd": ("_linear_atomic_bwd_kernel",
                                         "mixpo.kernels.linear_logps_atomic")}
# The overridden arguments each kernel has (KernelSpec.signature rejects others).
_LINEAR_ARGUMENTS = {
    "linear_lse_fwd": ("hidden_ptr", "weight_ptr", "labels_ptr", "rows_ptr", "logit_scale",
                       "softcap"),
    "linear_softmax_grad": ("hidden_ptr", "weight_ptr", "labels_ptr", "rows_ptr", "grad_ptr",
                            "logit_scale", "softcap"),
    "linear_atomic_bwd": ("hidden_ptr", "weight_ptr", "labels_ptr", "rows_ptr", "kept_ptr",
                          "order_ptr", "filter_eps", "logit_scale", "softcap"),
}
FORWARD_LARGE_TILE_TOKENS = 4096


def _select_forward_tile(configs, num_tokens, stats=False, **_):
    # The 256-token tile spills registers with the token statistics (STATS): 128 there.
    return configs[1] if len(configs) > 1 and num_tokens >= FORWARD_LARGE_TILE_TOKENS \
        and not stats else configs[0]


_LINEAR_GPU_CONFIGS = {
    ("linear_lse_fwd", "16bit"): (
        config(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
        config(BLOCK_N=256, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3)),
    ("linear_lse_fwd", "fp32"): (
        config(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=3),),
    ("linear_softmax_grad", "16bit"): (
        config(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=3),),
    ("linear_softmax_grad", "fp32"): (
        config(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, GROUP_N=8, num_warps=4, num_stages=3),),
    ("linear_atomic_bwd", "16bit"): (
        config(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8, num_stages=3),),
    ("linear_atomic_bwd", "fp32"): (
        config(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32, GROUP_N=8, num_warps=4, num_stages=3),),
}
# Interpreter: few programs with big blocks (~0.6 ms a program, ~0.13 ms a step).
_LINEAR_INTERPRETER_CONFIGS = {
    "linear_lse_fwd": config(BLOCK_N=64, BLOCK_V=8192, BLOCK_H=128),
    "linear_softmax_grad": config(BLOCK_N=64, BLOCK_V=4096, BLOCK_H=128, GROUP_N=1),
    "linear_atomic_bwd": config(BLOCK_N=64, BLOCK_V=8192, BLOCK_H=128, GROUP_N=1),
}

for _kernel, (_function, _module) in _LINEAR_KERNELS.items():
    for _suffix, _kind, _dtypes in (("", "16bit", ("bf16", "fp16")), ("_fp32", "fp32", ("fp32",))):
        register(KernelSpec(
            name=_kernel + _suffix, module=_module, function=_function,
            pointers={name: kind for name, kind in _LINEAR_POINTERS.items()
                      if name in _LINEAR_ARGUMENTS[_kernel]},
            scalars={name: kind for name, kind in _LINEAR_SCALARS.items()
                     if name in _LINEAR_ARGUMENTS[_kernel]},
            gpu_configs=_LINEAR_GPU_CONFIGS[_kernel, _kind],
            interpreter_config=_LINEAR_INTERPRETER_CONFIGS[_kernel],
            select=_select_forward_tile if _kernel == "linear_lse_fwd" else None,
            flags={"UPCAST": (False,), **(_FORWARD_FLAGS if _kernel == "linear_lse_fwd"
                                          else _TRANSFORM_FLAGS),
                   **({"ORDERED": (False, True)} if _kernel == "linear_atomic_bwd" else {})},
            dtypes=_dtypes))
