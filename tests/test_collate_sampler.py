"""PreferenceCollator layout and CurriculumSampler order, sharding and resume."""
import pytest
import torch

from mixpo.data.collate import PreferenceCollator
from mixpo.data.sampler import CurriculumSampler
from mixpo.data.tokenize import IGNORE_INDEX


def example(prompt, chosen, rejected, **columns):
    return {"chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected,
            "chosen_labels": [IGNORE_INDEX] * len(prompt) + chosen,
            "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected,
            "prompt_length": len(prompt), **columns}


def test_collator_puts_chosen_rows_first_and_pads_right():
    batch = PreferenceCollator(pad_token_id=0)([
        example([5, 6], [7], [8, 9, 10], hard=True, score_chosen=9.0, score_rejected=9.0,
                ref_chosen_logps=-1.5, ref_rejected_logps=-2.5),
        example([5], [11, 12], [13], hard=False, score_chosen=8.0, score_rejected=2.0,
                ref_chosen_logps=-3.0, ref_rejected_logps=-4.0),
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 11, 12, 0, 0],
                                           [5, 6, 8, 9, 10], [5, 13, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0],
                                                [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, -100, -100], [-100, 11, 12, -100, -100],
                                        [-100, -100, 8, 9, 10], [-100, 13, -100, -100, -100]]
    assert batch["hard"].dtype == torch.bool and batch["hard"].tolist() == [True, False]
    assert batch["score_chosen"].tolist() == [9.0, 8.0]
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -3.0]
    assert batch["ref_rejected_logps"].dtype == torch.float32
    assert "difficulty" not in batch


def test_collator_rounds_length_and_refuses_partial_columns():
    batch = PreferenceCollator(pad_token_id=3, pad_to_multiple_of=4)([example([1], [2], [2])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 3], [1, 2, 3, 3]]
    with pytest.raises(ValueError, match="'hard' is set on some pairs"):
        PreferenceCollator(0)([example([1], [2], [2], hard=True), example([1], [2], [2])])


def test_global_batch_k_covers_rows_k_times_g_in_order_on_any_world_size():
    rows, global_batch = 40, 8
    single = CurriculumSampler(rows, global_batch, micro_batch_size=2)
    assert single.total_steps == 5 and single.accumulation_steps == 4
    for step in range(5):
        expected = list(range(step * 8, step * 8 + 8))
        assert sum(single.micro_batches(step), []) == expected
        # Two ranks: contiguous halves, in rank order; micro-batches of 2 -> 2 accumulated.
        ranks = [CurriculumSampler(rows, global_batch, 2, world_size=2, rank=r) for r in (0, 1)]
        assert ranks[0].accumulation_steps == 2
        assert sum(ranks[0].micro_batches(step) + ranks[1].micro_batches(step), []) == expected
        assert ranks[1].micro_batches(step) == [expected[4:6], expected[6:8]]
        assert ranks[0].step(step).pairs == 8


def test_last_incomplete_batch_is_kept_by_default_and_shared_over_ranks():
    # 21 rows, global batch 8: steps of 8, 8 and a last one of the 5 hardest rows.
    single = CurriculumSampler(21, 8, 2)
    assert single.steps_per_epoch == 3 and single.last_batch_rows == 5
    last = single.step(2)
    assert last.pairs == 5 and last.micro_batches == [[16, 17], [18, 19], [20]]
    # Two ranks: 3 + 2 rows, and the same number of micro-batches (2) on both.
    ranks = [CurriculumSampler(21, 8, 2, world_size=2, rank=r).step(2) for r in (0, 1)]
    assert ranks[0].micro_batches == [[16, 17], [18]]
    assert ranks[1].micro_batches == [[19, 20], []]          # an empty stand-in
    assert ranks[0].pairs == ranks[1].pairs == 5
    # Four ranks and a last batch of one row: three ranks run a stand-in only.
    tiny = [CurriculumSampler(17, 8, 2, world_size=4, rank=r).step(2) for r in range(4)]
    assert [s.micro_batches for s in tiny] == [[[16]], [[]], [[]], [[]]]
    dropped = CurriculumSampler(21, 8, 2, drop_last=True)
    assert dropped.steps_per_epoch == 2 and dropped.dropped_rows_per_epoch == 5


def test_resume_epochs_and_tail():
    sampler = CurriculumSampler(num_rows=21, global_batch_size=4, micro_batch_size=4,
                                num_epochs=2, drop_last=True)
    assert (sampler.steps_per_epoch, sampler.total_steps) == (5, 10)
    assert sampler.dropped_rows_per_epoch == 1
    full = [(step.index, step.micro_batches) for step in sampler]
    assert full[5] == (5, [[0, 1, 2, 3]])  # the second epoch repeats the curriculum
    resumed = CurriculumSampler(21, 4, 4, num_epochs=2, drop_last=True)
    resumed.load_state_dict({**sampler.state_dict(), "start_step": 7})
    assert [(step.index, step.micro_batches) for step in resumed] == full[7:]
    assert len(resumed) == 3
    assert len(list(CurriculumSampler(21, 4, 4, max_steps=12))) == 12
    kept = CurriculumSampler(21, 4, 4, num_epochs=2)
    assert kept.total_steps == 12 and kept.step(5).micro_batches == [[20]]
    with pytest.raises(ValueError, match="num_rows=21"):
        CurriculumSampler(22, 4, 4, drop_last=True).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="drop_last"):        # old checkpoints dropped it
        kept.load_state_dict({"start_step": 2, "num_rows": 21, "global_batch_size": 4})


def test_sampler_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="multiple of ranks"):
        CurriculumSampler(100, 10, 4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        CurriculumSampler(7, 8, 2, drop_last=True)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        CurriculumSampler(16, 8, 2, world_size=2, rank=2)
