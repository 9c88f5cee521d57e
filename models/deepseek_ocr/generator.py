"""A long-lived greedy generator fed with pages while it decodes (continuous batching).

A `Generator` owns a fixed set of cache slots, the n-gram ban state and the decode step's CUDA
graphs. `run` pulls pages from a `streaming.PageFeed` whenever slots are free, between decode
steps, so a resident worker keeps its batch full across claims instead of idling down to one
sequence at the end of each batch; each finished page is reported at once through a callback.
Because the cache and state tensors live as long as the generator, graphs captured for a (rows,
key length) bucket are replayed for the generator's whole life, which its owner ends with
`release` (`resident.ResidentGenerator`), never the garbage collector.

Newly fed pages are vision-encoded together (views of equal size batched), then prefilled
right-padded into free slots, so every sequence keeps its own positions from 0 and a page decodes
to the same tokens whatever it shares the batch with. With `encode_thread` the encoding runs on
a thread and stream of its own while the batch goes on decoding (`encoder_thread`), and its pages
are prefilled once it is done. A running batch refills its freed slots in
groups (`admit_size`): pages of different lengths end one or two per step, and encoding and
prefilling each alone between steps kept an H200 half idle (`bench/e2e_gpu.py`, engine alone).
Pages that reach a running batch one by one (a worker's queue filling at the start of a run)
are gathered the same way, for at most `admit_wait_s`, rather than admitted at every step.

An error while admitting or decoding pages puts them back at the front of the line and lowers
the number of live sequences (`streaming.AdaptiveBatchLimit`, won back slowly as pages finish):
out of memory halves the batch until it fits (counted in `oom_recoveries`, logged once). A page
that fails with nothing else live is reported with its error, never dropped.

Each decode step is launched before the previous one's tokens are read back (`_Step`): the
next step needs only device state (its input tokens are the previous step's, in place), so the
host's work on a step (reading tokens, retiring finished pages, reporting them) runs while the
GPU computes the next, instead of the GPU waiting for it; on a host whose cores are busy with
rendering that work is not small. A page that ends at a step is therefore computed once more in
the step launched behind it; that token is dropped, and its slot has one position of slack for
it. With `keep_logits` (parity runs) every step is read back before the next is launched, since
a graph's logits are overwritten by its next replay.

While it runs, the interpreter's thread switch interval is cut to `SWITCH_INTERVAL_SECONDS`:
each step waits for the GPU with the GIL released, and a feeder or preparation thread busy in
Python would otherwise keep it for up to the default 5 ms before the loop launches the next step.

Legend: S slots, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.deepseek_ocr.decode_step import BucketedDecodeStep, NoRepeatNGramBan
from models.deepseek_ocr.encoder_thread import EncoderThread, Encoding
from models.deepseek_ocr.generation_types import (
    ContextLengthError,
    FedPage,
    GenerationSettings,
    PageGeneration,
    TextDecoder,
    output_limits,
    vision_spans,
)
from models.deepseek_ocr.kv_cache import KVCache
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.engine import FinishReason
from models.streaming import AdaptiveBatchLimit, PageFeed, is_out_of_memory

logger = logging.getLogger(__name__)

OnFinished = Callable[[FedPage, PageGeneration | Exception], None]
SWITCH_INTERVAL_SECONDS = 0.0005


@contextlib.contextmanager
def short_switch_interval():
    """The interpreter's switch interval at most `SWITCH_INTERVAL_SECONDS`, restored after."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, SWITCH_INTERVAL_SECONDS))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class ListFeed:
    """A fixed list of pages, shortest prompts first (so each prefill chunk pads little)."""

    def __init__(self, pages: list[FedPage]) -> None:
        self.waiting = deque(sorted(pages, key=lambda page: len(page.inputs.input_ids)))

    def take(self, limit: int, *, wait: bool) -> list[FedPage] | None:
        if not self.waiting:
            return None
        return [self.waiting.popleft() for _ in range(min(limit, len(self.waiting)))]


@dataclass(eq=False)
class _Sequence:
    """A page being decoded."""

    page: FedPage
    max_new_tokens: int
    encode_ms: float
    started: float
    step_ms: float = 0.0  # shares of the prefill and decode steps this page ran in
    finished: bool = False  # retired: a step launched before it ended computed a token to drop
    token_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Admission:
    """Pages admitted together whose vision encoding is under way on the encoder thread."""

    pages: list[FedPage]
    limits: list[int]
    encoding: Encoding


@dataclass
class _Step:
    """A decode step launched and not read back yet: the sequences its rows held at launch, and
    its tokens on their way to the host (`ready` recorded once they are there)."""

    sequences: list[_Sequence]
    tokens: torch.Tensor  # (n,)
    logits: torch.Tensor | None
    scores: torch.Tensor | None
    launched: float
    ready: torch.cuda.Event | None = None


class Generator:
    """`num_slots` sequences of up to `capacity` positions; slot i holds `live[i]`."""

    def __init__(
        self,
        model: DeepseekOcrForCausalLM,
        settings: GenerationSettings,
        *,
        num_slots: int,
        capacity: int,
        tokenizer: TextDecoder | None = None,
    ) -> None:
        self.model, self.settings, self.tokenizer = model, settings, tokenizer
        parameter = model.lm_head.weight
        decoder = model.config.decoder
        self.capacity = capacity
        self.max_positions = min(decoder.max_position_embeddings, capacity)
        self.cache = KVCache(
            num_layers=decoder.num_hidden_layers,
            num_slots=num_slots,
            capacity=capacity + 1,  # the step launched behind a page's last one writes there
            num_kv_heads=decoder.num_key_value_heads,
            head_dim=decoder.head_dim,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        window = settings.ngram_window or min(settings.max_new_tokens, capacity)
        self.ngram_ban = NoRepeatNGramBan(
            settings.ngram_size, window, settings.ngram_whitelist, num_slots, parameter.device
        )
        self.last_tokens = torch.zeros(num_slots, dtype=torch.long, device=parameter.device)
        self.bucketed_step = (
            BucketedDecodeStep(
                self._decode_forward,
                num_slots,
                capacity,  # a dropped step at `capacity` attends to the keys before it alone
                capture=parameter.device.type == "cuda",
                keep_logits=settings.keep_logits,
            )
            if settings.cuda_graphs
            else None
        )
        self.live: list[_Sequence] = []
        self.in_flight: _Step | None = None  # launched, tokens not read back yet
        self.encoder = (
            EncoderThread(model, settings, parameter.device) if settings.encode_thread else None
        )
        self.admission: _Admission | None = None  # being encoded, not prefilled yet
        self.launch_ahead = not settings.keep_logits
        # Pinned host buffers the steps' tokens are copied into without a sync, used in turn:
        # a step's tokens are read before the step two behind it is launched.
        self.token_buffers = (
            [torch.empty(num_slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
            if parameter.device.type == "cuda"
            else []
        )
        self.steps_launched = 0
        self.last_read = 0.0  # when the latest step's tokens were read back (step time shares)
        self.retry: deque[FedPage] = deque()  # pages put back after an error, admitted first
        self.live_limit = AdaptiveBatchLimit(num_slots)
        self.on_finished: OnFinished = lambda page, outcome: None
        self.recover = True
        self.oom_recoveries = 0  # steps that ran out of memory and were retried smaller
        # Where `run`'s time went, cumulative over the generator's life: polling the feed (and
        # blocking on it with nothing live), admitting pages (vision encoding and prefill),
        # decode steps (launch to tokens read back and finished pages reported).
        self.loop_seconds = {"feed": 0.0, "admit": 0.0, "decode": 0.0}
        # Admissions so far: groups encoded and prefilled together, and their pages. A group's
        # launches and syncs are paid once, so admit seconds per page grow as groups shrink.
        self.admissions = {"groups": 0, "pages": 0}

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def graph_count(self) -> int:
        return self.bucketed_step.graph_count if self.bucketed_step is not None else 0

    @property
    def graph_pool_bytes(self) -> int:
        return self.bucketed_step.graph_pool_bytes if self.bucketed_step is not None else 0

    def release(self) -> None:
        """Destroy the decode step's graphs and free the cache now; the generator is not used
        after this (a reference someone kept holds no device memory)."""
        if self.bucketed_step is not None:
            self.bucketed_step.release()
            self.bucketed_step = None
        if self.encoder is not None:
            self.encoder.close()
        self.cache.free()
        if self.cache.device.type == "cuda":
            # Back to the driver, not only to PyTorch's allocator: whoever sizes the next
            # generator or batch from free memory sees it (with or without graphs released).
            torch.cuda.empty_cache()

    @property
    def max_live(self) -> int:
        """Sequences decoded at once now: the slots, less after an error (`_fail`)."""
        return self.live_limit.limit

    @property
    def admit_size(self) -> int:
        """Free slots a running batch waits for before it admits pages: an eighth of the batch,
        at most `admit_pages`, so a group's encoding and prefill run as batches while the batch
        stays at least seven eighths full; one for small batches."""
        return max(1, min(self.settings.admit_pages, self.max_live // 8))

    def fits(self, settings: GenerationSettings, num_slots: int, capacity: int) -> bool:
        """Whether this generator can serve a run that needs these settings and sizes."""
        return (
            settings == self.settings and num_slots <= self.num_slots and capacity <= self.capacity
        )

    @torch.inference_mode()
    def run(
        self, feed: PageFeed[FedPage], on_finished: OnFinished, *, recover: bool = True
    ) -> None:
        """Decode every page the feed gives until it closes; report each page as it finishes.

        With `recover`, errors are contained as the module says; without, the first one is
        raised (a one-shot call whose caller handles errors itself).
        """
        self.on_finished, self.recover = on_finished, recover
        # A run that raised (or was interrupted) may have left pages behind: they belong to
        # its caller, not to this run. The slots' cache contents are simply overwritten.
        self.live.clear()
        self.in_flight = None
        self.admission = None
        self.retry.clear()
        self.live_limit = AdaptiveBatchLimit(self.num_slots)
        closed = False
        # Pages taken from the feed while a batch runs wait here until a group is ready: at
        # least `admit_size` of them, the feed closed, or the first waited `admit_wait_s`.
        pending: list[FedPage] = []
        pending_since = 0.0
        with short_switch_interval():
            while True:
                room = self.max_live - len(self.live)
                if self.admission is None and room >= (self.admit_size if self.live else 1):
                    pending[:0] = [self.retry.popleft() for _ in range(len(self.retry))]
                    if not closed and len(pending) < room:
                        polled = time.perf_counter()
                        fed = feed.take(room - len(pending), wait=not self.live and not pending)
                        self.loop_seconds["feed"] += time.perf_counter() - polled
                        closed = fed is None
                        if fed and not pending:
                            pending_since = time.monotonic()
                        pending += fed or []
                    waited = time.monotonic() - pending_since >= self.settings.admit_wait_s
                    if pending and (
                        not self.live or closed or len(pending) >= self.admit_size or waited
                    ):
                        admitted, pending = pending[:room], pending[room:]
                        pending_since = time.monotonic()
                        admitting = time.perf_counter()
                        self._admit(admitted)
                        self.loop_seconds["admit"] += time.perf_counter() - admitting
                if self.admission is not None and (not self.live or self._encoded()):
                    prefilling = time.perf_counter()
                    self._read_back()  # slots and finished pages settled before a prefill
                    self._prefill_admitted()
                    self.loop_seconds["admit"] += time.perf_counter() - prefilling
                stepping = time.perf_counter()
                self._decode_step()
                self.loop_seconds["decode"] += time.perf_counter() - stepping
                idle = self.in_flight is None and self.admission is None and not self.live
                if idle and closed and not self.retry and not pending:
                    return

    @torch.inference_mode()
    def capture_graphs(self, seconds: float) -> int:
        """Capture the decode step's graphs before any page, for up to `seconds` (every rows
        count at the shortest key lengths first); the graphs captured.

        Otherwise each new (rows, key length) bucket is captured between two steps while the GPU
        waits, ~60-75 ms each on an H200, more of them while a batch fills page group by page
        group (a worker at the start of a run) and as its longest page grows. The steps run over
        free slots, whose state admission resets."""
        if self.bucketed_step is None or self.live:
            return 0
        return self.bucketed_step.capture_ahead(seconds)

    def run_all(self, pages: list[FedPage]) -> dict[FedPage, PageGeneration]:
        """Decode a fixed list of pages; outputs by page. Out of memory shrinks the batch as in
        `run`; an error of a page that fails on its own is raised."""
        outputs: dict[FedPage, PageGeneration] = {}

        def keep(page: FedPage, outcome: PageGeneration | Exception) -> None:
            if isinstance(outcome, Exception):
                raise outcome
            outputs[page] = outcome

        self.run(ListFeed(pages), keep)
        return outputs

    def _admit(self, pages: list[FedPage]) -> None:
        """Encode new pages' views together, then prefill them into free slots in chunks of at
        most `prefill_tokens` padded tokens; with the encoder thread, start the encoding only
        (`_prefill_admitted` prefills the pages once it is done)."""
        limits: list[int] = []
        admitted: list[FedPage] = []
        for page in pages:
            try:
                [limit] = output_limits(
                    [page.inputs], self.settings, self.max_positions, [page.max_new_tokens]
                )
            except ContextLengthError as error:
                self._fail([page], error)
                continue
            admitted.append(page)
            limits.append(limit)
        if not admitted:
            return
        self.admissions["groups"] += 1
        self.admissions["pages"] += len(admitted)
        if self.encoder is not None:
            self.admission = _Admission(admitted, limits, self.encoder.submit(admitted))
            return
        self._read_back()  # slots and finished pages settled before a prefill
        try:
            spans, encode_ms = self._encode(admitted)
        except Exception as error:
            self._fail(admitted, error)
            return
        self._prefill_all(admitted, spans, limits, encode_ms)

    def _encoded(self) -> bool:
        assert self.admission is not None and self.encoder is not None
        return self.encoder.ready(self.admission.encoding)

    def _prefill_admitted(self) -> None:
        """Prefill the pages whose encoding the encoder thread finished (waiting for it)."""
        admission, self.admission = self.admission, None
        assert admission is not None and self.encoder is not None
        try:
            spans, elapsed_ms = self.encoder.result(admission.encoding)
        except Exception as error:
            self._fail(admission.pages, error)
            return
        encode_ms = _encode_shares(admission.pages, elapsed_ms)
        self._prefill_all(admission.pages, spans, admission.limits, encode_ms)

    def _prefill_all(
        self,
        pages: list[FedPage],
        spans: list[torch.Tensor],
        limits: list[int],
        encode_ms: list[float],
    ) -> None:
        """Prefill encoded pages into free slots, shortest prompts first, in chunks of at most
        `prefill_tokens` padded tokens."""
        order = sorted(range(len(pages)), key=lambda i: len(pages[i].inputs.input_ids))
        chunk: list[int] = []
        for index in order:
            longest = max(len(pages[i].inputs.input_ids) for i in [*chunk, index])
            if chunk and longest * (len(chunk) + 1) > self.settings.prefill_tokens:
                self._prefill([(pages[i], spans[i], limits[i], encode_ms[i]) for i in chunk])
                chunk = []
            chunk.append(index)
        self._prefill([(pages[i], spans[i], limits[i], encode_ms[i]) for i in chunk])

    def _encode(self, pages: list[FedPage]) -> tuple[list[torch.Tensor], list[float]]:
        """Vision spans of the pages (precomputed ones kept) and each page's share of the
        encoding time."""
        started = time.perf_counter()
        spans = vision_spans(self.model, pages, self.settings)
        if spans and spans[0].is_cuda:
            torch.cuda.synchronize(spans[0].device)
        return spans, _encode_shares(pages, (time.perf_counter() - started) * 1000)

    def _prefill(self, chunk: list[tuple[FedPage, torch.Tensor, int, float]]) -> None:
        started = time.perf_counter()
        first = len(self.live)
        slots = slice(first, first + len(chunk))
        inputs = [page.inputs for page, *_ in chunk]
        lengths = [len(p.input_ids) for p in inputs]
        device = self.last_tokens.device
        input_ids = torch.zeros(len(chunk), max(lengths), dtype=torch.long)  # right-padded
        images_seq_mask = torch.zeros(len(chunk), max(lengths), dtype=torch.bool)
        for row, page in enumerate(inputs):
            input_ids[row, : lengths[row]] = page.input_ids
            images_seq_mask[row, : lengths[row]] = page.images_seq_mask
        try:
            logits = self.model(
                input_ids.to(device),
                images_seq_mask.to(device),
                [span for _, span, _, _ in chunk],
                cache_step=self.cache.prefill_step(first, lengths),
                logits_index=torch.tensor(lengths, device=device) - 1,
                float_logits=self.settings.keep_logits,
            )  # (n, V)
        except Exception as error:
            self._fail([page for page, *_ in chunk], error)
            return
        self.live.extend(
            _Sequence(page, limit, encode_ms, started) for page, _, limit, encode_ms in chunk
        )
        self.ngram_ban.reset(slots)
        scores = self.ngram_ban(slots, logits)
        tokens = self._pick(slots, scores)
        self._record(self.live[slots], tokens.tolist(), logits, scores, started=started)

    def _decode_step(self) -> None:
        """Launch a step over the live slots, then read the one launched before it."""
        previous, self.in_flight = self.in_flight, None
        if self.live:
            self.in_flight = self._launch_step()
            if self.in_flight is None:  # failed: its pages start over, and so do the previous's
                previous = None
        self._read(previous)
        if not self.launch_ahead:
            self._read_back()

    def _launch_step(self) -> _Step | None:
        """Launch a decode step over every live slot (None if it failed); its tokens are read
        later (`_read`)."""
        rows = len(self.live)
        launched = time.perf_counter()
        try:
            key_length = self.cache.reserve(0, rows)
            if self.bucketed_step is not None:
                tokens, logits, scores = self.bucketed_step(rows, key_length)
            else:
                tokens, logits, scores = self._decode_forward(rows, key_length)
        except Exception as error:
            # The step may have half-written the cache: every live page starts over.
            pages = [sequence.page for sequence in self.live]
            self.live.clear()
            self._fail(pages, error)
            return None
        step = _Step(list(self.live), tokens, logits, scores, launched)
        if self.token_buffers:
            buffer = self.token_buffers[self.steps_launched % 2][:rows]
            step.tokens = buffer.copy_(tokens, non_blocking=True)
            step.ready = torch.cuda.Event()
            step.ready.record()
        self.steps_launched += 1
        return step

    def _read_back(self) -> None:
        """Read the step in flight, if one is."""
        step, self.in_flight = self.in_flight, None
        self._read(step)

    def _read(self, step: _Step | None) -> None:
        """Read a launched step's tokens and retire the pages it finished."""
        if step is None:
            return
        if step.ready is not None:
            step.ready.synchronize()
        # Its share of time: since it was launched or the step before it was read, the later.
        self._record(
            step.sequences,
            step.tokens.tolist(),
            step.logits,
            step.scores,
            started=max(step.launched, self.last_read),
        )

    def _decode_forward(
        self, rows: int, key_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device work of a decode step over slots `[0, rows)`: `(n,)` tokens, `(n, V)` logits
        and scores. Reads and writes only persistent device state (graph-capturable)."""
        slots = slice(0, rows)
        step = self.cache.device_step(0, rows, key_length)
        logits = self.model(
            self.last_tokens[slots, None], cache_step=step, float_logits=self.settings.keep_logits
        )[:, 0]  # (n, V)
        scores = self.ngram_ban(slots, logits)
        return self._pick(slots, scores), logits, scores

    def _pick(self, slots: slice, scores: torch.Tensor) -> torch.Tensor:
        """Greedy `(n,)` tokens from banned scores; advance the slots' device state."""
        tokens = scores.argmax(dim=-1)  # (n,)
        self.last_tokens[slots] = tokens
        self.ngram_ban.push(slots, tokens)
        return tokens

    def _record(
        self,
        sequences: list[_Sequence],
        token_ids: list[int],
        logits: torch.Tensor | None,
        scores: torch.Tensor | None,
        *,
        started: float,
    ) -> None:
        """Append each row's token to its sequence (rows of sequences retired since the step
        was launched are dropped) and retire finished sequences. The step's time since
        `started`, which its tokens being on the host ends, is shared among its rows."""
        done: dict[_Sequence, FinishReason] = {}
        self.last_read = time.perf_counter()
        share_ms = (self.last_read - started) * 1000 / max(1, len(token_ids))
        for offset, (sequence, token) in enumerate(zip(sequences, token_ids, strict=True)):
            if sequence.finished:
                continue
            sequence.step_ms += share_ms
            sequence.token_ids.append(token)
            if self.settings.keep_logits and logits is not None and scores is not None:
                sequence.logits.append(logits[offset].cpu())
                sequence.scores.append(scores[offset].cpu())
            if token == self.settings.eos_token_id and not self.settings.ignore_eos:
                done[sequence] = FinishReason.EOS
            elif len(sequence.token_ids) >= sequence.max_new_tokens:
                done[sequence] = FinishReason.LENGTH
        if done:
            self._retire([(slot, done[s]) for slot, s in enumerate(self.live) if s in done])

    def _retire(self, done: list[tuple[int, FinishReason]]) -> None:
        """Report finished sequences and free their slots, moving the last live slot into each
        hole. Highest slots first, so the slot moved into a hole is always a live one."""
        now = time.perf_counter()
        for slot, reason in sorted(done, reverse=True):
            sequence = self.live[slot]
            sequence.finished = True
            last = len(self.live) - 1
            if slot != last:
                self.cache.move_slot(last, slot)
                self.ngram_ban.move(last, slot)
                self.last_tokens[slot] = self.last_tokens[last]
                self.live[slot] = self.live[last]
            self.live.pop()
            self.on_finished(sequence.page, self._generation(sequence, reason, now))
            self.live_limit.finished()

    def _generation(self, sequence: _Sequence, reason: FinishReason, now: float) -> PageGeneration:
        inputs, ids = sequence.page.inputs, sequence.token_ids
        generation = PageGeneration(
            token_ids=ids,
            text=None,
            finish_reason=reason,
            placeholder_tokens=inputs.n_placeholders,
            valid_vision_tokens=inputs.valid_vision_tokens,
            prompt_tokens=len(inputs.input_ids),
            output_tokens=len(ids),
            encode_ms=sequence.encode_ms,
            decode_ms=(now - sequence.started) * 1000,
            gpu_ms=sequence.encode_ms + sequence.step_ms,
            logits=torch.stack(sequence.logits) if sequence.logits else None,
            scores=torch.stack(sequence.scores) if sequence.scores else None,
        )
        if self.tokenizer is not None:
            generation.text = self.tokenizer.decode(generation.text_token_ids)
        return generation

    def _fail(self, pages: list[FedPage], error: Exception) -> None:
        """Contain an error of `pages` (none of them live any more): report a page that failed
        with nothing else live, else put them back and shrink the batch."""
        if not self.recover:
            raise error
        if self.model.lm_head.weight.is_cuda:
            torch.cuda.empty_cache()  # what the failed step allocated, before anything retries
        if is_out_of_memory(error):
            self.oom_recoveries += 1
            if self.oom_recoveries == 1:
                logger.warning(
                    "out of memory with %d pages in flight: retrying them in a smaller batch "
                    "(logged once per generator)",
                    len(pages) + len(self.live),
                )
        if len(pages) == 1 and not self.live:
            self.on_finished(pages[0], error)
            return
        self.retry.extendleft(reversed(pages))
        self.live_limit.shrink(len(pages), live=len(self.live))


def _encode_shares(pages: list[FedPage], elapsed_ms: float) -> list[float]:
    """Each page's share, by placeholders, of its group's encoding time (none for a page whose
    span came precomputed)."""
    per_ms = elapsed_ms / (
        sum(page.inputs.n_placeholders for page in pages if page.vision_span is None) or 1
    )
    return [0.0 if p.vision_span is not None else p.inputs.n_placeholders * per_ms for p in pages]


__all__ = ["Generator", "ListFeed", "OnFinished"]
