"""Training metrics: TRL's names, aggregated over every pair of every rank since the last log.

Each logging step appends one JSON object to `OUTPUT/metrics.jsonl` (and to TensorBoard under
`OUTPUT/runs/` when tensorboard is installed): `step`, the loss metrics of
`PreferenceLossOutput.metrics()` (loss, rewards/*, logps/*, gamma/*, routing/sft_fraction),
`lr`, `grad_norm` (before clipping, at the logging step), `tokens_per_second` (non-padding
tokens over all ranks) and `memory/peak_gb` (CUDA peak allocated, or the process's peak RSS on
CPU).
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from mixpo.losses import PreferenceLossOutput
from mixpo.train import distributed

PAIR_FIELDS = ("per_pair_loss", "chosen_logps", "rejected_logps", "chosen_rewards",
               "rejected_rewards", "gamma", "chosen_counts", "rejected_counts")
# Present when the loss returns TRL's per-token metrics (token_metrics / use_weighting).
OPTIONAL_FIELDS = ("hard", "chosen_token_sums", "rejected_token_sums")


class MetricsWindow:
    """Per-pair results accumulated on this rank since the last log (fp32 tensors, kept on
    the training device so that adding a micro-batch never waits for it)."""

    def __init__(self):
        self.pairs: dict[str, list[torch.Tensor]] = {name: []
                                                     for name in PAIR_FIELDS + OPTIONAL_FIELDS}
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, out: PreferenceLossOutput, tokens: int) -> None:
        for name in PAIR_FIELDS:
            self.pairs[name].append(getattr(out, name).detach().float())
        for name in OPTIONAL_FIELDS:
            if getattr(out, name) is not None:
                self.pairs[name].append(getattr(out, name).detach())
        self.tokens += int(tokens)

    def state_dict(self) -> dict:
        """Saved in checkpoints so a resumed run logs the same numbers."""
        return {"pairs": {name: [tensor.cpu() for tensor in tensors]
                          for name, tensors in self.pairs.items()}, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.pairs, self.tokens = state["pairs"], state["tokens"]

    def summarize(self, env) -> dict:
        """TRL-named metrics over all pairs of all ranks; then the window starts afresh.
        Every rank must call it (it gathers)."""
        # Per-tensor .to: entries restored from a checkpoint live on the CPU.
        def local(name):
            return torch.cat([tensor.to(env.device) for tensor in self.pairs[name]])

        gathered = {name: distributed.all_gather_cat(local(name), env).cpu()
                    for name in PAIR_FIELDS}
        hard = None
        if self.pairs["hard"]:
            flags = local("hard").to(torch.uint8)  # gloo: no bool
            hard = distributed.all_gather_cat(flags, env).cpu().bool()
        for name in OPTIONAL_FIELDS[1:]:
            gathered[name] = distributed.all_gather_cat(local(name), env).cpu() \
                if self.pairs[name] else None
        summary = PreferenceLossOutput(loss=gathered["per_pair_loss"].mean(), hard=hard,
                                       **gathered).metrics()
        elapsed = time.perf_counter() - self.started
        tokens = distributed.all_reduce_sum(float(self.tokens), env)
        summary["tokens_per_second"] = tokens / max(elapsed, 1e-9)
        self.__init__()
        return summary


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """Appends rows to metrics.jsonl (rank 0 only) and mirrors them to TensorBoard."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.is_file():
            # Rows logged after the checkpoint we resume from will be logged again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(output_dir / "runs"))
        except ImportError:  # tensorboard is optional
            self.tensorboard = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(name, value, row["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
