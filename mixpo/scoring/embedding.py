"""Embedding-distance difficulty: how different the chosen and the rejected response are
(MixDPO, Pang et al., section 6; the authors used BAAI/bge-large-en-v1.5).

Following the authors' code (JlPang863/QualityDPO `embedding_distance_explore.ipynb`,
`zzzzzz_data.py`):
- only the RESPONSES are embedded, never the prompt: each assistant message of a completion
  as `"### assistant: {content}\\n"` (a plain-string completion as one such message);
- an embedding is the MEAN of the model's last hidden states over the response's tokens (the
  attention mask), whatever pooling the sentence-transformers model itself is configured
  with (they mean-pooled BGE, whose own pooling is CLS), then L2-normalised;
- distance = cosine distance `1 - dot(e_chosen, e_rejected)`, in [0, 2]; identical responses
  get exactly 0. They sort by it descending: a BIGGER distance is EASIER, as every mixpo
  difficulty (`prepare --difficulty embedding` reads the `embedding_distance` column as is).
(Their committed `process_dialog` appends the rejected turns to the chosen text; that is a
bug, and this module embeds each response on its own.)

Embeddings are cached on disk (`EmbeddingCache`), keyed by the model (its resolved path and a
fingerprint of its files: names, sizes, modification times), the embedding method and the
sequence length, and by the sha256 of each text, so a rerun, or another file sharing
responses, embeds only the texts it has not seen.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from mixpo.data.formats import (EMBEDDING_DISTANCE_COLUMN, check_finite_scores,
                                check_preference_rows, split_example)
from mixpo.data.io import RowNamer, default_row_names
from mixpo.files import atomic_output
from mixpo.hf.loading import check_device, loading_errors

# Bump when the text format or the pooling changes: cached vectors of another method differ.
METHOD = "responses '### assistant: {content}\\n', mean of last hidden states; v1"
FLUSH_EVERY = 4096  # new embeddings written to the cache at least this often (texts)
CACHE_OWNER = "mixpo embedding cache"


def default_cache_dir() -> Path:
    """$MIXPO_CACHE_DIR/embeddings, else $XDG_CACHE_HOME/mixpo/embeddings, else
    ~/.cache/mixpo/embeddings."""
    if os.environ.get("MIXPO_CACHE_DIR"):
        return Path(os.environ["MIXPO_CACHE_DIR"]) / "embeddings"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixpo" / "embeddings"


def response_text(completion) -> str:
    """The text embedded for one completion (a string or assistant messages): each message as
    `### assistant: {content}\\n`, the authors' format."""
    if isinstance(completion, str):
        return f"### assistant: {completion}\n"
    return "".join(f"### assistant: {message['content']}\n" for message in completion)


def load_embedding_model(path: str, device: str = "cpu"):
    """A `sentence_transformers.SentenceTransformer` from the local directory `path`, in eval
    mode on `device`. ValueError (one line, naming the path) when it is not a directory or
    cannot be loaded; nothing is downloaded."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"--embedding-model {path!r} is not a directory; give a local "
                         "sentence-transformers model directory")
    check_device(device)
    from sentence_transformers import SentenceTransformer

    with loading_errors("sentence-transformers model", path, extra=(RuntimeError, KeyError)):
        model = SentenceTransformer(str(directory), device=device, local_files_only=True)
    return model.eval()


def model_key(path: str, max_seq_length: int | None) -> str:
    """sha256 (hex) of the model directory's resolved path, every file in it (relative name,
    size, modification time), METHOD and the truncation length."""
    root = Path(path).resolve()
    files = sorted([str(item.relative_to(root)), item.stat().st_size, item.stat().st_mtime_ns]
                   for item in root.rglob("*") if item.is_file())
    description = {"path": str(root), "files": files, "method": METHOD,
                   "max_seq_length": max_seq_length}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def text_hash(text: str) -> bytes:
    """sha256 digest (32 bytes) of the UTF-8 text: the cache key of its embedding."""
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Embeddings of one model (`key`, from `model_key`) under `directory/key/`.

    Each write adds a shard, a directory holding `hashes.npy` (uint8 [m, 32], the text
    hashes) and `embeddings.npy` (float32 [m, d], mean-pooled, not normalised), written
    atomically (`mixpo.files.atomic_output`), so a killed run loses at most its unwritten
    part, and concurrent runs never overwrite each other.
    """

    def __init__(self, directory: str | os.PathLike, key: str):
        self.root = Path(directory) / key

    def lookup(self, hashes: list[bytes]) -> dict[bytes, np.ndarray]:
        """The cached vectors of those of `hashes` that are in the cache. A damaged shard
        (truncated, unreadable, row counts that disagree) is skipped with a warning naming it,
        and removed when mixpo wrote it, so its texts are embedded again."""
        wanted, found = set(hashes), {}
        for shard in sorted(self.root.glob("shard-*")) if self.root.is_dir() else []:
            if shard.name.endswith(".tmp") or not (shard / "embeddings.npy").is_file():
                continue
            try:
                raw, vectors = self._read_shard(shard)
            except (OSError, ValueError) as error:
                self._drop_damaged(shard, error)
                continue
            for row in range(len(raw) // 32):
                digest = raw[32 * row:32 * (row + 1)]
                if digest in wanted and digest not in found:
                    found[digest] = np.array(vectors[row], dtype=np.float32)
        return found

    @staticmethod
    def _read_shard(shard: Path) -> tuple[bytes, np.ndarray]:
        keys = np.load(shard / "hashes.npy")
        vectors = np.load(shard / "embeddings.npy", mmap_mode="r")
        if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32:
            raise ValueError(f"hashes.npy is {keys.dtype} {keys.shape}, not uint8 [m, 32]")
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"embeddings.npy has shape {vectors.shape} for {len(keys)} hashes")
        return keys.tobytes(), vectors

    @staticmethod
    def _drop_damaged(shard: Path, error: Exception) -> None:
        import shutil
        import warnings

        from mixpo.files import written_by

        mine = written_by(shard) == CACHE_OWNER or {item.name for item in shard.iterdir()} \
            <= {"hashes.npy", "embeddings.npy"}
        if mine:
            shutil.rmtree(shard, ignore_errors=True)
        warnings.warn(f"embedding cache shard {shard} is damaged ({error}); "
                      f"{'removed it, ' if mine else ''}its texts are embedded again",
                      stacklevel=3)

    def add(self, hashes: list[bytes], vectors: np.ndarray) -> None:
        """Write one shard with `vectors` [m, d] for `hashes` [m]."""
        if not hashes:
            return
        name = f"shard-{time.time_ns():020d}-{os.getpid()}"
        with atomic_output(self.root / name, directory=True, owner=CACHE_OWNER) as staging:
            keys = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), 32)
            np.save(staging / "hashes.npy", keys)
            np.save(staging / "embeddings.npy", np.asarray(vectors, dtype=np.float32))


def _mean_pooled(model, texts: list[str], batch_size: int) -> np.ndarray:
    """float32 [len(texts), d]: the mean of each text's token embeddings (the model's last
    hidden states; sentence-transformers returns them unpadded, so the mean is over the
    attention mask)."""
    tokens = model.encode(texts, batch_size=batch_size, output_value="token_embeddings",
                          convert_to_numpy=False, show_progress_bar=False)
    return np.stack([t.float().mean(dim=0).cpu().numpy() for t in tokens]).astype(np.float32)


def embed_texts(texts: list[str], model, batch_size: int = 32,
                cache: EmbeddingCache | None = None,
                progress: bool = True) -> tuple[np.ndarray, int]:
    """L2-normalised mean-pooled embeddings of `texts`, float64 [n, d], and how many distinct
    texts were embedded now (the rest came from `cache`, or repeat another text).

    Texts not in the cache are embedded longest first in chunks of `batch_size` (a tqdm bar
    on stderr with `progress`) and added to the cache every FLUSH_EVERY texts and at the end.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    hashes = [text_hash(text) for text in texts]
    unique = dict(zip(hashes, texts))
    vectors = cache.lookup(list(unique)) if cache is not None else {}
    missing = sorted((h for h in unique if h not in vectors), key=lambda h: -len(unique[h]))
    pending_hashes, pending_vectors = [], []
    bar = tqdm(total=len(missing), desc="embedding responses", unit="text",
               disable=not progress or not missing, file=sys.stderr)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        pooled = _mean_pooled(model, [unique[h] for h in chunk], batch_size)
        vectors.update(zip(chunk, pooled))
        pending_hashes += chunk
        pending_vectors.append(pooled)
        if cache is not None and len(pending_hashes) >= FLUSH_EVERY:
            cache.add(pending_hashes, np.concatenate(pending_vectors))
            pending_hashes, pending_vectors = [], []
        bar.update(len(chunk))
    bar.close()
    if cache is not None and pending_hashes:
        cache.add(pending_hashes, np.concatenate(pending_vectors))
    matrix = np.stack([vectors[h] for h in hashes]).astype(np.float64) if hashes else \
        np.zeros((0, 0))
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("the embedding model returned a zero vector; cannot normalise it")
    return matrix / norms, len(missing)


def cosine_distances(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """1 - dot(a_i, b_i) of L2-normalised rows, float64 [n], clipped to [0, 2] (rounding)."""
    return np.clip(1.0 - np.einsum("nd,nd->n", chosen, rejected), 0.0, 2.0)


@dataclass(frozen=True)
class EmbeddingSummary:
    """What `score_embedding_distance` did, for the one-line report."""

    pairs: int
    embedded: int
    texts: int
    identical: int
    mean_distance: float
    model: str

    def line(self) -> str:
        return (f"score-embedding: {self.pairs} pairs, {self.embedded} of {self.texts} distinct "
                f"responses embedded ({self.texts - self.embedded} from the cache) with "
                f"{self.model}; mean distance {self.mean_distance:.4f}, {self.identical} "
                "identical (distance 0)")


def response_texts(dataset: datasets.Dataset,
                   row_names: RowNamer = default_row_names) -> tuple[list[str], list[str]]:
    """(chosen texts, rejected texts) to embed, `response_text` of each row's completions.
    Rows are validated (`check_preference_rows`: ValueErrors naming the row and column)."""
    check_preference_rows(dataset, row_names)
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    chosen, rejected = [], []
    for index, row in enumerate(dataset.select_columns(columns)):
        example = split_example(row, row_names(index))
        chosen.append(response_text(example.chosen))
        rejected.append(response_text(example.rejected))
    return chosen, rejected


def embedding_distances(dataset: datasets.Dataset, model, batch_size: int = 32,
                        cache: EmbeddingCache | None = None, progress: bool = True,
                        row_names: RowNamer = default_row_names) -> tuple[np.ndarray, dict]:
    """Cosine distance between each pair's chosen and rejected response embeddings, float64
    [n] (module docstring), with `model` a loaded SentenceTransformer; see `pair_distances`."""
    return pair_distances(*response_texts(dataset, row_names), model, batch_size, cache,
                          progress)


def pair_distances(chosen: list[str], rejected: list[str], model, batch_size: int = 32,
                   cache: EmbeddingCache | None = None,
                   progress: bool = True) -> tuple[np.ndarray, dict]:
    """Cosine distance between the embeddings of chosen[i] and rejected[i], float64 [n]
    (exactly 0 where the two texts are equal), and counts for the summary ({'embedded',
    'texts', 'identical'})."""
    embeddings, embedded = embed_texts(chosen + rejected, model, batch_size, cache, progress)
    distances = cosine_distances(embeddings[:len(chosen)], embeddings[len(chosen):])
    same = np.array([c == r for c, r in zip(chosen, rejected)], dtype=bool)
    distances[same] = 0.0
    counts = {"embedded": embedded, "texts": len(set(chosen) | set(rejected)),
              "identical": int(same.sum())}
    return distances, counts


def score_embedding_distance(dataset: datasets.Dataset, model_path: str, batch_size: int = 32,
                             device: str = "cpu", cache_dir: str | os.PathLike | None = None,
                             use_cache: bool = True, progress: bool = True,
                             row_names: RowNamer = default_row_names,
                             ) -> tuple[datasets.Dataset, EmbeddingSummary]:
    """`dataset` with an `embedding_distance` column (float, bigger = easier; replacing an old
    one), computed with the sentence-transformers model in the local directory `model_path`
    (`embedding_distances`), and a summary. The cache lives in `cache_dir` (default
    `default_cache_dir()`); `use_cache=False` embeds everything and writes nothing."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    check_device(device)
    chosen, rejected = response_texts(dataset, row_names)  # bad rows fail before loading
    model = load_embedding_model(model_path, device)
    cache = None
    if use_cache:
        key = model_key(model_path, getattr(model, "max_seq_length", None))
        cache = EmbeddingCache(default_cache_dir() if cache_dir is None else cache_dir, key)
    distances, counts = pair_distances(chosen, rejected, model, batch_size, cache, progress)
    check_finite_scores(distances, (f"{row_names(i)}, column {EMBEDDING_DISTANCE_COLUMN!r}"
                                    for i in range(len(distances))), "the embedding distance is",
                        "the model returned non-finite embeddings")
    if EMBEDDING_DISTANCE_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(EMBEDDING_DISTANCE_COLUMN)
    scored = dataset.add_column(EMBEDDING_DISTANCE_COLUMN, distances.tolist())
    summary = EmbeddingSummary(pairs=len(distances), model=str(model_path),
                               mean_distance=float(distances.mean()), **counts)
    return scored, summary
