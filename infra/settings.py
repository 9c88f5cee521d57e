"""Runtime configuration, read from `OCRFLOW_*` environment variables (and a `.env` file).

Settings are passed in, never created at import, so tests and flows can hold different ones.
S3 credentials are deliberately absent: boto3's own chain (profiles, roles, AWS_ENDPOINT_URL)
configures S3.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from platformdirs import user_data_dir
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.vocabulary import Mode

PIPELINE_VERSION = "1"
"""Bumped when a change makes earlier results stale: documents done under another version rerun."""


def default_data_dir() -> Path:
    return Path(user_data_dir("ocrflow", appauthor=False))


def default_database_url() -> str:
    return f"sqlite:///{default_data_dir() / 'ocrflow.db'}"


class EngineChoice(StrEnum):
    AUTO = "auto"  # DeepSeek-OCR when a checkpoint is configured, else the CPU engine
    DEEPSEEK = "deepseek"
    RAPIDOCR = "rapidocr"
    TESSERACT = "tesseract"
    QUEUE = "queue"  # hand pages to resident GPU workers (`ocrflow gpu-worker`)


class RoutingPolicy(StrEnum):
    AUTO = "auto"  # trustworthy born-digital pages keep their text layer
    ALWAYS_OCR = "always-ocr"  # every non-blank page is OCRed


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OCRFLOW_", env_file=".env", extra="ignore")

    database_url: str = Field(default_factory=default_database_url)
    data_dir: Path = Field(default_factory=default_data_dir)

    # OCR engine
    engine: EngineChoice = EngineChoice.AUTO
    model_path: Path | None = None  # official DeepSeek-OCR checkpoint directory
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # GPU numerics: auto = bfloat16 where the GPU has it, else float16 (float32 on CPU)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # MoE experts: auto = PyTorch's fused grouped matmul on Hopper/Blackwell in bfloat16, else
    # the portable Triton kernel (models/deepseek_ocr/expert_kernels.py)
    expert_kernel: Literal["auto", "grouped", "portable"] = "auto"
    # Decode-step attention: auto = the Triton kernel over each row's own cached keys on CUDA
    # (models/deepseek_ocr/decode_attention.py), else PyTorch's SDPA over the masked key range
    decode_attention: Literal["auto", "sdpa", "triton"] = "auto"
    # Admitted pages' vision encoding on a thread and CUDA stream of its own while the batch
    # decodes (models/deepseek_ocr/encoder_thread.py): on a host busy rendering pages, launching
    # the encoder falls behind the GPU, and the decode steps fill the gaps
    overlap_encoding: bool = True
    # at most how long a running batch gathers pages that reach it fewer than its free-slot
    # group (`GenerationSettings.admit_wait_s`) before it admits them together
    admit_wait_seconds: float = Field(default=0.5, ge=0)
    ocr_batch_size: int = 16  # pages per OCR call (engine=queue: the whole window)
    cpu_workers: int | None = None  # processes for routing/rendering; default: see tasks.parallel
    # added to those processes' niceness, so a GPU worker's decode loop, Postgres and the flow on
    # the same host are scheduled ahead of bulk page work (0: same priority as the flow)
    cpu_worker_niceness: int = Field(default=10, ge=0, le=19)
    # logical CPUs those processes may run on, as `taskset` writes them ("4-15", "0,2,8-11");
    # None: any. Leaves whole cores to a GPU worker's decode loop on the same host
    cpu_worker_cores: str | None = None
    # documents one ingest run works at once, and windows of one document routed/recognised
    # ahead of persisting; None: enough to fill GPU workers' slots with engine=queue, else 1 and 2
    document_concurrency: int | None = None
    windows_in_flight: int | None = None
    max_new_tokens: int = 8192
    # at most the seconds a GPU worker spends capturing its decode step's CUDA graphs before it
    # takes pages (every batch size at the shortest key lengths first; it stops once all are
    # captured: an H200 worker at 4,096 output tokens had all 480 within a 44-46 s warm-up, where
    # 30 s left 67 to be captured mid-run while the GPU waited), after its vision encoder has met
    # every view shape once; 0: neither, each made on first use
    graph_warm_up_seconds: float = Field(default=90.0, ge=0)
    ngram_size: int = 20  # official PDF script: 20 / 50
    ngram_window: int = 50
    queue_worker_grace_seconds: float = 120.0  # engine=queue: pages retryable if no worker
    queue_lease_seconds: float = 60.0  # a GPU worker's hold on a page, renewed by heartbeats
    queue_heartbeat_seconds: float = 5.0  # how often a worker beats and renews its leases
    queue_max_attempts: int = 3  # claims of one queued page before the queue gives up on it
    # engine=queue: pages one ingest process has rendered and not yet settled (memory bound);
    # None: twice the live GPU workers' slots, at least one window
    queue_pages_ahead: int | None = None

    # Page lifecycle: transient failures are retried with backoff, then end `failed`.
    page_max_attempts: int = 5  # transient failures of one page before it ends failed
    page_retry_base_seconds: float = 30.0  # backoff: base * 2**(failures - 1), capped
    page_retry_max_seconds: float = 3600.0
    document_lease_seconds: float = 120.0  # a run's hold on a document, renewed per window;
    # a `running` document whose lease ran out (its run died) is resumed by watch and redrive

    # Routing
    routing_policy: RoutingPolicy = RoutingPolicy.AUTO
    precision_target: float = 0.95
    mode_override: Mode | None = None  # force one mode for every OCR page

    # Splitting limits: a file over a limit is recorded as failed, never half-processed.
    max_file_bytes: int = 512 * 1024 * 1024
    max_pages: int = 5000
    max_page_pixels: int = 40_000_000
    page_window: int = 64
    render_dpi: int = 144

    # Cost report: the price of one GPU hour, in US dollars. The default is an assumption,
    # about what GPU clouds list for an on-demand H100 or H200 hour (reserved and spot hours
    # cost less, hyperscalers' on-demand hours more): set your own.
    gpu_hour_usd: float = Field(default=3.0, ge=0)

    # S3 results written back per document
    results_prefix: str = "ocrflow-results/"
    s3_claim_lease_seconds: float = 300.0  # a run's hold on an S3 version, renewed while it runs
    s3_max_attempts: int = 3  # claims of one S3 version before it ends failed

    @field_validator("cpu_worker_cores")
    @classmethod
    def _valid_core_list(cls, cores: str | None) -> str | None:
        if cores is not None:
            parse_core_list(cores)
        return cores

    @field_validator("database_url")
    @classmethod
    def _normalise_postgres_url(cls, url: str) -> str:
        """Accept the libpq-style URLs users paste; we always speak psycopg 3."""
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


def parse_core_list(text: str) -> frozenset[int]:
    """`"4-15"`, `"0,2,8-11"` (a `taskset` list) as CPU numbers; ValueError when malformed."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or int(last or first) < int(first):
            raise ValueError(f"not a CPU list like '4-15' or '0,2,8-11': {text!r}")
        cores.update(range(int(first), int(last or first) + 1))
    return frozenset(cores)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
