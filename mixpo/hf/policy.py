"""The policy: a Hugging Face causal LM whose forward ends in mixpo's logit-free loss.

`PreferenceModel.forward` runs the model body (no LM head, so no [tokens x vocab] logits) and
then `mixpo.LinearPreferenceLoss` on the last hidden states and the LM-head weight. Both run
inside one module forward, so under FSDP2 the head weight (in the root unit) is unsharded
when the loss reads it.
"""
from __future__ import annotations

import torch

from dataclasses import replace

from mixpo.hf.loading import logit_transform
from mixpo.loss_config import LossConfig
from mixpo.data.collate import PreferenceBatch
from mixpo.losses import linear_loss, sequence_logps


def decoder_layers(causal_lm) -> list[torch.nn.Module]:
    """The repeated blocks of the body (FSDP units)."""
    body = causal_lm.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(causal_lm).__name__}")


def packed_attention(batch: dict, attn_implementation: str, dtype: torch.dtype) -> dict:
    """The body's attention keywords for a padding-free batch (one row holding several
    sequences, `mixpo.data.collate.PackedPreferenceCollator`): position ids restarting per
    sequence, and attention kept within each sequence. flash_attention_2/3 find the sequences
    from the position ids (varlen kernels); sdpa gets a boolean block-diagonal causal mask
    [1, 1, L, L] (1 byte per entry, True = attend), eager its additive form in `dtype`; both
    are built on the device from the lengths (no host sync)."""
    position_ids = batch["position_ids"]
    if attn_implementation in ("flash_attention_2", "flash_attention_3"):
        return {"position_ids": position_ids, "attention_mask": None}
    lengths = batch["sequence_lengths"]
    total = position_ids.shape[1]
    sequence = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device),
                                       lengths, output_size=total)

    def rule(query, key):
        return (sequence[query] == sequence[key]) & (key <= query)

    def dense():
        return (sequence[:, None] == sequence[None, :]).tril_()

    return _mask_keywords(rule, dense, position_ids, attn_implementation, dtype)


def shared_prefix_attention(batch: dict, attn_implementation: str, dtype: torch.dtype) -> dict:
    """The body's attention keywords for a prefix-shared batch
    (`mixpo.data.collate.SharedPrefixCollator`: per pair [prompt | chosen | rejected] in one
    row): a token attends causally within its pair, to the prompt and to its own
    completion, never from the rejected completion to the chosen one. sdpa gets the boolean
    mask, eager its additive form, flex_attention a BlockMask of the same rule (CUDA);
    flash-attn varlen cannot express it (the trainer packs unshared rows there)."""
    if attn_implementation in ("flash_attention_2", "flash_attention_3"):
        raise ValueError("prefix sharing cannot run under flash-attn varlen attention (the "
                         "rejected tokens must skip the chosen ones): use sdpa, eager or "
                         "flex_attention, or unshared padding-free rows")
    segments = batch["segment_lengths"]
    position_ids = batch["position_ids"]
    segment = torch.repeat_interleave(torch.arange(segments.shape[0], device=segments.device),
                                      segments, output_size=position_ids.shape[1])
    pair, branch = segment // 3, segment % 3        # branch: 0 prompt, 1 chosen, 2 rejected

    def rule(query, key):
        return (pair[query] == pair[key]) & (key <= query) & \
            ((branch[key] == 0) | (branch[key] == branch[query]))

    def dense():
        # Causal within the pair; the one rule causality leaves: rejected skips chosen.
        allowed = (pair[:, None] == pair[None, :]).tril_()
        return allowed.masked_fill_((branch == 2)[:, None] & (branch == 1)[None, :], False)

    return _mask_keywords(rule, dense, position_ids, attn_implementation, dtype)


def _mask_keywords(rule, dense, position_ids, attn_implementation: str, dtype) -> dict:
    """{position_ids, attention_mask} for a packed row whose attention is `rule(query, key)`
    (index tensors -> bool; flex_attention's BlockMask is built from it) or `dense()` (the
    [L, L] boolean form, built in place: sdpa takes it as is, eager as an additive mask in
    `dtype`)."""
    total, device = position_ids.shape[1], position_ids.device
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(lambda b, h, query, key: rule(query, key), 1, None, total,
                                 total, device=device)
        return {"position_ids": position_ids, "attention_mask": mask}
    allowed = dense()
    if attn_implementation == "sdpa":
        return {"position_ids": position_ids, "attention_mask": allowed[None, None]}
    mask = torch.full((total, total), torch.finfo(dtype).min, dtype=dtype,
                      device=device).masked_fill_(allowed, 0.0)
    return {"position_ids": position_ids, "attention_mask": mask[None, None]}


def layout_attention(batch: PreferenceBatch, implementation: str, dtype) -> dict:
    """The body's attention keywords for the batch's layout: its attention mask (padded),
    position ids and the packed mask (packed), the prefix-sharing mask (shared)."""
    if batch.layout == "shared":
        return shared_prefix_attention(batch, implementation, dtype)
    if batch.layout == "packed":
        return packed_attention(batch, implementation, dtype)
    return {"attention_mask": batch["attention_mask"]}


def completion_hidden(hidden: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """The body's output as the loss reads it: a shared row's completion positions gathered
    in the unshared order (the last prompt token twice: chosen's and rejected's); else as
    is."""
    return hidden[:, batch["completion_positions"]] if batch.layout == "shared" else hidden


def _check_head_adapter(head) -> None:
    """The loss reads head.weight, so an active PEFT adapter on the head would be ignored:
    refused with what to do instead."""
    if hasattr(head, "base_layer") and not (getattr(head, "disable_adapters", False)
                                            or getattr(head, "merged", False)):
        raise ValueError("PreferenceModel: lm_head carries an active PEFT adapter, which the "
                         "logit-free loss (it reads lm_head.weight) would ignore: merge it "
                         "(merge_and_unload), leave lm_head out of target_modules, or train "
                         "with MixpoDPOTrainer, which applies a LoRA on the head")


def _head_inputs(hidden, head):
    """(hidden, weight, bias) for the loss. Under autocast the loss itself casts all three to
    the autocast dtype (`mixpo.losses.autocast_head_inputs`); otherwise hidden states that
    left the body in another dtype than the head's (an fp32 final norm in a 16-bit model) are
    cast to the head's, as the model's own lm_head would need them."""
    weight, bias = head.weight, head.bias
    if not torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return hidden, weight, bias


class PreferenceModel(torch.nn.Module):
    """A causal LM + the logit-free preference loss in one forward.

    forward(batch, ref_logps=None, margin=None, gamma=None, ...): `batch` is a collator's
    output, padded (`mixpo.data.collate.PreferenceCollator`: input_ids / attention_mask /
    HF-style labels [2B, T]) or padding-free (`PackedPreferenceCollator`: one row
    [1, L], position-aligned labels, sequence lengths); its `hard` column is MixDPO's
    routing and its completion_* tensors describe the labels (computed on the CPU).
        returns (loss, PreferenceLossOutput) — the loss is also returned alone so that FSDP
        finds the tensor to hook its backward on; validate=False skips the loss API's
        host-side checks (the trainer's fast path);
        with `logps_only=True`: summed completion log-probs [2B] (no gradient, LD-DPO
        weighted when the loss is), used for reference log-probs.
    `loss_config`: the loss (default: sigmoid DPO); its logit transform is the model's own
    (`logit_transform` of the HF config: Gemma-2's softcap, Cohere's and Granite's scales);
    `workspace_bytes`: the logit-free head's budget (`linear_preference_loss`; None: the
    default).
    """

    def __init__(self, causal_lm, loss_config: LossConfig | None = None,
                 backend: str = "auto", workspace_bytes: int | None = None):
        super().__init__()
        self.causal_lm = causal_lm
        logit_scale, softcap = logit_transform(causal_lm.config)
        self.loss_config = replace(loss_config or LossConfig(), logit_scale=logit_scale,
                                   softcap=softcap)
        self.backend = backend
        self.workspace_bytes = workspace_bytes

    def hidden_states(self, batch: dict):
        """The body's last hidden states as the loss reads them: [2B, T, H] padded, [1, L, H]
        packed, and for a prefix-shared batch [1, n, H], the completion positions gathered
        in the unshared order (the last prompt token twice: chosen's and rejected's)."""
        batch = PreferenceBatch.of(batch)
        body = self.causal_lm.get_decoder()
        attention = layout_attention(batch, self.causal_lm.config._attn_implementation,
                                     self.causal_lm.dtype)
        hidden = body(input_ids=batch["input_ids"], use_cache=False,
                      **attention).last_hidden_state
        return completion_hidden(hidden, batch)

    def forward(self, batch: dict, ref_logps=None, margin=None, gamma=None,
                logps_only: bool = False, validate: bool = True):
        batch = PreferenceBatch.of(batch)
        head = self.causal_lm.get_output_embeddings()
        _check_head_adapter(head)
        packed = batch.layout != "padded"
        labels, shape = batch.position_labels, batch.completion
        config = self.loss_config
        if logps_only:
            if shape["completion_rows"] is None:
                shape = {}
            with torch.no_grad():
                hidden, weight, bias = _head_inputs(self.hidden_states(batch), head)
                return sequence_logps(hidden, weight, labels, bias=bias,
                                      ld_alpha=config.ld_alpha, logit_scale=config.logit_scale,
                                      softcap=config.softcap, backend=self.backend,
                                      workspace_bytes=self.workspace_bytes, **shape)
        hidden, weight, bias = _head_inputs(self.hidden_states(batch), head)
        out = linear_loss(hidden, weight, labels, config, bias=bias,
                          ref_logps=ref_logps, hard=batch.get("hard"), margin=margin,
                          gamma=gamma, backend=self.backend, validate=validate and
                          not packed, workspace_bytes=self.workspace_bytes, **shape)
        return out.loss, out


@torch.no_grad()
def pair_logps(model: PreferenceModel, examples: list[dict], collator,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen [n], rejected [n]) of tokenized pairs, fp32 on the
    CPU: one forward of `model` over the collated batch."""
    logps = model(PreferenceBatch.of(collator(examples)).to(device),
                  logps_only=True).float().cpu()
    return logps[:len(examples)], logps[len(examples):]
