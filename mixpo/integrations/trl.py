"""mixpo inside TRL: `MixpoDPOConfig` and `MixpoDPOTrainer`, drop-in subclasses of trl's
`DPOConfig` / `DPOTrainer` (trl >= 1.16; `pip install mixpo[trl]`).

    from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer
    args = MixpoDPOConfig(output_dir="out", beta=0.01, label_smoothing=0.1, route_below=0.5)
    trainer = MixpoDPOTrainer(model=model, args=args, train_dataset=prepared,
                              processing_class=tokenizer)          # the rest as in TRL
    trainer.train()

What changes against stock TRL, and what does not:
- The loss is mixpo's logit-free fused loss (`mixpo.linear_preference_loss`) on the body's last
  hidden state and the LM-head weight (PEFT: the base model's head), computed inside the
  model's forward (so FSDP has the head unsharded), for every loss type TRL 1.16's DPOTrainer
  has plus simpo, cpo and orpo; TRL's list form, loss_weights, use_weighting,
  f_divergence_type, ld_alpha and discopop_tau keep their meaning. The logit transform of the
  model (Gemma-2 softcap, Cohere / Granite scales) is read from its config as TRL reads it.
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
  solver's state is saved in TRL checkpoints and restored on resume.
- Curriculum: the dataset's order, through a sequential sampler (the last incomplete batch is
  kept, TRL's `dataloader_drop_last=False`), on by default when routing or a `difficulty`
  column is present (`curriculum=None`), and said so in the log. TRL shuffles otherwise.
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
import logging
import os
import sys
from dataclasses import dataclass, field
from types import MethodType
from typing import Optional

import torch

from mixpo.hf.loading import logit_transform
from mixpo.loss_config import LossConfig
from mixpo.losses import linear_loss, sequence_logps
from mixpo.margins import AdaptiveMargin

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as error:                                   # pragma: no cover
    raise ImportError("mixpo.integrations.trl needs trl >= 1.16: pip install 'mixpo[trl]'") \
        from error

logger = logging.getLogger(__name__)
MARGIN_STATE = "mixpo_margin_rank{rank}.pt"
PASSTHROUGH = ("hard", "difficulty")       # per-pair columns the collator carries


@dataclass
class MixpoDPOConfig(DPOConfig):
    """trl.DPOConfig plus mixpo's options (TRL's own fields keep their meaning)."""

    gamma: Optional[float] = field(default=None, metadata={
        "help": "Target margin inside the loss (z = beta * h - gamma); None = the loss type's "
                "default (simpo 0.5, else 0). With adaptive_margin: gamma-PO's mean margin."})
    average_log_prob: Optional[bool] = field(default=None, metadata={
        "help": "None = each loss type's convention (per token for ipo, sigmoid_norm, simpo, "
                "orpo); True / False force per-token / summed log-ratios."})
    sft_weight: float = field(default=0.0, metadata={
        "help": "Adds sft_weight * NLL of the chosen responses (TRL's RPO is the list form "
                "['sigmoid', 'sft'])."})
    nll_normalization: str = field(default="batch", metadata={
        "help": "NLL terms: 'batch' (TRL, Liger: mean over the batch's chosen tokens) or "
                "'pair' (mean of per-pair means)."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "CPO's NLL weight."})
    rdpo_alpha: float = field(default=0.0, metadata={"help": "R-DPO length penalty."})
    dpop_lambda: float = field(default=0.0, metadata={"help": "DPOP penalty."})
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
    curriculum: Optional[bool] = field(default=None, metadata={
        "help": "Train in the dataset's order (sequential sampler); None = on when routing or "
                "a difficulty column is present."})
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


def _attach_mixpo_head(causal_lm) -> None:
    """Patch `causal_lm.forward` (as TRL's add_fused_lm_head does) so that
    `model(..., mixpo_head=fn)` runs the body only and returns fn(hidden, lm_head): the head is
    read inside the model's forward (FSDP has unsharded it), through every wrapper (DDP, PEFT,
    accelerate). Without `mixpo_head` the previous forward (TRL's) runs unchanged."""
    if getattr(causal_lm, "_mixpo_head_attached", False):
        return
    previous = causal_lm.forward

    def forward(self, *args, mixpo_head=None, **kwargs):
        if mixpo_head is None:
            return previous(*args, **kwargs)
        kwargs.pop("labels", None)
        kwargs.pop("fused_lm_head", None)
        router = kwargs.pop("output_router_logits", False)
        body = self.get_decoder() if hasattr(self, "get_decoder") else self.base_model
        outputs = body(*args, **kwargs, **({"output_router_logits": True} if router else {}))
        result = mixpo_head(outputs.last_hidden_state, self.get_output_embeddings())
        if not router:
            return result
        mask = kwargs.get("attention_mask")       # packed rows pass a 4-D mask: no padding
        return result, _router_aux_loss(self, outputs.router_logits,
                                        mask if mask is not None and mask.ndim == 2 else None)

    causal_lm.forward = MethodType(forward, causal_lm)
    causal_lm._mixpo_head_attached = True


def _router_aux_loss(causal_lm, router_logits, attention_mask):
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


def _full(tensor):
    """An FSDP2 DTensor parameter gathered, anything else as is."""
    return tensor.full_tensor() if tensor is not None and hasattr(tensor, "full_tensor") \
        else tensor


def _position_labels(inputs) -> torch.Tensor:
    """TRL's batch (input_ids, completion_mask [2B, L]) as mixpo's position-aligned labels:
    position t reads token t+1 when that token is a completion token, else -100."""
    input_ids, completion = inputs["input_ids"], inputs["completion_mask"]
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    return labels


def _packed(inputs, attn_implementation: str, dtype) -> tuple[dict, dict]:
    """TRL's right-padded [2B, L] batch as one padding-free row: (the body's keywords, the
    loss's labels and completion_* shape). Boolean indexing reads the lengths on the host
    (TRL's own metrics sync every step anyway)."""
    from mixpo.hf.policy import packed_attention

    real = inputs["attention_mask"].bool()
    lengths = real.sum(dim=1)
    labels = _position_labels(inputs)
    packed_labels = labels[real][None]
    rows = torch.nonzero(packed_labels[0] != -100).squeeze(1)
    sequence = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device),
                                       lengths)
    batch = {"position_ids": (real.cumsum(dim=1) - 1)[real][None], "sequence_lengths": lengths}
    body = {"input_ids": inputs["input_ids"][real][None],
            **packed_attention(batch, attn_implementation, dtype)}
    shape = {"labels": packed_labels, "completion_rows": rows,
             "completion_sequences": sequence[rows],
             "completion_counts": (labels != -100).sum(dim=1).float()}
    return body, shape


class _PassthroughCollator:
    """TRL's preference collator, plus the per-pair columns mixpo reads (PASSTHROUGH)."""

    def __init__(self, collator, columns):
        self.collator, self.columns = collator, columns

    def __call__(self, examples):
        batch = self.collator(examples)
        for column in self.columns:
            if column in examples[0]:
                values = [example[column] for example in examples]
                dtype = torch.bool if column == "hard" else torch.float32
                batch[column] = torch.tensor(values, dtype=dtype)
        return batch


def _check_routing_column(dataset, column: str) -> None:
    """The routing column must hold booleans (a string "false" would route every pair)."""
    if column not in dataset.column_names:
        raise ValueError(f"routing_column {column!r} is not a column of the dataset "
                         f"(columns: {dataset.column_names})")
    for index, value in enumerate(dataset[column]):
        if not isinstance(value, bool):
            raise ValueError(f"row {index}, column {column!r}: routing flags must be true/false, "
                             f"got {value!r}")


def _check_precompute_cache(args, *datasets) -> None:
    """trl 1.16 caches precomputed reference log-probs next to the dataset's files; an
    in-memory dataset's cache folder (or any, with datasets' caching disabled) is per process,
    so with several processes every rank but the first fails after the whole reference pass.
    Refuse before it."""
    if not args.precompute_ref_log_probs or args.world_size <= 1:
        return
    import datasets as hf_datasets

    for dataset in datasets:
        splits = dataset.values() if isinstance(dataset, dict) else [dataset]
        for split in splits:
            files = getattr(split, "cache_files", None)
            if files is not None and (files == [] or not hf_datasets.is_caching_enabled()):
                raise ValueError(
                    f"precompute_ref_log_probs with {args.world_size} processes needs datasets "
                    "with files on disk (datasets.load_from_disk / load_dataset): trl caches "
                    "the reference log-probs next to them, and an in-memory dataset's cache "
                    "is private to each process")


class MixpoDPOTrainer(DPOTrainer):
    """trl.DPOTrainer with mixpo's fused logit-free loss, MixDPO routing, gamma-PO margins and a
    curriculum sampler (module docstring). Same constructor as trl.DPOTrainer."""

    _tag_names = ["trl", "dpo", "mixpo"]

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        args = _as_mixpo_config(args)
        args.loss_config()                                     # every loss option, checked now
        # Before trl tokenizes (the cheap place to fail); _precompute_ref_logps checks trl's
        # own tokenized copies again, which is what its cache really sits next to.
        _check_precompute_cache(args, train_dataset, eval_dataset)
        # TRL 1.16 turns padding_free off (with a warning) for DPO: mixpo packs in its own
        # forward instead, from TRL's padded batch.
        self._padding_free, args.padding_free = args.padding_free, False
        self._routing = args.routing_column is not None or any(
            value is not None for value in (args.route_below, args.route_at_or_below,
                                            args.route_fraction))
        if train_dataset is not None and hasattr(train_dataset, "column_names"):
            train_dataset = self._with_routing(train_dataset, args)
            has_difficulty = "difficulty" in train_dataset.column_names
        else:
            has_difficulty = False
        self._curriculum = args.curriculum if args.curriculum is not None \
            else (self._routing or has_difficulty)
        self._margin = None
        super().__init__(model=model, ref_model=ref_model, args=args,
                         data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config,
                         peft_config=peft_config)
        self.data_collator = _PassthroughCollator(self.data_collator, PASSTHROUGH)
        if args.adaptive_margin:    # each process keeps its own queue, as the authors' code
            gamma0 = LossConfig(loss_type=tuple(args.loss_type), gamma=args.gamma).fixed_gamma
            self._margin = AdaptiveMargin(gamma0, args.margin_tau, seed=args.seed
                                          + args.process_index, center=args.margin_center)
        self._log_choices(args)

    # -- set-up ----------------------------------------------------------------------------
    def _with_routing(self, dataset, args):
        """The dataset with a `hard` column when routing is configured (and only then)."""
        if args.routing_column is not None:
            _check_routing_column(dataset, args.routing_column)
            if args.routing_column != "hard":
                if "hard" in dataset.column_names:
                    dataset = dataset.remove_columns("hard")
                dataset = dataset.add_column("hard", dataset[args.routing_column])
            return dataset
        if not self._routing:
            return dataset.remove_columns("hard") if "hard" in dataset.column_names else dataset
        from mixpo.data.difficulty import compute_difficulty, route_hard

        difficulty = compute_difficulty(dataset, args.difficulty, tuple(args.score_columns)
                                        if args.score_columns else None)
        thresholds = {name: getattr(args, name) for name in
                      ("route_below", "route_at_or_below", "route_fraction")
                      if getattr(args, name) is not None}
        hard = route_hard(difficulty, **thresholds)
        if "hard" in dataset.column_names:
            dataset = dataset.remove_columns("hard")
        return dataset.add_column("hard", hard.tolist())

    def _log_choices(self, args) -> None:
        if not self.is_world_process_zero():
            return
        if self._curriculum:
            logger.warning("mixpo: curriculum on: pairs are fed in the dataset's order "
                           "(sequential sampler, last incomplete batch kept)")
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

    def _body_inputs(self, model, inputs) -> tuple[dict, dict]:
        """The body's keywords, and (padding-free) the packed labels and completion_* shape."""
        if not self._padding_free:
            return {k: v for k, v in inputs.items()
                    if k in ("input_ids", "attention_mask", "position_ids")}, {}
        causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
        return _packed(inputs, causal_lm.config._attn_implementation, causal_lm.dtype)

    def _loss_config_for(self, model) -> LossConfig:
        causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
        _attach_mixpo_head(causal_lm)
        logit_scale, softcap = logit_transform(causal_lm.config)
        return self.args.loss_config(logit_scale=logit_scale, softcap=softcap)

    # -- reference log-probs ---------------------------------------------------------------
    def _precompute_ref_logps(self, dataset, name, batch_size):
        _check_precompute_cache(self.args, dataset)       # the tokenized copy trl caches on
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch with `mixpo.sequence_logps` (logit-free)."""
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        config = self._loss_config_for(model)
        labels = _position_labels(inputs)
        model_kwargs, shape = self._body_inputs(model, inputs)
        labels = shape.pop("labels", labels)
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and hasattr(self.accelerator.unwrap_model(self.model),
                                              "peft_config"):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in
                                          unwrapped.peft_config else None)

        def head(hidden, lm_head):
            return sequence_logps(hidden, _full(lm_head.weight), labels,
                                  bias=_full(lm_head.bias), ld_alpha=config.ld_alpha,
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
        labels = _position_labels(inputs)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        elif config.reference_free:
            ref_logps = None
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_logps = torch.cat(self.compute_ref_log_probs(reference, inputs))
        hard = inputs.get("hard") if self._routing else None
        margin = self._margin if mode == "train" else None    # eval batches stay out of it
        model_kwargs, shape = self._body_inputs(model, inputs)
        labels = shape.pop("labels", labels)

        def head(hidden, lm_head):
            return linear_loss(hidden, _full(lm_head.weight), labels, config,
                               bias=_full(lm_head.bias), ref_logps=ref_logps, hard=hard,
                               margin=margin, backend=self.args.mixpo_backend,
                               validate=not shape, **shape)

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
            loss = out.loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        loss = out.loss if loss is None else loss
        self._log_loss_metrics(out, inputs, mode)
        if return_outputs:
            return loss, out
        return loss

    def _log_loss_metrics(self, out, inputs, mode) -> None:
        """TRL's metrics (per-pair values and token sums gathered over processes, as TRL does)
        plus gamma/* and routing/*; one host sync."""
        gather = self.accelerator.gather_for_metrics
        pair_values = torch.stack([out.chosen_rewards, out.rejected_rewards, out.chosen_logps,
                                   out.rejected_logps, out.gamma,
                                   out.gamma.new_zeros(out.gamma.shape) if out.hard is None
                                   else out.hard.float()], dim=1)
        pairs = gather(pair_values)                                        # [B * world, 6]
        chosen_sums, rejected_sums = out.chosen_token_sums, out.rejected_token_sums
        token_totals = gather(torch.stack([
            chosen_sums[:, 0].sum(), rejected_sums[:, 0].sum(),
            chosen_sums[:, 1].sum() + rejected_sums[:, 1].sum(), chosen_sums[:, 3].sum(),
            out.chosen_counts.sum(), out.rejected_counts.sum()])[None]).sum(0)
        tokens = gather(inputs["attention_mask"].sum()[None]).sum()
        margins = pairs[:, 0] - pairs[:, 1]
        values = torch.stack([
            pairs[:, 0].mean(), pairs[:, 1].mean(), (margins > 0).float().mean(), margins.mean(),
            pairs[:, 2].mean(), pairs[:, 3].mean(),
            token_totals[0] / token_totals[4], token_totals[1] / token_totals[5],
            token_totals[2] / (token_totals[4] + token_totals[5]),
            token_totals[3] / token_totals[4], pairs[:, 4].mean(),
            pairs[:, 4].std(unbiased=False), pairs[:, 5].mean(), tokens.float()]).tolist()
        names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
                 "entropy", "mean_token_accuracy", "gamma/mean", "gamma/std",
                 "routing/sft_fraction")
        for name, value in zip(names, values):
            self._metrics[mode][name].append(value)
        if mode == "train":
            self._total_train_tokens += int(values[-1]) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    # -- the gamma-PO solver in checkpoints --------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self._margin is None:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from mixpo.files import atomic_output

        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if os.path.isdir(folder):
            path = os.path.join(folder, MARGIN_STATE.format(rank=self.args.process_index))
            with atomic_output(path) as staging:
                torch.save(self._margin.state_dict(), staging)

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if checkpoint is None or self._margin is None:
            return
        path = os.path.join(checkpoint, MARGIN_STATE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} has no gamma-PO solver state "
                             f"({os.path.basename(path)}): it was not written by an "
                             "adaptive_margin run of this process count")
        self._margin.load_state_dict(torch.load(path, weights_only=False))


__all__ = ["MixpoDPOConfig", "MixpoDPOTrainer"]
