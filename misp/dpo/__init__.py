"""Preference optimisation of the VLM: MISP-DPO and its baselines as configurations of one module."""

from misp.dpo.module import MISPDPOModule
from misp.dpo.objective import PreferenceObjective

__all__ = ["MISPDPOModule", "PreferenceObjective"]
