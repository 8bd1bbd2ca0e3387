"""Training configuration: one dataclass, read from YAML and overridden from the command line.

`mixpo train recipe.yaml --max_steps 12 --output_dir runs/a` reads the recipe, then applies
each `--key value` (every field is a command-line option; `--key-with-dashes` also works).
Values are parsed to the field's type; an unknown key or a malformed value is an error naming
it (argparse's for the command line, ValueError for YAML files and dicts).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mixpo.data.kinds import DIFFICULTY_KINDS, ORDERS
from mixpo.loss_spec import LOSS_TYPES

OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit")
REFERENCES = ("precomputed", "live", "none")


def option(default, help: str, choices=None):
    """A config field whose `--help` text (and allowed values, checked by `validate`) live in
    its metadata, TRL's `field(metadata={"help": ...})` convention."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every knob of a training run; each field's help is what `mixpo train --help` shows."""

    # --- model ---
    model_name_or_path: str = option("", "model directory (or Hugging Face Hub id)")
    tokenizer_name_or_path: str = option("", "tokenizer directory; empty = the model's")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | "
                        "float16", choices=("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = option(
        "auto", "auto: flash_attention_2 if importable, else sdpa",
        choices=("auto", "sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = option(False, "recompute each decoder layer in backward")
    device: str = option("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))

    # --- data ---
    train_file: str = option("", ".jsonl / .json / .parquet / save_to_disk directory")
    max_length: int = option(1024, "prompt + completion tokens")
    max_prompt_length: int = option(512, "prompt tokens kept (its end) when truncating")
    difficulty: str = option(
        "", "empty = use the file as prepared (its order, its `hard` column); otherwise score, "
        "select, route and order it here: " + " | ".join(DIFFICULTY_KINDS),
        choices=("",) + tuple(DIFFICULTY_KINDS))
    order: str = option("easy-first", "with difficulty: " + "; ".join(
        f"{name} = {meaning}" for name, meaning in ORDERS.items()), choices=ORDERS)
    route_below: typing.Optional[float] = option(None, "MixDPO: hard = difficulty < this")
    route_fraction: typing.Optional[float] = option(None, "or: the hardest fraction is hard")
    select_easiest: typing.Optional[float] = option(
        None, "Selective DPO tau: keep the easiest fraction")
    routing: bool = option(True, "hard pairs take the SFT loss (False: ignore `hard`)")

    # --- reference ---
    reference: str = option("precomputed", "precomputed (cached file, no reference model in "
                            "memory) | live (frozen copy) | none (reference-free)",
                            choices=REFERENCES)
    reference_batch_size: int = option(8, "pairs per forward of the precompute pass")

    # --- loss ---
    loss_type: str = option("sigmoid", " | ".join(LOSS_TYPES), choices=LOSS_TYPES)
    beta: float = option(0.1, "inverse temperature")
    gamma: float = option(0.0, "target margin (SimPO gamma = beta * gamma_beta_ratio)")
    adaptive_margin: bool = option(False, "gamma-PO: per-pair margins with mean `gamma`")
    margin_tau: float = option(10.0, "gamma-PO tau")
    margin_center: bool = option(False, "gamma-DPO: use gamma_i - gamma (zero-mean shift)")
    label_smoothing: float = option(0.0, "cDPO / rDPO label smoothing")
    average_log_prob: bool = option(False, "per-token log-ratios (gamma-DPO's default)")
    sft_weight: float = option(0.0, "+ sft_weight * NLL(chosen) on every pair")

    # --- optimisation ---
    learning_rate: float = option(1e-6, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    optim: str = option("adamw", "adamw (torch, fused on GPU) | adamw_bf16 (bf16 states, "
                        "stochastic rounding) | adamw_8bit (torchao)", choices=OPTIMIZERS)
    step_in_backward: bool = option(
        False, "update each parameter as soon as its gradient is ready, then free it; needs "
        "no accumulation and max_grad_norm 0; one process only")
    max_grad_norm: float = option(1.0, "0 = no clipping (the norm is still logged)")
    warmup_ratio: float = option(0.1, "cosine schedule with linear warmup")
    global_batch_size: int = option(128, "pairs per optimizer step, over all ranks")
    micro_batch_size: int = option(2, "pairs per forward pass on one rank")
    num_epochs: int = option(1, "passes over the data")
    max_steps: int = option(0, "> 0 overrides num_epochs")

    # --- run ---
    output_dir: str = option("outputs/mixpo", "where checkpoints, metrics and final/ go")
    seed: int = option(42, "seeds data order (shuffle), margins and the RNGs")
    logging_steps: int = option(10, "log every this many optimizer steps")
    save_steps: int = option(500, "0 = no intermediate checkpoints")
    save_total_limit: int = option(0, "keep the newest N checkpoints (0 = all)")
    progress_bar: bool = option(True, "show a tqdm progress bar")

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first inconsistent option; returns self."""
        for item in dataclasses.fields(self):
            allowed = item.metadata.get("choices")
            if allowed is not None and getattr(self, item.name) not in allowed:
                raise ValueError(f"{item.name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, item.name)!r}")
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

    @classmethod
    def override(cls, name: str, default):
        """Field `name` of this config with another default (for subclasses such as the
        demo's config), keeping its help and choices."""
        item = next(f for f in dataclasses.fields(cls) if f.name == name)
        return field(default=default, metadata=item.metadata)

    @property
    def reference_free(self) -> bool:
        return LOSS_TYPES[self.loss_type].reference_free or self.reference == "none"

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


def add_config_arguments(parser, config_class=TrainConfig) -> None:
    """One `--key VALUE` option per config field (also spelled `--key-with-dashes`); values are
    kept as given and typed by `build_config`. Bool keys alone (`--gradient_checkpointing`)
    mean true. Options left out stay absent from the namespace."""
    import argparse

    types = _field_types(config_class)
    for item in dataclasses.fields(config_class):
        names = [f"--{item.name}"]
        if "_" in item.name:
            names.append(f"--{item.name.replace('_', '-')}")
        is_bool = types[item.name] is bool
        parser.add_argument(*names, dest=item.name, default=argparse.SUPPRESS,
                            metavar="BOOL" if is_bool else "VALUE",
                            nargs="?" if is_bool else None, const="true" if is_bool else None,
                            help=f"{item.metadata.get('help', '')} (default {item.default!r})"
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
