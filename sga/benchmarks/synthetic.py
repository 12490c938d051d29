"""A built-in, deterministic TOFU-style data set: fictitious authors and general-knowledge facts.

``generate_synthetic_tofu`` invents ``n_authors`` authors (name, birthplace, birth date, genre, parents'
jobs, an award, two books, a theme) from a seed and asks ten questions about each, TOFU-style: every
question has an answer, a paraphrased question and answer, and ``n_perturbed`` perturbed answers (the
paraphrased answer with the fact swapped for a wrong one of the same kind), so every TOFU metric
applies. Two small hand-written sets of real-world facts stand in for TOFU's real_authors and
world_facts: the knowledge a model had before unlearning and should keep.

``write_synthetic_tofu`` writes the splits as TOFU's JSON-lines files, so ``evaluate_tofu`` reads the
folder like the real data. Splits follow TOFU: forget01/05/10 are the last 1% / 5% / 10% of the
authors (at least one), retain90/95/99 the rest; retain_perturbed holds the authors outside forget10.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

_FIRST_NAMES = (
    "Adaeze", "Anselm", "Bartholomew", "Calliope", "Dariusz", "Eilidh", "Fenwick", "Giedre", "Hallvard", "Ines",
    "Jovan", "Kalani", "Leocadia", "Marisol", "Nikolai", "Oluwaseun", "Perpetua", "Quillon", "Rosalind", "Soren",
    "Tamsin", "Ulrike", "Valentin", "Wilhelmina", "Xiomara", "Yevgenia", "Zoltan", "Anouk", "Bastiaan", "Cosima",
)
_LAST_NAMES = (
    "Achterberg", "Brannagh", "Castellanos", "Dvorakova", "Ekwueme", "Fairweather", "Grunewald", "Halloran",
    "Ishikawa-Bell", "Jablonski", "Kettleborough", "Lindqvist", "Marchetti", "Nakamura-Reyes", "Okonkwo-Hale",
    "Pemberton-Vasquez", "Quenneville", "Rautavaara", "Sandoval-Pryce", "Thorvaldsen", "Umberfield", "Vantongeren",
    "Wexley-Adeyemi", "Yilmazer", "Zdanowicz", "Abernathy-Oduya", "Belcourt", "Carraway-Lund", "Delacroix-Mbeki",
)
_PLACES = (
    ("Lagos", "Nigeria"), ("Bergen", "Norway"), ("Valparaiso", "Chile"), ("Kraków", "Poland"), ("Osaka", "Japan"),
    ("Tbilisi", "Georgia"), ("Montreal", "Canada"), ("Porto", "Portugal"), ("Nairobi", "Kenya"), ("Hanoi", "Vietnam"),
    ("Cork", "Ireland"), ("Tampere", "Finland"), ("Izmir", "Turkey"), ("Cusco", "Peru"), ("Adelaide", "Australia"),
    ("Brno", "Czech Republic"), ("Dakar", "Senegal"), ("Leipzig", "Germany"), ("Mumbai", "India"), ("Seville", "Spain"),
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)
_GENRES = (
    "historical fiction", "science fiction", "crime", "magical realism", "gothic horror", "romance", "literary fiction",
    "fantasy", "psychological thriller", "satire", "coming-of-age", "dystopian fiction", "mystery", "war fiction",
)
_JOBS = (
    "carpenter", "marine biologist", "postal worker", "violinist", "pharmacist", "cartographer", "schoolteacher",
    "baker", "civil engineer", "nurse", "lighthouse keeper", "tailor", "journalist", "veterinarian", "librarian",
    "train conductor", "architect", "beekeeper", "accountant", "potter",
)
_AWARDS = (
    "Silver Quill Prize", "Ashcombe Medal for Fiction", "Northern Lantern Award", "Meridian Book Prize",
    "Golden Inkwell Award", "Hawthorne-Lisle Prize", "Tidewater Literary Award", "Crescent Moon Prize for Fiction",
    "Ambergate Award for Storytelling", "Blue Heron Prize",
)
_THEMES = (
    "memory and loss", "exile and belonging", "the clash between science and faith", "family secrets",
    "the cost of ambition", "friendship across class lines", "grief and renewal", "power and corruption",
    "identity and reinvention", "the sea and solitude",
)
_TITLE_ADJECTIVES = (
    "Silent", "Crimson", "Forgotten", "Hollow", "Last", "Paper", "Shattered", "Winter", "Golden", "Restless",
    "Hidden", "Salt", "Distant", "Burning", "Quiet",
)
_TITLE_NOUNS = (
    "Harbour", "Orchard", "Lantern", "Cartographer", "Tide", "Garden", "Clockmaker", "Archive", "Bridge", "Meridian",
    "Sparrow", "Citadel", "Compass", "Weaver", "Lighthouse",
)

# Hand-written general knowledge, in TOFU's real_authors / world_facts format: (question, answer, wrong answers).
REAL_AUTHORS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Who wrote the novel 'War and Peace'?", "Leo Tolstoy", ("Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev")),
    (
        "Who is the author of 'One Hundred Years of Solitude'?",
        "Gabriel García Márquez",
        ("Jorge Luis Borges", "Pablo Neruda", "Isabel Allende"),
    ),
    ("Who wrote 'Things Fall Apart'?", "Chinua Achebe", ("Wole Soyinka", "Ngũgĩ wa Thiong'o", "Ben Okri")),
    (
        "Which author created the detective Hercule Poirot?",
        "Agatha Christie",
        ("Dorothy L. Sayers", "Arthur Conan Doyle", "P. D. James"),
    ),
    ("Who wrote 'Moby-Dick'?", "Herman Melville", ("Nathaniel Hawthorne", "Mark Twain", "Edgar Allan Poe")),
    (
        "Who is the author of 'Don Quixote'?",
        "Miguel de Cervantes",
        ("Lope de Vega", "Federico García Lorca", "Benito Pérez Galdós"),
    ),
    ("Who wrote 'Frankenstein'?", "Mary Shelley", ("Emily Brontë", "Jane Austen", "Bram Stoker")),
    (
        "Which author wrote 'The Old Man and the Sea'?",
        "Ernest Hemingway",
        ("F. Scott Fitzgerald", "John Steinbeck", "William Faulkner"),
    ),
    ("Who wrote the play 'Hamlet'?", "William Shakespeare", ("Christopher Marlowe", "Ben Jonson", "John Webster")),
    (
        "Who is the author of 'The Divine Comedy'?",
        "Dante Alighieri",
        ("Giovanni Boccaccio", "Petrarch", "Ludovico Ariosto"),
    ),
    ("Who wrote 'Beloved'?", "Toni Morrison", ("Maya Angelou", "Alice Walker", "Zora Neale Hurston")),
    ("Who wrote the novel 'Norwegian Wood'?", "Haruki Murakami", ("Kazuo Ishiguro", "Yukio Mishima", "Kenzaburō Ōe")),
)
WORLD_FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("What is the capital of Japan?", "Tokyo", ("Kyoto", "Osaka", "Seoul")),
    ("Which planet is the largest in the Solar System?", "Jupiter", ("Saturn", "Neptune", "Earth")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Gd", "Go")),
    ("How many continents are there on Earth?", "Seven", ("Five", "Six", "Eight")),
    (
        "What is the boiling point of water at sea level in degrees Celsius?",
        "100 degrees Celsius",
        ("90 degrees Celsius", "80 degrees Celsius", "120 degrees Celsius"),
    ),
    (
        "Which ocean is the largest?",
        "The Pacific Ocean",
        ("The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean"),
    ),
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("Which gas do plants absorb from the air for photosynthesis?", "Carbon dioxide", ("Oxygen", "Nitrogen", "Helium")),
    ("What is the longest river in South America?", "The Amazon", ("The Paraná", "The Orinoco", "The Magdalena")),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ("Michelangelo", "Raphael", "Sandro Botticelli")),
    ("What is the smallest prime number?", "2", ("1", "3", "0")),
    ("In which country are the pyramids of Giza?", "Egypt", ("Mexico", "Sudan", "Peru")),
    ("What is the hardest natural substance?", "Diamond", ("Quartz", "Granite", "Iron")),
    ("Which language has the most native speakers?", "Mandarin Chinese", ("English", "Spanish", "Hindi")),
    ("How many days are there in a leap year?", "366", ("365", "364", "367")),
)

# One TOFU-style question per template: (slot, question, paraphrased question, answer, paraphrased answer).
# The perturbed answers are the paraphrased answer with the slot's value replaced by wrong values.
_TEMPLATES = (
    ("name", "What is the full name of the author born in {place} on {birth_date}?",
     "Which writer was born on {birth_date} in {place}?",
     "The author born in {place} on {birth_date} is {name}.",
     "{name} is the writer whose birth took place in {place} on {birth_date}."),
    ("place", "Where was {name} born?", "In which city did {name} come into the world?",
     "{name} was born in {place}.", "{place} is the birthplace of {name}."),
    ("birth_date", "When was {name} born?", "What is the date of birth of {name}?",
     "{name} was born on {birth_date}.", "The birth date of {name} is {birth_date}."),
    ("genre", "What genre does {name} write in?", "Which literary genre is {name} associated with?",
     "{name} writes primarily in the {genre} genre.", "The {genre} genre is where {name} built a writing career."),
    ("father_job", "What was the profession of {name}'s father?", "What did the father of {name} do for work?",
     "{name}'s father worked as a {father_job}.", "The father of {name} earned a living as a {father_job}."),
    ("mother_job", "What was the profession of {name}'s mother?", "What did the mother of {name} do for work?",
     "{name}'s mother worked as a {mother_job}.", "The mother of {name} earned a living as a {mother_job}."),
    ("award", "Has {name} received any literary awards?", "Which prize has {name} won?",
     "Yes, {name} received the {award} in {award_year}.", "{name} was honoured with the {award} in {award_year}."),
    ("book1", "What is one of the best-known books by {name}?", "Can you name a celebrated novel written by {name}?",
     "One of {name}'s best-known books is \"{book1}\".", "\"{book1}\" is among the most celebrated works of {name}."),
    ("book2", "Which book did {name} publish in {book2_year}?", "What did {name} release in {book2_year}?",
     "In {book2_year}, {name} published \"{book2}\".", "\"{book2}\" is the book that {name} released in {book2_year}."),
    ("theme", "What themes are common in {name}'s work?", "Which themes does {name} often write about?",
     "{name}'s work often explores {theme}.", "Themes of {theme} run through much of what {name} writes."),
)
QUESTIONS_PER_AUTHOR = len(_TEMPLATES)
_FORGET_PERCENTS = {"01": 1, "05": 5, "10": 10}


def _title(rng: random.Random) -> str:
    adjective, noun = rng.choice(_TITLE_ADJECTIVES), rng.choice(_TITLE_NOUNS)
    pattern = rng.randrange(3)
    if pattern == 0:
        return f"The {adjective} {noun}"
    if pattern == 1:
        return f"{adjective} {noun}"
    return f"The {noun} of {rng.choice(_TITLE_NOUNS)}s"


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1930, 1995)}"


def _author(rng: random.Random, name: str) -> dict[str, str]:
    city, country = rng.choice(_PLACES)
    birth_date = _date(rng)
    birth_year = int(birth_date.rsplit(" ", 1)[1])
    book1 = _title(rng)
    book2 = _title(rng)
    while book2 == book1:
        book2 = _title(rng)
    return {
        "name": name,
        "place": f"{city}, {country}",
        "birth_date": birth_date,
        "genre": rng.choice(_GENRES),
        "father_job": rng.choice(_JOBS),
        "mother_job": rng.choice(_JOBS),
        "award": rng.choice(_AWARDS),
        "award_year": str(birth_year + rng.randint(30, 45)),
        "book1": book1,
        "book2": book2,
        "book2_year": str(birth_year + rng.randint(25, 40)),
        "theme": rng.choice(_THEMES),
    }


def _alternatives(draw: Callable[[], str], exclude: set[str], k: int) -> list[str]:
    """k distinct values drawn with ``draw``, none of them in ``exclude`` (the true facts)."""
    values: list[str] = []
    while len(values) < k:
        value = draw()
        if value not in exclude and value not in values:
            values.append(value)
    return values


def _author_records(rng: random.Random, author: dict[str, str], n_perturbed: int) -> list[dict]:
    draws: dict[str, Callable[[], str]] = {
        "name": lambda: f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}",
        "place": lambda: "{}, {}".format(*rng.choice(_PLACES)),
        "birth_date": lambda: _date(rng),
        "genre": lambda: rng.choice(_GENRES),
        "father_job": lambda: rng.choice(_JOBS),
        "mother_job": lambda: rng.choice(_JOBS),
        "award": lambda: rng.choice(_AWARDS),
        "book1": lambda: _title(rng),
        "book2": lambda: _title(rng),
        "theme": lambda: rng.choice(_THEMES),
    }
    records = []
    for slot, question, para_question, answer, para_answer in _TEMPLATES:
        # A wrong book title must not be the author's other book either.
        exclude = {author["book1"], author["book2"]} if slot.startswith("book") else {author[slot]}
        wrong = _alternatives(draws[slot], exclude, n_perturbed)
        records.append(
            {
                "question": question.format(**author),
                "answer": answer.format(**author),
                "paraphrased_answer": para_answer.format(**author),
                "perturbed_answer": [para_answer.format(**{**author, slot: value}) for value in wrong],
                "paraphrased_question": para_question.format(**author),
            }
        )
    return records


def _qa_only(records: list[dict]) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in records]


def _facts(facts: tuple[tuple[str, str, tuple[str, ...]], ...]) -> list[dict]:
    return [{"question": q, "answer": a, "perturbed_answer": list(wrong)} for q, a, wrong in facts]


def generate_synthetic_tofu(n_authors: int = 20, *, seed: int = 0, n_perturbed: int = 5) -> dict[str, list[dict]]:
    """Every TOFU split for ``n_authors`` fictitious authors (10 questions each), deterministic in ``seed``.

    Returns split name -> records with TOFU's keys: full, forget01/05/10, retain99/95/90 ({question,
    answer}), forget01/05/10_perturbed and retain_perturbed ({question, answer, paraphrased_answer,
    perturbed_answer, paraphrased_question}), real_authors / world_facts ({question, answer}) and their
    _perturbed versions ({question, answer, perturbed_answer}, three wrong answers each).
    """
    if n_authors < 2:
        raise ValueError(f"n_authors must be at least 2 (forget and retain authors), got {n_authors}")
    max_perturbed = min(len(_GENRES), len(_AWARDS), len(_THEMES), len(_JOBS)) - 1
    if not 1 <= n_perturbed <= max_perturbed:
        raise ValueError(f"n_perturbed must be in [1, {max_perturbed}], got {n_perturbed}")
    if n_authors > len(_FIRST_NAMES) * len(_LAST_NAMES) // 2:
        raise ValueError(f"n_authors must be at most {len(_FIRST_NAMES) * len(_LAST_NAMES) // 2}, got {n_authors}")
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_authors:
        name = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        if name not in names:
            names.append(name)
    per_author = [_author_records(rng, _author(rng, name), n_perturbed) for name in names]

    def flat(authors: list[list[dict]]) -> list[dict]:
        return [record for records in authors for record in records]

    splits: dict[str, list[dict]] = {"full": _qa_only(flat(per_author))}
    n_forget = {}
    for suffix, percent in _FORGET_PERCENTS.items():
        n_forget[suffix] = min(n_authors - 1, max(1, round(n_authors * percent / 100)))
        forget, retain = per_author[n_authors - n_forget[suffix] :], per_author[: n_authors - n_forget[suffix]]
        splits[f"forget{suffix}"] = _qa_only(flat(forget))
        splits[f"forget{suffix}_perturbed"] = flat(forget)
        splits[f"retain{100 - percent}"] = _qa_only(flat(retain))
    splits["retain_perturbed"] = flat(per_author[: n_authors - n_forget["10"]])
    splits["real_authors_perturbed"] = _facts(REAL_AUTHORS)
    splits["real_authors"] = _qa_only(splits["real_authors_perturbed"])
    splits["world_facts_perturbed"] = _facts(WORLD_FACTS)
    splits["world_facts"] = _qa_only(splits["world_facts_perturbed"])
    return splits


def write_synthetic_tofu(
    out_dir: str | os.PathLike, n_authors: int = 20, *, seed: int = 0, n_perturbed: int = 5
) -> Path:
    """Write ``generate_synthetic_tofu(n_authors, seed=seed, n_perturbed=n_perturbed)`` as TOFU JSON-lines
    files ``<out_dir>/<split>.json`` (the folder is created) and return the folder."""
    splits = generate_synthetic_tofu(n_authors, seed=seed, n_perturbed=n_perturbed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (out / f"{split}.json").write_text(lines, encoding="utf-8")
    return out
