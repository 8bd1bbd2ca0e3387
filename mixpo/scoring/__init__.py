"""Model-based difficulty of preference pairs, written as columns that `mixpo data prepare`
reads: the validation DPO loss of held-out reference models (Selective DPO, `validation`) and
a reward model's margin (MixDPO's reward variant, `reward`)."""
