"""Tiny random-weight models of every supported family, in the exact hub layout, built offline.

They are the real ``transformers`` architectures with small sizes, so every code path a 7B checkpoint takes
(loading, prompting, the image scatter, M-RoPE positions, 4-bit, LoRA, FSDP) runs in the tests on a CPU.
"""
