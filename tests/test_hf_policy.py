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
        ours = policy(input_ids, attention_mask, labels, logps_only=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    want = (token * (labels[:, 1:] != -100)).sum(1)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-4)
    if kind != "llama":   # the plain-head log-probs differ: the transform was needed
        plain = PreferenceModel(tiny_model("llama"))
        plain.causal_lm = model
        from dataclasses import replace
        plain.loss.config = replace(plain.loss.config, logit_scale=1.0, softcap=None)
        with torch.no_grad():
            untransformed = plain(input_ids, attention_mask, labels, logps_only=True)
        assert (untransformed - want).abs().max() > 1e-2
