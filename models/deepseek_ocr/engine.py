"""`DeepseekOcrEngine`: the resident DeepSeek-OCR model behind the pipeline's `OcrEngine` interface.

The model is loaded once and stays on its device, and so does its generator
(`resident.ResidentGenerator`): its cache slots and the CUDA graphs captured for its decode steps
are reused by every call. The
engine is a `streaming.StreamingEngine`: `prepare` builds a page's prompt and views in its own
mode (CPU work a worker runs off the decode loop), `serve` decodes pages fed while it runs
(continuous batching over at most `max_batch` sequences) and reports each as it finishes, and
`result` parses the grounded output into blocks, markdown and figure crops. `recognize` is the
same for a fixed list of pages.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace
from pathlib import Path

import torch

from infra.vocabulary import Mode
from models.deepseek_ocr.checkpoint import load_checkpoint, resolve_dtype, weight_files
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.generation_types import (
    FedPage,
    GenerationSettings,
    PageGeneration,
    output_limits,
)
from models.deepseek_ocr.generator import OnFinished
from models.deepseek_ocr.grounding import crop_figures, parse_grounded_output
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import prepare_page
from models.deepseek_ocr.prompts import Prompt
from models.deepseek_ocr.resident import ResidentGenerator, resident_generator
from models.deepseek_ocr.serving import max_tiles_for, slot_capacity
from models.deepseek_ocr.tokenizer import DeepseekOcrTokenizer, load_tokenizer
from models.engine import OcrRequest, OcrResult
from models.streaming import PageFeed

ENGINE_NAME = "deepseek-ocr"
# Weight bytes sampled per file for the revision fingerprint: enough to tell checkpoints apart
# (real weights, formula weights, another fine-tune) without reading 6.7 GB at start-up.
FINGERPRINT_SAMPLE_BYTES = 1 << 20


def checkpoint_fingerprint(directory: str | Path) -> str:
    """A short revision id: SHA-256 over `config.json`, every weight file's safetensors header
    and the first MiB of its tensor data."""
    directory = Path(directory)
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for path in weight_files(directory):
        with path.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            digest.update(handle.read(header_length))
            digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:12]


class DeepseekOcrEngine:
    """DeepSeek-OCR on one device; any mix of modes in one batch."""

    name = ENGINE_NAME

    def __init__(
        self,
        model: DeepseekOcrForCausalLM,
        tokenizer: DeepseekOcrTokenizer,
        *,
        model_revision: str,
        settings: GenerationSettings | None = None,
        prompt: str = Prompt.DOCUMENT_MARKDOWN,
        default_mode: Mode = Mode.GUNDAM,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_revision = model_revision
        self.settings = replace(settings or GenerationSettings(), eos_token_id=tokenizer.eos_id)
        self.prompt = str(prompt)
        self.default_mode = default_mode
        self.max_tiles = max_tiles_for(self.model.lm_head.weight.device)
        self.resident: ResidentGenerator = resident_generator(self.model)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        expert_kernel: str = "auto",
        max_new_tokens: int = 8192,
        ngram_size: int = 20,
        ngram_window: int = 50,
        max_batch: int = 64,
        prompt: str = Prompt.DOCUMENT_MARKDOWN,
        default_mode: Mode = Mode.GUNDAM,
    ) -> DeepseekOcrEngine:
        """Load an official-layout checkpoint directory strictly onto `device`.

        `dtype` auto is bfloat16 on a GPU that has it, float16 on older ones, float32 on CPU;
        `expert_kernel` picks the MoE matmul (`expert_kernels`). The n-gram defaults are the
        official PDF script's (20 within the last 50 generated tokens).
        """
        device = torch.device(device)
        config = DeepseekOcrConfig.from_official_json(checkpoint_dir)
        with torch.device("meta"):
            model = DeepseekOcrForCausalLM(config)
        load_checkpoint(model, checkpoint_dir, device=device, dtype=resolve_dtype(dtype, device))
        model.set_expert_kernel(expert_kernel)
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            ngram_size=ngram_size,
            ngram_window=ngram_window,
            max_batch=max_batch,
        )
        return cls(
            model,
            load_tokenizer(checkpoint_dir),
            model_revision=checkpoint_fingerprint(checkpoint_dir),
            settings=settings,
            prompt=prompt,
            default_mode=default_mode,
        )

    def prepare(self, request: OcrRequest) -> FedPage:
        """The page's prompt ids and pixel views in its mode (the engine's default if none)."""
        inputs = prepare_page(
            request.image,
            request.mode or self.default_mode,
            self.prompt,
            self.tokenizer,
            self.max_tiles,
        )
        return FedPage(key=request, inputs=inputs, max_new_tokens=request.max_new_tokens)

    def serve(self, feed: PageFeed[FedPage], on_finished: OnFinished) -> None:
        """Decode pages from `feed` until it closes, `max_batch` at a time, each slot sized for
        any page; errors are contained per page (see `generator`)."""
        capacity = slot_capacity(self.model.config.decoder, self.settings.max_new_tokens)
        with self.resident.lock:
            generator = self.resident.acquire(
                self.settings, num_slots=self.settings.max_batch, capacity=capacity
            )
            generator.run(feed, on_finished)

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        """Recognise a batch of pages; results come back in request order, errors raised."""
        if not requests:
            return []
        pages = [self.prepare(request) for request in requests]
        limits = output_limits(
            [page.inputs for page in pages],
            self.settings,
            self.model.config.decoder.max_position_embeddings,
            [page.max_new_tokens for page in pages],
        )
        with self.resident.lock:
            generator = self.resident.acquire(
                self.settings,
                num_slots=min(self.settings.max_batch, len(pages)),
                capacity=max(
                    len(p.inputs.input_ids) + limit for p, limit in zip(pages, limits, strict=True)
                ),
            )
            outputs = generator.run_all(pages)
        return [self.result(page, outputs[page]) for page in pages]

    def result(self, page: FedPage, generation: PageGeneration) -> OcrResult:
        """Text, blocks and figure crops of a finished page (CPU work, off the decode loop)."""
        request = page.key
        if not isinstance(request, OcrRequest):
            raise TypeError(f"not a page this engine prepared: key {request!r}")
        generation.text = self.tokenizer.decode(generation.text_token_ids)
        return self._result(request, page.inputs.mode, generation)

    def _result(self, request: OcrRequest, mode: Mode, generation: PageGeneration) -> OcrResult:
        raw = (generation.text or "").strip()  # the official decoding strips the text
        parsed = parse_grounded_output(
            raw, page_width=request.page_width, page_height=request.page_height
        )
        return OcrResult(
            key=request.key,
            markdown=parsed.markdown,
            blocks=parsed.blocks,
            raw_output=raw,
            finish_reason=generation.finish_reason,
            engine=self.name,
            model_revision=self.model_revision,
            mode=mode,
            vision_tokens=generation.placeholder_tokens,
            valid_vision_tokens=generation.valid_vision_tokens,
            prompt_tokens=generation.prompt_tokens,
            output_tokens=generation.output_tokens,
            encode_ms=generation.encode_ms,
            decode_ms=generation.decode_ms,
            gpu_ms=generation.gpu_ms,
            figures=crop_figures(parsed.blocks, request.image),
        )


__all__ = ["ENGINE_NAME", "DeepseekOcrEngine", "checkpoint_fingerprint"]
