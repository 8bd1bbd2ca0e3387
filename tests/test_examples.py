"""examples/: the accelerate configs for DeepSpeed ZeRO-3 and FSDP2 load with accelerate's own
reader and describe the layouts the 2-process tests run (tests/deepspeed_trl_worker.py,
tests/fsdp2_trl_worker.py), and examples/mixpo_dpo.py trains from its command line (one CPU
process, a tiny model and a .jsonl file)."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
accelerate = pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(EXAMPLES / "accelerate" / name))


def test_zero3_config_is_the_tested_zero3():
    from deepspeed_trl_worker import deepspeed_config

    config = load("zero3.yaml")
    assert config.distributed_type == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == deepspeed_config(3)["zero_optimization"][
        "stage"] == 3
    assert config.mixed_precision == "bf16"


def test_fsdp2_config_is_the_tested_layout():
    from fsdp2_trl_worker import FSDP2_LAYOUT

    config = load("fsdp2.yaml").fsdp_config
    assert load("fsdp2.yaml").distributed_type == "FSDP"
    assert config["fsdp_version"] == FSDP2_LAYOUT["fsdp_version"]
    assert config["fsdp_auto_wrap_policy"].lower() == FSDP2_LAYOUT["auto_wrap_policy"]
    assert config["fsdp_reshard_after_forward"] is FSDP2_LAYOUT["reshard_after_forward"]


@pytest.mark.usefixtures("one_thread")
def test_example_script_trains_from_its_command_line(tmp_path):
    from fixtures import build_tiny_causal_lm, build_tiny_tokenizer
    from test_integration_trl import rows

    data = rows()
    tokenizer = build_tiny_tokenizer([value for row in data for value in row.values()
                                      if isinstance(value, str)], chat_template=False)
    build_tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))
    sys.path.insert(0, str(EXAMPLES))
    try:
        import mixpo_dpo
    finally:
        sys.path.remove(str(EXAMPLES))
    trainer = mixpo_dpo.main([
        "--model_name_or_path", str(tmp_path / "model"),
        "--dataset_name", str(tmp_path / "pairs.jsonl"), "--output_dir", str(tmp_path / "out"),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "--bf16", "false",
        "--report_to", "none", "--max_length", "64", "--save_strategy", "no",
        "--logging_steps", "1", "--route_below", "0.5", "--beta", "0.1"])
    assert trainer._routing and trainer._curriculum and trainer.args.beta == 0.1
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    assert (tmp_path / "out" / "model.safetensors").is_file()
