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
from mixpo.losses import linear_loss, sequence_logps, shift_labels
from mixpo.modules import LinearPreferenceLoss


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
        finds the tensor to hook its backward on; completion_rows / completion_counts (from
        `mixpo.data.collate.PreferenceCollator`) describe the shifted labels, and
        validate=False skips the loss API's host-side checks;
        with `logps_only=True`: summed completion log-probs [2B] (no gradient, LD-DPO
        weighted when the loss is), used for reference log-probs.
    `loss_config`: the loss (default: sigmoid DPO); its logit transform is the model's own
    (`logit_transform` of the HF config: Gemma-2's softcap, Cohere's and Granite's scales).
    """

    def __init__(self, causal_lm, loss_config: LossConfig | None = None):
        super().__init__()
        self.causal_lm = causal_lm
        logit_scale, softcap = logit_transform(causal_lm.config)
        config = replace(loss_config or LossConfig(), logit_scale=logit_scale, softcap=softcap)
        self.loss = LinearPreferenceLoss.from_config(config)

    def hidden_states(self, input_ids, attention_mask):
        body = self.causal_lm.get_decoder()
        return body(input_ids=input_ids, attention_mask=attention_mask,
                    use_cache=False).last_hidden_state                      # [2B, T, H]

    def forward(self, input_ids, attention_mask, labels, ref_logps=None, hard=None, margin=None,
                logps_only: bool = False, completion_rows=None, completion_counts=None,
                validate: bool = True, gamma=None):
        head = self.causal_lm.get_output_embeddings()
        # HF labels name token t at position t; the loss reads position t's prediction of t+1.
        position_labels = shift_labels(labels)
        if logps_only:
            config = self.loss.config
            with torch.no_grad():
                hidden = self.hidden_states(input_ids, attention_mask)
                return sequence_logps(hidden, head.weight, position_labels, bias=head.bias,
                                      ld_alpha=config.ld_alpha, logit_scale=config.logit_scale,
                                      softcap=config.softcap)
        hidden = self.hidden_states(input_ids, attention_mask)
        # The trainer passes the batch's shape (computed on the CPU by the collator) and
        # validate=False: no host sync inside the step.
        out = linear_loss(hidden, head.weight, position_labels, self.loss.config,
                          bias=head.bias, ref_logps=ref_logps, hard=hard, margin=margin,
                          gamma=gamma,
                          backend=self.loss.backend, completion_rows=completion_rows,
                          completion_counts=completion_counts, validate=validate)
        return out.loss, out


@torch.no_grad()
def pair_logps(model: PreferenceModel, examples: list[dict], collator,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen [n], rejected [n]) of tokenized pairs, fp32 on the
    CPU: one forward of `model` over the collated batch."""
    batch = collator(examples)
    logps = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                  batch["labels"].to(device), logps_only=True).float().cpu()
    return logps[:len(examples)], logps[len(examples):]
