"""The policy: a Hugging Face causal LM whose forward ends in mixpo's logit-free loss.

`PreferenceModel.forward` runs the model body (no LM head, so no [tokens x vocab] logits) and
then `mixpo.LinearPreferenceLoss` on the last hidden states and the LM-head weight. Both run
inside one module forward, so under FSDP2 the head weight (in the root unit) is unsharded
when the loss reads it.
"""
from __future__ import annotations

import importlib.util

import torch

from mixpo import LinearPreferenceLoss, sequence_logps, shift_labels

# Config attributes of models whose logits are not simply hidden @ lm_head.weight.T (+ bias):
# the logit-free loss would silently compute other log-probs for them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier_scale")


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def attention_implementation(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str,
                   gradient_checkpointing: bool = False, trainable: bool = True):
    """AutoModelForCausalLM from a local directory, on CPU (moved later), dropout off."""
    from transformers import AutoModelForCausalLM

    if not path:
        raise ValueError("model_name_or_path is empty: give a model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except OSError as error:
        raise ValueError(f"cannot load a causal LM from {path!r}: {error}") from None
    for name in LOGIT_TRANSFORMS:
        if getattr(model.config, name, None) not in (None, 0, 1, 1.0):
            raise ValueError(f"{path}: config.{name}={getattr(model.config, name)} transforms "
                             "the logits; the logit-free loss supports plain linear LM heads")
    # Preference training runs without dropout (TRL's disable_dropout default): the policy
    # and its reference must score a sequence identically at step 0.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if trainable:
        model.train()  # from_pretrained returns eval mode; checkpointing only acts in training
    else:
        model.requires_grad_(False).eval()
    return model


def decoder_layers(causal_lm) -> list[torch.nn.Module]:
    """The repeated blocks of the body (FSDP units)."""
    body = causal_lm.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(causal_lm).__name__}")


class PreferenceModel(torch.nn.Module):
    """A causal LM + the logit-free preference loss in one forward.

    forward(input_ids [2B, T], attention_mask [2B, T], labels [2B, T] HF-style, ...):
        returns (loss, PreferenceLossOutput) — the loss is also returned alone so that FSDP
        finds the tensor to hook its backward on;
        with `logps_only=True`: summed completion log-probs [2B] (no gradient), used for
        reference log-probs.
    `loss_kwargs` are fixed keywords of `mixpo.linear_preference_loss` (loss_type, beta, ...).
    """

    def __init__(self, causal_lm, loss_kwargs: dict):
        super().__init__()
        self.causal_lm = causal_lm
        self.loss = LinearPreferenceLoss(**loss_kwargs)

    def hidden_states(self, input_ids, attention_mask):
        body = self.causal_lm.get_decoder()
        return body(input_ids=input_ids, attention_mask=attention_mask,
                    use_cache=False).last_hidden_state                      # [2B, T, H]

    def forward(self, input_ids, attention_mask, labels, ref_logps=None, hard=None, margin=None,
                logps_only: bool = False):
        head = self.causal_lm.get_output_embeddings()
        # HF labels name token t at position t; the loss reads position t's prediction of t+1.
        position_labels = shift_labels(labels)
        if logps_only:
            with torch.no_grad():
                hidden = self.hidden_states(input_ids, attention_mask)
                return sequence_logps(hidden, head.weight, position_labels, bias=head.bias)
        hidden = self.hidden_states(input_ids, attention_mask)
        out = self.loss(hidden, head, position_labels, ref_logps=ref_logps, hard=hard,
                        margin=margin)
        return out.loss, out
