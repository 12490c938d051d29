"""Unlearning benchmarks and their published metrics: TOFU, MUSE-News and the Harry Potter completion
protocol, plus a built-in synthetic TOFU-style data set. Metric formulas live in ``metrics``, the
membership-inference attacks in ``mia``, model-side scoring in ``scoring``, prompt formatting in
``prompts``, results tables and JSON files in ``report``, open-unlearning's evaluation logs in
``openunlearning_log``."""
from .harry_potter import evaluate_harry_potter, make_completion_pairs
from .muse import evaluate_muse, load_muse_split
from .openunlearning_log import (
    load_retain_reference,
    read_openunlearning_log,
    write_openunlearning_logs,
)
from .report import format_results, load_results, save_results
from .synthetic import generate_synthetic_tofu, write_synthetic_tofu
from .tofu import evaluate_tofu, load_tofu_split, tofu_forget_truth_ratios

__all__ = [
    "evaluate_harry_potter",
    "evaluate_muse",
    "evaluate_tofu",
    "format_results",
    "generate_synthetic_tofu",
    "load_muse_split",
    "load_retain_reference",
    "load_results",
    "load_tofu_split",
    "make_completion_pairs",
    "read_openunlearning_log",
    "save_results",
    "tofu_forget_truth_ratios",
    "write_openunlearning_logs",
    "write_synthetic_tofu",
]
