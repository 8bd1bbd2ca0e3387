"""Training configuration: one dataclass, read from YAML and overridden from the command line.

`mixpo train recipe.yaml --max_steps 12 --output_dir runs/a` reads the recipe, then applies
each `--key value` (every field is a command-line option; `--key-with-dashes` also works).
Values are parsed to the field's type; an unknown key or a malformed value is an error naming
it (argparse's for the command line, ValueError for YAML files and dicts).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mixpo.data.kinds import DIFFICULTY_KINDS, ORDERS
from mixpo.loss_config import LossConfig, option_fields
from mixpo.schedule import SCHEDULERS

OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit")
REFERENCES = ("precomputed", "live", "none")
REPORTERS = ("none", "tensorboard", "wandb")

# Earlier spellings of config keys, still accepted in recipes and on the command line (a note
# says so once): old name -> current name (Hugging Face TrainingArguments' names).
KEY_ALIASES = {"micro_batch_size": "per_device_train_batch_size",
               "num_epochs": "num_train_epochs", "lr": "learning_rate"}


def option(default, help: str, choices=None):
    """A config field whose `--help` text (and allowed values, checked by `validate`) live in
    its metadata, TRL's `field(metadata={"help": ...})` convention."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# The loss options, declared once by mixpo.LossConfig (defaults, help, choices).
_LossOptions = dataclasses.make_dataclass("_LossOptions", option_fields())


@dataclass
class TrainConfig(_LossOptions):
    """Every knob of a training run; each field's help is what `mixpo train --help` shows.
    Names are Hugging Face TrainingArguments' / TRL's where they have the option. The loss
    options (loss_type, beta, gamma, ...) are mixpo.LossConfig's, inherited: a YAML file or
    `--key value` sets them flat, as before."""

    # --- model ---
    model_name_or_path: str = option("", "model directory (or Hugging Face Hub id)")
    tokenizer_name_or_path: str = option("", "tokenizer directory; empty = the model's")
    dtype: str = option("auto", "the weights' dtype: auto (bf16 on GPU, fp32 on CPU) | "
                        "float32 | bfloat16 | float16",
                        choices=("auto", "float32", "bfloat16", "float16"))
    mixed_precision: str = option(
        "no", "compute dtype over fp32 weights: no | bf16 | fp16 (Hugging Face's `bf16: "
        "true` = fp32 master weights and AdamW states, bf16 compute: the papers' setup)",
        choices=("no", "bf16", "fp16"))
    attn_implementation: str = option(
        "auto", "auto: flash_attention_2 if importable, else sdpa",
        choices=("auto", "sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = option(False, "recompute each decoder layer in backward")
    device: str = option("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))

    # --- data ---
    train_file: str = option("", ".jsonl / .json / .parquet / save_to_disk directory")
    split: str = option("", "split of a saved DatasetDict (save_to_disk directory)")
    eval_file: str = option("", "optional held-out pairs, same formats (eval/* metrics)")
    eval_split: str = option("", "split of eval_file when it is a saved DatasetDict")
    eval_steps: int = option(0, "evaluate every this many steps (0 = at the end only)")
    max_length: int = option(1024, "prompt + completion tokens")
    max_prompt_length: int = option(512, "prompt tokens kept (its end) when truncating")
    difficulty: str = option(
        "", "empty = use the file as prepared (its order; its `hard` column only with "
        "routing: true); otherwise score, select, route and order it here: "
        + " | ".join(DIFFICULTY_KINDS), choices=("",) + tuple(DIFFICULTY_KINDS))
    score_columns: typing.Optional[list[str]] = option(
        None, "with difficulty: rating: the (chosen, rejected) rating columns when not one of "
        "the known names (e.g. MixDPO's instruct ratings)")
    order: str = option("easy-first", "with difficulty (without: shuffle permutes the file, "
                        "anything else keeps its order): " + "; ".join(
        f"{name} = {meaning}" for name, meaning in ORDERS.items()), choices=ORDERS)
    route_below: typing.Optional[float] = option(None, "MixDPO: hard = difficulty < this")
    route_at_or_below: typing.Optional[float] = option(
        None, "MixDPO's Argilla variant: hard = difficulty <= this")
    route_fraction: typing.Optional[float] = option(None, "or: the hardest fraction is hard")
    select_easiest: typing.Optional[float] = option(
        None, "Selective DPO tau: keep the easiest int(tau * n) pairs")
    routing: typing.Optional[bool] = option(
        None, "hard pairs take the SFT loss; empty = when a route_* option is set; true with "
        "a prepared file = use its `hard` column")
    drop_last: bool = option(False, "drop the last incomplete global batch of each epoch "
                             "(kept by default, as the MixDPO authors' trainer)")
    padding_free: bool = option(False, "pack each micro-batch's sequences into one row "
                                "(position ids restart per sequence, attention stays within "
                                "each): no compute on padding")
    prefix_sharing: bool = option(False, "with padding_free: each pair's prompt is read once, "
                                  "chosen and rejected attend to one copy of it (sdpa, eager, "
                                  "flex_attention; under flash-attn rows stay unshared)")
    group_by_length: int = option(0, "with padding_free or not: sort pairs by length inside "
                                  "windows of this many rows of the order (0 = off), so "
                                  "micro-batches hold similar lengths; the easy-to-hard order "
                                  "holds across windows")

    # --- reference ---
    reference: str = option("precomputed", "precomputed (cached file, no reference model in "
                            "memory) | live (frozen copy) | none (reference-free)",
                            choices=REFERENCES)
    reference_batch_size: int = option(8, "pairs per forward of the precompute pass")

    # --- loss: the options of mixpo.LossConfig (inherited from _LossOptions), plus gamma-PO ---
    adaptive_margin: bool = option(False, "gamma-PO: per-pair margins with mean `gamma`")
    margin_tau: float = option(10.0, "gamma-PO tau")
    margin_center: bool = option(False, "gamma-DPO: use gamma_i - gamma (zero-mean shift)")

    # --- optimisation ---
    learning_rate: float = option(1e-6, "peak learning rate")
    lr_scheduler_type: str = option("cosine", "warmup then: " + " | ".join(SCHEDULERS),
                                    choices=SCHEDULERS)
    warmup_ratio: float = option(0.1, "share of the steps with linear warmup")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    optim: str = option("adamw", "adamw (torch: fp32 states for fp32 weights, fused on GPU) | "
                        "adamw_bf16 (bf16 states, stochastic rounding) | adamw_8bit (torchao)",
                        choices=OPTIMIZERS)
    step_in_backward: bool = option(
        False, "update each parameter as soon as its gradient is ready, then free it; needs "
        "no accumulation and max_grad_norm 0; one process only")
    max_grad_norm: float = option(1.0, "0 = no clipping (the norm is still logged)")
    global_batch_size: typing.Optional[int] = option(
        128, "pairs per optimizer step over all ranks (mixpo's: the same for any number of "
        "GPUs); empty = per_device_train_batch_size x gradient_accumulation_steps x ranks")
    per_device_train_batch_size: int = option(2, "pairs per forward pass on one rank")
    gradient_accumulation_steps: typing.Optional[int] = option(
        None, "micro-batches per step and rank (Hugging Face); sets global_batch_size")
    num_train_epochs: int = option(1, "passes over the data")
    max_steps: int = option(0, "> 0 overrides num_train_epochs")

    # --- run ---
    output_dir: str = option("outputs/mixpo", "where checkpoints, metrics and final/ go")
    seed: int = option(42, "seeds data order (shuffle), margins and the RNGs")
    logging_steps: int = option(10, "log every this many optimizer steps")
    report_to: list[str] = option(["none"], "none | tensorboard | wandb (needs a W&B login, or "
                                  "WANDB_MODE=offline to log locally without one); a line per "
                                  "logging step is printed anyway")
    save_steps: int = option(500, "0 = no intermediate checkpoints")
    save_total_limit: int = option(0, "keep the newest N checkpoints (0 = all)")
    progress_bar: bool = option(True, "show a tqdm progress bar")
    ddp_timeout: int = option(1800, "seconds a collective may wait for a stuck rank")
    resume_on_changed_data: bool = option(
        False, "resume even though the training data or model changed since the checkpoint")

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad option; returns self. Runs before anything
        is loaded, so a typo costs nothing."""
        for item in dataclasses.fields(self):
            allowed = item.metadata.get("choices")
            if allowed is not None and getattr(self, item.name) not in allowed:
                raise ValueError(f"{item.name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, item.name)!r}")
        for name in self.report_to:
            if name not in REPORTERS:
                raise ValueError(f"report_to must list {', '.join(REPORTERS)}, got {name!r}")
        positive = ("max_length", "max_prompt_length", "per_device_train_batch_size",
                    "reference_batch_size", "logging_steps", "num_train_epochs", "ddp_timeout")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), "
                             f"got {self.max_length}")
        for key in ("global_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("max_steps", "save_steps", "save_total_limit", "eval_steps",
                    "max_grad_norm", "weight_decay"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.adam_epsilon <= 0 or self.margin_tau <= 0:
            raise ValueError("adam_epsilon and margin_tau must be > 0")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        loss = self.loss_config()            # every loss option, checked by LossConfig
        if self.adaptive_margin and (self.gamma or 0.0) < 0:
            raise ValueError("adaptive_margin needs gamma >= 0 (the mean margin gamma0)")
        if self.adaptive_margin and not loss.has_margin:
            raise ValueError(f"adaptive_margin applies to the margin loss types, not "
                             f"{self.loss_type}")
        if loss.reference_free and self.reference == "live":
            raise ValueError(f"reference 'live' loads a reference model, but loss_type "
                             f"{self.loss_type} is reference-free: use reference none")
        if self.step_in_backward and self.max_grad_norm > 0:
            raise ValueError("step_in_backward updates each parameter before the total gradient "
                             "norm is known, so it cannot clip: set max_grad_norm 0")
        routes = [name for name in ("route_below", "route_at_or_below", "route_fraction")
                  if getattr(self, name) is not None]
        if len(routes) > 1:
            raise ValueError(f"choose one of {', '.join(routes)}")
        if not self.difficulty and (routes or self.select_easiest is not None):
            raise ValueError("route_below / route_at_or_below / route_fraction / select_easiest "
                             "need a difficulty (" + ", ".join(DIFFICULTY_KINDS) + ")")
        if self.score_columns is not None and (self.difficulty != "rating"
                                               or len(self.score_columns) != 2):
            raise ValueError("score_columns names two rating columns (chosen, rejected) for "
                             f"difficulty rating, got {self.score_columns} with difficulty "
                             f"{self.difficulty or 'empty'}")
        if self.routing is False and routes:
            raise ValueError(f"routing: false contradicts {routes[0]}")
        if self.mixed_precision != "no" and self.dtype not in ("auto", "float32"):
            raise ValueError(f"mixed_precision {self.mixed_precision} keeps fp32 weights: set "
                             f"dtype float32 (or auto), not {self.dtype}")
        if self.optim == "adamw_8bit" and importlib.util.find_spec("torchao") is None:
            raise ValueError("optim 'adamw_8bit' needs torchao (pip install torchao)")
        if self.prefix_sharing and not self.padding_free:
            raise ValueError("prefix_sharing needs padding_free: true (the shared prompt and "
                             "both completions go into one packed row)")
        if "wandb" in self.report_to:
            check_wandb_ready()
        if "tensorboard" in self.report_to and \
                importlib.util.find_spec("torch.utils.tensorboard") is None:
            raise ValueError("report_to tensorboard needs tensorboard (pip install tensorboard)")
        return self

    @property
    def routes(self) -> bool:
        """Whether hard pairs are routed to the SFT loss in this run."""
        if self.routing is not None:
            return self.routing
        return any(getattr(self, name) is not None
                   for name in ("route_below", "route_at_or_below", "route_fraction"))

    @classmethod
    def override(cls, name: str, default):
        """Field `name` of this config with another default (for subclasses such as the
        demo's config), keeping its help and choices."""
        item = next(f for f in dataclasses.fields(cls) if f.name == name)
        return option(default, item.metadata["help"], item.metadata.get("choices"))

    def loss_config(self, **transform) -> LossConfig:
        """The run's loss as a LossConfig (ValueError naming a bad option); `transform`:
        the model's logit_scale / softcap."""
        names = [name for item in self.loss_type for name in item.split(",") if name]
        return LossConfig.from_options(self, loss_type=tuple(names), **transform)

    @property
    def reference_free(self) -> bool:
        return self.loss_config().reference_free or self.reference == "none"

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
    if typing.get_origin(annotation) is list:
        # A YAML list, or "a,b,c" on the command line.
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [coerce_value(key, item.strip() if isinstance(item, str) else item, item_type)
                for item in items]
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
            number = float(value)  # also YAML's "1e-6", which PyYAML leaves as a string
            if not math.isfinite(number):
                raise ValueError(f"config key {key!r}: {value!r} is not a finite number")
            return number
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError) as error:
        if "finite" in str(error):
            raise
        name = getattr(annotation, "__name__", str(annotation))
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {name}") from None
    raise TypeError(f"unsupported config field type {annotation!r} for {key!r}")


def _note_alias(old: str, new: str) -> None:
    import warnings

    warnings.warn(f"config key {old!r} is now {new!r} (the old name still works)",
                  FutureWarning, stacklevel=3)


def _canonical(key: str, value, types: dict, source: str) -> tuple[str, object]:
    """(field name, raw value) for a config key: old spellings (KEY_ALIASES) and Hugging Face's
    `bf16` / `fp16` switches are accepted: as in Hugging Face, they mean mixed precision
    (fp32 weights, 16-bit compute)."""
    if key in ("bf16", "fp16") and key not in types:
        on = str(value).lower() in _TRUE if not isinstance(value, bool) else value
        return "mixed_precision", key if on else "no"
    if key in KEY_ALIASES and key not in types and KEY_ALIASES[key] in types:
        _note_alias(key, KEY_ALIASES[key])
        return KEY_ALIASES[key], value
    return _check_key(key, types, source), value


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
    aliases = {new: old for old, new in KEY_ALIASES.items()}
    for item in dataclasses.fields(config_class):
        names = [f"--{item.name}"]
        if item.name in aliases:
            names.append(f"--{aliases[item.name]}")
        names += [name.replace("_", "-") for name in names if "_" in name]
        is_bool = types[item.name] in (bool, typing.Optional[bool])
        default = item.default_factory() if item.default is dataclasses.MISSING \
            else item.default                    # list fields have a factory, not a default
        parser.add_argument(*names, dest=item.name, default=argparse.SUPPRESS,
                            metavar="BOOL" if is_bool else "VALUE",
                            nargs="?" if is_bool else None, const="true" if is_bool else None,
                            help=f"{item.metadata.get('help', '')} (default {default!r})"
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
            key, value = _canonical(str(key), value, types, str(yaml_path))
            values[key] = coerce_value(key, value, types[key])
    for key, value in (overrides or {}).items():
        key, value = _canonical(key, value, types, "the overrides")
        values[key] = coerce_value(key, value, types[key])
    return config_class(**values).validate()


def canonical_config_dict(config: dict) -> dict:
    """A stored config dict (an earlier run's) with today's key names."""
    return {KEY_ALIASES.get(key, key): value for key, value in config.items()}


def check_wandb_ready() -> None:
    """ValueError, before anything loads, when report_to wandb cannot log: no wandb package,
    or online mode without credentials (WANDB_API_KEY, or `wandb login`'s ~/.netrc entry)."""
    import netrc
    import os
    from urllib.parse import urlparse

    if importlib.util.find_spec("wandb") is None:
        raise ValueError("report_to wandb needs the wandb package (pip install wandb)")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") \
            or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ValueError("report_to wandb: no W&B login found (WANDB_API_KEY or `wandb login`); "
                     "set WANDB_MODE=offline to log under output_dir without an account, or "
                     "use report_to tensorboard")
