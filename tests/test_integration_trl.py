"""mixpo inside trl 1.16: MixpoDPOTrainer against stock trl.DPOTrainer on a tiny random Llama
(step-0 loss and gradients per shared loss type), a short run with routing, adaptive margins
and precomputed reference log-probs that trains, logs, checkpoints and resumes, a LoRA run,
and the curriculum sampler."""
import json
import pickle
import random
import re

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fixtures import WORDS, build_tiny_causal_lm, build_tiny_tokenizer  # noqa: E402
from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer      # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(n=24, seed=0):
    """Standard (string) preference rows with UltraFeedback-style ratings, ties included."""
    rng = random.Random(seed)

    def sentence(low=3, high=7):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    data = []
    for index in range(n):
        rejected_score = rng.choice([2.0, 3.5, 5.0, 6.5])
        gap = 0.0 if index % 4 == 1 else rng.choice([1.0, 2.5, 4.0])
        data.append({"prompt": sentence() + " ", "chosen": sentence(), "rejected": sentence(),
                     "score_chosen": rejected_score + gap, "score_rejected": rejected_score})
    return data


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer([value for row in rows() for value in row.values()
                                 if isinstance(value, str)], chat_template=False)


def make(trainer_class, config_class, tokenizer, tmp_path, model_seed=0, dataset=None,
         **options):
    model = build_tiny_causal_lm(tokenizer, seed=model_seed).train()
    ref_model = None
    if not options.get("precompute_ref_log_probs") and "peft_config" not in options:
        ref_model = build_tiny_causal_lm(tokenizer, seed=model_seed)
    peft_config = options.pop("peft_config", None)
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4,
                    learning_rate=1e-3, max_steps=3, logging_steps=1, save_strategy="no",
                    report_to="none", seed=0, use_cpu=True, max_length=64,
                    gradient_checkpointing=False, bf16=False, dataloader_num_workers=0)
    settings.update(options)
    args = config_class(**settings)
    return trainer_class(model=model, ref_model=ref_model, args=args,
                         train_dataset=dataset or datasets.Dataset.from_list(rows()),
                         processing_class=tokenizer, peft_config=peft_config)


def first_step(trainer):
    """Loss and parameter gradients of the first training batch."""
    trainer.model.zero_grad(set_to_none=True)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(batch)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in trainer.model.named_parameters()
             if param.grad is not None}
    return loss.detach(), grads, batch


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0),
                                                       ("hinge", 0.0), ("robust", 0.1)])
def test_step_zero_equals_stock_dpo_trainer(tokenizer, tmp_path, loss_type, label_smoothing):
    options = dict(loss_type=loss_type, label_smoothing=label_smoothing, beta=0.3,
                   curriculum=False)
    stock = make(trl.DPOTrainer, trl.DPOConfig, tokenizer, tmp_path / "stock",
                 **{k: v for k, v in options.items() if k != "curriculum"})
    ours = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "mixpo", **options)
    stock_loss, stock_grads, stock_batch = first_step(stock)
    our_loss, our_grads, our_batch = first_step(ours)
    assert torch.equal(stock_batch["input_ids"], our_batch["input_ids"])  # same shuffle
    torch.testing.assert_close(our_loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert set(our_grads) == set(stock_grads) and len(our_grads) > 10
    for name, grad in stock_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # TRL's metric names, same values (rewards are TRL's summed ones, ipo included).
    for name in ("rewards/chosen", "rewards/margins", "logps/chosen", "logits/chosen",
                 "entropy", "mean_token_accuracy"):
        assert ours._metrics["train"][name][-1] == pytest.approx(
            stock._metrics["train"][name][-1], rel=1e-4, abs=1e-5), name


def test_step_zero_under_bf16_autocast_agrees_with_stock(tokenizer, tmp_path):
    """fp32 model under bf16 autocast (TRL's bf16=True on an fp32 model, as accelerate wraps
    the forward): both heads compute in bf16, and the gradients agree to bf16 rounding."""
    options = dict(loss_type="sigmoid", beta=0.3)
    stock = make(trl.DPOTrainer, trl.DPOConfig, tokenizer, tmp_path / "stock", **options)
    ours = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "mixpo",
                curriculum=False, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock_loss, stock_grads, _ = first_step(stock)
        our_loss, our_grads, _ = first_step(ours)
    assert our_loss.dtype == torch.float32
    torch.testing.assert_close(our_loss, stock_loss, rtol=2e-2, atol=1e-3)
    for name, grad in stock_grads.items():
        error = (our_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert error < 2e-2, (name, error.item())      # measured: 6e-3


@pytest.mark.parametrize("precompute", [False, True])
def test_bf16_training_runs_body_and_head_under_autocast(tokenizer, tmp_path, monkeypatch,
                                                         precompute):
    """trl's bf16=True on an fp32 model: accelerate's mixed precision wraps the model's
    forward, and mixpo's head branch (which runs the body itself) must stay inside it: the
    loss sees bf16 activations from the body, reference pass and training steps alike."""
    import mixpo.integrations.trl as integration

    seen = []

    def recording(function):
        def wrapper(hidden, *args, **kwargs):
            seen.append((function.__name__, torch.is_autocast_enabled("cpu"), hidden.dtype))
            return function(hidden, *args, **kwargs)
        return wrapper

    for name in ("linear_loss", "sequence_logps"):
        monkeypatch.setattr(integration, name, recording(getattr(integration, name)))
    # A hook on the body's first MLP records the dtype the body computes in.
    body_dtypes = []
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, bf16=True,
                   max_steps=1, precompute_ref_log_probs=precompute)
    trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, inputs, output: body_dtypes.append(output.dtype))
    trainer.train()
    assert [call[0] for call in seen].count("linear_loss") == 1
    assert all(autocast for _, autocast, _ in seen), seen
    assert "sequence_logps" in [call[0] for call in seen]    # reference: live or precomputed
    assert body_dtypes and set(body_dtypes) == {torch.bfloat16}, body_dtypes
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def tiny_mixtral(tokenizer, seed=0):
    """A random 2-layer Mixtral (4 experts, top-2) with a load-balancing coefficient."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.05, max_position_embeddings=256,
                           pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MixtralForCausalLM(config)


def test_moe_router_aux_loss_equals_stock_dpo_trainer(tokenizer, tmp_path):
    """trl 1.16 adds router_aux_loss_coef * aux_loss for MoE models: mixpo's head adds the
    same term from the body's router logits (padded and padding-free alike)."""
    results = {}
    for name, trainer_class, config_class, extra in (
            ("stock", trl.DPOTrainer, trl.DPOConfig, {}),
            ("mixpo", MixpoDPOTrainer, MixpoDPOConfig, {"curriculum": False}),
            ("packed", MixpoDPOTrainer, MixpoDPOConfig, {"curriculum": False,
                                                          "padding_free": True}),
            ("shared", MixpoDPOTrainer, MixpoDPOConfig, {"curriculum": False,
                                                          "padding_free": True,
                                                          "prefix_sharing": True})):
        args = config_class(output_dir=str(tmp_path / name), per_device_train_batch_size=4,
                            max_steps=1, save_strategy="no", report_to="none", seed=0,
                            use_cpu=True, max_length=64, bf16=False, beta=0.3,
                            dataloader_num_workers=0, **extra)
        trainer = trainer_class(model=tiny_mixtral(tokenizer).train(),
                                ref_model=tiny_mixtral(tokenizer), args=args,
                                train_dataset=datasets.Dataset.from_list(rows()),
                                processing_class=tokenizer)
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.05
        loss, grads, _ = first_step(trainer)
        results[name] = (loss, grads, trainer._metrics["train"]["aux_loss"][-1])
    stock_loss, stock_grads, stock_aux = results["stock"]
    assert stock_aux > 1.0                          # a real term: about num_experts_per_tok
    for name in ("mixpo", "packed", "shared"):      # shared rows weigh prompt tokens twice
        loss, grads, aux = results[name]
        assert aux == pytest.approx(stock_aux, rel=1e-6), name
        torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
        for parameter, grad in stock_grads.items():
            torch.testing.assert_close(grads[parameter], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{name} {parameter}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_padding_free_and_prefix_sharing_equal_padded(tokenizer, tmp_path, loss_type):
    options = dict(loss_type=loss_type, beta=0.3, curriculum=True, ld_alpha=0.5,
                   route_below=1.0, sft_weight=0.1)
    padded = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "padded", **options)
    padded_loss, padded_grads, _ = first_step(padded)
    metrics = {name: values[-1] for name, values in padded._metrics["train"].items()}
    for name, extra in (("packed", {}), ("shared", {"prefix_sharing": True})):
        ours = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / name,
                    padding_free=True, **extra, **options)
        assert ours._padding_free and not ours.args.padding_free   # TRL's switch stays off
        loss, grads, _ = first_step(ours)
        torch.testing.assert_close(loss, padded_loss, rtol=1e-5, atol=1e-6)
        for parameter, grad in padded_grads.items():
            torch.testing.assert_close(grads[parameter], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{name} {parameter}")
        for metric, value in metrics.items():
            assert ours._metrics["train"][metric][-1] == pytest.approx(
                value, rel=1e-4, abs=1e-5), (name, metric)


def test_prefix_sharing_needs_padding_free(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="prefix_sharing needs padding_free=True"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, prefix_sharing=True)


def test_routing_margins_curriculum_checkpoint_interrupted_save_and_resume(tokenizer, tmp_path,
                                                                           monkeypatch, caplog):
    """MixDPO routing + gamma-PO + precomputed reference through TRL's loop, easy-first: the
    6 tied pairs come last, so the routed fraction per step is 0, 0, 0, 0, 0.5, 1. The save
    of checkpoint-6 is interrupted where a kill would leave it (after the model, optimizer
    and RNG states, before mixpo's solver state and trainer_state.json). A path to it is
    refused naming what is missing and the checkpoint to use; resume_from_checkpoint=True
    falls back to checkpoint-4 and retrains steps 5-6 exactly; a solver-state file that is a
    code-running pickle is refused, never unpickled."""
    import mixpo.integrations.trl as integration

    options = dict(loss_type="sigmoid", beta=0.1, route_below=0.5, adaptive_margin=True,
                   gamma=0.5, precompute_ref_log_probs=True, max_steps=6, save_strategy="steps",
                   save_steps=2)
    run = tmp_path / "run"
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, run, **options)
    gaps = [row["score_chosen"] - row["score_rejected"] for row in rows()]
    order = sorted(range(len(gaps)), key=lambda index: -gaps[index])       # stable, easy-first
    assert trainer.train_dataset["hard"] == [gaps[index] < 0.5 for index in order]
    assert trainer._curriculum

    save = integration.save_margin_state

    def killed_at_step_6(margin, folder, rank):
        if folder.endswith("checkpoint-6"):
            raise KeyboardInterrupt("killed while saving checkpoint-6")
        save(margin, folder, rank)

    monkeypatch.setattr(integration, "save_margin_state", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(integration, "save_margin_state", save)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["routing/sft_fraction"] for entry in logged] == [0, 0, 0, 0, 0.5, 1.0]
    assert any(entry["gamma/std"] > 0 for entry in logged)
    assert "ref_chosen_logps" in trainer.train_dataset[0]
    interrupted = run / "checkpoint-6"
    assert (interrupted / "model.safetensors").is_file()
    assert not (interrupted / "trainer_state.json").exists()
    assert not (interrupted / "mixpo_margin_rank0.pt").exists()
    saved = torch.load(run / "checkpoint-2" / "mixpo_margin_rank0.pt", weights_only=True)
    assert len(saved["queue"]) == 8 + 2 * 4            # initial queue + two steps of 4 gaps
    losses = [entry["loss"] for entry in logged]

    resumed = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, run, **options)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-6: trainer_state.json "
                       r"is missing: its save was interrupted; resume from .*checkpoint-4"):
        resumed.train(resume_from_checkpoint=str(interrupted))
    caplog.clear()
    resumed.train(resume_from_checkpoint=True)
    assert re.search(r"not resuming from \S*checkpoint-6 .*resuming from \S*checkpoint-4",
                     caplog.text)
    again = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
    assert len(again) == 6      # steps 1-4 from the checkpoint's history, 5-6 trained again
    assert again[4:] == pytest.approx(losses[4:], rel=1e-5)
    assert len(resumed._margin.queue) == 8 + 6 * 4

    # A checkpoint with its trainer state but no solver state: named, with its causes.
    (run / "checkpoint-4" / "mixpo_margin_rank0.pt").unlink()
    with pytest.raises(ValueError, match="checkpoint-4: mixpo_margin_rank0.pt missing .*"
                       "interrupted, or the run that wrote it had no adaptive_margin"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, run, **options).train(
            resume_from_checkpoint=str(run / "checkpoint-4"))

    # A solver-state file that runs code when unpickled is refused, in one line, by name.
    marker = tmp_path / "code-ran"
    with open(run / "checkpoint-2" / "mixpo_margin_rank0.pt", "wb") as handle:
        pickle.dump(_RunsCode(str(marker)), handle)          # a bare pickle
    with pytest.raises(ValueError, match=r"^\S*checkpoint-2/mixpo_margin_rank0.pt: not a "
                       r"gamma-PO solver state mixpo wrote \([^\n]*\)$"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, run, **options).train(
            resume_from_checkpoint=str(run / "checkpoint-2"))
    torch.save({"queue": [], "x": _RunsCode(str(marker))},    # torch's own format
               run / "checkpoint-2" / "mixpo_margin_rank0.pt")
    with pytest.raises(ValueError, match=r"^\S*checkpoint-2/mixpo_margin_rank0.pt: refused: it "
                       r"holds Python objects other than tensors"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, run, **options).train(
            resume_from_checkpoint=str(run / "checkpoint-2"))
    assert not marker.exists()


class _RunsCode:
    """Unpickling this creates a file: what a crafted checkpoint file could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_curriculum_is_prepare_s_easy_first_order_unless_asked(tokenizer, tmp_path, caplog):
    """The default curriculum is `mixpo data prepare`'s order (same difficulty, same stable
    sort), whether the data was prepared or not; order="as-is" keeps the dataset's order;
    the log says which; what cannot be ordered is refused by name."""
    from mixpo.data.difficulty import prepare_dataset

    raw = datasets.Dataset.from_list(rows())
    prepared, _ = prepare_dataset(raw, route_below=0.5)
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "a", route_below=0.5)
    assert trainer.train_dataset["prompt_ids"] == [tokenizer(prompt)["input_ids"]
                                                  for prompt in prepared["prompt"]]
    assert "curriculum on: easy-first by rating difficulty" in caplog.text
    # A file prepared in its own order is re-sorted by its difficulty column, unless as-is.
    as_is, _ = prepare_dataset(raw, order="as-is")
    caplog.clear()
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "b", dataset=as_is)
    assert trainer.train_dataset["difficulty"] == prepared["difficulty"]
    assert "easy-first by the dataset's `difficulty` column" in caplog.text
    caplog.clear()
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "c", dataset=as_is,
                   order="as-is")
    assert trainer.train_dataset["difficulty"] == as_is["difficulty"]
    assert "the dataset's own order (order='as-is')" in caplog.text
    with pytest.raises(ValueError, match="order='easy-first' is the curriculum's order; with "
                       "curriculum=False TRL shuffles"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "d", curriculum=False,
             order="easy-first")
    unscored = raw.remove_columns(["score_chosen", "score_rejected"]).add_column(
        "flag", [index % 4 == 1 for index in range(len(raw))])
    with pytest.raises(ValueError, match="the curriculum orders pairs easy-first by "
                       "difficulty, and .*; pass order='as-is'"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "e", dataset=unscored,
             routing_column="flag")


def test_routing_column_is_type_checked_and_not_used_unless_asked(tokenizer, tmp_path):
    data = rows()
    for row in data:
        row["hard"] = "false"                 # strings would route every pair
    with pytest.raises(ValueError, match="routing flags must be true/false"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "a", routing_column="hard",
             dataset=datasets.Dataset.from_list(data))
    for row in data:
        row["hard"] = True
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path / "b",
                   dataset=datasets.Dataset.from_list(data), curriculum=False)
    assert "hard" not in trainer.train_dataset.column_names   # no routing configured


def test_curriculum_sampler_yields_dataset_order(tokenizer, tmp_path):
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, curriculum=True,
                   order="as-is", per_device_train_batch_size=5)
    batches = list(trainer.get_train_dataloader())
    data = rows()
    first_ids = tokenizer(data[0]["prompt"] + data[0]["chosen"])["input_ids"]
    assert batches[0]["input_ids"][0, :len(first_ids)].tolist() == first_ids
    assert [len(batch["input_ids"]) // 2 for batch in batches] == [5, 5, 5, 5, 4]  # kept


def test_lora_run_trains_the_adapters(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.0)
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, peft_config=config,
                   beta=0.1, learning_rate=5e-3, max_steps=3)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()
              if "lora_B" in name}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and any(not torch.equal(after[name], value) for name, value in before.items())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # adapters start at 0


def test_unknown_loss_type_is_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="loss_type must be one of .* got 'kto'"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, loss_type="kto")


def test_precompute_with_several_processes_needs_datasets_on_disk(tokenizer, tmp_path,
                                                                  monkeypatch):
    from types import SimpleNamespace

    from mixpo.integrations.trl_data import check_precompute_cache

    monkeypatch.setattr(MixpoDPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="precompute_ref_log_probs with 2 processes needs"):
        make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path,
             precompute_ref_log_probs=True)
    datasets.Dataset.from_list(rows()).save_to_disk(str(tmp_path / "data"))
    on_disk = datasets.load_from_disk(str(tmp_path / "data"))
    args = SimpleNamespace(precompute_ref_log_probs=True, world_size=2)
    check_precompute_cache(args, on_disk, {"test": on_disk}, None)        # accepted
    with pytest.raises(ValueError, match="in-memory"):
        check_precompute_cache(args, on_disk, {"test": datasets.Dataset.from_list(rows())})
    check_precompute_cache(SimpleNamespace(precompute_ref_log_probs=True, world_size=1),
                            datasets.Dataset.from_list(rows()))             # one process: fine
    datasets.disable_caching()            # every map then writes to a per-process temp folder
    try:
        with pytest.raises(ValueError, match="needs datasets with files on disk"):
            check_precompute_cache(args, on_disk)
    finally:
        datasets.enable_caching()
    # The check also guards trl's own tokenized copy, right before the reference pass.
    with pytest.raises(ValueError, match="in-memory"):
        MixpoDPOTrainer._precompute_ref_logps(SimpleNamespace(args=args),
                                              datasets.Dataset.from_list(rows()), "train", 4)


def test_mixpo_metrics_are_json_serialisable(tokenizer, tmp_path):
    trainer = make(MixpoDPOTrainer, MixpoDPOConfig, tokenizer, tmp_path, max_steps=1)
    trainer.train()
    json.dumps(trainer.state.log_history)


def test_the_readme_snippet_runs_on_a_cpu(tokenizer, tmp_path, monkeypatch):
    """The README's "Inside TRL" block, as written, on a tiny model and rated rows."""
    readme = (__import__("pathlib").Path(__file__).resolve().parent.parent / "README.md")
    blocks = re.findall(r"```python\n(.*?)\n```", readme.read_text(), re.S)
    snippet = next(block for block in blocks if "MixpoDPOTrainer(model=model" in block)
    monkeypatch.chdir(tmp_path)
    scope = {"model": build_tiny_causal_lm(tokenizer).train(), "tokenizer": tokenizer,
             "dataset": datasets.Dataset.from_list(rows(8))}
    exec(snippet, scope)
    state = scope["trainer"].state
    assert not scope["args"].bf16 and state.global_step > 0
    assert torch.isfinite(torch.tensor(state.log_history[-1]["train_loss"]))


def test_the_callers_args_build_the_same_trainer_twice(tokenizer, tmp_path):
    args = MixpoDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                          report_to="none", use_cpu=True, bf16=False, max_length=64,
                          padding_free=True, curriculum=False)
    for _ in range(2):
        trainer = MixpoDPOTrainer(model=build_tiny_causal_lm(tokenizer),
                                  ref_model=build_tiny_causal_lm(tokenizer), args=args,
                                  train_dataset=datasets.Dataset.from_list(rows(8)),
                                  processing_class=tokenizer)
        assert trainer._padding_free and args.padding_free
