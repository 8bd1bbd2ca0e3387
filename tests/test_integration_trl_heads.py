"""MixpoDPOTrainer on the heads and inputs stock trl 1.16 DPOTrainer takes: a frozen head
(LoRA elsewhere: no dWeight), a LoRA on the head itself (gradients to its A and B equal a
materialised reference), `evaluate()` with `compute_metrics` (logits only when it asks), and
a vision-language model (a tiny LLaVA built offline: its image inputs reach the body)."""
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

import mixpo                                                           # noqa: E402
from fixtures import build_tiny_tokenizer, tiny_llama_config          # noqa: E402
from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer    # noqa: E402
from test_integration_trl import first_step, make, rows               # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer([value for row in rows() for value in row.values()
                                 if isinstance(value, str)], chat_template=False)


def test_lora_elsewhere_leaves_the_head_without_dweight(tokenizer, tmp_path, monkeypatch):
    from mixpo.kernels import linear_logps_torch, linear_one_pass

    calls = []

    def spy(function):
        def call(*args, weight_grad=True, **kwargs):
            calls.append(weight_grad)
            return function(*args, weight_grad=weight_grad, **kwargs)
        return call

    # The two-pass backward or, for per-pair losses that fit the workspace, the one pass.
    for module, name in ((linear_logps_torch, "linear_token_logps_backward"),
                         (linear_one_pass, "linear_token_logps_one_pass")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.0)
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, peft_config=config,
                   max_steps=1, mixpo_backend="torch")
    loss, grads, _ = first_step(trainer)
    assert calls == [False] and grads and all("lora_" in name for name in grads)
    calls.clear()
    trainer.model.get_base_model().lm_head.weight.requires_grad_(True)    # a trainable head
    first_step(trainer)
    assert calls == [True]


def _reference_step(trainer, batch):
    """The same DPO loss from the PEFT model's own forward (materialised logits, LoRA on the
    head applied by PEFT) and mixpo's logits loss, reference = adapters disabled."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :-1] = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0,
                                                           -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**inputs).logits
    ref = torch.log_softmax(ref_logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])
    ref_logps = (ref[..., 0] * (labels != -100)).sum(1)
    out = mixpo.preference_loss(model(**inputs).logits, labels, ref_logps=ref_logps,
                                beta=trainer.args.beta, backend="torch")
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_lora_on_the_head_trains_its_a_and_b_as_peft_computes_it(tokenizer, tmp_path):
    """The head is W + s B A: mixpo's logit-free loss runs it as [x | s A x] [W | B]^T, and
    loss and every LoRA gradient (the head's A and B included) equal PEFT's materialised
    forward. Random B (init_lora_weights=False) so that A's gradient is not zero."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                             lora_dropout=0.0, init_lora_weights=False)
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, peft_config=config,
                   beta=0.3, max_steps=1)
    loss, grads, batch = first_step(trainer)
    ref_loss, ref_grads = _reference_step(trainer, batch)
    head = [name for name in ref_grads if "lm_head.lora_" in name]
    assert len(head) == 2 and all(ref_grads[name].abs().sum() > 0 for name in head)
    assert set(grads) == set(ref_grads)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Disabled adapters (the reference pass) read the base head only.
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    assert torch.cat([chosen, rejected]).tolist() == pytest.approx(_base_logps(trainer, batch),
                                                                   rel=1e-5)


def _base_logps(trainer, batch):
    """Summed completion log-probs under the base model (adapters disabled), materialised."""
    model = trainer.model
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :-1] = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0,
                                                           -100)
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])
    return (logps[..., 0] * (labels != -100)).sum(1).tolist()


def test_unsupported_adapters_on_the_head_are_refused_by_name(tokenizer, tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], use_dora=True)
    with pytest.raises(ValueError, match="LoRA adapter 'default' on the LM head uses a variant "
                       r"\(use_dora, fan_in_fan_out, ...\)"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, peft_config=config)
    config = peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[])
    with pytest.raises(ValueError, match="a Linear adapter on the LM head is not supported"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, peft_config=config)


def test_evaluate_with_compute_metrics_as_stock_trl(tokenizer, tmp_path):
    """trl's prediction_step reads `outputs.logits` when compute_metrics asks for them: the
    same logits (an extra materialised forward, as stock), the same eval metrics; without
    compute_metrics no logits are computed at all (the head module never runs)."""
    seen = {}

    def compute_metrics(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        return {"logit_mean": float(logits[labels != -100].mean())}

    results = {}
    for name, trainer_class, config_class, extra in (
            ("stock", trl.DPOTrainer, trl.DPOConfig, {}),
            ("mixpo", MixpoDPOTrainer, MixpoDPOConfig, {"curriculum": False})):
        for metrics in (None, compute_metrics):
            trainer = make(trainer_class, config_class, tokenizer, tmp_path / name, beta=0.3,
                           per_device_eval_batch_size=4, **extra)
            trainer.compute_metrics = metrics
            head_calls = []
            trainer.model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results[name, metrics is None] = trainer.evaluate(
                    datasets.Dataset.from_list(rows(8, seed=1)))
            said = any("return_outputs=True" in str(w.message) for w in caught)
            seen[name, metrics is None] = (len(head_calls), said)
    for plain in (True, False):
        stock, ours = results["stock", plain], results["mixpo", plain]
        for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
            assert ours[key] == pytest.approx(stock[key], rel=1e-5, abs=1e-6), key
    assert results["mixpo", False]["eval_logit_mean"] == pytest.approx(
        results["stock", False]["eval_logit_mean"], rel=1e-6)
    # Head forwards (8 rows, batch 4) and the deprecation warning, as stock trl.
    assert seen["mixpo", True] == seen["stock", True] == (0, False)
    assert seen["mixpo", False] == seen["stock", False] == (2, True)


def tiny_llava(tokenizer, seed=0):
    """A random LLaVA: 1-layer CLIP tower on 8x8 images (4 patch tokens), tiny Llama."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=8, patch_size=4)
    config = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(tokenizer),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(config).train()


def vision_rows(n=8):
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    data = rows(n)
    for row in data:
        row["prompt"] = "<image> " + row["prompt"]
        row["images"] = [Image.fromarray(generator.integers(0, 255, (8, 8, 3), dtype=np.uint8))]
    return data


def test_vision_inputs_reach_the_body_as_in_stock_trl(tmp_path):
    """A tiny LLaVA (built offline) trained on image + text pairs: pixel_values reach the
    vision tower through mixpo's head, so loss and every gradient, the vision tower's
    included, equal stock trl's."""
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:                                       # transformers without it
        from transformers import CLIPImageProcessor as ImageProcessor
    from transformers import LlavaProcessor

    text = build_tiny_tokenizer([value for row in rows() for value in row.values()
                                 if isinstance(value, str)], chat_template=False)
    text.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": 8},
                                       crop_size={"height": 8, "width": 8}),
        tokenizer=text, patch_size=4, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1)
    results = {}
    for name, trainer_class, config_class, extra in (
            ("stock", trl.DPOTrainer, trl.DPOConfig, {}),
            ("mixpo", MixpoDPOTrainer, MixpoDPOConfig, {"curriculum": False})):
        args = config_class(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                            max_steps=1, report_to="none", use_cpu=True, bf16=False, seed=0,
                            max_length=None, save_strategy="no", beta=0.3,
                            dataloader_num_workers=0, **extra)
        trainer = trainer_class(model=tiny_llava(text), ref_model=tiny_llava(text), args=args,
                                train_dataset=datasets.Dataset.from_list(vision_rows()),
                                processing_class=processor)
        results[name] = first_step(trainer)
    with pytest.raises(ValueError, match="padding_free packs text-only batches: set "
                       "padding_free=False for a dataset with images"):
        MixpoDPOTrainer(model=tiny_llava(text), ref_model=tiny_llava(text),
                        args=MixpoDPOConfig(output_dir=str(tmp_path / "packed"), use_cpu=True,
                                            padding_free=True, report_to="none"),
                        train_dataset=datasets.Dataset.from_list(vision_rows()),
                        processing_class=processor)
    (stock_loss, stock_grads, batch), (loss, grads, _) = results["stock"], results["mixpo"]
    assert batch["pixel_values"].shape == (4, 3, 8, 8)          # per chosen and rejected row
    tower = [name for name in stock_grads if "vision_tower" in name]
    assert tower and all(stock_grads[name].abs().sum() > 0 for name in tower)
    assert set(grads) == set(stock_grads)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_model_key_of_trl_s_batch_reaches_the_body():
    """The vision collator's other keys (Qwen2-VL's image_grid_thw, Idefics' and SmolVLM's
    pixel_attention_mask, Gemma 3's token_type_ids, Qwen2.5-VL's mm_token_type_ids) pass
    through as trl's own forward passes them; trl's bookkeeping and mixpo's columns do not."""
    from mixpo.integrations.trl_head import model_inputs

    keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw",
            "pixel_attention_mask", "token_type_ids", "mm_token_type_ids", "image_sizes"]
    batch = {key: torch.zeros(1) for key in keys + ["completion_mask", "ref_chosen_logps",
                                                   "ref_rejected_logps", "hard", "difficulty"]}
    assert list(model_inputs(batch)) == keys
