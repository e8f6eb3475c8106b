"""An open_clip ViT image tower as a transformers ``CLIPVisionModel``: LLaVA's vision tower from a CLIP.

Real LLaVA starts from a pretrained CLIP vision tower. On the Shapes world the tiny LLaVA does the same
with the tiny CLIP misp trained, so that SFT only has to learn the projector and the language side.
open_clip fuses q/k/v into one ``in_proj``; transformers keeps them apart; the rest renames one to one.
"""

from __future__ import annotations

from torch import Tensor, nn

from misp.models.clip import ClipSpec, load_clip


def vision_config_kwargs(visual: nn.Module) -> dict:
    """CLIPVisionConfig arguments that reproduce an open_clip VisionTransformer's shape and maths."""
    width = visual.conv1.out_channels
    block = visual.transformer.resblocks[0]
    if type(block.mlp.gelu).__name__ != "GELU" or getattr(visual, "attn_pool", None) is not None:
        raise ValueError("only plain open_clip ViTs (GELU MLP, no attention pooling) convert to CLIPVisionModel")
    return {
        "hidden_size": width,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": len(visual.transformer.resblocks),
        "num_attention_heads": block.attn.num_heads,
        "image_size": visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size,
        "patch_size": visual.conv1.kernel_size[0],
        "hidden_act": "gelu",
        "layer_norm_eps": block.ln_1.eps,
        "projection_dim": visual.proj.shape[1] if visual.proj is not None else width,
    }


def vision_state_dict(visual: nn.Module) -> dict[str, Tensor]:
    """The open_clip tower's weights under CLIPVisionModel's names (without the ``vision_model.`` root)."""
    sd = visual.state_dict()
    out = {
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "pre_layrnorm.weight": sd["ln_pre.weight"],
        "pre_layrnorm.bias": sd["ln_pre.bias"],
        "post_layernorm.weight": sd["ln_post.weight"],
        "post_layernorm.bias": sd["ln_post.bias"],
    }
    for i in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[src + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[src + "attn.in_proj_bias"].chunk(3)
        out |= {
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.weight": k, dst + "self_attn.k_proj.bias": kb,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.out_proj.weight": sd[src + "attn.out_proj.weight"],
            dst + "self_attn.out_proj.bias": sd[src + "attn.out_proj.bias"],
            dst + "layer_norm1.weight": sd[src + "ln_1.weight"], dst + "layer_norm1.bias": sd[src + "ln_1.bias"],
            dst + "layer_norm2.weight": sd[src + "ln_2.weight"], dst + "layer_norm2.bias": sd[src + "ln_2.bias"],
            dst + "mlp.fc1.weight": sd[src + "mlp.c_fc.weight"], dst + "mlp.fc1.bias": sd[src + "mlp.c_fc.bias"],
            dst + "mlp.fc2.weight": sd[src + "mlp.c_proj.weight"], dst + "mlp.fc2.bias": sd[src + "mlp.c_proj.bias"],
        }
    return {k: v.detach().clone() for k, v in out.items()}


def load_clip_vision(checkpoint: str) -> tuple[dict, dict[str, Tensor]]:
    """Config kwargs and weights of the vision tower of a CLIP saved by ``save_clip``."""
    visual = load_clip(ClipSpec(checkpoint=checkpoint)).model.visual
    return vision_config_kwargs(visual), vision_state_dict(visual)
