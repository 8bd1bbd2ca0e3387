"""`mixpo demo`: the whole pipeline on a task whose answers can be checked, in minutes on a CPU.

1. Build a character tokenizer and a tiny Llama-style model from a config (nothing downloaded).
2. SFT-warm it briefly on additions "12+7=" -> "19" (deliberately short: it stays imperfect).
3. Make preference pairs: chosen = the right sum, rejected = a wrong one, with 1-10 rating
   scores: a near miss (off by one) keeps a high rating, so its pair has a small rating margin
   and counts as hard; off-by-ten and random answers make easy pairs.
4. Train MixDPO with gamma-PO margins through the real trainer (`mixpo.train.train`): pairs
   ordered easy-first by rating margin, hard ones (margin < route_below) routed to SFT,
   reference log-probs precomputed, checkpoints, metrics.jsonl.
5. Print accuracy before/after (greedy decoding) and reward statistics, and plot the run.
Runs on a GPU when there is one. Module-level imports stay light: `mixpo --help` imports this.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from mixpo.files import atomic_output, atomic_write_text
from mixpo.train.config import TrainConfig, option

CHARS = "0123456789+="
PAD, EOS = "<pad>", "<eos>"


@dataclass
class DemoConfig(TrainConfig):
    """TrainConfig with the demo's defaults, plus the task and SFT warm-up settings."""

    # --- task and warm-up (demo only) ---
    operand_max: int = option(20, "additions a+b with 0 <= a, b < operand_max")
    hidden_size: int = option(64, "tiny Llama: width")
    num_layers: int = option(2, "tiny Llama: decoder layers")
    sft_steps: int = option(120, "SFT warm-up steps (kept short on purpose)")
    sft_batch_size: int = option(64, "SFT warm-up batch size")
    sft_learning_rate: float = option(3e-3, "SFT warm-up learning rate")
    # --- training defaults for the demo (every TrainConfig key can be overridden) ---
    output_dir: str = TrainConfig.override("output_dir", "mixpo-demo")
    max_length: int = TrainConfig.override("max_length", 16)
    max_prompt_length: int = TrainConfig.override("max_prompt_length", 8)
    difficulty: str = TrainConfig.override("difficulty", "rating")
    route_below: float = TrainConfig.override("route_below", 1.0)  # near misses (margin 0.5)
    loss_type: list = TrainConfig.override("loss_type", ["sigmoid"])
    beta: float = TrainConfig.override("beta", 0.1)
    gamma: float = TrainConfig.override("gamma", 0.5)
    adaptive_margin: bool = TrainConfig.override("adaptive_margin", True)
    learning_rate: float = TrainConfig.override("learning_rate", 1e-4)
    global_batch_size: int = TrainConfig.override("global_batch_size", 32)
    per_device_train_batch_size: int = TrainConfig.override("per_device_train_batch_size", 16)
    num_train_epochs: int = TrainConfig.override("num_train_epochs", 3)
    reference_batch_size: int = TrainConfig.override("reference_batch_size", 64)
    logging_steps: int = TrainConfig.override("logging_steps", 5)
    save_steps: int = TrainConfig.override("save_steps", 25)
    seed: int = TrainConfig.override("seed", 0)

    def validate(self) -> "DemoConfig":
        if self.model_name_or_path or self.train_file:
            raise ValueError("the demo builds its own model and data: drop model_name_or_path "
                             "and train_file (use `mixpo train` for your own)")
        if self.operand_max < 2 or self.sft_steps < 0:
            raise ValueError("operand_max must be >= 2 and sft_steps >= 0")
        return super().validate()


# ---------------------------------------------------------------------------------------------
# Builders: tokenizer, model, task
# ---------------------------------------------------------------------------------------------
def build_char_tokenizer():
    """A PreTrainedTokenizerFast with one token per character of CHARS plus <pad> and <eos>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, **{char: index + 2 for index, char in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS,
                                   model_max_length=64)


def build_tiny_llama(tokenizer, hidden_size: int, num_layers: int, seed: int):
    """A freshly initialised LlamaForCausalLM sized for the task (about 0.1 M parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def all_problems(operand_max: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(operand_max) for b in range(operand_max)]


def wrong_answers(answer: int, rng: random.Random) -> list[tuple[str, float]]:
    """Three wrong answers with the rating a grader would give them (the right one gets 10):
    off by one 9.5 (a hard pair), off by ten 6.0, a random number 2.0."""
    near = answer + rng.choice([-1, 1]) if answer > 0 else answer + 1
    tens = answer + 10 if answer < 10 or rng.random() < 0.5 else answer - 10
    far = rng.choice([n for n in range(answer + 25) if abs(n - answer) > 2])
    return [(str(near), 9.5), (str(tens), 6.0), (str(far), 2.0)]


def preference_rows(problems, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for a, b in problems:
        for rejected, score in wrong_answers(a + b, rng):
            rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": rejected,
                         "score_chosen": 10.0, "score_rejected": score})
    return rows


# ---------------------------------------------------------------------------------------------
# SFT warm-up and evaluation
# ---------------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _sft_batch(tokenizer, problems):
    """input_ids, attention_mask, labels [n, T] for `problems`, right-padded; only the answer
    and its EOS are labelled."""
    import torch

    rows = []
    for a, b in problems:
        prompt = _encode(tokenizer, f"{a}+{b}=")
        answer = _encode(tokenizer, str(a + b)) + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    length = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in rows])
    labels = torch.tensor([answer + [-100] * (length - len(answer)) for _, answer in rows])
    return input_ids, (input_ids != pad).long(), labels


def sft_warmup(model, tokenizer, problems, cfg: DemoConfig, device) -> list[float]:
    """Cross-entropy on the answer tokens (prompt masked). Returns the loss per step."""
    import torch

    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_learning_rate)
    model.train()
    losses = []
    for _ in range(cfg.sft_steps):
        batch = rng.sample(problems, min(cfg.sft_batch_size, len(problems)))
        input_ids, attention_mask, labels = (t.to(device) for t in _sft_batch(tokenizer, batch))
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def greedy_accuracy(model, tokenizer, problems, device, max_new_tokens: int = 4) -> float:
    """Share of problems whose greedy answer (up to EOS) is the right sum. Prompts are
    grouped by length, so no padding (and no position shift) is needed."""
    import torch

    model.eval()
    by_length: dict[int, list[tuple[int, int]]] = {}
    for a, b in problems:
        by_length.setdefault(len(f"{a}+{b}="), []).append((a, b))
    correct = 0
    with torch.no_grad():
        for group in by_length.values():
            ids = torch.tensor([_encode(tokenizer, f"{a}+{b}=") for a, b in group], device=device)
            prompt_length = ids.shape[1]
            for _ in range(max_new_tokens):
                next_ids = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_ids], dim=1)
            for (a, b), answer in zip(group, ids[:, prompt_length:].tolist()):
                if tokenizer.eos_token_id in answer:
                    answer = answer[:answer.index(tokenizer.eos_token_id)]
                correct += tokenizer.decode(answer) == str(a + b)
    return correct / len(problems)


def pair_logps(model, tokenizer, rows, cfg: DemoConfig, device) -> tuple:
    """Summed completion log-probs [2N] (chosen rows first) and completion token counts [2N]
    with the trainer's own tokenization, collation and logit-free scoring."""
    import torch

    from mixpo.data.collate import PreferenceCollator
    from mixpo.data.tokenize import tokenize_rows
    from mixpo.hf import policy

    examples = tokenize_rows(rows, tokenizer, cfg.max_length, cfg.max_prompt_length)
    chosen, rejected = policy.pair_logps(policy.PreferenceModel(model).eval(), examples,
                                         PreferenceCollator(tokenizer.pad_token_id), device)
    counts = [len(example[f"{name}_input_ids"]) - example["prompt_length"]
              for name in ("chosen", "rejected") for example in examples]
    return torch.cat([chosen, rejected]), torch.tensor(counts, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------
def warm_started_model(cfg: DemoConfig, output_dir: Path, device) -> Path:
    """OUTPUT/sft-model: built and SFT-warmed once; reused by reruns with the same settings."""
    sft_dir = output_dir / "sft-model"
    info = {k: getattr(cfg, k) for k in ("operand_max", "hidden_size", "num_layers", "sft_steps",
                                         "sft_batch_size", "sft_learning_rate", "seed")}
    marker = sft_dir / "demo_sft.json"
    if marker.is_file() and json.loads(marker.read_text()) == info:
        print(f"reusing the SFT warm-up in {sft_dir}")
        return sft_dir
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.seed).to(device)
    print(f"SFT warm-up: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{cfg.sft_steps} steps on {cfg.operand_max ** 2} additions")
    losses = sft_warmup(model, tokenizer, all_problems(cfg.operand_max), cfg, device)
    if losses:
        print(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    with atomic_output(sft_dir, directory=True, owner="mixpo demo") as staging:
        model.cpu().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "demo_sft.json").write_text(json.dumps(info))
    return sft_dir


def evaluate(model_dir: Path, cfg: DemoConfig, eval_rows, device, reference_logps=None):
    """Task accuracy and pair statistics of the model in `model_dir`; with the reference's
    (chosen, rejected) log-probs also the implicit reward accuracy and margin.
    Returns (results dict, this model's (chosen, rejected) log-probs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixpo.loss_spec import sequence_rewards

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    logps, counts = pair_logps(model, tokenizer, eval_rows, cfg, device)
    chosen, rejected = logps[:len(eval_rows)], logps[len(eval_rows):]
    problems = all_problems(cfg.operand_max)
    result = {"task_accuracy": greedy_accuracy(model, tokenizer, problems, device),
              "logp_preference_accuracy": (chosen > rejected).float().mean().item(),
              "logps_chosen": chosen.mean().item(), "logps_rejected": rejected.mean().item()}
    if reference_logps is not None:
        # The implicit rewards of the loss this demo trains (mixpo.loss_spec).
        rewards, _ = sequence_rewards(logps, counts, torch.cat(reference_logps), cfg.beta,
                                      cfg.loss_config().reward_normalized)
        margins = rewards[:len(eval_rows)] - rewards[len(eval_rows):]
        result["reward_accuracy"] = (margins > 0).float().mean().item()
        result["reward_margin"] = margins.mean().item()
    return result, (chosen, rejected)


def results_table(before: dict, after: dict, hard_pairs: int, total_pairs: int,
                  last_metrics: dict | None) -> str:
    def row(label, old, new):
        old = f"{old:9.3f}" if isinstance(old, float) else f"{old:>9s}"
        return f"{label:46s}{old}{new:9.3f}"

    lines = [f"{'':46s}{'before':>9s}{'after':>9s}",
             row("task accuracy (greedy decoding, all sums)", before["task_accuracy"],
                 after["task_accuracy"]),
             row("fresh pairs with logp(chosen) > logp(rejected)",
                 before["logp_preference_accuracy"], after["logp_preference_accuracy"]),
             row("mean logp chosen (fresh pairs)", before["logps_chosen"],
                 after["logps_chosen"]),
             row("mean logp rejected (fresh pairs)", before["logps_rejected"],
                 after["logps_rejected"]),
             row("reward accuracy (fresh pairs)", "-", after["reward_accuracy"]),
             row("reward margin (fresh pairs)", "-", after["reward_margin"]),
             f"{'training pairs routed to SFT (hard)':46s}{hard_pairs:>18d} / {total_pairs}"]
    if last_metrics:
        lines.append(f"{'last log: loss, reward accuracy, gamma mean':46s}"
                     f"{last_metrics['loss']:>18.3f}, {last_metrics['rewards/accuracies']:.2f}, "
                     f"{last_metrics['gamma/mean']:.2f}")
    return "\n".join(lines)


def plot_run(metrics: list[dict], before: dict, after: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in metrics]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(steps, [row["loss"] for row in metrics], marker="o")
    loss_axis.set(xlabel="step", ylabel="loss (mean over pairs)", title="MixDPO + gamma-PO loss")
    accuracy_axis.plot(steps, [row["rewards/accuracies"] for row in metrics], marker="o",
                       label="reward accuracy (training pairs)")
    accuracy_axis.plot(steps, [row["routing/sft_fraction"] for row in metrics], linestyle="--",
                       label="share of pairs routed to SFT")
    for value, label, color in ((before["task_accuracy"], "task accuracy before", "grey"),
                                (after["task_accuracy"], "task accuracy after", "green")):
        accuracy_axis.axhline(value, color=color, linestyle=":", label=label)
    accuracy_axis.set(xlabel="step", ylabel="fraction", ylim=(0, 1.05), title="accuracy")
    accuracy_axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(cfg: DemoConfig) -> dict:
    """Steps 1-5 of the module docstring; returns the before/after numbers. Under torchrun
    rank 0 alone writes (warm-up, data, report) while the others wait; training is shared."""
    import torch

    from mixpo.train import distributed

    from mixpo.train.checkpoint import output_lock

    threads = torch.get_num_threads()
    try:
        with distributed.process_group(cfg.device, cfg.ddp_timeout) as env:
            if env.device.type == "cpu":
                # A 0.1 M-parameter model gains nothing from intra-op threads, and spinning
                # OpenMP threads on a busy machine make every step several times slower.
                torch.set_num_threads(1)
            with output_lock(Path(cfg.output_dir), enabled=env.is_main):
                return _run_demo(cfg, env)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig, env) -> dict:
    import datasets

    from mixpo.data.difficulty import compute_difficulty, route_hard
    from mixpo.data.io import save_rows
    from mixpo.train import distributed
    from mixpo.train.metrics import read_metrics
    from mixpo.train.trainer import train

    output_dir = Path(cfg.output_dir)
    device = env.device
    sft_dir = output_dir / "sft-model"
    pairs_file = output_dir / "pairs.jsonl"
    problems = all_problems(cfg.operand_max)
    train_rows = preference_rows(problems, cfg.seed)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        sft_dir = warm_started_model(cfg, output_dir, device)
        save_rows(datasets.Dataset.from_list(train_rows), pairs_file)
    distributed.barrier(env)          # the others read what rank 0 wrote
    # Fresh pairs for evaluation: the same sums with newly drawn wrong answers.
    eval_rows = preference_rows(problems, cfg.seed + 1)

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train_cfg = TrainConfig(**{k: v for k, v in dataclasses.asdict(cfg).items()
                               if k in train_fields})
    train_cfg.model_name_or_path, train_cfg.train_file = str(sft_dir), str(pairs_file)
    result = train(train_cfg, env)
    if not env.is_main:
        return {}

    before, reference_logps = evaluate(sft_dir, cfg, eval_rows, device)
    after, _ = evaluate(Path(result["final_dir"]), cfg, eval_rows, device, reference_logps)
    metrics = read_metrics(output_dir)
    plot_run(metrics, before, after, output_dir / "demo.png")
    # The routing the trainer applied, by the data layer's own rules.
    routes = {name: getattr(cfg, name) for name in
              ("route_below", "route_at_or_below", "route_fraction")
              if getattr(cfg, name) is not None}
    hard_pairs = int(route_hard(compute_difficulty(datasets.Dataset.from_list(train_rows),
                                                   cfg.difficulty), **routes).sum())
    table = results_table(before, after, hard_pairs, len(train_rows),
                          metrics[-1] if metrics else None)
    print("\n" + table)
    print(f"\nplot: {output_dir / 'demo.png'}   metrics: {output_dir / 'metrics.jsonl'}   "
          f"model: {result['final_dir']}")
    summary = {"before": before, "after": after, "hard_pairs": hard_pairs, "table": table}
    atomic_write_text(output_dir / "demo_results.json", json.dumps(summary, indent=1))
    return summary
