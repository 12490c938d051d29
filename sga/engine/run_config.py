"""The whole check of a run configuration, before any model or data is loaded."""
from __future__ import annotations

import importlib.util

from sga.config import ConfigError, UnlearnConfig
from sga.data.unlearning import check_pairing
from sga.engine.evaluation import check_evaluation_config
from sga.methods import Objective, check_method_name


def check_run_config(config: UnlearnConfig) -> UnlearnConfig:
    """Every check of ``config``, raising :class:`sga.config.ConfigError` on the first problem; returns it.

    ``UnlearnConfig.validate`` (each section's own values), then what needs the rest of the library: the method
    is registered (``sga.methods.METHODS``), the pairing it asks for is installed, and the evaluation's criterion,
    files and retain reference fit the data (``sga.engine.evaluation.check_evaluation_config``), and the experiment
    trackers are installed.
    """
    config.validate()
    check_method_name(config.method.name)
    check_pairing(config.data)
    check_evaluation_config(config)
    check_trackers(config)
    return config


def check_normal_data(config: UnlearnConfig, objective: Objective) -> None:
    """A method that trains on normal (retain) data gets some: json data need a retain file."""
    if objective.uses_normal and config.data.dataset == "json" and not config.data.retain_file:
        raise ConfigError(f"method {objective.name} needs normal (retain) data: give --retain-file FILE")


# the package each experiment tracker of train.report_to imports
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(config: UnlearnConfig) -> None:
    """Every tracker of ``train.report_to`` is installed."""
    for name in config.train.trackers():
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(f"train.report_to={name} needs the {TRACKER_PACKAGES[name]} package (pip install {TRACKER_PACKAGES[name]})")
