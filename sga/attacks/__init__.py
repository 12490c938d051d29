"""Does the forgetting last? Attacks on an unlearned model that try to bring the forgotten answers back, each
measured before and after on the forget set and scored for durability.

==============  =================================================================================================
module          job
==============  =================================================================================================
``scores``      R (relearning against the retain model's relearning) and Q (a metric's own change), the formulas
``measure``     the forget-set measurement every attack repeats: probability, ROUGE-L, truth ratio, forget quality
``relearn``     relearning through the engine's fine-tuning: the forget set, half of it (RTT), a related set
``quantize``    4-bit NF4 and 8-bit reloads through bitsandbytes, and its weight round trip
``probes``      prompt probes: a jailbreak answer prefix, paraphrased questions, retain-paired questions
``results``     one attack's result (metrics, deltas, scores) and its open-unlearning logs
``suite``       the names of the attacks and the runner that measures, attacks and scores models
==============  =================================================================================================

This layer sits between ``sga.experiments`` (the study runs it) and ``sga.engine`` (relearning trains through it).
"""
from sga.attacks.measure import STANDARD, Measurement, PromptStyle, measure
from sga.attacks.probes import PROBES, probe_style
from sga.attacks.quantize import (
    QUANTIZATIONS,
    fake_quantized,
    load_quantized,
    quantize_dequantize,
)
from sga.attacks.relearn import RELEARN_SETS, RelearnSettings, relearn, split_halves
from sga.attacks.results import (
    AttackResult,
    score_attack,
    write_attack_logs,
    write_measurement_log,
)
from sga.attacks.scores import change_score, relearn_score
from sga.attacks.suite import (
    ATTACKS,
    AttackData,
    AttackRunner,
    AttackSuite,
    attack_models,
    parse_attacks,
)

__all__ = [
    "ATTACKS", "PROBES", "QUANTIZATIONS", "RELEARN_SETS", "STANDARD", "AttackData", "AttackResult", "AttackRunner",
    "AttackSuite", "Measurement", "PromptStyle", "RelearnSettings", "attack_models", "change_score", "fake_quantized",
    "load_quantized", "measure", "parse_attacks", "probe_style", "quantize_dequantize", "relearn", "relearn_score",
    "score_attack", "split_halves", "write_attack_logs", "write_measurement_log",
]
