"""mixpo inside other training stacks: `mixpo.integrations.trl` (MixpoDPOConfig,
MixpoDPOTrainer; needs `pip install mixpo[trl]`). Imported explicitly, never by `import mixpo`."""
