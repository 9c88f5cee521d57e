"""`DeepseekOcrEngine`: the resident DeepSeek-OCR model behind the pipeline's `OcrEngine` interface.

The model is loaded once and stays on its device, and so does its generator
(`resident.ResidentGenerator`): its cache slots and the CUDA graphs captured for its decode steps
are reused by every call. The
engine is a `streaming.StreamingEngine`: `prepare` builds a page's prompt and views in its own
mode (CPU work a worker runs off the decode loop), `serve` decodes pages fed while it runs
(continuous batching over at most `max_batch` sequences) and reports each as it finishes, and
`result` parses the grounded output into blocks, markdown and figure crops. `recognize` is the
same for a fixed list of pages.

Both model generations run behind this one engine: `from_checkpoint` reads the family from the
folder's `config.json` (`models.deepseek_ocr2.family`). DeepSeek-OCR 2 differs only in how a
page becomes inputs (transformers' processor, budgets instead of v1's views), so the engine
takes that step as `page_inputs` and names itself after the family, which is what each page's
result records as its `engine`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from infra.vocabulary import Mode
from models.deepseek_ocr.checkpoint import resolve_dtype, weight_files
from models.deepseek_ocr.generation_types import (
    FedPage,
    GenerationSettings,
    PageGeneration,
    output_limits,
    warm_up_encoder,
)
from models.deepseek_ocr.generator import Generator, OnFinished
from models.deepseek_ocr.grounding import crop_figures, parse_grounded_output
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import PageInputs, prepare_page
from models.deepseek_ocr.prompts import Prompt
from models.deepseek_ocr.resident import ResidentGenerator, resident_generator
from models.deepseek_ocr.serving import max_tiles_for, slot_capacity
from models.deepseek_ocr.tokenizer import DeepseekOcrTokenizer, load_tokenizer
from models.deepseek_ocr2.family import ModelFamily, checkpoint_family, load_ocr_model
from models.engine import OcrRequest, OcrResult
from models.streaming import PageFeed

if TYPE_CHECKING:
    from models.deepseek_ocr2.modeling import DeepseekOcr2ForCausalLM
    from models.deepseek_ocr2.processor import Ocr2PageInputs

ENGINE_NAME = ModelFamily.DEEPSEEK_OCR.value
# A page's model inputs from its image, mode and prompt (the family's preprocessing).
PageInputsFn = Callable[[Image.Image, Mode, str], "PageInputs | Ocr2PageInputs"]
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
    """DeepSeek-OCR (either generation) on one device; any mix of modes in one batch.

    `page_inputs` turns a page into model inputs (v1's `processor.prepare_page` by default);
    `name` is the engine name results carry (the model family's).
    """

    def __init__(
        self,
        model: DeepseekOcrForCausalLM | DeepseekOcr2ForCausalLM,
        tokenizer: DeepseekOcrTokenizer,
        *,
        model_revision: str,
        settings: GenerationSettings | None = None,
        prompt: str = Prompt.DOCUMENT_MARKDOWN,
        default_mode: Mode = Mode.GUNDAM,
        page_inputs: PageInputsFn | None = None,
        name: str = ENGINE_NAME,
    ) -> None:
        self.name = name
        self.page_inputs = page_inputs or self._v1_page_inputs
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
        decode_attention: str = "auto",
        overlap_encoding: bool = False,
        admit_wait_s: float = 0.5,
        max_new_tokens: int = 8192,
        ngram_size: int = 20,
        ngram_window: int = 50,
        max_batch: int = 64,
        prompt: str = Prompt.DOCUMENT_MARKDOWN,
        default_mode: Mode = Mode.GUNDAM,
    ) -> DeepseekOcrEngine:
        """Load a checkpoint folder strictly onto `device`: DeepSeek-OCR in the official layout,
        or DeepSeek-OCR 2 in transformers' (its `config.json`'s `model_type` decides).

        `dtype` auto is bfloat16 on a GPU that has it, float16 on older ones, float32 on CPU;
        `expert_kernel` picks the MoE matmul (`expert_kernels`), `decode_attention` the decode
        step's attention (`decode_attention`), `overlap_encoding` whether admitted pages are
        encoded beside decoding (`encoder_thread`), `admit_wait_s` how long a running batch
        gathers arriving pages to admit them together (`Generator`). The n-gram defaults are the
        official PDF script's (20 within the last 50 generated tokens), the same for OCR-2.
        """
        device = torch.device(device)
        family = checkpoint_family(checkpoint_dir)
        model = load_ocr_model(checkpoint_dir, device, resolve_dtype(dtype, device))
        model.set_expert_kernel(expert_kernel)
        model.set_decode_attention(decode_attention)
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            ngram_size=ngram_size,
            ngram_window=ngram_window,
            max_batch=max_batch,
            encode_thread=overlap_encoding,
            admit_wait_s=admit_wait_s,
        )
        return cls(
            model,
            load_tokenizer(checkpoint_dir),
            model_revision=checkpoint_fingerprint(checkpoint_dir),
            settings=settings,
            prompt=prompt,
            default_mode=default_mode,
            page_inputs=ocr2_page_inputs(checkpoint_dir)
            if family is ModelFamily.DEEPSEEK_OCR_2
            else None,
            name=family.value,
        )

    def _v1_page_inputs(self, image: Image.Image, mode: Mode, prompt: str) -> PageInputs:
        return prepare_page(image, mode, prompt, self.tokenizer, self.max_tiles)

    def prepare(self, request: OcrRequest) -> FedPage:
        """The page's prompt ids and pixel views in its mode (the engine's default if none)."""
        inputs = self.page_inputs(request.image, request.mode or self.default_mode, self.prompt)
        return FedPage(key=request, inputs=inputs, max_new_tokens=request.max_new_tokens)

    def serve(self, feed: PageFeed[FedPage], on_finished: OnFinished) -> None:
        """Decode pages from `feed` until it closes, `max_batch` at a time, each slot sized for
        any page; errors are contained per page (see `generator`)."""
        with self.resident.lock:
            self._serving_generator().run(feed, on_finished)

    def capture_graphs(self, seconds: float) -> int:
        """Capture `serve`'s decode graphs now, for up to `seconds`, so a resident worker's first
        pages do not wait for them (`Generator.capture_graphs`); the graphs captured."""
        with self.resident.lock:
            return self._serving_generator().capture_graphs(seconds)

    def warm_up_encoder(self) -> int:
        """Build cuDNN's plans for every vision-encoder shape before any page waits for them
        (`generation_types.warm_up_encoder`). On CUDA and DeepSeek-OCR (v1) only; the shapes
        encoded."""
        v1 = isinstance(self.model, DeepseekOcrForCausalLM)
        if not v1 or not self.model.lm_head.weight.is_cuda:
            return 0
        with self.resident.lock:
            return warm_up_encoder(self.model, self.settings)

    def _serving_generator(self) -> Generator:
        """The resident generator `serve` decodes with: `max_batch` slots sized for any page."""
        capacity = slot_capacity(self.model.config.decoder, self.settings.max_new_tokens)
        return self.resident.acquire(
            self.settings, num_slots=self.settings.max_batch, capacity=capacity
        )

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


def ocr2_page_inputs(checkpoint_dir: str | Path | None = None) -> PageInputsFn:
    """DeepSeek-OCR 2's page preparation: transformers' processor, the mode naming the budget."""
    from models.deepseek_ocr2.processor import build_processor
    from models.deepseek_ocr2.processor import prepare_page as prepare_ocr2_page

    processor = build_processor(checkpoint_dir)
    return lambda image, mode, prompt: prepare_ocr2_page(processor, image, prompt, mode)


__all__ = ["ENGINE_NAME", "DeepseekOcrEngine", "checkpoint_fingerprint", "ocr2_page_inputs"]
