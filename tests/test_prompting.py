"""Prompt templating: plain prompts are wrapped once; pre-templated prompts (mDPO files) are kept."""

from __future__ import annotations

from misp.models.prompting import encode_example, format_prompt
from misp.models.vlm import VLMSpec, load_vlm


def test_plain_prompt_gets_the_llava_template():
    assert format_prompt("describe the image.") == "USER: <image>\ndescribe the image. ASSISTANT:"


def test_pretemplated_prompt_is_kept_and_tokenises_to_one_image(vlm_dir):
    _, processor = load_vlm(VLMSpec(path=str(vlm_dir)))
    templated = "USER: <image>\ndescribe the image. ASSISTANT:"
    assert format_prompt(templated) == templated
    plain = encode_example(processor, "describe the image.", "a red circle.")
    again = encode_example(processor, templated, "a red circle.")
    assert again == plain
