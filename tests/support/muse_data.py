"""A small MUSE-News-shaped folder for the MUSE tests (tests/benchmarks, tests/engine)."""
import json

FORGET_TEXTS = [
    "The harbour council voted on Tuesday to close the old ferry pier after engineers found deep cracks.",
    "Local bakers said the price of flour had doubled since spring, and several shops cut their hours.",
    "A rare grey heron nested on the roof of the town library, drawing crowds of birdwatchers all week.",
    "The river festival was cancelled when heavy rain flooded the meadow where the stages were built.",
]
HOLDOUT_TEXTS = [
    "Volunteers planted two hundred oak saplings along the northern edge of the new cycling path.",
    "The museum opened a small exhibition of maps drawn by sailors who charted the coast by hand.",
    "Students from the music school gave a free concert in the market square on Saturday evening.",
    "A new bus route will link the hospital with the railway station from the first of next month.",
]


def write_muse(root, forget=FORGET_TEXTS, holdout=HOLDOUT_TEXTS):
    """A MUSE-News-shaped folder: JSON arrays for verbmem / knowmem, JSON lines for privleak."""
    for subset in ("verbmem", "knowmem", "privleak"):
        (root / subset).mkdir(parents=True, exist_ok=True)
    verbmem = [{"prompt": text[:40], "gt": text[40:]} for text in forget]
    (root / "verbmem" / "forget.json").write_text(json.dumps(verbmem))
    qa = {
        "forget_qa": [{"question": "What did the harbour council close?", "answer": "the old ferry pier"},
                      {"question": "What had doubled since spring?", "answer": "the price of flour"}],
        "forget_qa_icl": [{"question": "Where did the heron nest?", "answer": "on the library roof"}],
        "retain_qa": [{"question": "How many saplings were planted?", "answer": "two hundred"}],
        "retain_qa_icl": [{"question": "Where was the concert?", "answer": "in the market square"}],
    }
    for split, records in qa.items():
        (root / "knowmem" / f"{split}.json").write_text(json.dumps(records))
    for split, texts in (("forget", forget), ("holdout", holdout), ("retain", holdout)):
        (root / "privleak" / f"{split}.json").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root
