"""The model side of `MixpoDPOTrainer` (mixpo.integrations.trl): mixpo's head runs inside the
model's forward, on the LM head as one linear map (hidden, weight, bias), under every wrapper
trl trains through.

- FSDP2: DTensor parameters are gathered (`full_tensor`), as trl's fused head does.
- DeepSpeed ZeRO-3 partitions every parameter to 0 elements outside its module's forward,
  and the head module never runs its forward here. Read as module attributes inside the
  engine's forward, the head's parameters are gathered by ZeRO-3 itself, which registers them
  as external parameters of the running module (the model; an embedding tied to the head is
  the same parameter, registered once). The model's backward hooks gather them again for the
  backward, so the forward's result leaves the model as a dict (`HeadOutput`), where those
  hooks find its tensors (a dataclass hides them: the backward then saw a 0-row weight).
  ZeRO-1/2 do not partition parameters.
- PEFT LoRA on the head: exactly PEFT's forward, W x + b + sum_a s_a B_a A_a dropout_a(x)
  (+ s_a b_Ba with lora_bias), as the one linear map [x | s_a A_a dropout_a(x) ...] times
  [W | B_a ...]^T: gradients reach A and B, B A is never formed. It costs a [V, H + r] copy of
  the head and its gradient per step. Adapters disabled or merged: the base head. Other
  adapter types and LoRA variants (DoRA, ...) on the head are refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from types import MethodType

import torch

from mixpo.data.collate import PackedPreferenceCollator, PreferenceBatch, SharedPrefixCollator
from mixpo.hf.policy import layout_attention
from mixpo.loss_spec import IGNORE_INDEX, shift_labels
from mixpo.losses import PreferenceLossOutput

# The batch keys trl's collators add that are not model inputs (trl's `_non_model_keys`), and
# the per-pair columns mixpo's collator carries.
PASSTHROUGH = ("hard", "difficulty")
NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps") + PASSTHROUGH


def attach_mixpo_head(causal_lm) -> None:
    """Patch `causal_lm.forward` (as TRL's add_fused_lm_head does) so that
    `model(..., mixpo_head=fn)` runs the body only and returns fn(hidden, lm_head): the head is
    read inside the model's forward (FSDP has unsharded it, ZeRO-3's hooks are armed), through
    every wrapper (DDP, DeepSpeed, PEFT, accelerate). The body is the model's `base_model`, as
    trl's (a vision-language model's body takes the image inputs). Without `mixpo_head` the
    previous forward (TRL's) runs unchanged."""
    if getattr(causal_lm, "_mixpo_head_attached", False):
        return
    previous = causal_lm.forward

    def forward(self, *args, mixpo_head=None, **kwargs):
        if mixpo_head is None:
            return previous(*args, **kwargs)
        kwargs.pop("labels", None)
        kwargs.pop("fused_lm_head", None)
        router = kwargs.pop("output_router_logits", False)
        token_weights = kwargs.pop("mixpo_token_weights", None)
        outputs = self.base_model(*args, **kwargs,
                                  **({"output_router_logits": True} if router else {}))
        result = HeadOutput.of(mixpo_head(outputs.last_hidden_state,
                                          self.get_output_embeddings()))
        if not router:
            return result
        # Packed rows pass a 4-D mask (no padding: every token counts once); shared rows count
        # each prompt token twice, as the unshared rows it stands for.
        mask = kwargs.get("attention_mask")
        weights = token_weights if token_weights is not None else \
            mask if mask is not None and mask.ndim == 2 else None
        return result, router_aux_loss(self, outputs.router_logits, weights)

    causal_lm.forward = MethodType(forward, causal_lm)
    causal_lm._mixpo_head_attached = True


class HeadOutput(dict):
    """The loss's `PreferenceLossOutput` as a dict for the trip out of the model's forward:
    wrappers hook the tensors of a module's output, and DeepSpeed ZeRO-3 gathers the
    parameters the module read (the head's) for the backward through those hooks, but finds
    tensors only in tensors, tuples, lists and dicts (accelerate's fp32 output conversion
    rebuilds dicts too). `result(output)` gives the dataclass back, with the hooked tensors."""

    @classmethod
    def of(cls, result):
        if not isinstance(result, PreferenceLossOutput):
            return result
        return cls((field.name, getattr(result, field.name))
                   for field in dataclasses.fields(result))

    @staticmethod
    def result(output):
        return PreferenceLossOutput(**output) if isinstance(output, HeadOutput) else output


def router_aux_loss(causal_lm, router_logits, attention_mask):
    """The MoE load-balancing loss as the model's own forward computes it (its modeling
    module's `load_balancing_loss_func`, with its expert counts): what trl 1.16 adds as
    `router_aux_loss_coef * outputs.aux_loss`."""
    for cls in type(causal_lm).__mro__:         # FSDP2 subclasses the model's class
        function = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if function is not None:
            return function(router_logits, causal_lm.num_experts,
                            causal_lm.num_experts_per_tok, attention_mask)
    raise ValueError(f"{type(causal_lm).__name__} returns router logits but its modeling "
                     "module has no load_balancing_loss_func: set router_aux_loss_coef=0.0")


def full(tensor):
    """An FSDP2 DTensor parameter gathered, anything else as is."""
    return tensor.full_tensor() if tensor is not None and hasattr(tensor, "full_tensor") \
        else tensor


# -- PEFT ----------------------------------------------------------------------------------
def _lora_adapters(lm_head) -> list:
    """The active LoRA adapters of a PEFT-wrapped head that change its output ([] for a plain
    head, disabled or merged adapters); ValueError for what the linear map cannot hold."""
    if not hasattr(lm_head, "base_layer"):
        return []
    if not hasattr(lm_head, "lora_A"):
        raise ValueError(f"a {type(lm_head).__name__} adapter on the LM head is not supported "
                         "by mixpo's logit-free head: leave lm_head out of target_modules "
                         "(or use modules_to_save=['lm_head'])")
    if lm_head.disable_adapters or lm_head.merged:
        return []
    adapters = [name for name in lm_head.active_adapters if name in lm_head.lora_A]
    for name in adapters:
        if name in getattr(lm_head, "lora_variant", {}) or getattr(lm_head, "fan_in_fan_out",
                                                                    False):
            raise ValueError(f"LoRA adapter {name!r} on the LM head uses a variant (use_dora, "
                             "fan_in_fan_out, ...) that mixpo's logit-free head does not "
                             "support: leave lm_head out of target_modules")
    return adapters


def check_head_adapters(model) -> None:
    """ValueError naming what mixpo's head cannot run, before training."""
    if hasattr(model, "get_output_embeddings"):
        _lora_adapters(model.get_output_embeddings())


class _NoModule:
    """A class no module is an instance of."""


@contextlib.contextmanager
def head_adapters_allowed():
    """trl 1.16's DPOTrainer refuses a PEFT adapter on lm_head (its fused head reads
    lm_head.weight and would never train the adapter, its message says); mixpo's head runs
    the adapter (`head_tensors`), so that refusal (trl's only use of `BaseTunerLayer` in
    dpo_trainer) is lifted while MixpoDPOTrainer's constructor runs."""
    import trl.trainer.dpo_trainer as dpo_trainer

    original = getattr(dpo_trainer, "BaseTunerLayer", None)
    if original is None:
        yield
        return
    dpo_trainer.BaseTunerLayer = _NoModule
    try:
        yield
    finally:
        dpo_trainer.BaseTunerLayer = original


def head_tensors(hidden, lm_head) -> tuple:
    """(hidden, weight, bias) whose linear map is the head's output (module docstring)."""
    adapters = _lora_adapters(lm_head)
    base = lm_head.base_layer if hasattr(lm_head, "base_layer") else lm_head
    weight, bias = full(base.weight), full(base.bias)
    if not adapters:
        return hidden, weight, bias
    hiddens, weights = [hidden], [weight]
    for name in adapters:
        lora_a, lora_b = lm_head.lora_A[name], lm_head.lora_B[name]
        scaling = lm_head.scaling[name]
        down = lora_a(lm_head.lora_dropout[name](hidden.to(lora_a.weight.dtype)))
        hiddens.append((down * scaling).to(hidden.dtype))
        weights.append(full(lora_b.weight).to(weight.dtype))
        if lora_b.bias is not None:
            lora_bias = full(lora_b.bias) * scaling
            bias = lora_bias if bias is None else bias + lora_bias
    return torch.cat(hiddens, dim=-1), torch.cat(weights, dim=1), bias


# -- batches -------------------------------------------------------------------------------
def model_inputs(inputs) -> dict:
    """The body's keywords from trl's batch: every key trl's own forward passes (text ids and
    masks, and a vision-language model's pixel_values, image_grid_thw, pixel_attention_mask,
    token_type_ids, ...)."""
    return {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}


def position_labels(inputs) -> torch.Tensor:
    """TRL's batch (input_ids, completion_mask [2B, L]) as mixpo's position-aligned labels:
    position t reads token t+1 when that token is a completion token, else IGNORE_INDEX."""
    return shift_labels(inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0,
                                                        IGNORE_INDEX))


def trl_batch(inputs, layout: str) -> PreferenceBatch:
    """TRL's right-padded [2B, L] batch as mixpo's typed batch: "padded" keeps TRL's rows
    (position-aligned labels added); "packed" and "shared" (prefix sharing) are built by the
    data layer's own collators from the rows' tokens, so both front doors pack one way.
    Packing reads the lengths on the host (TRL's own metrics sync every step anyway)."""
    if layout == "padded":
        return PreferenceBatch({"input_ids": inputs["input_ids"],
                                "attention_mask": inputs["attention_mask"],
                                "position_labels": position_labels(inputs)}, "padded")
    device = inputs["input_ids"].device
    ids, real = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
    completion = inputs["completion_mask"].cpu().bool()
    pairs = ids.shape[0] // 2
    examples = []
    for pair in range(pairs):
        example = {}
        for side, row in (("chosen", pair), ("rejected", pairs + pair)):
            tokens, scored = ids[row][real[row]], completion[row][real[row]]
            example[f"{side}_input_ids"] = tokens
            example[f"{side}_labels"] = tokens.masked_fill(~scored, IGNORE_INDEX)
        example["prompt_length"] = int((~scored).long().cumprod(0).sum())   # leading prompt
        examples.append(example)
    collator = SharedPrefixCollator() if layout == "shared" else PackedPreferenceCollator()
    return collator(examples).to(device)


def body_inputs(batch: PreferenceBatch, attn_implementation: str, dtype) -> dict:
    """The body's keywords for a packed or shared batch (position ids, the attention mask of
    its layout; shared rows also weigh each prompt token twice in a MoE router loss, as the
    unshared rows it stands for)."""
    keywords = {"input_ids": batch["input_ids"],
                **layout_attention(batch, attn_implementation, dtype)}
    if batch.layout == "shared":
        segment = torch.repeat_interleave(
            torch.arange(batch["segment_lengths"].shape[0], device=batch["input_ids"].device),
            batch["segment_lengths"], output_size=batch["input_ids"].shape[1])
        keywords["mixpo_token_weights"] = ((segment % 3 == 0).float() + 1.0)[None]
    return keywords
