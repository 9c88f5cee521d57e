"""Batched greedy generation on a tiny formula-weight model: batching, pages fed while decoding,
error containment, stopping, n-gram ban."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw

from infra.vocabulary import Mode
from models.deepseek_ocr import generation_types
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.decode_step import NoRepeatNGramBan
from models.deepseek_ocr.formula_weights import fill_with_formula
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import (
    ContextLengthError,
    FedPage,
    GenerationSettings,
    PageGeneration,
    encode_pages,
)
from models.deepseek_ocr.generator import Generator, ListFeed
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM, VisionSpanMismatch
from models.deepseek_ocr.processor import PageInputs, prepare_page_from_ids
from models.engine import FinishReason

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


class TrickleFeed:
    """Hands out one page on every third poll while others decode, so pages join mid-run."""

    def __init__(self, pages: list[FedPage]) -> None:
        self.waiting = deque(pages)
        self.polls = 0
        self.joined_mid_run = 0

    def take(self, limit: int, *, wait: bool) -> list[FedPage] | None:
        if not self.waiting:
            return None
        self.polls += 1
        if not wait and self.polls % 3:
            return []
        self.joined_mid_run += not wait
        return [self.waiting.popleft()]


def run_fed(generator: Generator, feed) -> list[tuple[object, PageGeneration | Exception]]:
    finished: list[tuple[object, PageGeneration | Exception]] = []
    generator.run(feed, lambda page, outcome: finished.append((page.key, outcome)))
    return finished


def test_pages_fed_mid_generation_decode_as_one_at_a_time(model, pages, spans) -> None:
    """Pages joining a running generation (encoded on admission, into slots other pages freed)
    give the tokens each gives alone, and each is reported as it finishes; a second run on the
    same generator (its cache and decode state reused) gives them again."""
    settings = replace(SETTINGS, max_new_tokens=18)
    limits = [18, 3, 5, 2]
    capacity = max(len(p.input_ids) for p in pages) + max(limits)
    generator = Generator(model, settings, num_slots=2, capacity=capacity)
    alone = [
        generate(model, [page], settings, max_new_tokens=[limit], vision_spans=[span])[0]
        for page, limit, span in zip(pages, limits, spans, strict=True)
    ]
    for _ in range(2):
        fed = [FedPage(i, p, limit) for i, (p, limit) in enumerate(zip(pages, limits, strict=True))]
        feed = TrickleFeed(fed)
        finished = run_fed(generator, feed)
        assert feed.joined_mid_run >= 2  # pages really joined while others decoded
        # The long first page is reported last; the short ones as soon as each ends.
        assert [key for key, _ in finished] == [1, 2, 3, 0]
        for key, outcome in finished:
            assert isinstance(outcome, PageGeneration)
            assert outcome.token_ids == alone[key].token_ids
            assert outcome.finish_reason == alone[key].finish_reason
            assert outcome.encode_ms > 0


def recorded_admissions(generator: Generator, monkeypatch) -> list[tuple[int, int]]:
    """(pages admitted, pages live then) of each of `generator`'s admissions, as they happen."""
    admissions: list[tuple[int, int]] = []
    admit = generator._admit

    def recorded(batch: list[FedPage]) -> None:
        admissions.append((len(batch), len(generator.live)))
        admit(batch)

    monkeypatch.setattr(generator, "_admit", recorded)
    return admissions


def test_a_running_batch_refills_freed_slots_in_groups(model, pages, spans, monkeypatch) -> None:
    """Pages of different lengths free slots one or two per step; a running batch waits until
    an eighth of its slots (at most `admit_pages`) are free and admits pages together, so their
    encoding and prefill run batched. The tokens are those of refilling every freed slot at once."""
    limits = [random.Random(i).randint(1, 12) for i in range(40)]
    capacity = max(len(p.input_ids) for p in pages) + max(limits)

    def run(admit_pages: int) -> tuple[dict[object, list[int]], list[tuple[int, int]]]:
        settings = replace(SETTINGS, max_new_tokens=12, admit_pages=admit_pages)
        generator = Generator(model, settings, num_slots=24, capacity=capacity)
        admissions = recorded_admissions(generator, monkeypatch)
        fed = [FedPage(i, pages[i % 4], n, spans[i % 4]) for i, n in enumerate(limits)]
        outcomes = dict(run_fed(generator, ListFeed(fed)))
        assert len(outcomes) == len(limits)
        return {key: outcome.token_ids for key, outcome in outcomes.items()}, admissions

    grouped, admissions = run(admit_pages=3)  # 24 slots: an eighth is 3
    refills = [size for size, live in admissions if live]
    assert refills, "freed slots should be refilled while pages decode"
    assert all(size >= 3 for size in refills[:-1])  # the last may take what the feed has left
    eager, eager_admissions = run(admit_pages=1)
    assert any(size < 3 for size, live in eager_admissions if live)  # the old behaviour differs
    assert grouped == eager


@pytest.mark.parametrize("admit_wait_s", [3600.0, 0.0])
def test_pages_trickling_into_a_running_batch_are_admitted_in_groups(
    model, pages, spans, monkeypatch, admit_wait_s
) -> None:
    """A running batch with room gathers pages that arrive one by one until `admit_size` of
    them are there (or `admit_wait_s` passed) and admits them together, instead of encoding and
    prefilling one page at every step; the tokens are those of a batch fed all at once."""
    limits = [16] + [random.Random(i).randint(4, 12) for i in range(1, 13)]
    capacity = max(len(p.input_ids) for p in pages) + max(limits)
    settings = replace(SETTINGS, max_new_tokens=16, admit_pages=4, admit_wait_s=admit_wait_s)
    fed = [FedPage(i, pages[i % 4], n, spans[i % 4]) for i, n in enumerate(limits)]

    generator = Generator(model, settings, num_slots=32, capacity=capacity)
    admissions = recorded_admissions(generator, monkeypatch)
    trickled = {key: outcome.token_ids for key, outcome in run_fed(generator, TrickleFeed(fed))}
    at_once = Generator(model, settings, num_slots=32, capacity=capacity)
    together = {key: outcome.token_ids for key, outcome in run_fed(at_once, ListFeed(fed))}
    assert trickled == together
    refills = [size for size, live in admissions if live]
    if admit_wait_s:  # groups of `admit_size` (4 at 32 slots), the feed's last pages aside
        assert refills and all(size >= 4 for size in refills[:-1])
    else:  # nothing to wait for: every page is admitted the step it arrives
        assert refills and all(size == 1 for size in refills)


def test_the_decode_loop_accounts_for_its_time(model, pages, spans) -> None:
    """`loop_seconds` splits a run's time between polling the feed, admitting pages and decode
    steps; together they are the run, less the loop's own bookkeeping."""
    settings = replace(SETTINGS, max_new_tokens=12)
    capacity = max(len(p.input_ids) for p in pages) + 12
    generator = Generator(model, settings, num_slots=2, capacity=capacity)
    fed = [FedPage(i, pages[i % 4], 12, spans[i % 4]) for i in range(6)]
    started = time.perf_counter()
    run_fed(generator, TrickleFeed(fed))
    wall = time.perf_counter() - started
    spent = generator.loop_seconds
    assert spent["admit"] > 0 and spent["decode"] > 0 and spent["feed"] > 0
    assert 0.8 * wall <= sum(spent.values()) <= wall
    groups = generator.admissions["groups"]
    assert generator.admissions["pages"] == 6 and 1 < groups <= 6  # trickled: several groups


def test_each_step_is_launched_before_the_last_ones_tokens_are_read(model, pages, spans) -> None:
    """Finished pages are reported while the next step runs (the host's work hides behind the
    device's), and a page that fills its slot to capacity still decodes: the step launched
    behind its last one writes into the slot's one position of slack, and its token is dropped."""
    settings = replace(SETTINGS, max_new_tokens=9)
    limits = [4, 9, 6]
    capacity = max(len(pages[i].input_ids) for i in range(3)) + max(limits)
    generator = Generator(model, settings, num_slots=3, capacity=capacity)
    fed = [FedPage(i, pages[i], n, spans[i]) for i, n in enumerate(limits)]
    reported_during_a_step: list[bool] = []

    def finished(page: FedPage, outcome: PageGeneration | Exception) -> None:
        assert isinstance(outcome, PageGeneration)
        assert len(outcome.token_ids) == limits[page.key]
        alone = generate(model, [pages[page.key]], settings, max_new_tokens=[limits[page.key]])
        assert outcome.token_ids == alone[0].token_ids
        reported_during_a_step.append(generator.in_flight is not None)

    generator.run(ListFeed(fed), finished)
    assert len(reported_during_a_step) == 3 and all(reported_during_a_step)
    assert len(pages[1].input_ids) + limits[1] == capacity  # Gundam's page fills its slot


def test_pages_encoded_on_the_encoder_thread_decode_as_one_at_a_time(
    model, pages, monkeypatch
) -> None:
    """With `encode_thread`, admitted pages are encoded on a thread of their own while the
    batch decodes and prefilled once encoded: each page gives the tokens it gives alone, every
    encoding ran on that thread, and a page whose encoding raises is reported with its error
    (once it fails alone) while the others decode."""
    limits = [14, 3, 5, 2, 9, 7]
    settings = replace(SETTINGS, max_new_tokens=14)
    capacity = max(len(p.input_ids) for p in pages) + max(limits)
    bad = replace(pages[2])  # the same page, another object: its encoding raises
    encoding_threads: list[str] = []
    encode = generation_types.encode_pages

    def recorded(model, inputs, settings=None):
        encoding_threads.append(threading.current_thread().name)
        if any(page is bad for page in inputs):
            raise ValueError("views the encoder cannot take")
        return encode(model, inputs, settings)

    fed = [FedPage(i, pages[i % 4], n) for i, n in enumerate(limits)] + [FedPage("bad", bad, 4)]
    monkeypatch.setattr(generation_types, "encode_pages", recorded)
    threaded = Generator(
        model, replace(settings, encode_thread=True), num_slots=2, capacity=capacity
    )
    try:
        finished = dict(run_fed(threaded, TrickleFeed(fed)))
    finally:
        threaded.release()
    assert encoding_threads and all(t.startswith("vision-encoder") for t in encoding_threads)
    assert isinstance(finished.pop("bad"), ValueError)
    monkeypatch.setattr(generation_types, "encode_pages", encode)
    for key, outcome in finished.items():
        alone = generate(model, [pages[key % 4]], settings, max_new_tokens=[limits[key]])[0]
        assert outcome.token_ids == alone.token_ids
        assert outcome.encode_ms > 0
    assert len(finished) == len(limits)


def test_every_step_shape_falls_in_a_bucket_the_warm_up_visits(model) -> None:
    """The buckets a worker captures ahead (`buckets`) are every shape a step can take: any
    rows count and key length map to one of them, and none is visited twice."""
    generator = Generator(model, SETTINGS, num_slots=11, capacity=300)
    step = generator.bucketed_step
    visited = list(step.buckets())
    assert len(visited) == len(set(visited)) == 5 * 3  # rows 1, 2, 4, 8, 11; keys 128, 256, 300
    reached = {step.bucket(rows, keys) for rows in range(1, 12) for keys in range(1, 301)}
    assert reached == set(visited)
    assert visited[:5] == [(1, 128), (2, 128), (4, 128), (8, 128), (11, 128)]  # short keys first


def test_steps_run_over_free_slots_before_pages_leave_their_tokens_alone(
    model, pages, spans
) -> None:
    """Capturing graphs ahead runs a real step for every bucket over slots no page holds yet
    (on CPU the same steps run eagerly); pages admitted afterwards decode as on a fresh
    generator, since admission resets what those steps wrote."""
    limits = [14, 3, 5, 2, 9, 7]
    settings = replace(SETTINGS, max_new_tokens=14)
    capacity = max(len(p.input_ids) for p in pages) + max(limits)
    fed = [FedPage(i, pages[i % 4], n, spans[i % 4]) for i, n in enumerate(limits)]

    warmed = Generator(model, settings, num_slots=3, capacity=capacity)
    with torch.inference_mode():
        for bucket in warmed.bucketed_step.buckets():
            warmed.bucketed_step(*bucket)
    assert int(warmed.cache.positions.max()) > 0  # the steps did write the free slots' state
    fresh = Generator(model, settings, num_slots=3, capacity=capacity)
    after_warm_up = {key: out.token_ids for key, out in run_fed(warmed, ListFeed(fed))}
    assert after_warm_up == {key: out.token_ids for key, out in run_fed(fresh, ListFeed(fed))}


def test_a_failing_page_is_reported_alone_and_the_others_decode(model, pages, spans) -> None:
    """A page the model rejects (its placeholders do not match its vision span) fails first in
    a batch with a good page: both are retried with a smaller batch, the bad page is reported
    with its error once it fails alone, and every good page still decodes as it does alone."""
    mask = pages[0].images_seq_mask.clone()
    mask[mask.nonzero()[0]] = False  # one placeholder fewer than the span has features
    bad = replace(pages[0], images_seq_mask=mask)
    fed = [
        FedPage("good-0", pages[0], vision_span=spans[0]),
        FedPage("bad", bad, vision_span=spans[0]),
        FedPage("good-2", pages[2], vision_span=spans[2]),
        FedPage("good-3", pages[3], vision_span=spans[3]),
    ]
    capacity = max(len(p.input_ids) for p in pages) + SETTINGS.max_new_tokens
    generator = Generator(model, SETTINGS, num_slots=2, capacity=capacity)
    finished = dict(run_fed(generator, ListFeed(fed)))
    assert set(finished) == {"good-0", "bad", "good-2", "good-3"}  # each reported once
    assert isinstance(finished["bad"], VisionSpanMismatch)
    for key, index in (("good-0", 0), ("good-2", 2), ("good-3", 3)):
        alone = generate(model, [pages[index]], SETTINGS, vision_spans=[spans[index]])[0]
        assert finished[key].token_ids == alone.token_ids
    assert generator.max_live == 2  # the batch grew back after the error


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


def test_device_time_is_shared_among_a_batch_not_counted_per_page(model, pages) -> None:
    """Summing each page's wall time overstates a batch's device time by about its size; the
    pages' `gpu_ms` shares add up to no more than the call took."""
    batch = [pages[0]] * 6
    started = time.perf_counter()
    results = generate(model, batch, SETTINGS)
    call_ms = (time.perf_counter() - started) * 1000
    assert all(r.gpu_ms > r.encode_ms for r in results)
    assert sum(r.gpu_ms for r in results) <= call_ms
    assert sum(r.decode_ms for r in results) > 2 * sum(r.gpu_ms - r.encode_ms for r in results)


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
