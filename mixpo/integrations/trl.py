"""mixpo inside TRL: `MixpoDPOConfig` and `MixpoDPOTrainer`, drop-in subclasses of trl's
`DPOConfig` / `DPOTrainer` (trl >= 1.16; `pip install mixpo[trl]`).

    from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer
    args = MixpoDPOConfig(output_dir="out", beta=0.01, label_smoothing=0.1, route_below=0.5)
    trainer = MixpoDPOTrainer(model=model, args=args, train_dataset=prepared,
                              processing_class=tokenizer)          # the rest as in TRL
    trainer.train()

What changes against stock TRL, and what does not:
- The loss is mixpo's logit-free fused loss (`mixpo.linear_preference_loss`) on the body's last
  hidden state and the LM head (`trl_head`: FSDP2 DTensors gathered, DeepSpeed ZeRO-3's
  partitions gathered by ZeRO-3 for the forward and the backward, a PEFT LoRA on the head run
  as PEFT computes it; a frozen head gets no dWeight), computed inside the model's forward,
  for every loss type TRL 1.16's DPOTrainer has plus simpo, cpo and orpo; TRL's list form,
  loss_weights, use_weighting, f_divergence_type, ld_alpha and discopop_tau keep their
  meaning. The logit transform of the model (Gemma-2 softcap, Cohere / Granite scales) is read
  from its config as TRL reads it. Every model input of TRL's batch reaches the body
  (vision-language models' pixel_values, image_grid_thw, ...).
- `evaluate()` with `compute_metrics`: the logits come from an extra forward, as in stock TRL.
- Definitions that differ from TRL 1.16, said once in the log where they apply: with
  loss_type "sigmoid", label_smoothing is cDPO (the MixDPO authors' setting); TRL's sigmoid
  ignores it. Everything else agrees with TRL (losses and gradients, tested).
- Reference log-probs: `precompute_ref_log_probs=True` runs `mixpo.sequence_logps` once over
  the dataset (logit-free); a live `ref_model` (or PEFT with adapters disabled) works too.
- MixDPO routing: a boolean column (`routing_column`, e.g. "hard" from `mixpo data prepare`)
  or a threshold on the rating margin (`route_below`, `route_at_or_below`, `route_fraction`
  with `difficulty` / `score_columns`): routed pairs take the SFT loss of their chosen
  response. Routing happens only when configured.
- gamma-PO: `adaptive_margin=True` (gamma0 = `gamma`, `margin_tau`, `margin_center`); the
  solver's state is saved in TRL checkpoints and restored on resume (`trl_checkpoint`:
  weights-only loads; `resume_from_checkpoint=True` skips a checkpoint whose save was cut
  short).
- Curriculum: with routing or a difficulty configured, the pairs are ordered easy-first by
  the same difficulty and stable sort as `mixpo data prepare` (`order="as-is"` keeps the
  dataset's order, `order="shuffle"` permutes it) and fed through a sequential sampler (the
  last incomplete batch is kept, TRL's `dataloader_drop_last=False`); the log says which.
  `curriculum=False`: TRL shuffles.
- Metrics: TRL's names and definitions (rewards/*, logps/*, logits/chosen, logits/rejected,
  entropy, mean_token_accuracy, num_tokens, aux_loss) plus gamma/mean, gamma/std and
  routing/sft_fraction.
- MoE models: trl's `router_aux_loss_coef * aux_loss`, the load-balancing loss computed from
  the body's router logits by the model's own `load_balancing_loss_func`.
- Mixed precision: the forward runs inside accelerate's autocast (bf16=True computes the body
  and the head in bf16, as stock TRL).
"""
from __future__ import annotations

import contextlib
import dataclasses
import copy
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from mixpo.data.kinds import ORDERS
from mixpo.hf.loading import logit_transform
from mixpo.hf.policy import completion_hidden
from mixpo.integrations.trl_checkpoint import (MARGIN_STATE, incomplete, load_margin_state,
                                               resolve_resume, save_margin_state)
from mixpo.integrations.trl_data import (Difficulty, PassthroughCollator,
                                         check_precompute_cache, curriculum_on,
                                         curriculum_order, routing_configured, with_routing)
from mixpo.data.collate import PreferenceBatch
from mixpo.integrations.trl_head import (PASSTHROUGH, HeadOutput, attach_mixpo_head,
                                         body_inputs, check_head_adapters,
                                         head_adapters_allowed, head_tensors, model_inputs,
                                         trl_batch)
from mixpo.loss_config import LossConfig, option_fields
from mixpo.losses import linear_loss, sequence_logps
from mixpo.margins import AdaptiveMargin

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as error:                                   # pragma: no cover
    raise ImportError("mixpo.integrations.trl needs trl >= 1.16: pip install 'mixpo[trl]'") \
        from error

logger = logging.getLogger(__name__)


# mixpo's loss options that trl's DPOConfig lacks (gamma, sft_weight, ...), declared once by
# mixpo.LossConfig; the ones DPOConfig has (loss_type, beta, ...) keep trl's declaration, and
# token_metrics is always on (TRL logs those metrics).
_MixpoLossOptions = dataclasses.make_dataclass(
    "_MixpoLossOptions", option_fields(exclude={item.name for item in dataclasses.fields(
        DPOConfig)} | {"token_metrics"}), bases=(DPOConfig,))


@dataclass
class MixpoDPOConfig(_MixpoLossOptions):
    """trl.DPOConfig plus mixpo's options (TRL's own fields keep their meaning): the loss
    options of mixpo.LossConfig it lacks, then routing, gamma-PO, packing and curriculum."""

    routing_column: Optional[str] = field(default=None, metadata={
        "help": "MixDPO: a boolean column; its True pairs take the SFT loss (e.g. 'hard' "
                "from `mixpo data prepare`)."})
    route_below: Optional[float] = field(default=None, metadata={
        "help": "MixDPO: route pairs whose difficulty (rating margin) is < this (0.5 on "
                "UltraFeedback: the tied pairs)."})
    route_at_or_below: Optional[float] = field(default=None, metadata={
        "help": "MixDPO's Argilla variant: route pairs whose difficulty is <= this."})
    route_fraction: Optional[float] = field(default=None, metadata={
        "help": "MixDPO: route the hardest fraction of the pairs."})
    difficulty: str = field(default="rating", metadata={
        "help": "What route_* thresholds read: rating | reward | validation-loss | embedding "
                "(mixpo.data.kinds)."})
    score_columns: Optional[list[str]] = field(default=None, metadata={
        "help": "The (chosen, rejected) rating columns when not the usual names."})
    adaptive_margin: bool = field(default=False, metadata={
        "help": "gamma-PO: per-pair adaptive margins with mean `gamma`."})
    margin_tau: float = field(default=10.0, metadata={"help": "gamma-PO tau."})
    margin_center: bool = field(default=False, metadata={
        "help": "gamma-DPO: use gamma_i - gamma0 (zero-mean shift)."})
    padding_free: bool = field(default=False, metadata={
        "help": "Pack each micro-batch's sequences into one row (position ids restart per "
                "sequence, attention stays within each): no compute on padding. trl 1.16 "
                "disables this for DPO; mixpo's head supports it."})
    prefix_sharing: bool = field(default=False, metadata={
        "help": "With padding_free: each pair's prompt is read once, chosen and rejected "
                "attend to one copy of it ([prompt | chosen | rejected] per pair, the rejected "
                "tokens masked from the chosen ones); values equal the unshared rows. sdpa, "
                "eager, flex_attention; under flash-attn the rows stay unshared."})
    curriculum: Optional[bool] = field(default=None, metadata={
        "help": "Feed the pairs in the curriculum order (`order`) through a sequential "
                "sampler; None = on when routing, an `order` or a `difficulty` column (from "
                "`mixpo data prepare`) is there. False: TRL shuffles."})
    order: Optional[str] = field(default=None, metadata={
        "help": "The curriculum's order, as `mixpo data prepare --order`: easy-first (the "
                "default: a stable sort by difficulty, easiest first; the dataset's "
                "`difficulty` column when it has one, else `difficulty` computed), as-is (the "
                "dataset's own order) or shuffle (a permutation seeded by `seed`).",
        "choices": list(ORDERS)})
    mixpo_backend: str = field(default="auto", metadata={
        "help": "mixpo's backend: auto (Triton on CUDA) | triton | torch."})

    def loss_config(self, **transform) -> LossConfig:
        """The loss these arguments describe (ValueError naming a bad option)."""
        return LossConfig.from_options(self, token_metrics=True, **transform)


def _as_mixpo_config(args) -> MixpoDPOConfig:
    """A plain DPOConfig (or None) as a MixpoDPOConfig with mixpo's defaults."""
    if isinstance(args, MixpoDPOConfig):
        return args
    if args is None:
        return MixpoDPOConfig(output_dir="mixpo-dpo")
    values = {name: getattr(args, name) for name in args.__dataclass_fields__
              if name in MixpoDPOConfig.__dataclass_fields__
              and MixpoDPOConfig.__dataclass_fields__[name].init}
    return MixpoDPOConfig(**values)


def _causal_lm(model):
    """The transformers causal LM inside accelerate / DDP / PEFT wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    if hasattr(model, "get_base_model"):                        # peft.PeftModel
        model = model.get_base_model()
    return model


class MixpoDPOTrainer(DPOTrainer):
    """trl.DPOTrainer with mixpo's fused logit-free loss, MixDPO routing, gamma-PO margins and a
    curriculum (module docstring). Same constructor as trl.DPOTrainer."""

    _tag_names = ["trl", "dpo", "mixpo"]

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        import datasets

        # A copy: the padding_free switch is taken below, and the caller's args must build
        # the same trainer again.
        args = copy.copy(_as_mixpo_config(args))
        args.loss_config()                                     # every loss option, checked now
        # Before trl tokenizes (the cheap place to fail); _precompute_ref_logps checks trl's
        # own tokenized copies again, which is what its cache really sits next to.
        check_precompute_cache(args, train_dataset, eval_dataset)
        # TRL 1.16 turns padding_free off (with a warning) for DPO: mixpo packs in its own
        # forward instead, from TRL's padded batch.
        self._padding_free, args.padding_free = args.padding_free, False
        if args.prefix_sharing and not self._padding_free:
            raise ValueError("prefix_sharing needs padding_free=True (the shared prompt and "
                             "both completions go into one packed row)")
        self._routing = routing_configured(args)
        self._said_unshared = False
        self._last_batch = None          # (inputs, layout, PreferenceBatch): see _trl_batch
        ordered = isinstance(train_dataset, datasets.Dataset)
        self._curriculum = curriculum_on(args, train_dataset if ordered else None)
        self._curriculum_line = None
        if ordered:
            difficulty = Difficulty(train_dataset, args)
            train_dataset = with_routing(train_dataset, args, difficulty)
            if self._curriculum:
                train_dataset, self._curriculum_line = curriculum_order(train_dataset, args,
                                                                        difficulty)
            if self._padding_free and {"image", "images"} & set(train_dataset.column_names):
                raise ValueError("padding_free packs text-only batches: set padding_free=False "
                                 "for a dataset with images")
        self._margin = None
        with head_adapters_allowed():
            super().__init__(model=model, ref_model=ref_model, args=args,
                             data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class,
                             compute_metrics=compute_metrics, callbacks=callbacks,
                             optimizers=optimizers, quantization_config=quantization_config,
                             peft_config=peft_config)
        check_head_adapters(_causal_lm(self.model))
        self.data_collator = PassthroughCollator(self.data_collator)
        # gamma-PO: each process keeps its own queue, as the authors' code.
        self._margin = AdaptiveMargin.from_options(args, seed=args.seed + args.process_index)
        self._log_choices(args)

    # -- set-up ----------------------------------------------------------------------------
    def _log_choices(self, args) -> None:
        if not self.is_world_process_zero():
            return
        if self._curriculum:
            logger.warning(f"mixpo: curriculum on: {self._curriculum_line or 'the order given'}"
                           ", fed by a sequential sampler (last incomplete batch kept)")
        elif self.train_dataset is not None and hasattr(self.train_dataset, "column_names") \
                and "difficulty" in (self.train_dataset.column_names or ()):
            logger.warning("mixpo: curriculum off (curriculum=False): TRL shuffles the pairs")
        if self._routing and "hard" in self.train_dataset.column_names:
            routed = sum(self.train_dataset["hard"])
            logger.warning(f"mixpo: MixDPO routing: {routed} of {len(self.train_dataset)} pairs "
                           "take the SFT loss of their chosen response")
        if "sigmoid" in args.loss_type and args.label_smoothing:
            logger.warning("mixpo: loss_type='sigmoid' with label_smoothing applies cDPO (the "
                           "MixDPO authors' setting); trl 1.16's sigmoid ignores "
                           "label_smoothing")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in PASSTHROUGH:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _get_train_sampler(self, train_dataset=None):
        if self._curriculum:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def _body_inputs(self, model, inputs) -> tuple[dict, PreferenceBatch]:
        """(the body's keywords, mixpo's typed batch) of TRL's batch: padded as TRL built it,
        packed (padding_free), or packed with each prompt read once (prefix_sharing)."""
        if not self._padding_free:
            return model_inputs(inputs), self._trl_batch(inputs, "padded")
        causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
        implementation = causal_lm.config._attn_implementation
        layout = "packed"
        if self.args.prefix_sharing:
            if not implementation.startswith("flash_attention"):
                layout = "shared"
            elif not self._said_unshared and self.is_world_process_zero():
                logger.warning("mixpo: prefix_sharing: flash-attn cannot mask the rejected "
                               "response from the chosen one; packing unshared rows")
                self._said_unshared = True
        batch = self._trl_batch(inputs, layout)
        return body_inputs(batch, implementation, causal_lm.dtype), batch

    def _trl_batch(self, inputs: dict, layout: str) -> PreferenceBatch:
        """`trl_batch(inputs, layout)`, made once per step: with a live reference the
        reference pass and the loss read the same inputs (building the batch copies them to
        the host and collates)."""
        last = self._last_batch
        if last is None or last[0] is not inputs or last[1] != layout:
            self._last_batch = last = (inputs, layout, trl_batch(inputs, layout))
        return last[2]

    def _loss_config_for(self, model) -> LossConfig:
        """The loss of `model` (its logit transform), built and checked once per model."""
        causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
        cache = self.__dict__.setdefault("_loss_configs", {})
        if id(causal_lm) not in cache:
            attach_mixpo_head(causal_lm)
            logit_scale, softcap = logit_transform(causal_lm.config)
            cache[id(causal_lm)] = self.args.loss_config(logit_scale=logit_scale,
                                                         softcap=softcap)
        return cache[id(causal_lm)]

    # -- reference log-probs ---------------------------------------------------------------
    def _precompute_ref_logps(self, dataset, name, batch_size):
        check_precompute_cache(self.args, dataset)       # the tokenized copy trl caches on
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch with `mixpo.sequence_logps` (logit-free)."""
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        config = self._loss_config_for(model)
        model_kwargs, batch = self._body_inputs(model, inputs)
        shape = batch.completion if batch.layout != "padded" else {}
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and hasattr(self.accelerator.unwrap_model(self.model),
                                              "peft_config"):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in
                                          unwrapped.peft_config else None)

        def head(hidden, lm_head):
            hidden, weight, bias = head_tensors(completion_hidden(hidden, batch), lm_head)
            return sequence_logps(hidden, weight, batch.position_labels, bias=bias,
                                  ld_alpha=config.ld_alpha,
                                  logit_scale=config.logit_scale, softcap=config.softcap,
                                  backend=self.args.mixpo_backend, **shape)

        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs), adapter_context, \
                self.accelerator.autocast():
            logps = model(**model_kwargs, use_cache=False, mixpo_head=head)
        return logps.chunk(2, dim=0)

    # -- the loss --------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        config = self._loss_config_for(model)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        elif config.reference_free:
            ref_logps = None
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_logps = torch.cat(self.compute_ref_log_probs(reference, inputs))
        hard = inputs.get("hard") if self._routing else None
        margin = self._margin if mode == "train" else None    # eval batches stay out of it
        gamma = None
        if self._margin is not None and mode == "eval":       # gamma-PO's fixed eval margin
            gamma = torch.full((inputs["input_ids"].shape[0] // 2,),
                               self._margin.evaluation_gamma, device=inputs["input_ids"].device)
        model_kwargs, batch = self._body_inputs(model, inputs)
        packed = batch.layout != "padded"

        def head(hidden, lm_head):
            hidden, weight, bias = head_tensors(completion_hidden(hidden, batch), lm_head)
            return linear_loss(hidden, weight, batch.position_labels, config, bias=bias,
                               ref_logps=ref_logps, hard=hard, margin=margin, gamma=gamma,
                               backend=self.args.mixpo_backend, validate=not packed,
                               **(batch.completion if packed else {}))

        if self.aux_loss_enabled:          # MoE: trl's router load-balancing term
            model_kwargs["output_router_logits"] = True
        # accelerate applies mixed precision by wrapping the model's forward; the mixpo_head
        # branch of the patched forward runs the body itself, so enter autocast here (as
        # compute_ref_log_probs does): the body and the head then compute as in stock TRL.
        with self.accelerator.autocast():
            out = model(**model_kwargs, use_cache=False, mixpo_head=head)
        loss = None
        if self.aux_loss_enabled:
            out, aux_loss = out
            out = HeadOutput.result(out)
            loss = out.loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        out = HeadOutput.result(out)
        loss = out.loss if loss is None else loss
        self._log_loss_metrics(out, inputs, mode)
        if return_outputs:
            return loss, self._logits_outputs(model, inputs)
        return loss

    def _logits_outputs(self, model, inputs):
        """What stock trl 1.16 returns with return_outputs=True (prediction_step, when
        `compute_metrics` asks for logits): the model's own forward on the padded batch,
        logits [2B, L, V] included. mixpo's loss never forms them, so, as in stock trl, they
        cost an extra forward."""
        warnings.warn("`return_outputs=True`, and the logits it passes to `compute_metrics`, "
                      "cost an extra forward pass with materialised logits (as in trl 1.16, "
                      "which deprecates them)", FutureWarning, stacklevel=3)
        model_kwargs = model_inputs(inputs)
        with torch.no_grad(), self.accelerator.autocast():
            return model(**model_kwargs, use_cache=False)

    def _log_loss_metrics(self, out, inputs, mode) -> None:
        """TRL's metrics plus gamma/* and routing/*, from the per-pair values gathered over
        processes (as TRL gathers) by the one definition both front doors use
        (`PreferenceLossOutput.metric_tensors`); one host sync."""
        gather = self.accelerator.gather_for_metrics
        stats = out.per_pair(gather).metric_tensors()
        stats.pop("loss")                                   # TRL logs the loss itself
        tokens = gather(inputs["attention_mask"].sum()[None]).sum()
        values = torch.stack([*(value.float() for value in stats.values()),
                              tokens.float()]).tolist()
        for name, value in zip(stats, values):
            self._metrics[mode][name].append(value)
        if mode == "train":
            self._total_train_tokens += int(values[-1]) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    # -- the gamma-PO solver in checkpoints --------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """trl's train; `resume_from_checkpoint=True` resumes from the newest complete
        checkpoint (an interrupted save is skipped, with a warning), a path only from a
        complete one (ValueError naming what is missing)."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir,
                                                self.args.world_size, self._margin is not None)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_rng_state(self, output_dir):
        # Beside the RNG states: before trainer_state.json marks the checkpoint complete and
        # before older checkpoints are rotated away.
        super()._save_rng_state(output_dir)
        if self._margin is not None:
            save_margin_state(self._margin, output_dir, self.args.process_index)

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if checkpoint is None or self._margin is None:
            return
        path = os.path.join(checkpoint, MARGIN_STATE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            raise ValueError(f"cannot resume from {checkpoint}: "
                             f"{incomplete(checkpoint, self.args.world_size, True)}")
        load_margin_state(self._margin, path)


__all__ = ["MixpoDPOConfig", "MixpoDPOTrainer"]
