"""misp: multimodal preference optimisation of vision-language models (MISP-DPO and its baselines)."""

__version__ = "0.1.0"
