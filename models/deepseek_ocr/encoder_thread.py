"""Vision encoding of admitted pages on a thread and a CUDA stream of their own.

Encoding a group of new pages is bound by launching its kernels: on an H200 the host took
402 ms to launch the encoding of 32 pages (16 Gundam, 16 Base) that the GPU ran in 455 ms
(`bench.encode_host_time`). Run by the decode loop's thread it holds the batch's decode steps
for all that time, and on a side stream launched from that same thread it overlapped nothing
(`docs/gpu-worker.md`). Launched from a thread of its own, its kernels run beside the decode
steps, whose launches wait for the GIL at most a switch interval
(`generator.SWITCH_INTERVAL_SECONDS`).

Off unless `GenerationSettings.encode_thread` (`OCRFLOW_OVERLAP_ENCODING`) asks for it: it is
not yet measured on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from models.deepseek_ocr.generation_types import FedPage, GenerationSettings, vision_spans
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM


@dataclass(eq=False)
class Encoding:
    """One admission group's encoding under way. On CUDA, `began` and `ended` are recorded on
    the encoder's stream around it."""

    future: Future[list[torch.Tensor]]
    began: torch.cuda.Event | None = None
    ended: torch.cuda.Event | None = None
    wall_ms: list[float] = field(default_factory=list)  # the encoding's wall time, once done


class EncoderThread:
    """Encodes fed pages' views (precomputed spans kept) one group at a time."""

    def __init__(
        self, model: DeepseekOcrForCausalLM, settings: GenerationSettings, device: torch.device
    ) -> None:
        self.model, self.settings, self.device = model, settings, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vision-encoder")

    def submit(self, pages: Sequence[FedPage]) -> Encoding:
        if self.stream is None:
            encoding = Encoding(Future())
        else:
            timing = {"enable_timing": True}
            encoding = Encoding(Future(), torch.cuda.Event(**timing), torch.cuda.Event(**timing))
        encoding.future = self.pool.submit(self._encode, list(pages), encoding)
        return encoding

    def ready(self, encoding: Encoding) -> bool:
        """Whether the group's spans can be read without waiting."""
        return encoding.future.done() and (encoding.ended is None or encoding.ended.query())

    def result(self, encoding: Encoding) -> tuple[list[torch.Tensor], float]:
        """The group's spans, usable on the caller's current stream, and the encoding's time in
        ms (GPU time on CUDA); raises what the encoding raised."""
        spans = encoding.future.result()
        if encoding.ended is None or encoding.began is None:
            return spans, encoding.wall_ms[0]
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(encoding.ended)
        for span in spans:  # made on the encoder's stream, read and freed on this one
            span.record_stream(stream)
        encoding.ended.synchronize()
        return spans, encoding.began.elapsed_time(encoding.ended)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    @torch.inference_mode()
    def _encode(self, pages: list[FedPage], encoding: Encoding) -> list[torch.Tensor]:
        started = time.perf_counter()
        if self.stream is None:
            spans = vision_spans(self.model, pages, self.settings)
        else:
            assert encoding.began is not None and encoding.ended is not None
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                encoding.began.record()
                spans = vision_spans(self.model, pages, self.settings)
                encoding.ended.record()
        encoding.wall_ms.append((time.perf_counter() - started) * 1000)
        return spans


__all__ = ["EncoderThread", "Encoding"]
