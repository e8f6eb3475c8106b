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


def _pair_records():
    from misp.data.records import PreferenceRecord

    long = "a red circle at the top left. " * 40
    return [
        PreferenceRecord(id="short", image="x.png", prompt="describe the image.", chosen="a red circle.", rejected="a blue square."),
        PreferenceRecord(id="long", image="x.png", prompt="describe the image.", chosen="a red circle.", rejected=long),
    ]


def test_a_pair_over_max_length_is_skipped_with_a_counted_warning(vlm_dir, caplog):
    import logging

    from misp.models.prompting import encode_preference_records

    _, processor = load_vlm(VLMSpec(path=str(vlm_dir)))
    short = encode_example(processor, "describe the image.", "a blue square.")
    max_length = len(short["input_ids"]) + 4
    with caplog.at_level(logging.WARNING):
        encoded = encode_preference_records(processor, _pair_records(), max_length, "skip", "pairs.jsonl")
    assert encoded[0] is not None and encoded[1] is None
    assert "1 of 2 records" in caplog.text and "long" in caplog.text and "pairs.jsonl" in caplog.text


def test_truncate_cuts_both_responses_and_raise_names_the_record(vlm_dir):
    import pytest

    from misp.models.prompting import encode_preference_records

    _, processor = load_vlm(VLMSpec(path=str(vlm_dir)))
    eos = processor.tokenizer.eos_token_id
    max_length = len(encode_example(processor, "describe the image.", "a blue square.")["input_ids"]) + 4
    chosen, rejected = encode_preference_records(processor, _pair_records(), max_length, "truncate")[1]
    assert len(rejected["input_ids"]) == max_length and rejected["input_ids"][-1] != eos  # cut: unfinished
    assert chosen["input_ids"][-1] == eos  # the chosen answer fits whole
    with pytest.raises(ValueError, match="record 'long'.*max_length"):
        encode_preference_records(processor, _pair_records(), max_length, "raise", "pairs.jsonl")


def test_prompt_cache_leaves_every_encoding_of_the_tiny_worlds_sft_records_unchanged(vlm_dir, tiny_world, monkeypatch):
    from misp.data.records import read_sft_records
    from misp.models import prompting

    _, processor = load_vlm(VLMSpec(path=str(vlm_dir)))
    records = read_sft_records(tiny_world / "sft.jsonl").records
    prompting.clear_prompt_cache()
    cached = [encode_example(processor, r.prompt, r.response, max_length=256) for r in records]
    again = [encode_example(processor, r.prompt, r.response, max_length=256) for r in records]  # all hits
    prompts_only = [encode_example(processor, r.prompt) for r in records[:20]]
    monkeypatch.setattr(prompting, "PROMPT_CACHE_SIZE", 0)
    prompting.clear_prompt_cache()
    plain = [encode_example(processor, r.prompt, r.response, max_length=256) for r in records]
    assert len({r.prompt for r in records}) < len(records)  # prompts repeat, so the cache is exercised
    assert cached == plain and again == plain
    assert prompts_only == [encode_example(processor, r.prompt) for r in records[:20]]


def test_prompt_cache_is_bounded_and_sees_tokens_added_later(vlm_dir, monkeypatch):
    from misp.models import prompting

    _, processor = load_vlm(VLMSpec(path=str(vlm_dir)))
    tokenizer = processor.tokenizer
    monkeypatch.setattr(prompting, "PROMPT_CACHE_SIZE", 2)
    prompting.clear_prompt_cache()
    for prompt in ("describe the image.", "is there a red circle?", "is there a blue square?"):
        encode_example(processor, prompt, "yes.")
    assert len(prompting._PROMPT_IDS[tokenizer]) == 2
    before = encode_example(processor, "describe the zorblax.")
    tokenizer.add_tokens(["zorblax"])  # changes the prompt's ids: the cached ones must not be served
    after = encode_example(processor, "describe the zorblax.")
    assert after["input_ids"] == list(tokenizer(prompting.format_prompt("describe the zorblax.").replace(
        "<image>", processor.image_token * prompting.num_image_tokens(processor)))["input_ids"])
    assert after != before
