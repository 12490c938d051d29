"""The whole check of a run configuration, before any model or data is loaded."""
from __future__ import annotations

from sga.config import UnlearnConfig
from sga.data.unlearning import check_pairing
from sga.engine.evaluation import check_evaluation_config
from sga.methods import check_method_name


def check_run_config(config: UnlearnConfig) -> UnlearnConfig:
    """Every check of ``config``, raising :class:`sga.config.ConfigError` on the first problem; returns it.

    ``UnlearnConfig.validate`` (each section's own values), then what needs the rest of the library: the method
    is registered (``sga.methods.METHODS``), the pairing it asks for is installed, and the evaluation's criterion,
    files and retain reference fit the data (``sga.engine.evaluation.check_evaluation_config``).
    """
    config.validate()
    check_method_name(config.method.name)
    check_pairing(config.data)
    check_evaluation_config(config)
    return config
