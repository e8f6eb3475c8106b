"""misp: multimodal preference optimisation of vision-language models (MISP-DPO and its baselines)."""

import os as _os

# transformers >= 5.2x kernelizes every from_pretrained model with kernels downloaded from the hub unless told
# not to, and refuses to load at all when the `kernels` package is absent (misp's install removes it). misp
# trains the layers it loads, with no code fetched at run time; a user who wants hub kernels sets
# USE_HUB_KERNELS=YES themselves.
_os.environ.setdefault("USE_HUB_KERNELS", "NO")

__version__ = "0.1.0"
