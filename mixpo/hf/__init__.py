"""The Hugging Face layer shared by scoring and training: loading models and tokenizers
(`loading`), and the policy whose forward ends in mixpo's logit-free loss (`policy`)."""
