"""Everything before the loss: formats, pair construction, difficulty, order, selection,
routing (mixpo.data.* modules) and tokenization/collation/sampling for training."""
