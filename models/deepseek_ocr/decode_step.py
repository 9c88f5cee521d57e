"""The device work of one decode step: the n-gram ban and the bucketed, graph-replayed step.

Both read and write only persistent device tensors (no host data, no sync), so on CUDA a step is
captured once per (rows, key length) bucket as a CUDA graph and replayed: one launch instead of
hundreds of small kernels launched from Python, which otherwise bound the step (94 ms eager
against 7 ms replayed, batch 128 on an H200).

Legend: S slots, V vocabulary, W n-gram window.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator

import torch

TABLE_CELL_TOKEN_IDS = frozenset({128821, 128822})  # `<td>`, `</td>`: tables repeat them legally
# A graph's key length is rounded up to this (few graphs; masked keys cost little; the attention
# mask's rows stay 16-byte aligned, which the memory-efficient SDPA kernel wants).
KEY_LENGTH_BUCKET = 128
# One capture at a time in the process: a capture must not overlap another thread's capture or
# graph teardown (see `BucketedDecodeStep`).
_CAPTURE_LOCK = threading.Lock()


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
        device: torch.device | str,
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

    Graphs hold the addresses of their owner's cache and state tensors, so they live exactly as
    long as it does and are torn down by `release`, never by the garbage collector: a graph
    destroyed while another is being captured invalidates that capture
    (`cudaErrorStreamCaptureInvalidated`). For the same reason the collector is paused during a
    capture (a cycle it frees could hold graphs of an owner nobody released) and captures are
    serialised across threads. At most `len(rows buckets) x capacity / KEY_LENGTH_BUCKET` graphs
    exist; `graph_count` and `graph_pool_bytes` say how many and how much memory they reserve.
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
        self.graph_pool_bytes = 0  # memory the captures reserved (the pool's growth)

    def bucket(self, rows: int, key_length: int) -> tuple[int, int]:
        """The (rows, key length) shape a step over `rows` slots and `key_length` keys runs at."""
        return (
            min(self.num_slots, 1 << (rows - 1).bit_length()),
            min(self.capacity, -(-key_length // KEY_LENGTH_BUCKET) * KEY_LENGTH_BUCKET),
        )

    def buckets(self) -> Iterator[tuple[int, int]]:
        """Every bucket a run can reach, shortest key lengths first (all rows counts at each)."""
        rows = dict.fromkeys(
            self.bucket(1 << n, 1)[0] for n in range(self.num_slots.bit_length() + 1)
        )
        for key_length in range(
            KEY_LENGTH_BUCKET, self.capacity + KEY_LENGTH_BUCKET, KEY_LENGTH_BUCKET
        ):
            for row_count in rows:
                yield self.bucket(row_count, key_length)

    def capture_ahead(self, seconds: float) -> int:
        """Capture the buckets not captured yet, in `buckets` order, until `seconds` have passed;
        the graphs captured. Runs real steps over slots `[0, rows)`: only while none is live."""
        if self.pool is None:
            return 0
        deadline = time.monotonic() + seconds
        captured = 0
        for bucket in self.buckets():
            if time.monotonic() >= deadline:
                break
            if bucket not in self.graphs:
                self(*bucket)
                captured += 1
        return captured

    def __call__(self, rows: int, key_length: int) -> StepOutputs:
        """Run the step for slots `[0, rows)`: their tokens, and logits and scores if kept."""
        bucket = self.bucket(rows, key_length)
        if bucket in self.graphs:
            graph, outputs = self.graphs[bucket]
            graph.replay()
        else:
            outputs = self._kept(self.forward(*bucket))
            if self.pool is not None:
                self._capture(bucket)
        return tuple(None if t is None else t[:rows] for t in outputs)  # type: ignore[return-value]

    @property
    def graph_count(self) -> int:
        return len(self.graphs)

    def release(self) -> None:
        """Destroy every graph now (outside any capture); their pool's blocks go back to the
        allocator, and the owner (`Generator.release`) hands them to the driver."""
        if not self.graphs:
            return
        with _CAPTURE_LOCK:
            torch.cuda.synchronize()
            for graph, _outputs in self.graphs.values():
                graph.reset()
            self.graphs.clear()
            self.graph_pool_bytes = 0

    def _capture(self, bucket: tuple[int, int]) -> None:
        graph = torch.cuda.CUDAGraph()
        with _CAPTURE_LOCK:
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    reserved = torch.cuda.memory_reserved()  # after the capture's empty_cache
                    outputs = self._kept(self.forward(*bucket))
                self.graph_pool_bytes += torch.cuda.memory_reserved() - reserved
            finally:
                if collecting:
                    gc.enable()
        self.graphs[bucket] = (graph, outputs)

    def _kept(self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> StepOutputs:
        tokens, logits, scores = outputs
        return (tokens, logits, scores) if self.keep_logits else (tokens, None, None)


__all__ = ["KEY_LENGTH_BUCKET", "TABLE_CELL_TOKEN_IDS", "BucketedDecodeStep", "NoRepeatNGramBan"]
