"""Training records: read, check and tokenize them.

A record is a question/answer pair ``{"question", "answer"}`` (only the answer is scored) or a text
``{"text"}`` (every token after the first is scored). Records come from a TOFU split
(``sga.benchmarks.tofu``) or from JSON / JSON-lines files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from sga.benchmarks.prompts import IGNORE_INDEX, EncodedExample, encode_qa, encode_text
from sga.benchmarks.tofu import HUB_DATASET, load_tofu_split, read_json_records
from sga.config import DataConfig, tofu_retain_split


def check_records(records: object, source: str) -> list[dict]:
    """Each record is a mapping with string "question" and "answer" (a QA record), or a string "text";
    an error names ``source`` (the file) and the record's index otherwise (a null answer would train on "None")."""
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source} holds no records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {i} of {source} is a {type(record).__name__}, not an object")
        keys = ("question", "answer") if ("answer" in record or "question" in record or "text" not in record) else ("text",)
        for key in keys:
            if key not in record:
                raise ValueError(f"record {i} of {source} needs 'question' and 'answer', or 'text'")
            if not isinstance(record[key], str):
                raise ValueError(f"record {i} of {source}: {key!r} must be a string, got {record[key]!r}")
    return records


def read_records(path: str) -> list[dict]:
    """Records of a JSON / JSON-lines file; each must hold string "question" and "answer", or "text"."""
    return check_records(read_json_records(Path(path)), str(path))


def load_records(config: DataConfig) -> tuple[list[dict], list[dict]]:
    """Forget and retain records as the data config names them (retain may be empty for json data)."""
    if config.dataset == "tofu":
        def split_records(split: str) -> list[dict]:
            source = str(Path(config.data_dir) / f"{split}.json") if config.data_dir else f"{HUB_DATASET} ({split})"
            return check_records(load_tofu_split(split, config.data_dir), source)

        return split_records(config.tofu_split), split_records(tofu_retain_split(config.tofu_split))
    forget = read_records(config.forget_file)
    retain = read_records(config.retain_file) if config.retain_file else []
    return forget, retain


def record_text(record: dict) -> str:
    """The text a record is compared by when pairing: question and answer, or the text."""
    if "text" in record and "answer" not in record:
        return str(record["text"])
    return f"{record['question']} {record['answer']}"


def encode_record(
    tokenizer, record: dict, *, max_length: int, use_chat_template: Optional[bool] = None
) -> EncodedExample:
    """Token ids and labels of a record (HF convention: labels aligned with input_ids, -100 unscored),
    truncated to ``max_length`` tokens; an error if no scored token survives truncation."""
    if "answer" in record:
        example = encode_qa(tokenizer, str(record["question"]), str(record["answer"]), use_chat_template=use_chat_template)
    else:
        example = encode_text(tokenizer, str(record["text"]), max_length=max_length)
    if len(example.input_ids) > max_length:
        example = EncodedExample(example.input_ids[:max_length], example.labels[:max_length], example.prompt_length)
    if all(label == IGNORE_INDEX for label in example.labels[1:]):
        raise ValueError(f"no answer token left within max_length={max_length} for record {record_text(record)[:80]!r}")
    return example
