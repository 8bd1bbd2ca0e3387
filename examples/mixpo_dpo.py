"""MixpoDPOTrainer from the command line: trl's DPO script with mixpo's config and trainer.
Every DPOConfig and ModelConfig option keeps its trl name; mixpo adds its own (route_below,
adaptive_margin, order, padding_free, ...: `python examples/mixpo_dpo.py --help`).

    accelerate launch --config_file examples/accelerate/zero3.yaml examples/mixpo_dpo.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --output_dir out --bf16 \\
        --beta 0.01 --route_below 0.5 --precompute_ref_log_probs

`--dataset_name` is a Hub dataset or a local .jsonl / .json / .parquet file or a directory
written by `save_to_disk` (e.g. by `mixpo data prepare`): loaded through the datasets library
so its files lie on disk (trl caches precomputed reference log-probs next to them).
"""
import os

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_train_split(script_args):
    import datasets

    name = script_args.dataset_name
    if os.path.isdir(name):
        dataset = datasets.load_from_disk(name)
    elif os.path.splitext(name)[1].lower() in LOCAL_FORMATS:
        dataset = datasets.load_dataset(LOCAL_FORMATS[os.path.splitext(name)[1].lower()],
                                        data_files={script_args.dataset_train_split: name})
    else:
        dataset = datasets.load_dataset(name, name=script_args.dataset_config)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[script_args.dataset_train_split]
    return dataset


def main(argv=None):
    parser = TrlParser((ScriptArguments, MixpoDPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision, "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        **(training_args.model_init_kwargs or {})}
    trainer = MixpoDPOTrainer(model=model_args.model_name_or_path, args=training_args,
                              train_dataset=load_train_split(script_args),
                              peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
