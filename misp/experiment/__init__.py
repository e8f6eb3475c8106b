"""``misp experiment``: a fair multi-seed comparison of preference methods, tuned on a validation split."""

from misp.experiment.config import ExperimentConfig, QuickMode, Variant
from misp.experiment.runner import Experiment, Run

__all__ = ["Experiment", "ExperimentConfig", "QuickMode", "Run", "Variant"]
