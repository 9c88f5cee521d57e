"""The CPU worker pool's processes do not outlive the process that started them: a killed
`ingest` (SIGKILL, an OOM kill, a benchmark's deadline) used to leave its routing and rendering
workers blocked on their task pipe for ever, each holding its memory. Page-sized buffers are
mapped and unmapped (glibc), not left as holes in malloc's arenas. And the workers run at a lower
priority than the process that started them, so a GPU worker on the same host gets its cores."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.memory import release_large_buffers
from infra.settings import Settings, parse_core_list
from tasks.parallel import cpu_workers, map_page_chunks
from tests.conftest import REPO_ROOT

STARTS_POOL = """
import time
from infra.settings import Settings
from tasks.pages import prime_cpu_worker
from tasks.parallel import warm_up
warm_up(prime_cpu_worker, Settings())
print("pool started", flush=True)
time.sleep(600)
"""


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def test_cpu_workers_end_when_the_process_that_started_them_is_killed(tmp_path: Path) -> None:
    env = os.environ | {
        "OCRFLOW_CPU_WORKERS": "2",
        "OCRFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
    }
    parent = subprocess.Popen(
        [sys.executable, "-c", STARTS_POOL], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"pool started\n"
        deadline = time.monotonic() + 60
        while len(workers := children(parent.pid)) < 2:  # two workers (and a resource tracker)
            assert time.monotonic() < deadline, "the pool's workers never started"
            time.sleep(0.1)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(workers)
    for pid in left:  # do not leave them behind when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"CPU workers outlived their parent: {sorted(left)}"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_page_sized_buffers_are_mapped_on_glibc() -> None:
    assert release_large_buffers() is True
    assert release_large_buffers() is True  # once per process, then remembered


def niceness_in_worker(_path: Path, _settings: Settings, page_numbers: list[int]) -> list[int]:
    return [os.nice(0) for _ in page_numbers]


@pytest.mark.parametrize("niceness", [7, 0])
def test_cpu_workers_run_at_the_configured_lower_priority(niceness: int) -> None:
    settings = Settings(cpu_workers=2, cpu_worker_niceness=niceness)
    seen = map_page_chunks(niceness_in_worker, Path("unused.pdf"), settings, [1, 2])
    assert seen == [min(19, os.nice(0) + niceness)] * 2


def cores_in_worker(_path: Path, _settings: Settings, page_numbers: list[int]) -> list[set[int]]:
    return [os.sched_getaffinity(0) for _ in page_numbers]


def test_cpu_workers_keep_to_the_configured_cores() -> None:
    """The cores a GPU worker's decode loop keeps to itself on a shared host."""
    first = min(os.sched_getaffinity(0))
    settings = Settings(cpu_workers=2, cpu_worker_cores=f"{first},{first + 4096}")
    seen = map_page_chunks(cores_in_worker, Path("unused.pdf"), settings, [1, 2])
    assert seen == [{first}] * 2  # a CPU the machine lacks is left out
    anywhere = map_page_chunks(cores_in_worker, Path("unused.pdf"), Settings(cpu_workers=2), [1])
    assert anywhere == [os.sched_getaffinity(0)]


@pytest.mark.parametrize("text", ["4-15", "0,2,8-11", " 3 "])
def test_core_lists_read_as_taskset_writes_them(text: str) -> None:
    cores = parse_core_list(text)
    assert cores == {"4-15": set(range(4, 16)), "0,2,8-11": {0, 2, 8, 9, 10, 11}, " 3 ": {3}}[text]


@pytest.mark.parametrize("text", ["", "a-3", "5-2", "1,,2", "-3"])
def test_a_malformed_core_list_is_refused_with_the_setting(text: str) -> None:
    with pytest.raises(ValueError, match="CPU list"):
        Settings(cpu_worker_cores=text)


PRIMES_THEN_ROUTES = """
from pathlib import Path
from infra.settings import Settings
from models.deepseek_ocr import tokenizer
from tasks.pages import prepare_page_chunk, prime_cpu_worker
prime_cpu_worker(Settings())
primed = tokenizer._load.cache_info()
prepare_page_chunk(Path("samples/report.pdf"), Settings(), [1, 2, 3])
print(primed.currsize, tokenizer._load.cache_info().misses)
"""


def test_a_primed_worker_routes_its_first_born_digital_pages_without_loading_anything(
    tmp_path: Path,
) -> None:
    """Routing counts a text layer's tokens with the tokenizer; a worker that loaded it on its
    first born-digital page held that chunk ~2 s (on 2 cores) while a GPU's batch filled."""
    env = os.environ | {"OCRFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}"}
    done = subprocess.run(
        [sys.executable, "-c", PRIMES_THEN_ROUTES],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]  # loaded by the priming; routing loaded nothing


def test_with_gpu_workers_there_is_one_cpu_worker_per_core_they_may_use() -> None:
    allowed = os.sched_getaffinity(0)
    first = min(allowed)
    assert cpu_workers(Settings(engine="queue")) == len(allowed)
    assert cpu_workers(Settings(engine="queue", cpu_worker_cores=f"{first}")) == 1
    assert cpu_workers(Settings(engine="queue", cpu_worker_cores="4096")) == len(allowed)  # none
    assert cpu_workers(Settings(engine="queue", cpu_workers=3, cpu_worker_cores=f"{first}")) == 3
    assert cpu_workers(Settings(engine="rapidocr")) == 1
