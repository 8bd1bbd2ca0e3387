"""`mixpo data ...` end to end through mixpo.cli.main, and once as `python -m mixpo`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from mixpo.cli import main
from mixpo.data import difficulty
from mixpo.data.io import load_rows
from fixtures import (argilla_rows, raw_completion_rows, save_tiny_model, torch_threads,
                           ultrafeedback_rows, write_jsonl)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def uf_file(tmp_path):
    return write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows(20))


def _run(capsys, *argv):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pairs(tmp_path, capsys):
    raw = write_jsonl(tmp_path / "raw.jsonl", raw_completion_rows())
    code, out, _ = _run(capsys, "data", "pairs", raw, "-o", tmp_path / "pairs.parquet")
    assert code == 0 and "4 prompts in, 3 pairs out; dropped 1 with <2 completions" in out
    pairs, _ = load_rows(tmp_path / "pairs.parquet")
    assert pairs.column_names == ["source", "prompt", "chosen", "rejected", "score_chosen",
                                  "score_rejected"]
    code, out, _ = _run(capsys, "data", "pairs", raw, "-o", tmp_path / "random.jsonl",
                        "--strategy", "best-random", "--seed", "4", "--min-margin", "0.5")
    assert code == 0 and "1 below --min-margin" in out and "(best-random)" in out
    assert len(load_rows(tmp_path / "random.jsonl")[0]) == 2


def test_prepare_formats_and_options(tmp_path, capsys, uf_file):
    code, out, _ = _run(capsys, "data", "prepare", uf_file, "-o", tmp_path / "uf.parquet",
                        "--route-below", "0.5")
    prepared, _ = load_rows(tmp_path / "uf.parquet")
    margins = prepared["difficulty"]
    assert code == 0 and margins == sorted(margins, reverse=True)
    assert f"20 rows in, 20 out, {sum(m < 0.5 for m in margins)} hard" in out
    assert set(prepared.column_names) >= set(ultrafeedback_rows(1)[0]) | {"difficulty", "hard"}

    argilla = tmp_path / "argilla.json"
    argilla.write_text(json.dumps(argilla_rows(10)))
    code, out, _ = _run(capsys, "data", "prepare", argilla, "-o", tmp_path / "argilla_prepared",
                        "--route-fraction", "0.25", "--select-easiest", "0.8", "--order", "shuffle",
                        "--seed", "1")
    assert code == 0 and "10 rows in, 8 out, 2 hard" in out
    assert "2 dropped by --select-easiest" in out
    assert len(load_rows(tmp_path / "argilla_prepared")[0]) == 8

    renamed = [{**{k: v for k, v in r.items() if not k.endswith("_rating")},
                "judge_chosen": r["chosen_rating"], "judge_rejected": r["rejected_rating"]}
               for r in argilla_rows(10)]
    write_jsonl(tmp_path / "renamed.jsonl", renamed)
    code, out, _ = _run(capsys, "data", "prepare", tmp_path / "renamed.jsonl",
                        "-o", tmp_path / "r.json", "--score-columns", "judge_chosen",
                        "judge_rejected", "--swap-band")
    assert code == 0 and "easy-first +swap-band" in out
    written = json.loads((tmp_path / "r.json").read_text())
    assert [r["difficulty"] for r in written] == [r["judge_chosen"] - r["judge_rejected"]
                                                  for r in written]


def test_inspect_with_plot(tmp_path, capsys, uf_file):
    code, out, _ = _run(capsys, "data", "inspect", uf_file, "--plot", tmp_path / "margins.png",
                        "--route-below", "0.5")
    ties = sum(r["score_chosen"] == r["score_rejected"] for r in ultrafeedback_rows(20))
    assert code == 0 and "rows: 20" in out and f"ties (difficulty == 0): {ties}" in out
    assert "would be hard with --route-below 0.5" in out and "q50=" in out
    assert (tmp_path / "margins.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hard = sum(r["score_chosen"] - r["score_rejected"] < 0.5 for r in ultrafeedback_rows(20))
    assert f"the {hard} hard (SFT) pairs in red" in out and hard > 0


def test_score_reward_then_prepare(tmp_path, capsys, uf_file):
    model = save_tiny_model(tmp_path / "rm", ultrafeedback_rows(20), kind="reward")
    code, out, _ = _run(capsys, "data", "score-reward", uf_file, "-o", tmp_path / "scored.jsonl",
                        "--model", model, "--batch-size", "4")
    assert code == 0 and "20 pairs scored" in out
    code, out, _ = _run(capsys, "data", "prepare", tmp_path / "scored.jsonl", "-o",
                        tmp_path / "prepared.jsonl", "--difficulty", "reward",
                        "--route-fraction", "0.1")
    prepared, _ = load_rows(tmp_path / "prepared.jsonl")
    assert code == 0 and "2 hard" in out
    assert prepared["difficulty"] == pytest.approx(
        [c - r for c, r in zip(prepared["reward_chosen"], prepared["reward_rejected"])])


def test_score_validation_then_select(tmp_path, capsys):
    rows = ultrafeedback_rows(9)
    rows[5] = dict(rows[5], rejected=rows[5]["chosen"])  # one response twice: dropped
    source = write_jsonl(tmp_path / "uf.jsonl", rows)
    model = save_tiny_model(tmp_path / "policy", rows, kind="causal-lm")
    code, out, err = _run(capsys, "data", "score-validation", source, "-o",
                          tmp_path / "vl.parquet", "--model", model, "--seeds", "41,42",
                          "--evals", "2", "--batch-size", "2", "--lr", "1e-2")
    assert code == 0 and "8 pairs (1 dropped as chosen == rejected), 4 reference models, " \
        "4 scores per pair (LoRA r 16 alpha 16 dropout 0.05 on q_proj," in out
    assert err.count("score-validation: reference model") == 4  # progress on stderr
    scored, _ = load_rows(tmp_path / "vl.parquet")
    assert len(scored) == 8 and rows[5]["prompt_id"] not in scored["prompt_id"]
    assert all(math.isfinite(v) and v > 0 for v in scored["validation_loss"])
    code, out, _ = _run(capsys, "data", "prepare", tmp_path / "vl.parquet",
                        "-o", tmp_path / "easy.jsonl", "--difficulty", "validation-loss",
                        "--select-easiest", "0.5")
    easy, _ = load_rows(tmp_path / "easy.jsonl")
    assert code == 0 and easy["validation_loss"] == sorted(scored["validation_loss"])[:4]
    assert easy["selected_easiest"] == [0.5] * 4
    # The selective-dpo recipe selects again at training time: a selected file is refused.
    code, _, err = _run(capsys, "data", "prepare", tmp_path / "easy.jsonl",
                        "-o", tmp_path / "twice.jsonl", "--difficulty", "validation-loss",
                        "--select-easiest", "0.5")
    assert code == 2 and "already selected the easiest 0.5" in err
    assert not (tmp_path / "twice.jsonl").exists()
    code, out, _ = _run(capsys, "data", "score-validation", source, "-o", tmp_path / "full.json",
                        "--model", model, "--seeds", "41", "--evals", "1", "--batch-size", "4",
                        "--full-parameter", "--lr", "1e-3")
    assert code == 0 and "2 reference models, 1 scores per pair (full-parameter; lr 0.001)" in out


def test_route_at_or_below(tmp_path, capsys, uf_file):
    margins = [r["score_chosen"] - r["score_rejected"] for r in ultrafeedback_rows(20)]
    inclusive, strict = sum(m <= 0.5 for m in margins), sum(m < 0.5 for m in margins)
    assert inclusive > strict  # the fixture has margins of exactly 0.5
    code, out, _ = _run(capsys, "data", "prepare", uf_file, "-o", tmp_path / "a.jsonl",
                        "--route-at-or-below", "0.5")
    prepared, _ = load_rows(tmp_path / "a.jsonl")
    assert code == 0 and f"20 rows in, 20 out, {inclusive} hard" in out
    assert prepared["hard"] == [d <= 0.5 for d in prepared["difficulty"]]
    code, out, _ = _run(capsys, "data", "inspect", uf_file, "--route-at-or-below", "0.5")
    assert code == 0 and f"would be hard with --route-at-or-below 0.5: {inclusive} (" in out
    for command in (["prepare", str(uf_file), "-o", str(tmp_path / "b.jsonl")], ["inspect",
                                                                                str(uf_file)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["data", *command, "--route-below", "0.5", "--route-at-or-below", "0.5"])
        assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_inspect_plots_every_difficulty_kind(tmp_path, capsys):
    rows = [dict(r, embedding_distance=0.05 * i) for i, r in enumerate(ultrafeedback_rows(8))]
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    code, out, _ = _run(capsys, "data", "inspect", source, "--difficulty", "embedding", "--plot",
                        tmp_path / "e.png", "--route-below", "0.1")
    assert code == 0 and "embedding difficulty (bigger = easier)" in out
    assert "would be hard with --route-below 0.1: 2 (25.0%)" in out
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_prepare_help_names_the_orders_and_thresholds(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "as-is: the file's original order (MixDPO's 'shuffled' ablation" in text
    assert "shuffle: a seeded random permutation (not what MixDPO calls 'shuffled')" in text
    route_fraction = text[text.index("--route-fraction Q hard"):
                          text.index("--select-easiest TAU Selective")]
    assert "Not a MixDPO setting" in route_fraction and "best" not in route_fraction
    assert "difficulty <= D, inclusive (MixDPO's Argilla variant" in text
    assert "int(TAU * n) of the rest (floor" in text


@pytest.mark.parametrize("argv, message", [
    (["prepare", "{bad}", "-o", "{out}"], "bad.jsonl line 3, column 'score_chosen': score is nan"),
    (["prepare", "{uf}", "-o", "{out}", "--order", "shuffle", "--swap-band"],
     "needs --order easy-first"),
    (["prepare", "{uf}", "-o", "{out}", "--difficulty", "reward"], "score-reward"),
    (["prepare", "{raw}", "-o", "{out}"], "build pairs first"),
    (["prepare", "{missing}", "-o", "{out}"], "no such file"),
    (["prepare", "{uf}", "-o", "{tmp}/out.csv"], "unsupported output format"),
    (["pairs", "{uf}", "-o", "{out}"], "no 'completions' column"),
    (["inspect", "{fake}"], "not a readable Parquet file"),
    (["prepare", "{uf}", "-o", "{uf}/out.jsonl"], "cannot write"),
    (["score-reward", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model"],
     "cannot load a tokenizer"),
    (["score-validation", "{uf}", "-o", "{out}", "--model", "{tmp}", "--seeds", "4,x"],
     "--seeds takes comma-separated integers"),
    (["score-validation", "{uf}", "-o", "{out}", "--model", "{tmp}"],
     "--batch-size 512 on the 10 training pairs of a fold gives 1 optimizer step(s), too few "
     "for --evals 5 scorings; use --batch-size 2 or less"),
    (["prepare", "{uf}", "-o", "{out}", "--difficulty", "embedding"], "score-embedding"),
    (["prepare", "{selected}", "-o", "{out}", "--select-easiest", "0.5"],
     "selected.jsonl already selected the easiest 0.5 of its pairs"),
    (["prepare", "{big}", "-o", "{out}"], "big.jsonl line 3, column 'score_chosen': integer "
     "1000000000000000000000000000000 does not fit in 64 bits; write it as a float (1e+30)"),
    (["inspect", "{big}"], "big.jsonl line 3, column 'score_chosen': integer"),
    (["prepare", "{strings}", "-o", "{out}"], "strings.parquet row 0, column 'score_chosen': "
     "score '7.0' is not a number: the column holds strings; convert it to numbers first"),
    (["inspect", "{strings}"], "column 'score_chosen': score '7.0' is not a number: the "
     "column holds strings"),
    (["prepare", "{images}", "-o", "{out}"], "out.jsonl: column 'image.bytes' holds binary "
     "values, which JSON cannot hold; write .parquet or a directory instead"),
    (["score-reward", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--device", "bogus"],
     "--device 'bogus' is not a device; use cpu, cuda, cuda:N, mps or xpu"),
    (["score-reward", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--device", "cuda:99"],
     "--device cuda:99: "),
    pytest.param(["score-reward", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--device",
                  "cuda"], "--device cuda: cuda is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")),
    (["score-validation", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--device",
      "bogus"], "--device 'bogus' is not a device"),
    (["score-validation", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--device", "meta"],
     "--device 'meta': models run on cpu, cuda, mps, xpu, not on meta"),
    (["score-reward", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--max-length", "0"],
     "--max-length must be >= 1 (tokens kept), got 0"),
    (["score-reward", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--max-length=-3"],
     "--max-length must be >= 1 (tokens kept), got -3"),
    (["score-reward", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--batch-size", "0"],
     "--batch-size must be >= 1, got 0"),
    (["score-validation", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--max-length",
      "0"], "--max-length must be >= 2 (a prompt token and a completion token), got 0"),
    (["score-validation", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model", "--max-length=-3"],
     "--max-length must be >= 2 (a prompt token and a completion token), got -3"),
    (["score-validation", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model",
      "--max-prompt-length", "0"], "--max-prompt-length must be >= 1, got 0"),
    (["score-validation", "{uf}", "-o", "{out}", "--model", "{tmp}/no-model",
      "--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
])
def test_user_errors_exit_2_with_one_line_and_no_output(tmp_path, capsys, uf_file, argv, message):
    bad_rows = ultrafeedback_rows(4)
    bad_rows[2]["score_chosen"] = float("nan")
    # json.dumps writes the NaN literal, which Python's json (and so load_rows) accepts.
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad_rows))
    big_rows = ultrafeedback_rows(4)
    big_rows[2]["score_chosen"] = 10 ** 30  # an integer Arrow cannot hold (json.dumps keeps it)
    write_jsonl(tmp_path / "big.jsonl", big_rows)
    datasets.Dataset.from_list([dict(r, score_chosen=str(r["score_chosen"]))
                                for r in ultrafeedback_rows(4)]).to_parquet(
        str(tmp_path / "strings.parquet"))
    datasets.Dataset.from_list([dict(r, image={"bytes": b"\x89PNG", "path": "a.png"})
                                for r in ultrafeedback_rows(4)]).to_parquet(
        str(tmp_path / "images.parquet"))
    write_jsonl(tmp_path / "raw.jsonl", raw_completion_rows())
    (tmp_path / "fake.parquet").write_text("prompt,chosen\n")
    selected = write_jsonl(tmp_path / "selected.jsonl",
                           [dict(r, selected_easiest=0.5) for r in ultrafeedback_rows(4)])
    paths = {"bad": tmp_path / "bad.jsonl", "uf": uf_file, "raw": tmp_path / "raw.jsonl",
             "missing": tmp_path / "missing.jsonl", "fake": tmp_path / "fake.parquet",
             "out": tmp_path / "out.jsonl", "tmp": tmp_path, "selected": selected,
             "big": tmp_path / "big.jsonl", "strings": tmp_path / "strings.parquet",
             "images": tmp_path / "images.parquet"}
    before = sorted(os.listdir(tmp_path))
    # {tmp}/no-model holds no model: an option error, not "cannot load", shows that the
    # options are checked before any model is loaded.
    code, out, err = _run(capsys, "data", *[a.format(**paths) for a in argv])
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("mixpo data: error:") and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary files


def test_nan_in_a_score_column_the_difficulty_does_not_use_is_kept(tmp_path, capsys):
    rows = [dict(r, reward_chosen=0.5 + i, reward_rejected=0.25)
            for i, r in enumerate(ultrafeedback_rows(6))]
    rows[1]["score_chosen"] = math.nan  # a rating column; this run scores by reward
    source = write_jsonl(tmp_path / "nan.jsonl", rows)
    for name in ("out.jsonl", "out.json", "out.parquet"):
        code, out, err = _run(capsys, "data", "prepare", source, "-o", tmp_path / name,
                              "--difficulty", "reward", "--order", "as-is")
        assert code == 0 and "6 rows in, 6 out" in out and err == ""
        prepared, _ = load_rows(tmp_path / name)
        assert math.isnan(prepared["score_chosen"][1])
        assert prepared["score_chosen"][2:] == [r["score_chosen"] for r in rows[2:]]
        assert prepared["difficulty"] == [0.25 + i for i in range(6)]
    # Scored by rating, the same NaN is an error naming it.
    code, _, err = _run(capsys, "data", "prepare", source, "-o", tmp_path / "rating.jsonl")
    assert code == 2 and "nan.jsonl line 2, column 'score_chosen': score is nan" in err


def test_prepare_and_inspect_warn_about_identical_repeated_and_single_rows(tmp_path, capsys,
                                                                        uf_file):
    rows = ultrafeedback_rows(6)
    rows[3] = dict(rows[3], rejected=rows[3]["chosen"])
    rows += [rows[1], rows[1]]
    source = write_jsonl(tmp_path / "w.jsonl", rows)
    same = (f"mixpo data: warning: 1 of 8 pairs has chosen == rejected (the first: {source} "
            "line 4); they teach nothing")
    repeated = (f"mixpo data: warning: 2 of 8 rows repeat an earlier row exactly (the first: "
                f"{source} line 7 repeats {source} line 2); each copy trains on its pair again")
    for command in (["prepare", source, "-o", tmp_path / "w.parquet"], ["inspect", source]):
        for _ in range(2):  # every run warns, not only the first in a process
            code, out, err = _run(capsys, "data", *command)
            lines = err.splitlines()
            assert code == 0 and len(lines) == 2, err
            assert lines[0].startswith(same) and lines[1] == repeated
    # --select-easiest drops the identical pairs and says so; only the repeats are warned of.
    code, out, err = _run(capsys, "data", "prepare", source, "-o", tmp_path / "s.jsonl",
                          "--select-easiest", "1.0")
    assert code == 0 and "1 dropped as chosen == rejected" in out and err == repeated + "\n"
    one = write_jsonl(tmp_path / "one.jsonl", ultrafeedback_rows(1))
    for command in (["prepare", one, "-o", tmp_path / "one.parquet"], ["inspect", one]):
        code, _, err = _run(capsys, "data", *command)
        assert code == 0 and err == (f"mixpo data: warning: {one} has only 1 row: there is "
                                     "nothing to order, select or route\n")
    for command in (["prepare", uf_file, "-o", tmp_path / "clean.jsonl"], ["inspect", uf_file]):
        assert _run(capsys, "data", *command)[::2] == (0, "")  # clean data: no warning


def test_json_output_of_binary_columns_fails_before_the_work(tmp_path, capsys, monkeypatch):
    source = tmp_path / "images.parquet"
    datasets.Dataset.from_list([dict(r, image={"bytes": b"\x89PNG", "path": "a.png"})
                                for r in ultrafeedback_rows(4)]).to_parquet(str(source))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the data was prepared before the output was checked")

    monkeypatch.setattr(difficulty, "prepare_dataset", must_not_run)
    code, _, err = _run(capsys, "data", "prepare", source, "-o", tmp_path / "o.jsonl")
    assert code == 2 and "column 'image.bytes' holds binary values" in err
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def damaged_models(tmp_path_factory):
    """A reward model and a causal LM whose model.safetensors lost its second half."""
    root = tmp_path_factory.mktemp("damaged")
    models = {}
    for kind in ("reward", "causal-lm"):
        directory = save_tiny_model(root / kind, ultrafeedback_rows(20), kind=kind)
        weights = directory / "model.safetensors"
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
        models[kind] = directory
    return models


@pytest.mark.parametrize("command, kind", [
    (["score-reward"], "reward"),
    (["score-validation", "--batch-size", "2", "--evals", "1", "--seeds", "1"], "causal-lm"),
])
def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, capsys, uf_file,
                                                          damaged_models, command, kind):
    model = damaged_models[kind]
    code, _, err = _run(capsys, "data", command[0], uf_file, "-o", tmp_path / "o.jsonl",
                        "--model", model, *command[1:])
    what = "reward model" if kind == "reward" else "causal LM"
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"mixpo data: error: cannot load a {what} from '{model}': "
                          f"{model / 'model.safetensors'} is truncated or damaged (")
    assert not (tmp_path / "o.jsonl").exists()


def test_conflicting_options_are_rejected_by_argparse(capsys, uf_file, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", str(uf_file), "-o", str(tmp_path / "o.jsonl"),
              "--route-below", "0.5", "--route-fraction", "0.1"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_python_dash_m_mixpo(tmp_path, uf_file):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "mixpo", "data", "prepare", str(uf_file), "-o",
               str(tmp_path / "out.jsonl"), "--route-fraction", "0.1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "20 rows in, 20 out, 2 hard" in done.stdout
    assert len(load_rows(tmp_path / "out.jsonl")[0]) == 20
    missing_input = [str(tmp_path / "absent.jsonl"), "-o", str(tmp_path / "x.jsonl")]
    failed = subprocess.run(command[:5] + missing_input, capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_every_bad_row_is_named_in_one_error(tmp_path, capsys):
    rows = ultrafeedback_rows(12)
    for index in (2, 5, 7):
        rows[index]["chosen"][1]["content"] = ""
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, _, err = _run(capsys, "data", "prepare", source, "-o", tmp_path / "out.jsonl")
    assert code == 2 and err.count("\n") == 1
    assert "3 bad rows:" in err
    for line in (3, 6, 8):
        assert f"bad.jsonl line {line}, column 'chosen'" in err


def test_invalid_utf8_and_parquet_maps_are_named_by_file_line_and_column(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps(row).encode() for row in ultrafeedback_rows(4)]
    lines[2] = lines[2].replace(b'"prompt": "', b'"prompt": "\xff', 1)
    for suffix in ("jsonl", "json"):
        source = tmp_path / f"latin1.{suffix}"
        source.write_bytes(b"\n".join(lines) + b"\n")
        code, _, err = _run(capsys, "data", "prepare", source, "-o", tmp_path / "o.jsonl")
        assert code == 2 and f"latin1.{suffix} line 3, column " in err and "not UTF-8" in err
    table = pa.table({"prompt": ["p"] * 2, "chosen": ["a"] * 2, "rejected": ["b"] * 2,
                      "score_chosen": [5.0, 4.0], "score_rejected": [1.0, 2.0],
                      "meta": pa.array([[("k", "v")]] * 2, pa.map_(pa.string(), pa.string()))})
    pq.write_table(table, tmp_path / "map.parquet")
    code, _, err = _run(capsys, "data", "prepare", tmp_path / "map.parquet", "-o",
                        tmp_path / "o.parquet")
    assert code == 2 and "map.parquet, column 'meta': a Parquet map" in err

