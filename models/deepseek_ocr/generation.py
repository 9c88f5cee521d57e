"""Batched greedy generation for pages of any mix of modes.

The vision encoder runs once over all pages (views of equal size batched together). Prompts of
different lengths are prefilled right-padded into per-sequence cache slots, so every sequence keeps
its own positions from 0 and a batch gives the same tokens as one page at a time. Decoding runs
over all live slots; a finished sequence frees its slot at once and the next waiting page is
prefilled into it (continuous batching), so `max_batch` bounds memory, not the number of pages.

A decode step's device work (forward, n-gram ban, greedy pick, state updates) reads and writes
only persistent device tensors, so on CUDA it is captured once per (rows, key length) bucket as a
CUDA graph and replayed: one launch instead of hundreds of small kernels launched from Python,
which otherwise bound the step (94 ms eager against 7 ms replayed, batch 128 on an H200). The
host reads back only the picked tokens (one sync per step).

Legend: S live sequences (slots), V vocabulary, W n-gram window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from models.deepseek_ocr.kv_cache import KVCache
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import PageInputs
from models.engine import FinishReason

TABLE_CELL_TOKEN_IDS = frozenset({128821, 128822})  # `<td>`, `</td>`: tables repeat them legally
# A graph's key length is rounded up to this (few graphs; masked keys cost little; the attention
# mask's rows stay 16-byte aligned, which the memory-efficient SDPA kernel wants).
KEY_LENGTH_BUCKET = 128


class ContextLengthError(ValueError):
    """A prompt leaves no room for output within the model's maximum positions."""


class TextDecoder(Protocol):
    """What generation needs from a tokenizer (see `tokenizer.DeepseekOcrTokenizer`)."""

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str: ...


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding settings; the defaults are the official PDF script's.

    `ngram_window` None bans repeats anywhere in the generated text (0 for `ngram_size` turns the
    ban off). `ignore_eos` keeps going to the length limit, for benchmarks. `max_batch` is the
    number of sequences decoded together (cache slots); `prefill_tokens` bounds the padded tokens
    of one prefill forward; `views_per_batch` bounds the vision encoder's batch.
    """

    max_new_tokens: int = 8192
    eos_token_id: int = 1
    ngram_size: int = 20
    ngram_window: int | None = 50
    ngram_whitelist: frozenset[int] = TABLE_CELL_TOKEN_IDS
    ignore_eos: bool = False
    max_batch: int = 64
    prefill_tokens: int = 32768
    views_per_batch: int | None = 32
    keep_logits: bool = False  # return each step's raw and processed logits (parity checks)
    cuda_graphs: bool = True  # pad decode steps to shape buckets; on CUDA, replay them as graphs


@dataclass
class PageGeneration:
    """One page's output. `token_ids` include the EOS when one was generated; `text` does not.

    `encode_ms` is the page's share (by placeholders) of the batch's vision encoding; `decode_ms`
    the wall time from the page's prefill to its last token.
    """

    token_ids: list[int]
    text: str | None
    finish_reason: FinishReason
    placeholder_tokens: int
    valid_vision_tokens: int
    prompt_tokens: int
    output_tokens: int
    encode_ms: float
    decode_ms: float
    logits: torch.Tensor | None = None  # (output_tokens, V) raw, with keep_logits
    scores: torch.Tensor | None = None  # (output_tokens, V) after the n-gram ban


class NoRepeatNGramBan:
    """Per sequence, bans every token that would repeat an n-gram of its recent generated tokens.

    The official vLLM processor: on generated ids only, take the last n-1 tokens as a prefix,
    scan the n-grams that start in the last `window` tokens, and ban the token that followed
    each occurrence of the prefix, unless whitelisted. Vectorised over sequences: each keeps its
    last W tokens right-aligned in `recent`, -1 where it has fewer, and -1 never matches a token.
    """

    def __init__(
        self,
        ngram_size: int,
        window: int,
        whitelist: frozenset[int],
        num_slots: int,
        device: torch.device,
    ) -> None:
        self.ngram_size = ngram_size
        self.enabled = ngram_size > 0 and window >= ngram_size
        self.recent = torch.full((num_slots, max(window, 1)), -1, dtype=torch.long, device=device)
        self.whitelist = torch.tensor(sorted(whitelist) or [-1], dtype=torch.long, device=device)

    def reset(self, slots: slice) -> None:
        self.recent[slots] = -1

    def move(self, source: int, target: int) -> None:
        self.recent[target] = self.recent[source]

    def push(self, slots: slice, tokens: torch.Tensor) -> None:
        """Append one generated token `(n,)` to each of `slots`."""
        rows = self.recent[slots]
        self.recent[slots] = torch.cat((rows[:, 1:], tokens[:, None]), dim=1)

    def __call__(self, slots: slice, logits: torch.Tensor) -> torch.Tensor:
        """Return `(n, V)` logits with the banned tokens of `slots` set to -inf."""
        if not self.enabled:
            return logits
        prefix_length = self.ngram_size - 1
        recent = self.recent[slots]  # (n, W)
        current = recent[:, recent.shape[1] - prefix_length :]  # (n, n-1): the last n-1 tokens
        earlier = recent[:, :-1].unfold(1, prefix_length, 1)  # (n, W-n+1, n-1) n-gram prefixes
        following = recent[:, prefix_length:]  # (n, W-n+1) the token after each prefix
        banned = (earlier == current[:, None]).all(dim=-1) & (following >= 0)
        # A comparison, not `torch.isin` or a host scalar: nothing here may sync or copy from
        # the host, so a CUDA graph can capture it.
        banned &= ~(following[..., None] == self.whitelist).any(dim=-1)
        inf = logits.new_full((), float("inf"))
        # min(logit, -inf) bans; min(logit, +inf) keeps: deterministic with repeated ids.
        return logits.scatter_reduce(
            1, following.clamp(min=0), torch.where(banned, -inf, inf), reduce="amin"
        )


StepOutputs = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class BucketedDecodeStep:
    """The decode step padded to (rows, key length) buckets, on CUDA replayed as CUDA graphs.

    Rows round up to a power of two (the padding rows are free slots: computed, ignored) and
    key lengths up to `KEY_LENGTH_BUCKET` (masked keys), so a run needs a few dozen shapes. With
    `capture`, a bucket's first step runs eagerly (the warm-up a capture needs, and a real step)
    and is then captured for the next ones; all graphs share one memory pool, since they never
    run at once. Without it (CPU) every step runs eagerly, padded the same way. A graph keeps its
    `(rows, V)` logits and scores alive only with `keep_logits` (265 MB each at 512 rows).
    """

    def __init__(
        self,
        forward: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        num_slots: int,
        capacity: int,
        *,
        capture: bool,
        keep_logits: bool,
    ) -> None:
        self.forward, self.num_slots, self.capacity = forward, num_slots, capacity
        self.keep_logits = keep_logits
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, StepOutputs]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def __call__(self, rows: int, key_length: int) -> StepOutputs:
        """Run the step for slots `[0, rows)`: their tokens, and logits and scores if kept."""
        bucket = (
            min(self.num_slots, 1 << (rows - 1).bit_length()),
            min(self.capacity, -(-key_length // KEY_LENGTH_BUCKET) * KEY_LENGTH_BUCKET),
        )
        if bucket in self.graphs:
            graph, outputs = self.graphs[bucket]
            graph.replay()
        else:
            outputs = self._kept(self.forward(*bucket))
            if self.pool is not None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    self.graphs[bucket] = (graph, self._kept(self.forward(*bucket)))
        return tuple(None if t is None else t[:rows] for t in outputs)  # type: ignore[return-value]

    def _kept(self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> StepOutputs:
        tokens, logits, scores = outputs
        return (tokens, logits, scores) if self.keep_logits else (tokens, None, None)


@dataclass
class _Sequence:
    """A page being decoded."""

    page: int
    max_new_tokens: int
    started: float
    token_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)


class _BatchRun:
    """Prefill, decode and slot bookkeeping for one `generate` call; slot i holds `live[i]`."""

    def __init__(
        self,
        model: DeepseekOcrForCausalLM,
        pages: Sequence[PageInputs],
        spans: list[torch.Tensor],
        limits: list[int],
        settings: GenerationSettings,
    ) -> None:
        self.model, self.pages, self.spans = model, pages, spans
        self.limits, self.settings = limits, settings
        parameter = model.lm_head.weight
        decoder = model.config.decoder
        num_slots = min(settings.max_batch, len(pages))
        capacity = max(len(p.input_ids) + limit for p, limit in zip(pages, limits, strict=True))
        self.cache = KVCache(
            num_layers=decoder.num_hidden_layers,
            num_slots=num_slots,
            capacity=capacity,
            num_kv_heads=decoder.num_key_value_heads,
            head_dim=decoder.head_dim,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        window = settings.ngram_window or max(limits)
        self.ngram_ban = NoRepeatNGramBan(
            settings.ngram_size, window, settings.ngram_whitelist, num_slots, parameter.device
        )
        self.last_tokens = torch.zeros(num_slots, dtype=torch.long, device=parameter.device)
        self.bucketed_step = (
            BucketedDecodeStep(
                self._decode_forward,
                num_slots,
                capacity,
                capture=parameter.device.type == "cuda",
                keep_logits=settings.keep_logits,
            )
            if settings.cuda_graphs
            else None
        )
        self.live: list[_Sequence] = []
        self.finished: dict[int, tuple[_Sequence, FinishReason, float]] = {}

    def run(self) -> dict[int, tuple[_Sequence, FinishReason, float]]:
        # Shortest prompts first, so each prefill chunk pads little.
        waiting = deque(sorted(range(len(self.pages)), key=lambda i: len(self.pages[i].input_ids)))
        while waiting or self.live:
            free = self.cache.num_slots - len(self.live)
            if waiting and free:
                self._admit([waiting.popleft() for _ in range(min(free, len(waiting)))])
            elif self.live:
                self._decode_step()
        return self.finished

    def _admit(self, page_indices: list[int]) -> None:
        """Prefill waiting pages into free slots, in chunks of at most `prefill_tokens`."""
        chunk: list[int] = []
        for index in page_indices:
            longest = max(len(self.pages[i].input_ids) for i in [*chunk, index])
            if chunk and longest * (len(chunk) + 1) > self.settings.prefill_tokens:
                self._prefill(chunk)
                chunk = []
            chunk.append(index)
        self._prefill(chunk)

    def _prefill(self, page_indices: list[int]) -> None:
        started = time.perf_counter()
        first = len(self.live)
        slots = slice(first, first + len(page_indices))
        pages = [self.pages[i] for i in page_indices]
        lengths = [len(p.input_ids) for p in pages]
        device = self.last_tokens.device
        input_ids = torch.zeros(len(pages), max(lengths), dtype=torch.long)  # right-padded
        images_seq_mask = torch.zeros(len(pages), max(lengths), dtype=torch.bool)
        for row, page in enumerate(pages):
            input_ids[row, : lengths[row]] = page.input_ids
            images_seq_mask[row, : lengths[row]] = page.images_seq_mask
        logits = self.model(
            input_ids.to(device),
            images_seq_mask.to(device),
            [self.spans[i] for i in page_indices],
            cache_step=self.cache.prefill_step(first, lengths),
            logits_index=torch.tensor(lengths, device=device) - 1,
        )  # (n, V)
        self.live.extend(_Sequence(i, self.limits[i], started) for i in page_indices)
        self.ngram_ban.reset(slots)
        self._emit(slots, logits)

    def _decode_step(self) -> None:
        rows = len(self.live)
        key_length = self.cache.reserve(0, rows)
        if self.bucketed_step is not None:
            self._record(slice(0, rows), *self.bucketed_step(rows, key_length))
        else:
            self._record(slice(0, rows), *self._decode_forward(rows, key_length))

    def _decode_forward(
        self, rows: int, key_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device work of a decode step over slots `[0, rows)`: `(n,)` tokens, `(n, V)` logits
        and scores. Reads and writes only persistent device state (graph-capturable)."""
        slots = slice(0, rows)
        step = self.cache.device_step(0, rows, key_length)
        logits = self.model(self.last_tokens[slots, None], cache_step=step)[:, 0]  # (n, V)
        scores = self.ngram_ban(slots, logits)
        return self._pick(slots, scores), logits, scores

    def _emit(self, slots: slice, logits: torch.Tensor) -> None:
        """Pick each slot's next token greedily from prefill logits and record it."""
        scores = self.ngram_ban(slots, logits)
        self._record(slots, self._pick(slots, scores), logits, scores)

    def _pick(self, slots: slice, scores: torch.Tensor) -> torch.Tensor:
        """Greedy `(n,)` tokens from banned scores; advance the slots' device state."""
        tokens = scores.argmax(dim=-1)  # (n,)
        self.last_tokens[slots] = tokens
        self.ngram_ban.push(slots, tokens)
        return tokens

    def _record(
        self,
        slots: slice,
        tokens: torch.Tensor,
        logits: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> None:
        """Append each slot's token on the host and retire finished sequences."""
        done: list[tuple[int, FinishReason]] = []
        for offset, token in enumerate(tokens.tolist()):
            sequence = self.live[slots.start + offset]
            sequence.token_ids.append(token)
            if self.settings.keep_logits and logits is not None and scores is not None:
                sequence.logits.append(logits[offset].cpu())
                sequence.scores.append(scores[offset].cpu())
            if token == self.settings.eos_token_id and not self.settings.ignore_eos:
                done.append((slots.start + offset, FinishReason.EOS))
            elif len(sequence.token_ids) >= sequence.max_new_tokens:
                done.append((slots.start + offset, FinishReason.LENGTH))
        self._retire(done)

    def _retire(self, done: list[tuple[int, FinishReason]]) -> None:
        """Free the slots of finished sequences, moving the last live slot into each hole.

        Highest slots first, so the slot moved into a hole is always a live one.
        """
        now = time.perf_counter()
        for slot, reason in sorted(done, reverse=True):
            sequence = self.live[slot]
            self.finished[sequence.page] = (sequence, reason, (now - sequence.started) * 1000)
            last = len(self.live) - 1
            if slot != last:
                self.cache.move_slot(last, slot)
                self.ngram_ban.move(last, slot)
                self.last_tokens[slot] = self.last_tokens[last]
                self.live[slot] = self.live[last]
            self.live.pop()


def output_limits(
    pages: Sequence[PageInputs],
    settings: GenerationSettings,
    max_positions: int,
    max_new_tokens: Sequence[int | None] | None = None,
) -> list[int]:
    """Per page: the smaller of the settings', the page's own and the context's output limit."""
    overrides = max_new_tokens or [None] * len(pages)
    limits = []
    for page, override in zip(pages, overrides, strict=True):
        room = max_positions - len(page.input_ids)
        if room <= 0:
            raise ContextLengthError(
                f"prompt of {len(page.input_ids)} tokens leaves no room within "
                f"{max_positions} positions"
            )
        limits.append(min(settings.max_new_tokens, override or settings.max_new_tokens, room))
    return limits


def encode_pages(
    model: DeepseekOcrForCausalLM,
    pages: Sequence[PageInputs],
    settings: GenerationSettings | None = None,
) -> list[torch.Tensor]:
    """Vision spans `(N_i, C)` of the pages, views of equal size encoded together."""
    settings = settings or GenerationSettings()
    return model.model.encode_images(
        [p.global_view for p in pages],
        [p.tiles for p in pages],
        [p.tile_grid for p in pages],
        views_per_batch=settings.views_per_batch,
    )


@torch.inference_mode()
def generate(
    model: DeepseekOcrForCausalLM,
    pages: Sequence[PageInputs],
    settings: GenerationSettings | None = None,
    tokenizer: TextDecoder | None = None,
    max_new_tokens: Sequence[int | None] | None = None,
    vision_spans: Sequence[torch.Tensor] | None = None,
) -> list[PageGeneration]:
    """Greedy-decode every page (any mix of modes); results in input order.

    `max_new_tokens` optionally lowers the limit per page. With a tokenizer, each result
    carries its decoded text (special tokens kept, EOS dropped). `vision_spans` skips the
    vision encoder for pages already encoded (the parity command compares the spans first).
    """
    if not pages:
        return []
    settings = settings or GenerationSettings()
    limits = output_limits(
        pages, settings, model.config.decoder.max_position_embeddings, max_new_tokens
    )
    started = time.perf_counter()
    spans = list(vision_spans) if vision_spans is not None else encode_pages(model, pages, settings)
    if spans[0].is_cuda:
        torch.cuda.synchronize(spans[0].device)
    encode_ms = (time.perf_counter() - started) * 1000
    finished = _BatchRun(model, pages, spans, limits, settings).run()
    total_placeholders = sum(p.n_placeholders for p in pages)
    results = []
    for index, page in enumerate(pages):
        sequence, reason, decode_ms = finished[index]
        ids = sequence.token_ids
        text_ids = ids[:-1] if reason is FinishReason.EOS else ids
        results.append(
            PageGeneration(
                token_ids=ids,
                text=tokenizer.decode(text_ids) if tokenizer is not None else None,
                finish_reason=reason,
                placeholder_tokens=page.n_placeholders,
                valid_vision_tokens=page.valid_vision_tokens,
                prompt_tokens=len(page.input_ids),
                output_tokens=len(ids),
                encode_ms=encode_ms * page.n_placeholders / total_placeholders,
                decode_ms=decode_ms,
                logits=torch.stack(sequence.logits) if sequence.logits else None,
                scores=torch.stack(sequence.scores) if sequence.scores else None,
            )
        )
    return results


__all__ = [
    "TABLE_CELL_TOKEN_IDS",
    "BucketedDecodeStep",
    "ContextLengthError",
    "GenerationSettings",
    "NoRepeatNGramBan",
    "PageGeneration",
    "encode_pages",
    "generate",
    "output_limits",
]
