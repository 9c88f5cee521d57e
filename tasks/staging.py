"""Page images handed from the CPU workers to the ingest process through files, not the pool.

A pool worker's result travels back pickled through one pipe, which the pool's manager thread
reads 64 KiB at a time, taking the GIL for each read. With megabytes of TIFF per page, that
thread was a third of the samples in which the ingest process held the GIL (py-spy `--gil`,
`bench.e2e_gpu --engine instant`), and every window waited behind it for its chunks. A file
costs the worker one write and the ingest process one read, and the GIL is free during both.

The files live in one directory per ingest process under the temp directory (`TMPDIR`), each only
until the ingest process takes it (the pages-ahead budget bounds how many wait), the directory
until the process exits; one left by a killed process on this host is removed by the next
ingest process that stages a page.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

PREFIX = "ocrflow-pages-"
logger = logging.getLogger(__name__)

_directory: str | None = None
_lock = threading.Lock()


@dataclass(frozen=True)
class StagedImage:
    """An encoded page image waiting in a file for the ingest process."""

    path: str

    def take(self) -> bytes:
        """The image's bytes; the file is removed."""
        data = Path(self.path).read_bytes()
        self.discard()
        return data

    def discard(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def stage(data: bytes, directory: str | None) -> bytes | StagedImage:
    """`data` written to a file in `directory`; the bytes themselves when there is no
    directory (the work runs in the ingest process) or the file cannot be written."""
    if directory is None:
        return data
    try:
        handle, path = tempfile.mkstemp(suffix=".img", dir=directory)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
    except OSError:
        return data
    return StagedImage(path)


def staging_directory() -> str | None:
    """This process's directory for staged images, made on first use; None when the temp
    directory takes no new one (the images then travel through the pool's pipe)."""
    global _directory
    with _lock:
        if _directory is None:
            _remove_orphans()
            try:
                _directory = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}@{_host()}-")
            except OSError as error:
                logger.warning("page images go through the CPU pool's pipe: %s", error)
                return None
            atexit.register(shutil.rmtree, _directory, ignore_errors=True)
        return _directory


def _remove_orphans() -> None:
    """Removes the directories of this host's ingest processes that are gone (killed before
    their exit hook ran). Other hosts' are left alone: a shared temp directory is no proof
    that their processes are gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*@{_host()}-*"):
        owner = path.name.removeprefix(PREFIX).split("@", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _host() -> str:
    return socket.gethostname().replace("-", "_")


__all__ = ["StagedImage", "stage", "staging_directory"]
