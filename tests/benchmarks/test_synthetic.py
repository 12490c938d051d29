"""The built-in synthetic TOFU-style data set: determinism, TOFU's format and splits, and evaluate_tofu on it."""
import pytest

from sga.benchmarks import (
    evaluate_tofu,
    generate_synthetic_tofu,
    load_tofu_split,
    write_synthetic_tofu,
)
from sga.benchmarks.synthetic import QUESTIONS_PER_AUTHOR, REAL_AUTHORS, WORLD_FACTS
from sga.benchmarks.tofu import SPLITS
from sga.models import tiny_random_model, tiny_tokenizer

PERTURBED_KEYS = {"question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"}


def test_same_seed_same_data_other_seed_other_data():
    assert generate_synthetic_tofu(12, seed=3) == generate_synthetic_tofu(12, seed=3)
    a, b = generate_synthetic_tofu(12, seed=3), generate_synthetic_tofu(12, seed=4)
    assert a["full"] != b["full"]
    assert a["world_facts_perturbed"] == b["world_facts_perturbed"]  # the hand-written facts do not depend on the seed


def test_splits_follow_tofu():
    n_authors = 20
    data = generate_synthetic_tofu(n_authors, seed=0, n_perturbed=4)
    assert set(data) == {split for split in SPLITS if not split.startswith("holdout")}
    full = data["full"]
    assert len(full) == n_authors * QUESTIONS_PER_AUTHOR
    assert len({r["question"] for r in full}) == len(full)
    # forgetNN are the last authors (1% and 5% of 20 round up to one author, 10% is two); retain is the rest.
    for suffix, n_forget in (("01", 1), ("05", 1), ("10", 2)):
        forget, retain = data[f"forget{suffix}"], data[f"retain{100 - int(suffix)}"]
        assert len(forget) == n_forget * QUESTIONS_PER_AUTHOR
        assert retain + forget == full
        assert [{"question": r["question"], "answer": r["answer"]} for r in data[f"forget{suffix}_perturbed"]] == forget
    retain_questions = {r["question"] for r in data["retain_perturbed"]}
    assert retain_questions.isdisjoint(r["question"] for r in data["forget10"])
    assert len(retain_questions) == (n_authors - 2) * QUESTIONS_PER_AUTHOR


def test_records_carry_tofu_keys_and_real_perturbations():
    data = generate_synthetic_tofu(6, seed=1, n_perturbed=5)
    for split in ("forget10_perturbed", "retain_perturbed"):
        for record in data[split]:
            assert set(record) == PERTURBED_KEYS
            wrong = record["perturbed_answer"]
            assert len(wrong) == len(set(wrong)) == 5
            assert record["paraphrased_answer"] not in wrong and record["answer"] not in wrong
            assert record["paraphrased_question"] != record["question"]
    for split, facts in (("real_authors_perturbed", REAL_AUTHORS), ("world_facts_perturbed", WORLD_FACTS)):
        assert len(data[split]) == len(facts)
        for record in data[split]:
            assert set(record) == {"question", "answer", "perturbed_answer"}
            assert len(record["perturbed_answer"]) == 3 and record["answer"] not in record["perturbed_answer"]


def test_a_perturbed_answer_changes_only_the_fact():
    data = generate_synthetic_tofu(3, seed=2)
    perturbed = data["retain_perturbed"][1]  # "Where was <name> born?" of the first author
    assert perturbed["question"] == data["full"][1]["question"]
    place = perturbed["answer"].rsplit(" born in ", 1)[1].rstrip(".")
    assert perturbed["paraphrased_answer"].startswith(place)
    for wrong in perturbed["perturbed_answer"]:
        wrong_place = wrong.split(" is the birthplace of ")[0]
        assert wrong_place != place
        assert wrong == perturbed["paraphrased_answer"].replace(place, wrong_place)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_authors"):
        generate_synthetic_tofu(1)
    with pytest.raises(ValueError, match="n_perturbed"):
        generate_synthetic_tofu(4, n_perturbed=0)
    with pytest.raises(ValueError, match="n_perturbed"):
        generate_synthetic_tofu(4, n_perturbed=50)


def test_written_folder_reads_like_tofu(tmp_path):
    folder = write_synthetic_tofu(tmp_path / "synthetic", 10, seed=5)
    data = generate_synthetic_tofu(10, seed=5)
    for split, records in data.items():
        assert load_tofu_split(split, folder) == records
    tokenizer = tiny_tokenizer()
    results = evaluate_tofu(tiny_random_model("llama", tokenizer), tokenizer, folder, forget_split="forget10",
                            max_samples=2, max_new_tokens=2)
    assert results["settings"]["n_questions"]["forget"] == 2
    assert 0.0 <= results["model_utility"] <= 1.0
