"""Keep bitsandbytes 4-bit layers differentiable on the CPU when a model is trained (QLoRA).

On a CPU with AVX512-BF16, bitsandbytes (0.48+) repacks a ``Linear4bit`` weight into an inference-only
layout the first time the layer runs in eval mode on an input without grad: after any validation or
no-grad evaluation pass. From then on ``matmul_4bit`` takes a kernel that autograd cannot see through,
so the gradient stops at that layer (with only a warning): LoRA adapters below a frozen 4-bit layer get
wrong gradients while every step still runs. A model loaded for training must never take that path.
"""

from __future__ import annotations

from torch import nn


def keep_4bit_trainable(model: nn.Module) -> int:
    """Turn off the CPU inference repack on every bitsandbytes ``Linear4bit`` in ``model`` and undo any
    repack already done, so the backward pass goes through every 4-bit layer again.

    A no-op for models without 4-bit layers, on bitsandbytes versions without the repack, and on GPUs
    (the repack only happens for CPU inputs). Safe to call more than once.

    Returns:
        The number of layers whose weight had been repacked and was restored.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes import functional as bnb_functional
    except ImportError:  # no bitsandbytes: there are no 4-bit layers either
        return 0
    inverse = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    restored = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        # The flag bitsandbytes checks before repacking; set whatever the version, read only by those with it.
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            if inverse is None:
                raise RuntimeError(
                    "a 4-bit layer holds bitsandbytes' CPU inference layout, and this bitsandbytes has no "
                    "inverse for it; load the model again for training"
                )
            weight.data, weight.quant_state = inverse(weight.data, state)
            module.quant_state = weight.quant_state
            restored += 1
    return restored
