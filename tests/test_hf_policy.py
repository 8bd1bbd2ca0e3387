"""The Hugging Face layer: models whose heads scale or soft-cap the logits (Gemma-2, Cohere,
Granite) are read from their configs, so the logit-free loss scores exactly what the model's
own forward scores."""
import pytest
import torch

from mixpo.hf.loading import logit_transform
from mixpo.hf.policy import PreferenceModel

TINY = dict(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(kind):
    import transformers

    torch.manual_seed(0)
    if kind == "gemma2":
        config = transformers.Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=3.0,
                                           attn_logit_softcapping=None, sliding_window=16)
    elif kind == "cohere":
        config = transformers.CohereConfig(**TINY, logit_scale=0.3)
    elif kind == "granite":
        config = transformers.GraniteConfig(**TINY, logits_scaling=4.0)
    else:
        config = transformers.LlamaConfig(**TINY)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Larger head weights so that the transform matters (softcap binds, scale is visible).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.mark.parametrize("kind,expected", [("gemma2", (1.0, 3.0)), ("cohere", (0.3, None)),
                                           ("granite", (0.25, None)), ("llama", (1.0, None))])
def test_logit_transform_read_from_config_matches_the_model_forward(kind, expected):
    model = tiny_model(kind)
    scale, softcap = logit_transform(model.config)
    assert scale == pytest.approx(expected[0]) and softcap == expected[1]
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 301, (4, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :3] = -100
    policy = PreferenceModel(model)
    with torch.no_grad():
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        ours = policy(batch, logps_only=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    want = (token * (labels[:, 1:] != -100)).sum(1)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-4)
    if kind != "llama":   # the plain-head log-probs differ: the transform was needed
        plain = PreferenceModel(tiny_model("llama"))
        plain.causal_lm = model
        from dataclasses import replace
        plain.loss_config = replace(plain.loss_config, logit_scale=1.0, softcap=None)
        with torch.no_grad():
            untransformed = plain(batch, logps_only=True)
        assert (untransformed - want).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# Padding-free packed batches == padded batches
# ----------------------------------------------------------------------------------------------
def tokenized_pairs(lengths, seed=0):
    """Pairs as `tokenize_pair` returns them: (prompt, chosen, rejected) token counts."""
    import numpy as np
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for prompt, chosen, rejected in lengths:
        prompt_ids = torch.randint(1, 301, (prompt,), generator=gen).tolist()
        example = {"prompt_length": prompt}
        for name, count in (("chosen", chosen), ("rejected", rejected)):
            ids = prompt_ids + torch.randint(1, 301, (count,), generator=gen).tolist()
            example[f"{name}_input_ids"] = np.asarray(ids, dtype=np.int32)
            example[f"{name}_labels"] = np.asarray([-100] * prompt + ids[prompt:], dtype=np.int32)
        pairs.append(example)
    return pairs


LENGTHS = {
    "ragged": [(3, 5, 2), (6, 1, 4), (2, 7, 7)],          # incl. a 1-token completion
    "one pair": [(4, 3, 6)],                              # one pair: two sequences per pack
    "long prompt": [(12, 2, 1), (1, 9, 3)],
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])   # boolean / additive packed masks
@pytest.mark.parametrize("layout", sorted(LENGTHS))
@pytest.mark.parametrize("loss", [dict(loss_type="sigmoid"), dict(loss_type="ipo", ld_alpha=0.5),
                                  dict(loss_type="simpo")])
def test_packed_batches_match_padded_batches(layout, loss, attention):
    from mixpo.data.collate import PackedPreferenceCollator, PreferenceCollator
    from mixpo.loss_config import LossConfig

    examples = tokenized_pairs(LENGTHS[layout])
    reference_free = loss["loss_type"] == "simpo"
    ref = None if reference_free else -torch.linspace(5, 25, 2 * len(examples))
    results = {}
    collators = (("padded", PreferenceCollator(0)), ("packed", PackedPreferenceCollator()))
    for name, collator in collators:
        model = tiny_model("llama").train()
        model.set_attn_implementation(attention)
        assert model.config._attn_implementation == attention
        with torch.no_grad():
            model.get_output_embeddings().weight.div_(20.0)
        policy = PreferenceModel(model, LossConfig(beta=0.5, **loss))
        batch = collator(examples)
        loss_value, out = policy(batch, ref_logps=ref, validate=False)
        loss_value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            logps = policy(batch, logps_only=True)
        results[name] = (loss_value.detach(), out.per_pair_loss, logps, grads)
    padded, packed = results["padded"], results["packed"]
    assert packed[2].shape == padded[2].shape == (2 * len(examples),)
    for got, want in zip(packed[:3], padded[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(packed[3]) == set(padded[3])
    for name, grad in padded[3].items():
        torch.testing.assert_close(packed[3][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_batch_has_no_padding_and_restarts_positions():
    from mixpo.data.collate import PackedPreferenceCollator
    batch = PackedPreferenceCollator()(tokenized_pairs([(2, 3, 1), (1, 1, 4)]))
    assert batch["input_ids"].shape == (1, 5 + 2 + 3 + 5)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4]
    assert batch["sequence_lengths"].tolist() == [5, 2, 3, 5]
    assert batch["completion_counts"].tolist() == [3.0, 1.0, 1.0, 4.0]
    # Each sequence's last position predicts nothing (no label across a boundary).
    ends = torch.cumsum(batch["sequence_lengths"], 0) - 1
    assert (batch["labels"][0, ends] == -100).all()


def test_gradient_checkpointing_is_enabled_without_deprecation_warnings(tmp_path):
    import warnings

    from mixpo.hf.loading import load_causal_lm

    tiny_model("llama").save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = load_causal_lm(str(tmp_path), torch.float32, "sdpa", gradient_checkpointing=True)
    layers = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    assert layers and all(module.gradient_checkpointing for module in layers)
    assert model.training
    plain = load_causal_lm(str(tmp_path), torch.float32, "sdpa", gradient_checkpointing=False)
    assert not any(getattr(module, "gradient_checkpointing", False) for module in plain.modules())


def test_gemma2_softcap_30_matches_trl_fused_lm_head():
    """Gemma-2's final_logit_softcapping 30 (its real value): mixpo's logit-free DPO loss and
    its gradients equal the same loss on trl 1.16's fused LM head (`add_fused_lm_head`)."""
    import copy

    import transformers
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from mixpo.loss_config import LossConfig

    torch.manual_seed(0)
    config = transformers.Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=30.0,
                                       attn_logit_softcapping=None, sliding_window=16)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    with torch.no_grad():   # logits of order 30, so that the softcap binds
        model.get_output_embeddings().weight.mul_(300.0)
    theirs = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(theirs)
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 301, (4, 10), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    attention_mask[3, 7:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100                                       # the prompt
    ref = torch.tensor([-40.0, -35.0, -45.0, -30.0])
    beta = 0.1

    policy = PreferenceModel(model, LossConfig(beta=beta))
    assert policy.loss_config.softcap == 30.0
    ours, _ = policy({"input_ids": input_ids, "attention_mask": attention_mask,
                      "labels": labels}, ref_logps=ref)
    ours.backward()
    out = theirs(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 fused_lm_head=True)
    sequence = out.log_probs.sum(1)
    h = (sequence[:2] - ref[:2]) - (sequence[2:] - ref[2:])
    want = -torch.nn.functional.logsigmoid(beta * h).mean()
    want.backward()
    torch.testing.assert_close(ours.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    grads = dict(theirs.named_parameters())
    compared = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        compared += 1
    assert compared > 10
    # The softcap mattered: without it the log-probs are far from TRL's.
    from dataclasses import replace
    policy.loss_config = replace(policy.loss_config, softcap=None)
    with torch.no_grad():
        uncapped = policy({"input_ids": input_ids, "attention_mask": attention_mask,
                           "labels": labels}, logps_only=True)
    assert (uncapped - sequence.detach()).abs().max() > 1.0


def test_check_device_names_the_option_and_what_is_wrong():
    from mixpo.hf.loading import check_device

    assert check_device("cpu") == torch.device("cpu")
    for name, message in (("bogus", "^--model-device 'bogus' is not a device; use cpu, cuda"),
                          ("meta", "^--model-device 'meta': models run on cpu, cuda, mps, xpu"),
                          ("cuda:99", "^--model-device cuda:99: ")):
        with pytest.raises(ValueError, match=message):
            check_device(name, "--model-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device cuda: cuda is not available on this "
                                             r"machine.*; use --device cpu$"):
            check_device("cuda")


@pytest.mark.parametrize("shards", [1, 3])
def test_a_truncated_safetensors_file_is_named(tmp_path, shards):
    from mixpo.hf.loading import load_causal_lm, load_pretrained

    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="20KB" if shards > 1 else "1GB")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) >= shards
    broken = files[-1]
    with open(broken, "r+b") as handle:
        handle.truncate(broken.stat().st_size - 100)
    message = (rf"^cannot load a causal LM from '{tmp_path}': {broken} is truncated or damaged "
               r"\(Error while deserializing header: .*\); download or save it again$")
    with pytest.raises(ValueError, match=message):
        load_causal_lm(str(tmp_path), torch.float32, "sdpa")
    import transformers
    with pytest.raises(ValueError, match=message.replace("a causal LM", "a model")):
        load_pretrained(transformers.AutoModelForCausalLM, str(tmp_path), "model")


def test_flash_attention_without_flash_attn_falls_back_to_sdpa(tmp_path, monkeypatch):
    import importlib.util

    from mixpo.hf import loading

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.warns(UserWarning, match=r"^attn_implementation flash_attention_2: it runs on "
                                         r"CUDA GPUs only, this run is on cpu; using sdpa"):
        assert loading.attention_implementation("flash_attention_2", cpu) == "sdpa"
    assert loading.attention_implementation("eager", cpu) == "eager"
    assert loading.attention_implementation("auto", cpu) == "sdpa"
    installed = {"flash_attn": importlib.util.find_spec("torch")}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: installed.get(name))
    assert loading.attention_implementation("flash_attention_2", cuda) == "flash_attention_2"
    assert loading.attention_implementation("auto", cuda) == "flash_attention_2"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.warns(UserWarning, match="the flash-attn package is not installed; using sdpa"):
        assert loading.attention_implementation("flash_attention_2", cuda) == "sdpa"
    monkeypatch.undo()
    # Asked for at load time (flash-attn missing or unusable: transformers' ImportError).
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="^attn_implementation flash_attention_2: .*using sdpa"):
        model = loading.load_causal_lm(str(tmp_path), torch.float32, "flash_attention_2")
    assert model.config._attn_implementation == "sdpa"


def test_a_lora_on_the_head_is_refused_unless_disabled_or_merged():
    """PreferenceModel reads lm_head.weight, so an active LoRA on the head would silently be
    ignored: refused in one line; with the adapter disabled or merged the model's own logits
    are what the loss reads, and the logps agree with them."""
    peft = pytest.importorskip("peft")
    from mixpo.data.collate import PreferenceCollator

    model = tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"],
                                                      init_lora_weights=False))
    policy = PreferenceModel(lora)
    batch = PreferenceCollator(0)(tokenized_pairs(LENGTHS["ragged"]))
    with pytest.raises(ValueError, match="lm_head carries an active PEFT adapter"):
        policy(batch, logps_only=True)
    with lora.disable_adapter():
        plain = policy(batch, logps_only=True)
    merged = PreferenceModel(lora.merge_and_unload())(batch, logps_only=True)
    assert (merged - plain).abs().max() > 1e-3          # the adapter changes the head

    def model_logps(causal_lm):
        with torch.no_grad():
            logits = causal_lm(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (token * mask).sum(-1)

    torch.testing.assert_close(merged, model_logps(lora), rtol=1e-5, atol=1e-4)
