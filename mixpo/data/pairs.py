"""Build preference pairs from prompts with several scored completions.

Input rows look like raw UltraFeedback: a prompt (`instruction` or `prompt`) and a list of
completions, each with a response text and a score (`completions[{response, overall_score}]`).
Output rows follow the UltraFeedback-binarized schema: `prompt` (as given), `chosen` and
`rejected` as conversations [{"role": "user", ...}, {"role": "assistant", ...}],
`score_chosen`, `score_rejected`; one pair per prompt, in input order, other input columns
kept (the completions list itself is dropped).

Strategies (chosen is always the best-scored completion, the first one on ties):
- `best-worst`: rejected = the worst-scored other completion.
- `best-random`: rejected = a uniformly random other completion (UltraFeedback-binarized).
- `best-mu2sigma`: rejected = the other completion whose score is nearest mean - 2 std of
  the prompt's scores (population std). The pair-construction review (Xiao et al., "Finding
  the Sweet Spot", ACL 2025) finds this beats best-worst, whose rejected is often a
  degenerate outlier, the more so as completions per prompt grow.
"""
from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from mixpo.data.formats import COMPLETIONS_COLUMN, PROMPT_COLUMNS, check_score
from mixpo.data.io import RowNamer, default_row_names
from mixpo.data.kinds import PAIR_STRATEGIES

RESPONSE_KEYS = ("response", "text", "completion", "content")
SCORE_KEYS = ("overall_score", "score", "rating", "reward")
OUTPUT_COLUMNS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")


@dataclass(frozen=True)
class PairsSummary:
    """What `build_pairs` did: prompts read, pairs written, prompts dropped and why."""

    prompts: int
    pairs: int
    too_few_completions: int
    below_min_margin: int
    ties: int
    strategy: str

    def line(self) -> str:
        return (f"pairs ({self.strategy}): {self.prompts} prompts in, {self.pairs} pairs out; "
                f"dropped {self.too_few_completions} with <2 completions, "
                f"{self.below_min_margin} below --min-margin; {self.ties} tied pairs")


def _pick_key(completion: dict, candidates: tuple[str, ...], given: str | None,
              where: str, what: str) -> str:
    if given is not None:
        if given not in completion:
            raise ValueError(f"{where}: completion has no {given!r} key "
                             f"(keys: {sorted(completion)})")
        return given
    for key in candidates:
        if key in completion:
            return key
    raise ValueError(f"{where}: completion has no {what} key ({'/'.join(candidates)}); "
                     f"keys: {sorted(completion)}")


def choose_pair(scores: np.ndarray, strategy: str, rng: np.random.Generator) -> tuple[int, int]:
    """Indices (chosen, rejected) among one prompt's completion `scores` (at least two).

    The rejected index is never the chosen one; ties go to the earliest completion.
    """
    chosen = int(np.argmax(scores))
    others = np.array([i for i in range(len(scores)) if i != chosen])
    if strategy == "best-worst":
        rejected = others[int(np.argmin(scores[others]))]
    elif strategy == "best-random":
        rejected = others[int(rng.integers(len(others)))]
    elif strategy == "best-mu2sigma":
        target = scores.mean() - 2.0 * scores.std()
        rejected = others[int(np.argmin(np.abs(scores[others] - target)))]
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(PAIR_STRATEGIES)}")
    return chosen, int(rejected)


def _conversation(prompt, response: str) -> list[dict]:
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = list(prompt)
    return prompt_messages + [{"role": "assistant", "content": response}]


def build_pairs(dataset: datasets.Dataset, strategy: str = "best-mu2sigma",
                min_margin: float | None = None, seed: int = 0,
                row_names: RowNamer = default_row_names, response_key: str | None = None,
                score_key: str | None = None) -> tuple[datasets.Dataset, PairsSummary]:
    """One (chosen, rejected) pair per prompt from multi-completion rows.

    Args:
        dataset: rows with a prompt column (`instruction` or `prompt`) and `completions`, a
            list of dicts holding a response (`response`/`text`/...) and a score
            (`overall_score`/`score`/...).
        strategy: 'best-worst', 'best-random' or 'best-mu2sigma' (module docstring).
        min_margin: drop pairs with score_chosen - score_rejected below this.
        seed: seeds best-random's draws (one generator walked over rows in input order).
        row_names: names row i in error messages.
        response_key / score_key: completion keys, when not one of the usual names.
    Returns:
        (pairs in the UltraFeedback-binarized schema, in input order; a PairsSummary).
        Prompts with fewer than two completions or below `min_margin` are dropped and counted.
    Raises:
        ValueError naming the row and key for a missing/NaN score or an empty response.
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(PAIR_STRATEGIES)}")
    if COMPLETIONS_COLUMN not in dataset.column_names:
        raise ValueError(f"no {COMPLETIONS_COLUMN!r} column (columns: {dataset.column_names}); "
                         "pairs are built from raw multi-completion rows")
    prompt_column = next((c for c in PROMPT_COLUMNS if c in dataset.column_names), None)
    if prompt_column is None:
        raise ValueError(f"no prompt column ({' or '.join(PROMPT_COLUMNS)}); "
                         f"columns: {dataset.column_names}")
    kept_columns = [c for c in dataset.column_names
                    if c not in (COMPLETIONS_COLUMN, prompt_column) and c not in OUTPUT_COLUMNS]
    rng = np.random.default_rng(seed)
    rows, too_few, below_margin, ties = [], 0, 0, 0
    for index, row in enumerate(dataset):
        where = row_names(index)
        prompt, completions = row[prompt_column], row[COMPLETIONS_COLUMN] or []
        if not (prompt.strip() if isinstance(prompt, str) else isinstance(prompt, list) and prompt):
            raise ValueError(f"{where}, column {prompt_column!r}: empty or missing prompt")
        responses, scores = [], []
        for position, completion in enumerate(completions):
            place = f"{where}, column '{COMPLETIONS_COLUMN}[{position}]'"
            if not isinstance(completion, dict):
                raise ValueError(f"{place}: expected an object, got {completion!r}")
            text_key = _pick_key(completion, RESPONSE_KEYS, response_key, place, "response")
            value_key = _pick_key(completion, SCORE_KEYS, score_key, place, "score")
            text = completion[text_key]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}, column '{COMPLETIONS_COLUMN}[{position}].{text_key}': "
                                 "empty response")
            responses.append(text)
            scores.append(check_score(completion[value_key], where,
                                      f"{COMPLETIONS_COLUMN}[{position}].{value_key}"))
        if len(responses) < 2:
            too_few += 1
            continue
        chosen, rejected = choose_pair(np.array(scores), strategy, rng)
        margin = scores[chosen] - scores[rejected]
        if min_margin is not None and margin < min_margin:
            below_margin += 1
            continue
        ties += margin == 0
        pair = {column: row[column] for column in kept_columns}
        pair.update(prompt=prompt, chosen=_conversation(prompt, responses[chosen]),
                    rejected=_conversation(prompt, responses[rejected]),
                    score_chosen=scores[chosen], score_rejected=scores[rejected])
        rows.append(pair)
    summary = PairsSummary(prompts=len(dataset), pairs=len(rows), too_few_completions=too_few,
                           below_min_margin=below_margin, ties=int(ties), strategy=strategy)
    if not rows:
        raise ValueError(f"no pairs left ({summary.line()})")
    return datasets.Dataset.from_list(rows), summary
