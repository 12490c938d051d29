"""Unlearning data: training records (``records``), the pairing of each forget sample with its most similar
normal samples (``pairing``), and the tokenized, paired samples and their batch schedule (``unlearning``)."""
from sga.data.pairing import embedding_available, pair_normal_samples
from sga.data.records import (
    check_records,
    encode_record,
    load_records,
    read_records,
    record_text,
)
from sga.data.unlearning import (
    BatchSchedule,
    UnlearningData,
    build_unlearning_data,
    data_fingerprint,
    pad_examples,
)

__all__ = [
    "BatchSchedule",
    "UnlearningData",
    "build_unlearning_data",
    "check_records",
    "data_fingerprint",
    "embedding_available",
    "encode_record",
    "load_records",
    "pad_examples",
    "pair_normal_samples",
    "read_records",
    "record_text",
]
