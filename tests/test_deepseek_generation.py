"""Batched greedy generation on a tiny formula-weight model: batching, stopping, n-gram ban."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw

from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.formula_weights import fill_with_formula
from models.deepseek_ocr.generation import (
    ContextLengthError,
    GenerationSettings,
    NoRepeatNGramBan,
    encode_pages,
    generate,
)
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import PageInputs, prepare_page_from_ids
from models.engine import FinishReason, Mode

IMAGE_TOKEN_ID = 500
SETTINGS = GenerationSettings(max_new_tokens=8, ngram_size=3, ngram_window=6, max_batch=2)


@pytest.fixture(scope="module")
def model() -> DeepseekOcrForCausalLM:
    torch.set_num_threads(2)
    model = DeepseekOcrForCausalLM(DeepseekOcrConfig.tiny(vocab_size=512)).eval()
    fill_with_formula(model)
    return model


def page_image(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for row, top in enumerate(range(40, height - 40, 26)):
        draw.rectangle((40, top, width - 40 - 37 * (row % 5), top + 11), fill=(20, 30, 40))
    return image


@pytest.fixture(scope="module")
def pages() -> list[PageInputs]:
    """Four modes, three prompt lengths (79, 117, 909 and 279 tokens), Gundam tiled 2x3."""
    image = page_image(700, 900)
    return [
        prepare_page_from_ids(image, mode, [11, 12], [13, 14, 15], bos_id=0, image_token_id=500)
        for mode in (Mode.TINY, Mode.GUNDAM, Mode.SMALL, Mode.BASE)
    ]


@pytest.fixture(scope="module")
def spans(model: DeepseekOcrForCausalLM, pages: list[PageInputs]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return encode_pages(model, pages)


def test_batched_generation_equals_one_page_at_a_time(model, pages, spans) -> None:
    """Mixed modes and prompt lengths, two slots for four pages (so slots are refilled):
    token for token the same as decoding each page alone."""
    batched = generate(model, pages, SETTINGS, vision_spans=spans)
    for page, span, result in zip(pages, spans, batched, strict=True):
        alone = generate(model, [page], SETTINGS, vision_spans=[span])[0]
        assert result.token_ids == alone.token_ids
        assert result.finish_reason == alone.finish_reason
    assert len({tuple(r.token_ids) for r in batched}) > 1, "pages should decode differently"


def test_batched_vision_encoding_equals_per_page_encoding(model, pages, spans) -> None:
    with torch.inference_mode():
        for page, span in zip(pages, spans, strict=True):
            torch.testing.assert_close(encode_pages(model, [page])[0], span)


def test_results_carry_counts_and_timings(model, pages) -> None:
    results = generate(model, pages[:2], SETTINGS)
    tiny, gundam = results
    assert (tiny.placeholder_tokens, tiny.valid_vision_tokens, tiny.prompt_tokens) == (73, 64, 79)
    assert gundam.placeholder_tokens == 903 and gundam.prompt_tokens == 909
    assert gundam.valid_vision_tokens == pages[1].valid_vision_tokens
    for result in results:
        assert result.output_tokens == len(result.token_ids) == 8
        assert result.finish_reason is FinishReason.LENGTH
        assert result.encode_ms > 0 and result.decode_ms > 0
    assert gundam.encode_ms > tiny.encode_ms  # shared by placeholders


def test_eos_stops_a_sequence_and_is_dropped_from_the_text(model, pages, spans) -> None:
    free_run = generate(model, pages[:1], SETTINGS, vision_spans=spans[:1])[0].token_ids
    eos = free_run[2]
    settings = replace(SETTINGS, eos_token_id=eos)

    class Decoder:
        def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
            return " ".join(map(str, ids))

    stopped = generate(model, pages[:1], settings, Decoder(), vision_spans=spans[:1])[0]
    first_eos = free_run.index(eos)
    assert stopped.finish_reason is FinishReason.EOS
    assert stopped.token_ids == free_run[: first_eos + 1]
    assert stopped.text == " ".join(map(str, free_run[:first_eos]))

    ignored = generate(
        model, pages[:1], replace(settings, ignore_eos=True), vision_spans=spans[:1]
    )[0]
    assert ignored.finish_reason is FinishReason.LENGTH
    assert ignored.token_ids == free_run


def test_per_page_limits_and_context_length(model, pages, spans) -> None:
    results = generate(model, pages[:2], SETTINGS, max_new_tokens=[3, None], vision_spans=spans[:2])
    assert [r.output_tokens for r in results] == [3, 8]
    assert all(r.finish_reason is FinishReason.LENGTH for r in results)

    short_context = replace(model.config.decoder, max_position_embeddings=80)
    small = DeepseekOcrForCausalLM(replace(model.config, decoder=short_context))
    limited = generate(small, pages[:1], SETTINGS)[0]  # 79-token prompt: room for one token
    assert limited.output_tokens == 1
    with pytest.raises(ContextLengthError, match="117 tokens"):
        generate(small, pages[2:3], SETTINGS)


def banned_by_reference(generated: list[int], ngram: int, window: int, whitelist: set[int]):
    """The official vLLM rule, written out: the prefix is the last n-1 ids; scan the n-grams
    starting in [max(0, len - window), len - n] and ban what followed the prefix."""
    if len(generated) < ngram:
        return set()
    prefix = generated[len(generated) - ngram + 1 :]
    banned = set()
    for start in range(max(0, len(generated) - window), len(generated) - ngram + 1):
        if generated[start : start + ngram - 1] == prefix:
            banned.add(generated[start + ngram - 1])
    return banned - whitelist


@pytest.mark.parametrize(("ngram", "window"), [(2, 5), (3, 8), (3, 50), (4, 6)])
def test_ngram_ban_matches_the_official_rule(ngram: int, window: int) -> None:
    rng = random.Random(ngram * 100 + window)
    vocab, whitelist = 6, {2}
    # Longest first, so the sequences still running always fill the first slots.
    sequences = [[rng.randrange(vocab) for _ in range(length)] for length in range(39, 0, -3)]
    ban = NoRepeatNGramBan(ngram, window, frozenset(whitelist), len(sequences), "cpu")
    for position in range(max(map(len, sequences))):
        live = [s for s in sequences if len(s) > position]
        # Ban state of every live sequence after `position` tokens, then push the next token.
        logits = ban(slice(0, len(live)), torch.zeros(len(live), vocab))
        for row, sequence in enumerate(live):
            expected = banned_by_reference(sequence[:position], ngram, window, whitelist)
            assert set(torch.nonzero(logits[row].isinf()).flatten().tolist()) == expected
        ban.push(slice(0, len(live)), torch.tensor([s[position] for s in live]))


@pytest.mark.parametrize(("whitelist", "banned"), [(frozenset({7}), []), (frozenset(), [7])])
def test_ngram_ban_keeps_whitelisted_table_cells(whitelist: frozenset[int], banned: list[int]):
    ban = NoRepeatNGramBan(2, 10, whitelist, 1, "cpu")
    for token in (3, 3, 7, 7):
        ban.push(slice(0, 1), torch.tensor([token]))
    logits = ban(slice(0, 1), torch.zeros(1, 8))
    assert logits[0].isinf().nonzero().flatten().tolist() == banned  # `7 7` repeats
