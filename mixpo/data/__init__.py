"""Everything before the loss: formats, pair construction, difficulty, order, selection,
routing (mixpo.data.* modules) and tokenization/collation/sampling for training."""

# Loading, pair construction, difficulty, order, selection, routing (mixpo data ... commands).
from mixpo.data.difficulty import (compute_difficulty, easy_first_order, prepare_dataset,
                                   route_hard, swap_band)
from mixpo.data.formats import check_preference_rows, detect_format, render_example, split_example
from mixpo.data.inspect import inspect_margins, plot_margin_histogram
from mixpo.data.io import load_rows, save_rows
from mixpo.data.pairs import build_pairs
from mixpo.data.reward import load_reward_model, score_with_reward_model
from mixpo.data.validation import ValidationSettings, score_pairs, score_validation_loss

# Training input: tokenization, collation, the sequential curriculum sampler (mixpo.train).
from mixpo.data.collate import PreferenceCollator
from mixpo.data.sampler import CurriculumSampler
from mixpo.data.tokenize import IGNORE_INDEX, tokenize_pair, tokenize_rows
