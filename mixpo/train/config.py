"""Training configuration: one dataclass, read from YAML and overridden from the command line.

`mixpo train recipe.yaml --max_steps 12 --output_dir runs/a` reads the recipe, then applies
each `--key value` (every field is a command-line option; `--key-with-dashes` also works).
Values are parsed to the field's type; an unknown key or a malformed value is an error naming
it (argparse's for the command line, ValueError for YAML files and dicts).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit")
REFERENCES = ("precomputed", "live", "none")
DIFFICULTIES = ("", "rating", "reward", "validation-loss")
ORDERS = ("easy-first", "as-is", "shuffle")


@dataclass
class TrainConfig:
    """Every knob of a training run; the comments are the documentation `mixpo train` shows."""

    # --- model ---
    model_name_or_path: str = ""          # model directory (or Hugging Face Hub id)
    tokenizer_name_or_path: str = ""      # "" = the model's directory
    dtype: str = "auto"                   # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    attn_implementation: str = "auto"     # auto: flash_attention_2 if importable, else sdpa
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward
    device: str = "auto"                  # auto | cpu | cuda

    # --- data ---
    train_file: str = ""                  # .jsonl / .json / .parquet / save_to_disk directory
    max_length: int = 1024                # prompt + completion tokens
    max_prompt_length: int = 512          # prompt tokens kept (its end) when truncating
    difficulty: str = ""                  # "" = use the file as prepared (its order, its
                                          # `hard` column); rating | reward | validation-loss
                                          # = score, select, route and order it here
    order: str = "easy-first"             # with difficulty: easy-first | as-is | shuffle
    route_below: typing.Optional[float] = None     # MixDPO: hard = difficulty < this
    route_fraction: typing.Optional[float] = None  # or: the hardest fraction is hard
    select_easiest: typing.Optional[float] = None  # Selective DPO tau: keep easiest fraction
    routing: bool = True                  # hard pairs take the SFT loss (False: ignore `hard`)

    # --- reference ---
    reference: str = "precomputed"        # precomputed (cached file, no reference model in
                                          # memory) | live (frozen copy) | none (ref-free)
    reference_batch_size: int = 8         # pairs per forward of the precompute pass

    # --- loss ---
    loss_type: str = "sigmoid"            # sigmoid | ipo | hinge | robust | simpo
    beta: float = 0.1
    gamma: float = 0.0                    # target margin (SimPO gamma = beta * gamma_beta_ratio)
    adaptive_margin: bool = False         # gamma-PO: per-pair margins with mean `gamma`
    margin_tau: float = 10.0              # gamma-PO tau
    margin_center: bool = False           # gamma-DPO: use gamma_i - gamma (zero-mean shift)
    label_smoothing: float = 0.0
    average_log_prob: bool = False        # per-token log-ratios (gamma-DPO's default)
    sft_weight: float = 0.0               # + sft_weight * NLL(chosen) on every pair

    # --- optimisation ---
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw"                  # adamw (torch, fused on GPU) | adamw_bf16 (bf16
                                          # states, stochastic rounding) | adamw_8bit (torchao)
    step_in_backward: bool = False        # update each parameter as soon as its gradient is
                                          # ready, then free it; needs no accumulation and
                                          # max_grad_norm 0; one process only
    max_grad_norm: float = 1.0            # 0 = no clipping (the norm is still logged)
    warmup_ratio: float = 0.1             # cosine schedule with linear warmup
    global_batch_size: int = 128          # pairs per optimizer step, over all ranks
    micro_batch_size: int = 2             # pairs per forward pass on one rank
    num_epochs: int = 1
    max_steps: int = 0                    # > 0 overrides num_epochs

    # --- run ---
    output_dir: str = "outputs/mixpo"
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500                 # 0 = no intermediate checkpoints
    save_total_limit: int = 0             # keep the newest N checkpoints (0 = all)
    progress_bar: bool = True

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first inconsistent option; returns self."""
        choices = {"loss_type": LOSS_TYPES, "optim": OPTIMIZERS, "reference": REFERENCES,
                   "difficulty": DIFFICULTIES, "order": ORDERS,
                   "dtype": ("auto", "float32", "bfloat16", "float16"),
                   "device": ("auto", "cpu", "cuda"),
                   "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, key)!r}")
        positive = ("max_length", "max_prompt_length", "global_batch_size", "micro_batch_size",
                    "reference_batch_size", "logging_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.beta <= 0 or not math.isfinite(self.beta):
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.adaptive_margin and self.gamma < 0:
            raise ValueError("adaptive_margin needs gamma >= 0 (the mean margin gamma0)")
        if self.step_in_backward and self.max_grad_norm > 0:
            raise ValueError("step_in_backward updates each parameter before the total gradient "
                             "norm is known, so it cannot clip: set max_grad_norm 0")
        if not self.difficulty and (self.route_below is not None or self.route_fraction is not None
                                    or self.select_easiest is not None):
            raise ValueError("route_below / route_fraction / select_easiest need a difficulty "
                             "(rating, reward or validation-loss)")
        return self

    @property
    def reference_free(self) -> bool:
        return self.loss_type == "simpo" or self.reference == "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Parsing: YAML files and --key value overrides, typed by the dataclass fields
# ---------------------------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _field_types(config_class) -> dict:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def coerce_value(key: str, value, annotation):
    """`value` (from YAML or the command line) as the type `annotation`, or ValueError."""
    if typing.get_origin(annotation) is typing.Union and type(None) in typing.get_args(annotation):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # also YAML's "1e-6", which PyYAML leaves as a string
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        name = getattr(annotation, "__name__", str(annotation))
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {name}") from None
    raise TypeError(f"unsupported config field type {annotation!r} for {key!r}")


def _check_key(key: str, types: dict, source: str) -> str:
    if key not in types:
        close = difflib.get_close_matches(key, list(types), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown config key {key!r} in {source}{hint} "
                         f"(`mixpo train --help` lists the keys)")
    return key


def _field_comments(config_class) -> dict:
    """The `# ...` comments after each field in the class bodies (base classes first)."""
    comments = {}
    for klass in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source shipped: --help just lacks the comments
            continue
        current = None
        for line in source.splitlines():
            code, _, comment = line.partition("#")
            match = re.match(r"\s+(\w+): [^=]+=", code)
            if match:
                current = match.group(1)
                comments[current] = comment.strip()
            elif current and not code.strip() and comment.strip():
                comments[current] += " " + comment.strip()  # a comment continued below
            else:
                current = None
    return comments


def add_config_arguments(parser, config_class=TrainConfig) -> None:
    """One `--key VALUE` option per config field (also spelled `--key-with-dashes`); values are
    kept as given and typed by `build_config`. Bool keys alone (`--gradient_checkpointing`)
    mean true. Options left out stay absent from the namespace."""
    import argparse

    comments = _field_comments(config_class)
    types = _field_types(config_class)
    for item in dataclasses.fields(config_class):
        names = [f"--{item.name}"]
        if "_" in item.name:
            names.append(f"--{item.name.replace('_', '-')}")
        is_bool = types[item.name] is bool
        parser.add_argument(*names, dest=item.name, default=argparse.SUPPRESS,
                            metavar="BOOL" if is_bool else "VALUE",
                            nargs="?" if is_bool else None, const="true" if is_bool else None,
                            help=f"{comments.get(item.name, '')} (default {item.default!r})"
                            .replace("%", "%%"))


def overrides_from_args(args, config_class=TrainConfig) -> dict:
    """The config options given on the command line, as {key: raw value}."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if hasattr(args, f.name)}


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def build_config(config_class=TrainConfig, yaml_path: str | Path | None = None,
                 overrides: dict | None = None):
    """Defaults <- YAML file <- overrides ({key: value}, values typed here), validated."""
    types = _field_types(config_class)
    values = {}
    if yaml_path is not None:
        for key, value in load_yaml(yaml_path).items():
            key = _check_key(str(key), types, str(yaml_path))
            values[key] = coerce_value(key, value, types[key])
    for key, value in (overrides or {}).items():
        key = _check_key(key, types, "the overrides")
        values[key] = coerce_value(key, value, types[key])
    return config_class(**values).validate()
