"""Training metrics: TRL's names, aggregated over every pair of every rank since the last log.

Each logging step appends one JSON object to `OUTPUT/metrics.jsonl` (and to the report_to
backends, TensorBoard under `OUTPUT/runs/` or Weights & Biases), and prints it as one line:
`step`, the loss metrics of `PreferenceLossOutput.metrics()` (loss, rewards/*, logps/*,
gamma/*, routing/sft_fraction, and with token_metrics logits/*, entropy, mean_token_accuracy),
`learning_rate`, `grad_norm` (before clipping, at the logging step), `tokens_per_second`
(non-padding tokens over all ranks), `memory/peak_gb` (CUDA peak allocated, or the process's
peak RSS on CPU) and, at evaluation steps, `eval/*`.
"""
from __future__ import annotations

import json
import os
import resource
import time
import warnings
from pathlib import Path

import torch

from mixpo.files import atomic_output
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


def _kept_rows(path: Path, resume_step: int | None) -> list[str]:
    """The lines of an existing metrics.jsonl to keep on resume: rows up to the checkpoint's
    step (later ones will be logged again); a torn last line (a kill mid-write) is dropped
    with a warning."""
    if resume_step is None or not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                warnings.warn(f"{path}: dropping its torn last line (a run killed while "
                              "writing it)", stacklevel=3)
                break
            raise ValueError(f"{path} line {number}: not valid JSON; move the file away to "
                             "start a fresh log") from None
        if row.get("step", 0) <= resume_step:
            kept.append(line)
    return kept


def format_row(row: dict, total_steps: int) -> str:
    """The one line printed per logging step."""
    parts = [f"step {row['step']}/{total_steps}"]
    for name, spec in (("loss", ".4f"), ("rewards/accuracies", ".3f"), ("rewards/margins", ".4g"),
                       ("learning_rate", ".2e"), ("grad_norm", ".3g"),
                       ("tokens_per_second", ".0f"), ("eval/loss", ".4f")):
        if name in row:
            parts.append(f"{name} {row[name]:{spec}}")
    return " | ".join(parts)


def backend_tag(name: str) -> str:
    """A metric's tag in TensorBoard and W&B, as the Hugging Face Trainer writes it:
    `train/loss`, `train/rewards/margins`; evaluation metrics keep their `eval/` prefix."""
    return name if name.startswith("eval/") else f"train/{name}"


class MetricsLog:
    """Appends rows to metrics.jsonl (rank 0 only), prints a line per row, and mirrors the
    rows to the `report_to` backends: "tensorboard" (OUTPUT/runs/), "wandb" (honours
    WANDB_MODE, e.g. offline without a network), "none"."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None,
                 report_to=("none",), run_name: str = "", config: dict | None = None,
                 total_steps: int = 0, printer=print):
        self.path = output_dir / "metrics.jsonl"
        self.enabled, self.total_steps, self.printer = enabled, total_steps, printer
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        kept = _kept_rows(self.path, resume_step)
        with atomic_output(self.path) as staging:
            staging.write_text("".join(line + "\n" for line in kept))
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, TensorBoard hides the earlier run's points from the resumed step on
            # (they are logged again), so a restart leaves no duplicates.
            self.tensorboard = SummaryWriter(
                str(output_dir / "runs"), purge_step=None if resume_step is None
                else resume_step + 1)
        if "wandb" in report_to:
            import wandb
            try:
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mixpo"),
                                        name=run_name or None, dir=str(output_dir),
                                        config=config or {}, resume="allow")
            except Exception as error:                 # noqa: BLE001 - wandb's many kinds
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise ValueError(f"report_to wandb: wandb.init failed ({type(error).__name__}: "
                                 f"{first}); set WANDB_MODE=offline to log under output_dir "
                                 "without a network") from None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.printer(format_row(row, self.total_steps))
        scalars = {backend_tag(name): value for name, value in row.items()
                   if name != "step" and isinstance(value, (int, float))}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, row["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
