"""Roofline model of mixpo's kernels: work, HBM traffic and the floor time each one can reach.

For every kernel the model counts, from the kernel source:
  - matmul FLOPs (2 per multiply-accumulate), run on tensor cores for bf16/fp16; for fp32,
    the logit-free kernels use "tf32x3" (three TF32 tensor-core products: a third of the TF32
    peak) and torch's GEMMs the CUDA cores (TF32 is off for matmuls by default);
  - vector operations: elementwise fp32 instructions per element (compare, select, max, add,
    multiply, casts), one instruction = one operation, executed whether or not the element's
    load was masked off; excluded: address arithmetic, including the pointers and masks of the
    hidden/weight tiles loaded for tl.dot, and tf32x3's splitting of fp32 operands;
  - special-function operations: exp / log / reciprocal, run on the SFU (Triton's exp is a
    multiply by log2(e), counted as a vector op, plus one ex2 on the SFU);
  - HBM bytes: the traffic of the implementation as written: every tensor it reads or writes,
    and every re-read the kernel's tile order forces (hidden rows per vocab chunk, weight rows
    per token group, workspace round trips, fp32 accumulators per chunk); tiles that the
    resident programs share count once while they fit half of L2 (`L2_CAPACITY_BYTES`).
    Itemized in `KernelCost.bytes_moved`;
  - L2 bytes: what Triton tiles stream from L2 beyond HBM (every [BLOCK_N, BLOCK_V] tile
    loads its BLOCK_N + BLOCK_V rows of H) and fp32 atomics resolved in L2
    (`KernelCost.l2_bytes`), at a stated L2 bandwidth.

floor time = max(matmul FLOPs / matmul peak, vector ops / vector rate, special ops / SFU rate,
                 HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth)          [seconds]

the time the kernel would take if the binding unit ran at its peak and everything else
overlapped perfectly: a lower bound (`floor_seconds`). A prediction (`predict_seconds`) runs
the matmuls at a stated share of the peak, GEMM_EFFICIENCY (cuBLAS 0.9, Triton tl.dot 0.75),
and adds the atomic backward's L2 time to its matmul time (it cannot overlap them). Kernel
launch latency (a few microseconds) is not in the model; it is what the [B]-sized work (the
per-pair head's torch ops, the margin solve) actually costs.

Composite entries (role "total") are kernels run one after another: their floor and
prediction are the sums of their parts'. The FLOP floors: "matmul_flop_floor_fwd_bwd", 6 n V H
(forward, dHidden, dWeight once each: the one pass) and "matmul_flop_floor_8nvh", 8 n V H (the
logits recomputed in the backward: the default two-pass head, trl's head). `predictions()`
sets mixpo's default, its one pass, the old atomic design and trl 1.16's head side by side
against their floors.

Usage from a GPU benchmark script (beside this file in benchmarks/):

    import roofline
    workload = roofline.make_workload("llama-3-8b", tokens=16384, prompt_share=0.25)
    floor = roofline.floor_seconds("linear_logps_fwd_bwd", workload, "h100")
    print(f"{measured_seconds / floor:.2f} x floor")
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mixpo.kernels.configs import DEFAULT_WORKSPACE_BYTES, KERNELS, dweight_chunk_rows
from mixpo.kernels.linear_logps_torch import vocab_chunk_rows, workspace_rows
from mixpo.train.plan import KNOWN_SHAPES, canonical_shape_name

# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePeaks:
    """Peak rates of one GPU. FLOP/s count a fused multiply-add as 2 FLOPs."""
    name: str
    tensor_flops_16bit: float   # FLOP/s, dense bf16/fp16 tensor-core matmul, fp32 accumulate
    tensor_flops_tf32: float    # FLOP/s, dense TF32 tensor-core matmul
    fp32_flops: float           # FLOP/s, fp32 FMA on the CUDA cores
    special_ops_per_s: float    # SFU results/s (ex2, lg2, rcp): 16 per SM per clock
    hbm_bytes_per_s: float      # bytes/s
    source: str
    # L2 <-> SM traffic (tile reloads, atomics resolved in L2), bytes/s: an assumption of the
    # order public microbenchmarks report, not a datasheet figure (benchmarks/gpu_check.py
    # times the kernels it bounds). 0 leaves L2 out of the model.
    l2_bytes_per_s: float = 0.0

    @property
    def vector_ops_per_s(self) -> float:
        """fp32 vector instructions/s: one per CUDA core per clock = fp32 FLOP/s / 2."""
        return self.fp32_flops / 2

    def matmul_flops(self, dtype: str, fp32_precision: str = "ieee") -> float:
        """Matmul peak in FLOP/s for inputs of `dtype` ("bf16", "fp16" or "fp32").

        fp32_precision: how fp32 products run: "ieee" on the CUDA cores (torch's default,
        TF32 off for matmuls), "tf32x3" as three TF32 tensor-core products (mixpo's
        logit-free kernels).
        """
        if dtype != "fp32":
            return self.tensor_flops_16bit
        if fp32_precision == "tf32x3":
            return self.tensor_flops_tf32 / 3
        return self.fp32_flops

    def as_dict(self) -> dict:
        return {"name": self.name, "tensor_flops_16bit": self.tensor_flops_16bit,
                "tensor_flops_tf32": self.tensor_flops_tf32, "fp32_flops": self.fp32_flops,
                "vector_ops_per_s": self.vector_ops_per_s,
                "special_ops_per_s": self.special_ops_per_s,
                "hbm_bytes_per_s": self.hbm_bytes_per_s,
                "l2_bytes_per_s": self.l2_bytes_per_s, "source": self.source}


DEVICES = {
    "a100": DevicePeaks(
        name="A100-SXM4-80GB", tensor_flops_16bit=312e12, tensor_flops_tf32=156e12,
        fp32_flops=19.5e12,
        special_ops_per_s=108 * 16 * 1.41e9, hbm_bytes_per_s=2.0e12,
        source="NVIDIA A100 datasheet: 312 TFLOP/s dense bf16, 156 TF32, 19.5 fp32, 2.0 TB/s "
               "(80 GB SXM); SFU: 108 SMs x 16/clock x 1.41 GHz (CUDA guide throughput table, "
               "sm_80); L2 5 TB/s assumed (5120 B/clk x 1.41 GHz = 7.2 TB/s peak per the "
               "A100 whitepaper, ~70 % of it sustained)",
        l2_bytes_per_s=5.0e12),
    "h100": DevicePeaks(
        name="H100-SXM5-80GB", tensor_flops_16bit=800e12, tensor_flops_tf32=494.7e12,
        fp32_flops=66.9e12,
        special_ops_per_s=132 * 16 * 1.98e9, hbm_bytes_per_s=3.0e12,
        source="issue 6: ~800 TFLOP/s bf16 and ~3.0 TB/s as measured on H100 SXM (datasheet "
               "989 TFLOP/s, 3.35 TB/s); TF32 494.7 and fp32 66.9 TFLOP/s and SFU 132 SMs x "
               "16/clock x 1.98 GHz from the datasheet and CUDA guide (sm_90), i.e. "
               "optimistic; L2 10 TB/s assumed (what a 128 x 256 bf16 GEMM tile needs at "
               "~800 TFLOP/s; public measurements 7-12 TB/s)",
        l2_bytes_per_s=10.0e12),
}

# Share of the matmul peak each GEMM engine is assumed to reach on these shapes (large M, N, K):
# cuBLAS, whose measured bf16 8192^3 rate is the H100 peak above, loses ~10 % on GEMMs whose K
# is a vocab chunk or the token count and whose epilogue accumulates into fp32; a Triton tl.dot
# kernel without Hopper warp specialisation reaches ~75 % of cuBLAS (Triton's matmul tutorial
# figures on A100/H100). Stated, not measured: benchmarks/gpu_check.py reports the real ones.
GEMM_EFFICIENCY = {"cublas": 0.9, "triton": 0.75}
# L2 capacity the HBM re-read counts assume (the smaller of the two devices, A100's 40 MiB):
# tiles that the resident programs share stay in L2 when they fit half of it.
L2_CAPACITY_BYTES = 40 * 2**20

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# ----------------------------------------------------------------------------------------------
# Shapes and workloads
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """LM-head size of one model: hidden size H and vocabulary size V."""
    name: str
    hidden_size: int
    vocab_size: int


# The LM heads of mixpo.train.plan.KNOWN_SHAPES (the one model-shape table).
SHAPES = {name: ModelShape(name, hidden_size=values["hidden_size"],
                           vocab_size=values["vocab_size"])
          for name, (_, values) in KNOWN_SHAPES.items()}
DEFAULT_SHAPES = ("llama-3-8b", "qwen-2.5-7b", "gemma-2-9b")
DEFAULT_TOKENS = (2048, 4096, 8192, 16384, 32768)
DEFAULT_PROMPT_SHARES = (0.0, 0.25, 0.5)
DEFAULT_SEQ_LEN = 1024      # positions per sequence when pairs per batch are derived
SOLVE_SET_SIZE = 256        # gamma-PO solve set (queue sample + batch), AdaptiveMargin default
MARGIN_SOLVE_UPDATES = 19   # 20 iterations, the last update unused (AdaptiveMargin default)


@dataclass(frozen=True)
class Workload:
    """One training step's LM-head problem.

    tokens: N, positions in the batch [2B, T] (prompt, completion and padding);
    completion_tokens: n, positions with a label (the logit-free path computes only these);
    pairs: B (2B sequences); dtype: of logits / hidden / weight ("bf16", "fp16", "fp32");
    kept_tile_fraction: share of the atomic backward's [BLOCK_N, BLOCK_V] tiles that CCE's
    gradient filter keeps (`filter_eps`; 1.0 = no tile skipped, as with a random-weight
    head's flat softmax); workspace_bytes: the logit-free head's workspace budget;
    vocab_sorted: the atomic backward reads its vocab tiles through CCE's sorted order
    (`vocab_sorted=True`).
    """
    shape: ModelShape
    tokens: int
    completion_tokens: int
    pairs: int
    dtype: str = "bf16"
    kept_tile_fraction: float = 1.0
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    vocab_sorted: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if not 0 < self.completion_tokens <= self.tokens:
            raise ValueError(f"completion_tokens must be in [1, tokens={self.tokens}], "
                             f"got {self.completion_tokens}")
        if not 0 < self.pairs or 2 * self.pairs > self.completion_tokens:
            raise ValueError(f"pairs must be >= 1 with one completion token per sequence at "
                             f"least (2 x pairs <= {self.completion_tokens}), got {self.pairs}")
        if not 0.0 <= self.kept_tile_fraction <= 1.0:
            raise ValueError(f"kept_tile_fraction must be in [0, 1], "
                             f"got {self.kept_tile_fraction}")

    @property
    def prompt_share(self) -> float:
        return 1.0 - self.completion_tokens / self.tokens


def make_workload(shape, tokens: int, prompt_share: float = 0.0, pairs: int | None = None,
                  dtype: str = "bf16", seq_len: int = DEFAULT_SEQ_LEN,
                  kept_tile_fraction: float = 1.0, workspace_bytes=None,
                  vocab_sorted: bool = False) -> Workload:
    """A Workload from a shape name (see SHAPES) or a ModelShape.

    completion tokens n = round(tokens * (1 - prompt_share)); pairs default to
    tokens / (2 * seq_len), at least 1; workspace_bytes None: DEFAULT_WORKSPACE_BYTES.
    """
    if isinstance(shape, str):
        shape = canonical_shape_name(shape)
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
        shape = SHAPES[shape]
    if not (isinstance(tokens, int) and tokens > 0):
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    if not 0.0 <= prompt_share < 1.0:
        raise ValueError(f"prompt_share must be in [0, 1), got {prompt_share!r}")
    if pairs is None:
        if not (isinstance(seq_len, int) and seq_len > 0):
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        pairs = max(1, tokens // (2 * seq_len))
    return Workload(shape, tokens, round(tokens * (1.0 - prompt_share)), pairs, dtype,
                    kept_tile_fraction, workspace_bytes or DEFAULT_WORKSPACE_BYTES,
                    vocab_sorted)


# ----------------------------------------------------------------------------------------------
# Per-element operation counts, read from the kernel source (vector ops; exp adds one SFU op)
# ----------------------------------------------------------------------------------------------
# Loads of 16-bit data are cast to fp32 at once (`_cast_ops`: one op per element, none for
# fp32); the casts are not in the lists below but added where the kernel does them.
#
# mixpo/kernels/logits_logps.py (BLOCK_N = 1 on GPUs), per element of every row's vocab loop:
# prompt and padding rows run the loop too (their loads are masked off, the arithmetic is not
# skipped), so these lists count N x V elements. Forward (`_token_logps_fwd_kernel`):
TOKEN_LOGPS_FWD_VECTOR_OPS = ("vocab-bound compare", "mask and", "row max", "subtract max",
                              "scale by log2(e)", "sum of exp", "label compare",
                              "label select", "label sum")
# backward (`_token_logps_bwd_kernel`), per element read (masked) and dlogits element written:
TOKEN_LOGPS_BWD_VECTOR_OPS = ("vocab-bound compare", "load mask and", "subtract lse",
                              "scale by log2(e)", "label compare", "one-hot convert",
                              "one-hot minus prob", "times coefficient", "select active row",
                              "store mask and")
# mixpo/kernels/linear_logps.py. `_linear_lse_fwd_kernel`, per logit of a tile (after tl.dot;
# the tile loop has no label ops):
LINEAR_FWD_VECTOR_OPS = ("vocab-bound select", "row max", "subtract max", "scale by log2(e)",
                         "sum of exp")
# ... and, in its split-0 programs, per (token, hidden unit) of the label logit
# hidden[row] . weight[label] (plus a cast of each operand for 16-bit inputs):
LINEAR_LABEL_LOGIT_VECTOR_OPS = ("multiply", "sum")
# `_linear_softmax_grad_kernel` (the default backward), per logit of every tile (plus the
# cast of G to a 16-bit workspace):
LINEAR_SOFTMAX_GRAD_VECTOR_OPS = ("subtract lse", "scale by log2(e)", "label compare",
                                  "one-hot minus prob", "times coefficient", "times slope")
# `_linear_atomic_bwd_kernel`, per logit of every tile before CCE's filter, and per logit of a
# kept tile (plus the cast of G for a 16-bit tl.dot):
LINEAR_ATOMIC_BWD_VECTOR_OPS = ("subtract lse", "scale by log2(e)", "label compare",
                                "one-hot minus prob", "active select", "abs", "tile max")
LINEAR_ATOMIC_BWD_KEPT_VECTOR_OPS = ("times coefficient", "times slope")
# mixpo/kernels/pair_loss.py per pair, forward and its autograd backward (sigmoid kind,
# normalised: the longest branch), rounded up: two log-sigmoids, one sigmoid, three
# reciprocals and their derivatives. Counted with a dispatch mode: about 70 torch ops (kernel
# launches on a GPU) for sigmoid DPO forward + backward, 80 with an NLL term.
PAIR_HEAD_VECTOR_OPS_PER_PAIR = 120
PAIR_HEAD_SPECIAL_OPS_PER_PAIR = 20
PAIR_HEAD_TORCH_OPS = 80
# mixpo/kernels/margin_solve.py per solve-set entry and update: log, sigmoid (exp + rcp), exp.
MARGIN_SOLVE_VECTOR_OPS_PER_UPDATE = 20
MARGIN_SOLVE_SPECIAL_OPS_PER_UPDATE = 4

INDEX_BYTES = 8   # int64 labels and row indices
FP32_BYTES = 4


# ----------------------------------------------------------------------------------------------
# Kernel costs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelCost:
    """Work and traffic of one kernel (role "kernel"), of code outside mixpo shown for context
    (role "context": the LM-head GEMMs, a peer's head), of torch ops inside a mixpo launch
    helper (role "torch": fills, casts, cuBLAS GEMMs), of kernels run in sequence (role
    "total", with `parts`), or a matmul FLOP floor (role "floor"). FLOPs/ops are counts,
    bytes are bytes: `bytes_moved` to and from HBM, `l2_bytes` between L2 and the SMs beyond
    that (tile reloads, atomics). `engine` ("triton" or "cublas") picks the GEMM efficiency
    of predictions; `serial`: the kernel's L2 traffic does not overlap its matmuls (the atomic
    backward: one CTA per SM, atomics issued after each MMA)."""
    kernel: str
    role: str
    matmul_flops: float = 0.0
    vector_ops: float = 0.0
    special_ops: float = 0.0
    bytes_moved: dict = field(default_factory=dict)   # item -> bytes
    parts: tuple = ()
    note: str = ""
    fp32_matmul: str = "ieee"   # how fp32 matmuls run: "ieee" (CUDA cores) or "tf32x3"
    l2_bytes: dict = field(default_factory=dict)      # item -> bytes
    engine: str = "triton"
    serial: bool = False

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes_moved.values())

    @property
    def total_l2_bytes(self) -> float:
        return sum(self.l2_bytes.values())

    def seconds_by_resource(self, device: DevicePeaks, dtype: str,
                            efficiency: float = 1.0) -> dict:
        """Seconds each unit needs at its peak (matmul at `efficiency` of it): matmul,
        vector, special, memory (HBM), l2."""
        return {"matmul": self.matmul_flops
                / (efficiency * device.matmul_flops(dtype, self.fp32_matmul)),
                "vector": self.vector_ops / device.vector_ops_per_s,
                "special": self.special_ops / device.special_ops_per_s,
                "memory": self.total_bytes / device.hbm_bytes_per_s,
                "l2": self.total_l2_bytes / device.l2_bytes_per_s
                if device.l2_bytes_per_s else 0.0}

    def floor_seconds(self, device: DevicePeaks, dtype: str) -> float:
        """The floor in seconds: the binding resource's time, or the parts' floors summed."""
        if self.parts:
            return sum(part.floor_seconds(device, dtype) for part in self.parts)
        return max(self.seconds_by_resource(device, dtype).values())

    def predict_seconds(self, device: DevicePeaks, dtype: str) -> float:
        """A prediction: the floor with the matmuls at GEMM_EFFICIENCY[engine] of the peak,
        and a serial kernel's L2 time added to its matmul time instead of overlapping it."""
        if self.parts:
            return sum(part.predict_seconds(device, dtype) for part in self.parts)
        times = self.seconds_by_resource(device, dtype, GEMM_EFFICIENCY[self.engine])
        if self.serial:
            times["matmul"] += times.pop("l2")
        return max(times.values())

    def bound(self, device: DevicePeaks, dtype: str) -> str:
        """The binding resource (for a total: that of its part with the largest floor)."""
        if self.parts:
            return max(self.parts, key=lambda part: part.floor_seconds(device, dtype)) \
                .bound(device, dtype)
        times = self.seconds_by_resource(device, dtype)
        return max(times, key=times.get)


def _combined(kernel: str, role: str, parts: tuple, note: str = "") -> KernelCost:
    bytes_moved, l2_bytes = {}, {}
    for part in parts:
        for item, count in part.bytes_moved.items():
            bytes_moved[f"{part.kernel}: {item}"] = count
        for item, count in part.l2_bytes.items():
            l2_bytes[f"{part.kernel}: {item}"] = count
    return KernelCost(kernel, role, sum(p.matmul_flops for p in parts),
                      sum(p.vector_ops for p in parts), sum(p.special_ops for p in parts),
                      bytes_moved, parts, note, l2_bytes=l2_bytes)


def _cast_ops(dtype: str) -> int:
    """Conversion instructions for a 16-bit load or store (fp32 needs none)."""
    return 0 if dtype == "fp32" else 1


def lm_head_fwd(w: Workload) -> KernelCost:
    """logits [N, V] = hidden [N, H] @ weight^T: the GEMM before `preference_loss` (context)."""
    s, (N, V, H) = DTYPE_BYTES[w.dtype], (w.tokens, w.shape.vocab_size, w.shape.hidden_size)
    return KernelCost("lm_head_fwd", "context", matmul_flops=2 * N * V * H,
                      bytes_moved={"hidden read": N * H * s, "weight read": V * H * s,
                                   "logits write": N * V * s},
                      note="not a mixpo kernel: the model's LM head over all N positions")


def lm_head_bwd(w: Workload) -> KernelCost:
    """dHidden = dlogits @ weight and dWeight = dlogits^T @ hidden: two GEMMs (context)."""
    s, (N, V, H) = DTYPE_BYTES[w.dtype], (w.tokens, w.shape.vocab_size, w.shape.hidden_size)
    return KernelCost("lm_head_bwd", "context", matmul_flops=4 * N * V * H,
                      bytes_moved={"dlogits read (once per GEMM)": 2 * N * V * s,
                                   "weight read": V * H * s, "hidden read": N * H * s,
                                   "dHidden write": N * H * s, "dWeight write": V * H * s},
                      note="not a mixpo kernel: autograd of the LM head")


def token_logps_fwd(w: Workload) -> KernelCost:
    """`token_logps_forward` and the sequence sums after it (losses.py): one program per
    position (BLOCK_N = 1) runs an online LSE over the vocab. The logits loads of prompt and
    padding rows are masked off (`active`: no memory traffic), but those programs still run the
    vocab loop, so the vector and SFU work covers all N rows while the logits read covers the
    n completion rows. Token log-probs and LSE are written for every row (0 where ignored)."""
    s, (N, n, V) = DTYPE_BYTES[w.dtype], (w.tokens, w.completion_tokens, w.shape.vocab_size)
    vector = len(TOKEN_LOGPS_FWD_VECTOR_OPS) + _cast_ops(w.dtype)
    return KernelCost(
        "token_logps_fwd", "kernel", vector_ops=N * V * vector, special_ops=N * V,
        bytes_moved={"logits read (completion rows)": n * V * s,
                     "labels read": N * INDEX_BYTES,
                     "token log-probs and lse write (all rows)": 2 * N * FP32_BYTES,
                     "sequence sums (torch: token_logps.sum(dim=1))":
                     N * FP32_BYTES + 2 * w.pairs * FP32_BYTES})


def token_logps_bwd(w: Workload) -> KernelCost:
    """`token_logps_backward`: reads the completion rows' logits (loads masked by `active`)
    and writes dlogits for every row (store masked by the row range only: zeros on prompt and
    padding), in place or into a new buffer: the same bytes. Every row runs the vocab loop
    (vector and SFU work over N x V); lse is loaded for the completion rows only."""
    s, (N, n, V) = DTYPE_BYTES[w.dtype], (w.tokens, w.completion_tokens, w.shape.vocab_size)
    vector = len(TOKEN_LOGPS_BWD_VECTOR_OPS) + 2 * _cast_ops(w.dtype)
    return KernelCost(
        "token_logps_bwd", "kernel", vector_ops=N * V * vector, special_ops=N * V,
        bytes_moved={"logits read (completion rows)": n * V * s,
                     "dlogits write (all rows)": N * V * s,
                     "labels read": N * INDEX_BYTES, "lse read (completion rows)": n * FP32_BYTES,
                     "sequence gradients read": 2 * w.pairs * FP32_BYTES})


def gpu_tile(kernel: str, w: Workload) -> dict:
    """The GPU launch configuration's blocks (and warps) `mixpo.kernels.configs` picks for
    `kernel` on this workload, read from the table (not `choose`, which the interpreter
    overrides)."""
    spec = KERNELS[kernel + ("_fp32" if w.dtype == "fp32" else "")]
    launch = spec.select(spec.gpu_configs, num_tokens=w.completion_tokens) if spec.select \
        else spec.gpu_configs[0]
    return dict(launch.blocks)


def _tile_reloads(w: Workload, block_n: int, block_v: int, s: int) -> float:
    """L2 -> SM bytes of a tiled n x V x H product: every [BLOCK_N, BLOCK_V] output tile
    streams its BLOCK_N hidden rows and BLOCK_V weight rows through shared memory."""
    n, V, H = w.completion_tokens, w.shape.vocab_size, w.shape.hidden_size
    return n * V * H * s * (1 / block_n + 1 / block_v)


def linear_logps_fwd(w: Workload) -> KernelCost:
    """`linear_sequence_logps` (functions.py): the compaction of the completion tokens, the
    `mixpo::linear_token_logps` op (`linear_token_logps_forward`, `_linear_lse_fwd_kernel`)
    and the sequence sums.

    The kernel computes logits tiles hidden[rows] @ weight^T in SRAM with an online LSE, only
    for the n completion tokens; its tile loop has no label ops. The label logit is a separate
    dot product hidden[row] . weight[label] (n H multiply-adds on the CUDA cores) in the
    split-0 programs. Grid (vocab splits, token tiles), splits fastest, with enough splits
    that the resident programs' hidden tiles stay in L2 (`l2_min_splits`): hidden is read from
    HBM once, the weight once per group of token tiles that fits half of L2
    (L2_CAPACITY_BYTES); every tile streams its rows from L2 (`_tile_reloads`). The [splits, n]
    partial LSEs are counted as one split. No bias (none of SHAPES has one).
    """
    s, (N, n, V, H) = DTYPE_BYTES[w.dtype], (w.tokens, w.completion_tokens,
                                             w.shape.vocab_size, w.shape.hidden_size)
    tile = gpu_tile("linear_lse_fwd", w)
    n_tiles = -(-n // tile["BLOCK_N"])
    tiles_in_l2 = max(1, (L2_CAPACITY_BYTES // 2) // (tile["BLOCK_N"] * H * s))
    sequences = 2 * w.pairs
    label_logit = len(LINEAR_LABEL_LOGIT_VECTOR_OPS) + 2 * _cast_ops(w.dtype)
    return KernelCost(
        "linear_logps_fwd", "kernel", matmul_flops=2 * n * V * H,
        vector_ops=n * V * len(LINEAR_FWD_VECTOR_OPS) + n * H * label_logit,
        special_ops=n * V,
        bytes_moved={
            # labels != ignore_index (labels read, bool written), nonzero (bool read, rows
            # written), labels[rows] (rows and gathered labels read, row labels written).
            "label scan (torch)": N * (INDEX_BYTES + 2) + n * INDEX_BYTES,
            "label compaction (torch)": 3 * n * INDEX_BYTES,
            "hidden read (completion rows)": n * H * s,
            "weight read (once per token-tile group in L2)":
            -(-n_tiles // tiles_in_l2) * V * H * s,
            "rows and labels read": 2 * n * INDEX_BYTES,
            "partial lse and label logit write": 2 * n * FP32_BYTES,
            "log-prob = label logit - lse (torch)": 3 * n * FP32_BYTES,
            # rows // T (rows read, indices written), zeros [2B], index_add_ (indices and
            # log-probs read, [2B] read and written).
            "sequence sums (torch)": 3 * n * INDEX_BYTES + n * FP32_BYTES
            + 3 * sequences * FP32_BYTES},
        l2_bytes={"tile reloads": _tile_reloads(w, tile["BLOCK_N"], tile["BLOCK_V"], s)},
        fp32_matmul="tf32x3")


def linear_fwd_old(w: Workload) -> KernelCost:
    """The forward before this design (for the "old design" prediction): 128 x 128 tiles and
    a grid with token tiles varying fastest, so the resident programs hold 132 different
    hidden tiles (1 MiB each at H 4096), more than L2: every vocab tile re-reads them from
    HBM (n H s x V / BLOCK_V)."""
    new = linear_logps_fwd(w)
    s, (n, V, H) = DTYPE_BYTES[w.dtype], (w.completion_tokens, w.shape.vocab_size,
                                          w.shape.hidden_size)
    block = 128 if w.dtype != "fp32" else 64
    moved = dict(new.bytes_moved)
    moved["hidden read (completion rows)"] = n * H * s * -(-V // block)
    moved["weight read (once per token-tile group in L2)"] = V * H * s
    return KernelCost("linear_fwd_old", "kernel", new.matmul_flops, new.vector_ops,
                      new.special_ops, moved, fp32_matmul="tf32x3",
                      l2_bytes={"tile reloads": _tile_reloads(w, block, block, s)})


def vocab_chunks(w: Workload) -> int:
    """Vocab chunks of the default backward: the softmax-gradient workspace [n, C] in the
    input dtype fits `Workload.workspace_bytes` (`vocab_chunk_rows`)."""
    block_v = gpu_tile("linear_softmax_grad", w)["BLOCK_V"]
    chunk = vocab_chunk_rows(w.completion_tokens, w.shape.vocab_size, DTYPE_BYTES[w.dtype],
                             block_v, w.workspace_bytes)
    return -(-w.shape.vocab_size // chunk)


def linear_softmax_grad(w: Workload) -> KernelCost:
    """`_linear_softmax_grad_kernel`, once per vocab chunk: every [BLOCK_N, BLOCK_V] logits
    tile recomputed (2nVH, tl.dot) and its gradient G = coef * (onehot - softmax) written once
    in the input dtype into the workspace (n V s bytes in all). Grouped order: GROUP_N token
    tiles sweep a chunk's vocab tiles together, so hidden is read from HBM once per chunk and
    the weight once per token group; every tile streams its rows from L2."""
    s, (n, V, H) = DTYPE_BYTES[w.dtype], (w.completion_tokens, w.shape.vocab_size,
                                          w.shape.hidden_size)
    tile = gpu_tile("linear_softmax_grad", w)
    chunks = vocab_chunks(w)
    groups = -(-n // (tile["BLOCK_N"] * tile["GROUP_N"]))
    return KernelCost(
        "linear_softmax_grad", "kernel", matmul_flops=2 * n * V * H,
        vector_ops=n * V * (len(LINEAR_SOFTMAX_GRAD_VECTOR_OPS) + _cast_ops(w.dtype)),
        special_ops=n * V,
        bytes_moved={"hidden read (once per vocab chunk)": chunks * n * H * s,
                     "weight read (once per token group)": groups * V * H * s,
                     "rows, labels, lse, coefficients read (per chunk)":
                     chunks * n * (2 * INDEX_BYTES + 2 * FP32_BYTES),
                     "workspace G write": n * V * s},
        l2_bytes={"tile reloads": _tile_reloads(w, tile["BLOCK_N"], tile["BLOCK_V"], s)},
        fp32_matmul="tf32x3")


def linear_bwd_gemms(w: Workload) -> KernelCost:
    """The default backward's cuBLAS GEMMs, per vocab chunk [v0, v1): dHidden (fp32 [n, H])
    += G @ W[v0:v1] (`torch.addmm(..., out_dtype=float32)`: the accumulator read and written
    once per chunk) and dWeight[v0:v1] = G^T @ hidden[rows] (written once). 4nVH FLOPs at the
    cuBLAS efficiency; fp32 inputs run cuBLAS fp32 (CUDA cores unless TF32 is allowed)."""
    s, (n, V, H) = DTYPE_BYTES[w.dtype], (w.completion_tokens, w.shape.vocab_size,
                                          w.shape.hidden_size)
    chunks = vocab_chunks(w)
    return KernelCost(
        "linear_bwd_gemms", "torch", matmul_flops=4 * n * V * H, engine="cublas",
        bytes_moved={"workspace G read (both GEMMs)": 2 * n * V * s,
                     "weight read": V * H * s,
                     "hidden[rows] read (per chunk)": chunks * n * H * s,
                     "dHidden fp32 accumulator read + write (per chunk)":
                     chunks * 2 * n * H * FP32_BYTES,
                     "dWeight write (once)": V * H * s},
        note="cuBLAS: no atomics, each dWeight row written once")


def linear_bwd_buffers(w: Workload) -> KernelCost:
    """The torch work around the default backward (autograd's gradient of the sequence sums,
    the `mixpo::linear_token_logps_backward` op: `linear_token_logps_backward`,
    `gemm_backward`): the per-token coefficients
    (grad_seq[sequence]: indices and [2B] read, [n] fp32 written), the compact copy
    hidden[rows] for the dWeight GEMM, the zero-filled [N, H] dHidden and fp32 [n, H]
    accumulator, and the accumulator cast and scattered into dHidden's rows. No fp32 [V, H]
    buffer: dWeight is written by its GEMM. Accumulating into `weight.grad` (autograd) is
    not counted."""
    s, (N, n, H) = DTYPE_BYTES[w.dtype], (w.tokens, w.completion_tokens, w.shape.hidden_size)
    return KernelCost(
        "linear_bwd_buffers", "torch",
        bytes_moved={"coefficient gather (torch)": 2 * n * INDEX_BYTES + n * FP32_BYTES
                     + 2 * w.pairs * FP32_BYTES,
                     "hidden[rows] copy (rows, read, write)": n * INDEX_BYTES + 2 * n * H * s,
                     "dHidden zero fill": N * H * s,
                     "dHidden fp32 accumulator zero fill": n * H * FP32_BYTES,
                     "dHidden cast (fp32 read, temporary written)": n * H * (FP32_BYTES + s),
                     "dHidden scatter (rows and temporary read, rows written)":
                     n * INDEX_BYTES + 2 * n * H * s},
        note="torch fills, copies and casts around the backward")


def linear_logps_bwd(w: Workload) -> KernelCost:
    return _combined("linear_logps_bwd", "total",
                     (linear_softmax_grad(w), linear_bwd_gemms(w), linear_bwd_buffers(w)),
                     "the default backward: softmax-gradient kernel, cuBLAS GEMMs, buffers")


def linear_logps_fwd_bwd(w: Workload) -> KernelCost:
    return _combined("linear_logps_fwd_bwd", "total",
                     (linear_logps_fwd(w), linear_softmax_grad(w), linear_bwd_gemms(w),
                      linear_bwd_buffers(w)),
                     "the default (two passes): replaces the whole logits path, 8nVH")


def _one_pass_layout(w: Workload) -> tuple[int, int, int]:
    """(block tokens, groups, recomputed tokens) of the one pass (`mixpo.kernels.
    linear_one_pass`) for pairs of equal length (n / B completion tokens): groups of whole
    pairs whose fp32 logits fit the workspace; a pair larger than it is a group of its own
    and recomputes the tokens before its last block."""
    capacity = workspace_rows(w.shape.vocab_size, FP32_BYTES, w.workspace_bytes)
    pair_tokens = w.completion_tokens // w.pairs
    if pair_tokens <= capacity:
        return capacity, -(-w.pairs // (capacity // pair_tokens)), 0
    return capacity, w.pairs, w.completion_tokens - w.pairs * capacity


def one_pass_groups(w: Workload) -> int:
    """Groups of whole pairs of the one pass (`_one_pass_layout`)."""
    return _one_pass_layout(w)[1]


def one_pass_recomputed(w: Workload) -> int:
    """Tokens whose logits the one pass computes twice (`_one_pass_layout`)."""
    return _one_pass_layout(w)[2]


def linear_one_pass_gemms(w: Workload) -> KernelCost:
    """`linear_token_logps_one_pass`'s cuBLAS GEMMs, per workspace block: logits [t, V] =
    E @ W^T in fp32, dHidden = G @ W (written once) and dWeight += G^T @ E; the r recomputed
    tokens' logits twice. (6n + 2r) VH FLOPs. With 16-bit weights and more than one block
    dWeight accumulates in fp32 [V, H] (zero fill, read + write per block, final cast)."""
    s, (n, V, H) = DTYPE_BYTES[w.dtype], (w.completion_tokens, w.shape.vocab_size,
                                          w.shape.hidden_size)
    capacity, groups, recomputed = _one_pass_layout(w)
    recomputed_blocks = -(-recomputed // capacity)
    blocks = groups + recomputed_blocks            # backward blocks (dHidden, dWeight GEMMs)
    moved = {"fp32 logits write (logits GEMM)": (n + recomputed) * V * FP32_BYTES,
             "G read by both GEMMs": 2 * n * V * s,
             "weight read (logits and dHidden GEMMs, per block)":
                 (2 * blocks + recomputed_blocks) * V * H * s,
             "hidden[rows] read (logits and dWeight GEMMs)": (2 * n + recomputed) * H * s,
             "dHidden write": n * H * s}
    if w.dtype != "fp32" and blocks > 1:
        moved["dWeight fp32 accumulator (fill, read + write per block, cast)"] = \
            V * H * FP32_BYTES * (1 + 2 * blocks) + V * H * (FP32_BYTES + s)
    else:
        moved["dWeight write (accumulated in place)"] = V * H * s * (2 * blocks - 1)
    return KernelCost("linear_one_pass_gemms", "torch",
                      matmul_flops=(6 * n + 2 * recomputed) * V * H, engine="cublas",
                      bytes_moved=moved,
                      note=f"forward and exact gradient in one pass, 6nVH + 2rVH "
                           f"(r = {recomputed} recomputed tokens)")


def linear_one_pass_elementwise(w: Workload) -> KernelCost:
    """The one pass's elementwise kernels on each block's fp32 logits (`TritonGroupOps`:
    the `token_logps` kernels, one read for the log-sum-exp -- twice for a recomputed
    token -- one read + write for the gradient in place), the cast of G to a 16-bit input
    dtype, and the torch work around them (compaction, sequence sums, coefficients,
    dHidden fill and scatter)."""
    s, (N, n, V, H) = DTYPE_BYTES[w.dtype], (w.tokens, w.completion_tokens,
                                             w.shape.vocab_size, w.shape.hidden_size)
    recomputed = one_pass_recomputed(w)
    moved = {"logits read (log-sum-exp kernel)": (n + recomputed) * V * FP32_BYTES,
             "logits read + G write in place (gradient kernel)": 2 * n * V * FP32_BYTES,
             "label scan and compaction (torch)": N * (INDEX_BYTES + 2) + 4 * n * INDEX_BYTES,
             "sequence sums and coefficients (torch)": 6 * n * INDEX_BYTES
             + 2 * n * FP32_BYTES,
             "hidden[rows] copy, dHidden fill and scatter": 2 * n * H * s + N * H * s
             + 2 * n * H * s}
    if w.dtype != "fp32":
        moved["G cast to 16-bit (fp32 read, write)"] = n * V * (FP32_BYTES + s)
    return KernelCost("linear_one_pass_elementwise", "kernel",
                      vector_ops=(n + recomputed) * V * len(TOKEN_LOGPS_FWD_VECTOR_OPS)
                      + n * V * len(TOKEN_LOGPS_BWD_VECTOR_OPS),
                      special_ops=(2 * n + recomputed) * V, bytes_moved=moved)


def linear_one_pass_fwd_bwd(w: Workload) -> KernelCost:
    return _combined("linear_one_pass_fwd_bwd", "total",
                     (linear_one_pass_gemms(w), linear_one_pass_elementwise(w)),
                     "one pass: forward and exact gradient together, 6nVH + 2rVH")


def linear_atomic_bwd(w: Workload) -> KernelCost:
    """`_linear_atomic_bwd_kernel` (method="atomic", the old design): every tile recomputed
    (2nVH) and, for the `kept_tile_fraction` CCE's filter keeps, dHidden += G @ W_tile and
    dWeight_tile += G^T @ E (4nVH) added with fp32 atomics. L2 traffic: each kept program adds
    [BLOCK_N + BLOCK_V, H] fp32 values (403 GB at Llama-3 shape, 128 x 128 tiles) plus the
    tile reloads. HBM: with 16-bit weights the fp32 dWeight chunk (DWEIGHT_CHUNK_BYTES, more
    than L2) is read and written once per token group, dHidden once per chunk. `serial`: one
    CTA per SM, atomics issued after each MMA (its L2 time adds to the matmul time).
    `vocab_sorted`: every program also loads its tiles' int32 vocab ids (filtered or not),
    and the host finds the order (the completion rows' mean times the head, an argsort) and
    scatters each 16-bit dWeight chunk to its rows."""
    s, (n, V, H) = DTYPE_BYTES[w.dtype], (w.completion_tokens, w.shape.vocab_size,
                                          w.shape.hidden_size)
    tile = gpu_tile("linear_atomic_bwd", w)
    kept = w.kept_tile_fraction
    chunks = 1 if w.dtype == "fp32" else \
        -(-V // dweight_chunk_rows(V, H, tile["BLOCK_V"]))
    groups = -(-n // (tile["BLOCK_N"] * tile["GROUP_N"]))
    sorted_bytes, sorted_l2 = {}, {}
    if w.vocab_sorted:
        sorted_bytes = {"vocab order (rows gathered and averaged, head read, argsort)":
                        3 * n * H * s + V * H * s + 4 * V * INDEX_BYTES,
                        "vocab order read (per chunk)": chunks * V * 4}
        if w.dtype != "fp32":
            sorted_bytes["sorted dWeight scatter (cast, then indexed write)"] = \
                2 * V * H * s + V * INDEX_BYTES
        sorted_l2 = {"vocab ids (every program)": -(-n // tile["BLOCK_N"]) * V * 4}
    vector = len(LINEAR_ATOMIC_BWD_VECTOR_OPS) \
        + kept * (len(LINEAR_ATOMIC_BWD_KEPT_VECTOR_OPS) + _cast_ops(w.dtype))
    return KernelCost(
        "linear_atomic_bwd", "kernel", matmul_flops=2 * n * V * H + 4 * n * V * H * kept,
        vector_ops=n * V * vector, special_ops=n * V, serial=True,
        bytes_moved={"hidden read (once per vocab chunk)": chunks * n * H * s,
                     "weight read (once per token group)": groups * V * H * s,
                     "rows, labels, lse, coefficients read": chunks * n * (
                         2 * INDEX_BYTES + 2 * FP32_BYTES),
                     "dWeight fp32 read + write (per token group)":
                     groups * 2 * V * H * FP32_BYTES * kept,
                     "dHidden fp32 read + write (per chunk)": chunks * 2 * n * H * FP32_BYTES,
                     "fills and casts (dHidden, fp32 buffers, dWeight)":
                     2 * n * H * FP32_BYTES + V * H * (2 * FP32_BYTES + s),
                     **sorted_bytes},
        l2_bytes={"fp32 atomics": kept * n * V * H * FP32_BYTES
                  * (1 / tile["BLOCK_N"] + 1 / tile["BLOCK_V"]),
                  "tile reloads": _tile_reloads(w, tile["BLOCK_N"], tile["BLOCK_V"], s),
                  **sorted_l2},
        fp32_matmul="tf32x3")


def linear_old_fwd_bwd(w: Workload) -> KernelCost:
    return _combined("linear_old_fwd_bwd", "total", (linear_fwd_old(w), linear_atomic_bwd(w)),
                     "the old design: hidden re-read per vocab tile, atomic backward")


TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768


def trl_head_gemms(w: Workload) -> KernelCost:
    """trl 1.16's fused head (`trl/kernels/chunked_logprob.py`, log-probs only), its cuBLAS
    GEMMs as read from its source: token chunks of 4096, vocab chunks of 32768; logits tiles
    in the input dtype written by the forward and by the backward's recompute, read by both
    backward GEMMs; dHidden accumulated in fp32 per token chunk ([4096, H] read + written per
    vocab chunk), dWeight in an fp32 [V, H] (read + written per token chunk), both
    zero-filled and cast at the end. 8nVH at the cuBLAS efficiency."""
    s, (n, V, H) = DTYPE_BYTES[w.dtype], (w.completion_tokens, w.shape.vocab_size,
                                          w.shape.hidden_size)
    token_chunks = -(-n // TRL_TOKEN_CHUNK)
    vocab_chunks_trl = -(-V // TRL_VOCAB_CHUNK)
    return KernelCost(
        "trl_head_gemms", "context", matmul_flops=8 * n * V * H, engine="cublas",
        bytes_moved={"logits tiles write (forward, recompute)": 2 * n * V * s,
                     "gradient tiles read (both GEMMs)": 2 * n * V * s,
                     "weight read (forward, recompute, dHidden GEMM; per token chunk)":
                     3 * token_chunks * V * H * s,
                     "hidden read (forward, recompute, dWeight GEMM; per vocab chunk)":
                     3 * vocab_chunks_trl * n * H * s,
                     "dHidden fp32 read + write (per vocab chunk), fill, cast":
                     vocab_chunks_trl * 2 * n * H * FP32_BYTES
                     + n * H * (2 * FP32_BYTES + s),
                     "dWeight fp32 read + write (per token chunk), fill, cast":
                     token_chunks * 2 * V * H * FP32_BYTES + V * H * (2 * FP32_BYTES + s)},
        note="trl 1.16's fused LM head, for comparison (not mixpo code)")


def trl_head_elementwise(w: Workload) -> KernelCost:
    """trl 1.16's Triton kernels between its GEMMs: the forward's online log-sum-exp reads
    each logits tile, the backward's kernel turns it into the gradient in place (read +
    write), each launched after the GEMM that wrote the tile."""
    s, (n, V) = DTYPE_BYTES[w.dtype], (w.completion_tokens, w.shape.vocab_size)
    return KernelCost("trl_head_elementwise", "context", vector_ops=n * V * 12,
                      special_ops=2 * n * V,
                      bytes_moved={"logits tiles read (log-sum-exp)": n * V * s,
                                   "tiles read + gradient written in place": 2 * n * V * s},
                      note="trl 1.16's fused LM head, for comparison (not mixpo code)")


def trl_head_fwd_bwd(w: Workload) -> KernelCost:
    return _combined("trl_head_fwd_bwd", "total", (trl_head_gemms(w), trl_head_elementwise(w)),
                     "trl 1.16's fused LM head (log-probs only), for comparison")


def pair_head(w: Workload) -> KernelCost:
    """The per-pair head (`mixpo.kernels.pair_loss`) on [B]-sized fp32 data: torch ops,
    forward and autograd backward, each reading and writing [B] values."""
    B = w.pairs
    return KernelCost(
        "pair_head", "torch", vector_ops=B * PAIR_HEAD_VECTOR_OPS_PER_PAIR,
        special_ops=B * PAIR_HEAD_SPECIAL_OPS_PER_PAIR,
        bytes_moved={"each op's [B] inputs read and output written":
                     PAIR_HEAD_TORCH_OPS * 3 * B * FP32_BYTES},
        note=f"[B]-sized, about {PAIR_HEAD_TORCH_OPS} torch ops: launch latency (a few "
             "microseconds each, ~0.4 ms a step) is its real cost")


def margin_solve(w: Workload) -> KernelCost:
    """`solve_margins`: gamma-PO mirror descent over the solve set (max(256, B) gaps)."""
    size = max(SOLVE_SET_SIZE, w.pairs)
    updates = size * MARGIN_SOLVE_UPDATES
    return KernelCost(
        "margin_solve", "kernel", vector_ops=updates * MARGIN_SOLVE_VECTOR_OPS_PER_UPDATE,
        special_ops=updates * MARGIN_SOLVE_SPECIAL_OPS_PER_UPDATE,
        bytes_moved={"reward gaps read": size * FP32_BYTES, "margins write": size * FP32_BYTES},
        note="[B]-sized: launch latency (microseconds) is its real cost")


def token_logps_fwd_bwd(w: Workload) -> KernelCost:
    return _combined("token_logps_fwd_bwd", "total", (token_logps_fwd(w), token_logps_bwd(w)),
                     "preference_loss's kernels, without the LM-head GEMMs")


def logits_path_fwd_bwd(w: Workload) -> KernelCost:
    return _combined("logits_path_fwd_bwd", "total",
                     (lm_head_fwd(w), token_logps_fwd(w), token_logps_bwd(w), lm_head_bwd(w)),
                     "LM-head GEMMs over all N positions + preference_loss's kernels")


def matmul_flop_floor_fwd_bwd(w: Workload) -> KernelCost:
    """6 n V H FLOPs over the matmul peak: the LM-head matmuls of the completion tokens,
    forward and both backward products, each done once (no recompute): the floor of the one
    pass. No bytes counted. fp32 at the rate of the logit-free kernels' tf32x3 products, so
    that the ratio compares like with like."""
    n, V, H = w.completion_tokens, w.shape.vocab_size, w.shape.hidden_size
    return KernelCost("matmul_flop_floor_fwd_bwd", "floor", matmul_flops=6 * n * V * H,
                      note="6nVH: forward, dHidden, dWeight once each, completion tokens only",
                      fp32_matmul="tf32x3")


def matmul_flop_floor_8nvh(w: Workload) -> KernelCost:
    """8 n V H FLOPs over the matmul peak: the floor of a two-pass head that recomputes the
    logits in its backward (mixpo's default, trl's head)."""
    n, V, H = w.completion_tokens, w.shape.vocab_size, w.shape.hidden_size
    return KernelCost("matmul_flop_floor_8nvh", "floor", matmul_flops=8 * n * V * H,
                      note="8nVH: forward, recompute, dHidden, dWeight", fp32_matmul="tf32x3")


KERNEL_MODELS = {model.__name__: model for model in (
    lm_head_fwd, token_logps_fwd, token_logps_bwd, lm_head_bwd, token_logps_fwd_bwd,
    logits_path_fwd_bwd, linear_logps_fwd, linear_softmax_grad, linear_bwd_gemms,
    linear_bwd_buffers, linear_logps_bwd, linear_logps_fwd_bwd, linear_one_pass_gemms,
    linear_one_pass_elementwise, linear_one_pass_fwd_bwd, linear_fwd_old, linear_atomic_bwd,
    linear_old_fwd_bwd, trl_head_gemms, trl_head_elementwise, trl_head_fwd_bwd,
    matmul_flop_floor_fwd_bwd, matmul_flop_floor_8nvh, pair_head, margin_solve)}

# The designs the prediction compares, with the FLOP floor each is held to.
PREDICTED = {"linear_logps_fwd_bwd": ("mixpo default (two passes)", "matmul_flop_floor_8nvh"),
             "linear_one_pass_fwd_bwd": ("mixpo one pass", "matmul_flop_floor_fwd_bwd"),
             "linear_old_fwd_bwd": ("old design (atomic backward)", "matmul_flop_floor_8nvh"),
             "trl_head_fwd_bwd": ("trl 1.16 fused head", "matmul_flop_floor_8nvh")}


def predictions(workload: Workload, devices=("h100", "a100")) -> list:
    """One row per design of PREDICTED and device: predicted seconds (`predict_seconds`),
    its FLOP floor and their ratio."""
    rows = []
    for device in devices:
        peaks = device_peaks(device)
        for kernel, (label, floor_name) in PREDICTED.items():
            cost = kernel_cost(kernel, workload)
            floor = kernel_cost(floor_name, workload).floor_seconds(peaks, workload.dtype)
            seconds = cost.predict_seconds(peaks, workload.dtype)
            rows.append({"device": device, "design": label, "kernel": kernel,
                         "predicted_ms": 1e3 * seconds, "flop_floor": floor_name,
                         "flop_floor_ms": 1e3 * floor, "x_flop_floor": seconds / floor,
                         "bound": cost.bound(peaks, workload.dtype)})
    return rows


def kernel_cost(kernel: str, workload: Workload) -> KernelCost:
    """The KernelCost of `kernel` (a key of KERNEL_MODELS) on `workload`."""
    if kernel not in KERNEL_MODELS:
        raise ValueError(f"kernel must be one of {sorted(KERNEL_MODELS)}, got {kernel!r}")
    return KERNEL_MODELS[kernel](workload)


def device_peaks(device) -> DevicePeaks:
    """A DevicePeaks, or one of DEVICES by name ("a100", "h100")."""
    if isinstance(device, DevicePeaks):
        return device
    if device not in DEVICES:
        raise ValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
    return DEVICES[device]


def floor_seconds(kernel: str, workload: Workload, device) -> float:
    """Floor time in seconds of `kernel` on `workload` at `device`'s peaks.

    kernel: a key of KERNEL_MODELS, e.g. "linear_logps_fwd_bwd" (our logit-free forward +
    backward), "matmul_flop_floor_fwd_bwd" (6nVH / matmul peak), "token_logps_fwd".
    workload: from `make_workload` (or a Workload with the exact completion-token count).
    device: "a100", "h100" or a DevicePeaks. A measured time divided by this is the
    "x floor" figure benchmark scripts report.
    """
    return kernel_cost(kernel, workload).floor_seconds(device_peaks(device), workload.dtype)


def predict_seconds(kernel: str, workload: Workload, device) -> float:
    """Predicted seconds of `kernel` (KernelCost.predict_seconds: matmuls at the stated GEMM
    efficiency)."""
    return kernel_cost(kernel, workload).predict_seconds(device_peaks(device), workload.dtype)


ASSUMPTIONS = (
    "floor = max(matmul FLOPs / matmul peak, vector ops / vector rate, SFU ops / SFU rate, "
    "HBM bytes / bandwidth, L2 bytes / L2 bandwidth) per kernel; totals sum their parts' "
    "floors",
    "prediction = the same with the matmuls at GEMM_EFFICIENCY of the peak (cuBLAS 0.9, Triton "
    "tl.dot 0.75: stated, not measured) and, for the atomic backward, its L2 atomics added to "
    "its matmul time (one CTA per SM, atomics after each MMA)",
    "HBM bytes: the traffic of the implementation as written; tiles that the resident "
    "programs share are read from HBM once while they fit half of a 40 MiB L2; itemized per "
    "row in bytes_moved",
    "L2 bytes: every [BLOCK_N, BLOCK_V] tile of a Triton kernel streams its BLOCK_N hidden "
    "rows and BLOCK_V weight rows from L2 (n V H s (1/BLOCK_N + 1/BLOCK_V)); fp32 atomics "
    "count 4 bytes per element added; cuBLAS GEMMs are assumed tiled well (no L2 term)",
    "logits path: token_logps's masked loads never read prompt/padding rows (n x V logits "
    "read), but every row runs the vocab loop (vector and SFU work over N x V); its backward "
    "writes dlogits for all N rows (zeros on prompt/padding); the LM-head GEMMs (context) "
    "cover all N",
    "logit-free default (two passes): forward 2nVH (Triton), backward per vocab chunk "
    "(workspace_bytes): a Triton kernel recomputes the logits (2nVH) and writes G once to the "
    "workspace, then cuBLAS dHidden += G W (fp32 accumulator read + written per chunk) and "
    "dWeight = G^T E (each row written once): 8nVH, no atomics, no fp32 [V, H]",
    "one pass (per-pair losses): per group of pairs, cuBLAS fp32 logits, token_logps kernels "
    "(log-sum-exp, gradient in place), cuBLAS dHidden and dWeight: 6nVH; 16-bit weights over "
    "several groups accumulate dWeight in fp32 [V, H]",
    "old design: the forward re-reads hidden per vocab tile (token tiles fastest in the grid), "
    "the atomic backward adds every tile's fp32 products in L2 and re-touches the fp32 "
    "dWeight chunk per token group",
    "trl's head: read from trl/kernels/chunked_logprob.py (token chunks 4096, vocab chunks "
    "32768, logits tiles in the input dtype, fp32 dHidden and dWeight accumulators), its "
    "Triton kernels after its GEMMs",
    "fp32 inputs: logit-free Triton kernels at TF32 peak / 3 (tf32x3), torch GEMMs at fp32 "
    "peak",
    "vector/SFU rates: one fp32 instruction per CUDA core per clock, 16 SFU results per SM "
    "per clock; op counts from the kernel source, masked-off elements included, excluding "
    "address arithmetic and tf32x3 operand splitting",
    "torch ops inside the launch paths (compaction, sequence sums, coefficient gather, fills, "
    "casts): each reads its inputs and writes its output once",
    "[B]-sized work (pair_head's torch ops, margin_solve): launch latency, not in the model, "
    "dominates",
)

__all__ = ["ASSUMPTIONS", "DEFAULT_SHAPES", "DEVICES", "GEMM_EFFICIENCY", "PREDICTED", "SHAPES",
           "DevicePeaks", "KernelCost", "ModelShape", "Workload", "device_peaks",
           "floor_seconds", "kernel_cost", "make_workload", "predict_seconds", "predictions"]


# ----------------------------------------------------------------------------------------------
# Prefix sharing (issue 23): the model body's work, which the LM-head rows above leave out
# ----------------------------------------------------------------------------------------------
# UltraFeedback-like token lengths (Llama-3 tokens), the means of benchmarks/bench_train.py's
# log-normal draws: prompt median 100 / sigma 0.9, completions median 250 / sigma 0.6.
ULTRAFEEDBACK_MEANS = {"prompt": 150.0, "chosen": 300.0, "rejected": 300.0}


def prefix_sharing_body(prompt: float, chosen: float, rejected: float) -> dict:
    """What prefix sharing saves in the body, per pair of (prompt, chosen, rejected) tokens.
    Linear layers (6 x body parameters x tokens): unshared rows run 2P + C + R tokens, a
    shared row P + C + R. Causal attention within a sequence (query-key products, flash-attn
    varlen or per-pair blocks): unshared (P+C)^2/2 + (P+R)^2/2, shared P^2/2 + P (C+R) +
    (C^2+R^2)/2: the prompt's own square is done once. The LM head reads completion tokens
    only and is unchanged."""
    unshared = 2 * prompt + chosen + rejected
    shared = prompt + chosen + rejected
    attention_unshared = ((prompt + chosen) ** 2 + (prompt + rejected) ** 2) / 2
    attention_shared = prompt ** 2 / 2 + prompt * (chosen + rejected) + \
        (chosen ** 2 + rejected ** 2) / 2
    return {"lengths": {"prompt": prompt, "chosen": chosen, "rejected": rejected},
            "body_tokens_unshared": unshared, "body_tokens_shared": shared,
            "linear_flop_saving": 1 - shared / unshared,
            "attention_flop_saving": 1 - attention_shared / attention_unshared}
