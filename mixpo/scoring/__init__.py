"""Model-based difficulty of preference pairs, written as columns that `mixpo data prepare`
reads: the validation DPO loss of held-out reference models (Selective DPO, `validation`), a
reward model's margin (MixDPO's reward variant, `reward`) and the embedding distance of the
two responses (MixDPO section 6, `embedding`).

Only constants live here, so the command-line parsers read them without loading torch."""

# The Selective DPO authors' LoRA targets (glorgao/SelectiveDPO `curriculum-lens/recipes`);
# those a model has are adapted.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj")
