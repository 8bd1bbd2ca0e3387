"""Everything before the model: load formats (`io`, `formats`), build pairs (`pairs`), rating
difficulty, order, selection and routing (`difficulty`, vocabularies in `kinds`), a look at
the margins (`inspect`), and the training input: tokenization (`tokenize`), collation
(`collate`) and the sequential curriculum sampler (`sampler`).

This layer imports no model code: model-based difficulty lives in `mixpo.scoring`. Import
the submodules directly (`from mixpo.data.difficulty import prepare_dataset`); this package
imports nothing itself, so `mixpo.data.kinds` stays cheap.
"""
