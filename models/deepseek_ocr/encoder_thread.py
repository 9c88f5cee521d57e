"""Vision encoding of admitted pages on a thread and a CUDA stream of their own.

Run by the decode loop's thread, a group's encoding holds the batch's decode steps until it is
launched: ~350 ms for 32 pages (16 Gundam, 16 Base) on an H200 (`bench.encode_host_time`).
Launched from a thread of its own, its kernels run beside the decode steps, whose launches wait
for the GIL at most a switch interval (`generator.SWITCH_INTERVAL_SECONDS`).

On when `GenerationSettings.encode_thread` asks for it: engines built from settings do unless
`OCRFLOW_OVERLAP_ENCODING=false`. On the engine alone it gains nothing (13.51 against 13.45
pages/s on an H200, `bench/results/stream_admission_encoder_thread.json`): there the host
launches faster than the GPU runs the encoder, so its kernels only take GPU time the steps would
have had. In a worker whose host is busy rendering pages, launching fell behind the GPU (busy
53-88% while the CPU side worked); with the encoder on this thread the decode steps fill those
gaps: the end-to-end ratio was 0.883 with it against 0.806 in the run before without it (two
lent H200s; `bench/results/e2e_gpu.json`, `docs/gpu-worker.md`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from models.deepseek_ocr.generation_types import FedPage, GenerationSettings, vision_spans
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM


@dataclass(frozen=True, eq=False)
class Encoding:
    """One admission group's encoding under way: its spans and wall time in ms, once done. On
    CUDA, `began` and `ended` are recorded on the encoder's stream around it."""

    future: Future[tuple[list[torch.Tensor], float]]
    began: torch.cuda.Event | None
    ended: torch.cuda.Event | None


class EncoderThread:
    """Encodes fed pages' views (precomputed spans kept) one group at a time."""

    def __init__(
        self, model: DeepseekOcrForCausalLM, settings: GenerationSettings, device: torch.device
    ) -> None:
        self.model, self.settings, self.device = model, settings, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vision-encoder")

    def submit(self, pages: Sequence[FedPage]) -> Encoding:
        began = ended = None
        if self.stream is not None:
            began, ended = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        return Encoding(self.pool.submit(self._encode, list(pages), began, ended), began, ended)

    def ready(self, encoding: Encoding) -> bool:
        """Whether the group's spans can be read without waiting."""
        return encoding.future.done() and (encoding.ended is None or encoding.ended.query())

    def result(self, encoding: Encoding) -> tuple[list[torch.Tensor], float]:
        """The group's spans, usable on the caller's current stream, and the encoding's time in
        ms (GPU time on CUDA); raises what the encoding raised."""
        spans, wall_ms = encoding.future.result()
        if encoding.ended is None or encoding.began is None:
            return spans, wall_ms
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(encoding.ended)
        for span in spans:  # made on the encoder's stream, read and freed on this one
            span.record_stream(stream)
        encoding.ended.synchronize()
        return spans, encoding.began.elapsed_time(encoding.ended)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    @torch.inference_mode()
    def _encode(
        self,
        pages: list[FedPage],
        began: torch.cuda.Event | None,
        ended: torch.cuda.Event | None,
    ) -> tuple[list[torch.Tensor], float]:
        started = time.perf_counter()
        if self.stream is None or began is None or ended is None:
            spans = vision_spans(self.model, pages, self.settings)
        else:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                began.record()
                spans = vision_spans(self.model, pages, self.settings)
                ended.record()
        return spans, (time.perf_counter() - started) * 1000


__all__ = ["EncoderThread", "Encoding"]
