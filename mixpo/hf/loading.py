"""Loading Hugging Face models and tokenizers for mixpo: one error wrapping, one pad-token
fallback, one place that prepares a causal LM for preference training."""
from __future__ import annotations

import contextlib
import importlib.util
import warnings
from pathlib import Path

import torch

# Config attributes of models whose logits are not simply hidden @ lm_head.weight.T (+ bias),
# the ones trl 1.16's add_fused_lm_head reads. The scale ones in TRL's order of precedence.
SOFTCAP_ATTRIBUTE = "final_logit_softcapping"                         # Gemma-2/3
SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier")  # Cohere, Falcon-H1
DIVISOR_ATTRIBUTE = "logits_scaling"                                  # Granite, MiniCPM3: divide
LOGIT_TRANSFORMS = (SOFTCAP_ATTRIBUTE, *SCALE_ATTRIBUTES, DIVISOR_ATTRIBUTE)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(name: str, option: str = "--device") -> torch.device:
    """`name` ('cpu', 'cuda', 'cuda:1', 'mps', ...) as a torch.device this machine has, or a
    ValueError naming `option`: checked before a model is loaded, not when it is moved."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {name!r} is not a device; use cpu, cuda, cuda:N, mps or "
                         "xpu") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{option} {name!r}: models run on {', '.join(DEVICE_TYPES)}, not on "
                         f"{device.type}")
    backend = getattr(torch, device.type) if device.type != "mps" else torch.backends.mps
    if device.type != "cpu" and not backend.is_available():
        build = (" (this torch is a CPU-only build)" if device.type == "cuda"
                 and torch.version.cuda is None and torch.version.hip is None else "")
        raise ValueError(f"{option} {name}: {device.type} is not available on this "
                         f"machine{build}; use {option} cpu")
    if device.index is not None and device.type in ("cuda", "xpu"):
        count = backend.device_count()
        if device.index >= count:
            raise ValueError(f"{option} {name}: this machine has {count} {device.type} "
                             f"device(s) (0 to {count - 1})")
    return device


def broken_weight_file(path: str) -> tuple[Path, str] | None:
    """(file, reason) for the first .safetensors file under the directory `path` that
    safetensors cannot open (truncated, not safetensors at all), else None. Only headers
    are read."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not root.is_dir():
        return None
    for file in sorted(root.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            return file, reason
    return None


@contextlib.contextmanager
def loading_errors(what: str, path: str, extra: tuple = ()):
    """Inside: a missing or broken model directory (missing files, unknown model types, bad
    configs, a damaged safetensors file, and any exception type in `extra`) becomes a
    one-line ValueError naming `what`, `path` and, for damaged weights, the file."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        broken = broken_weight_file(path)
        file, reason = broken if broken else ("a weights file", str(error).splitlines()[0])
        raise ValueError(f"cannot load a {what} from {path!r}: {file} is truncated or damaged "
                         f"({reason}); download or save it again") from None
    except (OSError, ValueError, *extra) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot load a {what} from {path!r}: {message}") from None


def load_pretrained(factory, path: str, what: str, **kwargs):
    """`factory.from_pretrained(path, **kwargs)` (a transformers Auto class), with a missing
    or broken model directory reported as a ValueError naming `what` and `path`, and the
    file for a truncated or damaged safetensors file (`loading_errors`)."""
    if not path:
        raise ValueError(f"no path given for the {what}")
    with loading_errors(what, path):
        return factory.from_pretrained(path, **kwargs)


def ensure_pad_token(tokenizer, model=None) -> int:
    """The pad token id, falling back to EOS when the tokenizer has none (padding is masked
    out, so any id works); a sequence-classification `model` gets the same id in its config,
    which is how it finds each sequence's last token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token_id


def load_tokenizer(path: str):
    """AutoTokenizer from `path`, with a pad token (`ensure_pad_token`)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, path, "tokenizer")
    ensure_pad_token(tokenizer)
    return tokenizer


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' (bf16 on GPU, fp32 on CPU), 'float32', 'bfloat16' or 'float16'."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


FLASH_ATTENTION = "flash_attention_2"


def _flash_attention_missing(device: torch.device) -> str | None:
    """Why flash_attention_2 cannot run here (a one-line reason), or None when it can."""
    if device.type != "cuda":
        return f"it runs on CUDA GPUs only, this run is on {device.type}"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    return None


def flash_attention_fallback(reason: str) -> str:
    """The note `attention_implementation` and `load_causal_lm` warn with; 'sdpa'."""
    warnings.warn(f"attn_implementation {FLASH_ATTENTION}: {reason}; using sdpa instead",
                  stacklevel=3)
    return "sdpa"


def attention_implementation(name: str, device: torch.device) -> str:
    """'auto': flash_attention_2 on a GPU when flash-attn is importable, else sdpa. An
    explicit flash_attention_2 that cannot run here (no flash-attn, no GPU) falls back to
    sdpa with a warning: the same model, a slower kernel, rather than a crash at load."""
    if name == "auto":
        return "sdpa" if _flash_attention_missing(device) else FLASH_ATTENTION
    if name == FLASH_ATTENTION:
        reason = _flash_attention_missing(device)
        if reason:
            return flash_attention_fallback(reason)
    return name


def runs_flash_attention(name: str, device: torch.device) -> bool:
    """Whether `attention_implementation(name, device)` is flash-attn (without its warning)."""
    return name in ("auto", FLASH_ATTENTION) and not _flash_attention_missing(device)


def logit_transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) of a model config, as trl 1.16's add_fused_lm_head reads them:
    the model's logits are softcap * tanh(logit_scale * z / softcap), z = hidden @ W.T.
    logit_scale is the first of logit_scale, output_multiplier, lm_head_multiplier that is
    set, else 1 / logits_scaling (HyperCLOVA X multiplies by it instead), else 1."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, SOFTCAP_ATTRIBUTE, None) or None
    for name in SCALE_ATTRIBUTES:
        value = getattr(text, name, None)
        if value is not None:
            return float(value), softcap
    scaling = getattr(text, DIVISOR_ATTRIBUTE, None)
    if scaling is not None:
        scaling = float(scaling)
        return (scaling if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / scaling,
                softcap)
    return 1.0, softcap


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str,
                   gradient_checkpointing: bool = False, trainable: bool = True):
    """AutoModelForCausalLM from a local directory, on CPU (moved later), dropout off."""
    from transformers import AutoModelForCausalLM

    if not path:
        raise ValueError("model_name_or_path is empty: give a model directory")
    try:
        model = load_pretrained(AutoModelForCausalLM, path, "causal LM", dtype=dtype,
                                attn_implementation=attn_implementation)
    except ImportError as error:  # flash-attn present but unusable (a build for another torch)
        if attn_implementation != FLASH_ATTENTION:
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        model = load_pretrained(AutoModelForCausalLM, path, "causal LM", dtype=dtype,
                                attn_implementation=flash_attention_fallback(reason))
    # Preference training runs without dropout (TRL's disable_dropout default): the policy
    # and its reference must score a sequence identically at step 0.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    model.config.use_cache = False
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if trainable:
        model.train()  # from_pretrained returns eval mode; checkpointing only acts in training
    else:
        model.requires_grad_(False).eval()
    return model


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of a transformers model's layers."""
    # transformers >= 5.24 renamed it (the old name warns); older releases have only it.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
