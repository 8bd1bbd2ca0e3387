"""The data layer's vocabularies, each defined once with its help text: difficulty kinds,
row orders and pair-construction strategies. The standard library only, so command-line
parsers and the training config read them without loading the data stack."""
from __future__ import annotations

from typing import NamedTuple

class DifficultyKind(NamedTuple):
    """What a difficulty kind is (its help text) and its histogram axis label."""

    help: str
    label: str


# kind -> what the difficulty is (bigger = easier for every kind), and its axis label.
DIFFICULTY_KINDS = {
    "rating": DifficultyKind("rating margin score_chosen - score_rejected (MixDPO)",
                             "rating margin"),
    "reward": DifficultyKind("reward-model margin reward_chosen - reward_rejected (after "
                             "`mixpo data score-reward`)", "reward margin"),
    "validation-loss": DifficultyKind("minus the validation DPO loss (Selective DPO, after "
                                      "`mixpo data score-validation`)",
                                      "- validation DPO loss"),
    "embedding": DifficultyKind("cosine distance between the chosen and rejected responses' "
                                "embeddings (MixDPO section 6, after `mixpo data "
                                "score-embedding`, or `prepare --embedding-model DIR`)",
                                "embedding distance"),
}
DIFFICULTY_LABELS = {kind: spec.label for kind, spec in DIFFICULTY_KINDS.items()}  # a view

# order -> how the rows are fed (MixDPO and Selective DPO both train without shuffling).
ORDERS = {
    "easy-first": "stable sort by difficulty, easiest first (the curriculum)",
    "as-is": "the file's original order (MixDPO's 'shuffled' ablation: routing kept, "
             "curriculum off)",
    "shuffle": "a seeded random permutation (not what MixDPO calls 'shuffled')",
}

# strategy -> which completion becomes the rejected response (chosen = the best one).
PAIR_STRATEGIES = {
    "best-worst": "rejected = the worst-scored other completion",
    "best-random": "rejected = a uniformly random other completion",
    "best-mu2sigma": "rejected = the completion nearest mean - 2 std of the scores",
}


def describe(vocabulary: dict) -> str:
    """'a: what a is; b: ...' for help texts (a value's `help` when it has one)."""
    return "; ".join(f"{name}: {getattr(meaning, 'help', meaning)}"
                     for name, meaning in vocabulary.items())
