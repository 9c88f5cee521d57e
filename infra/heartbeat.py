"""Keep a lease alive while work runs: a daemon thread that renews it at an interval.

A process killed with SIGKILL stops renewing, so its lease runs out and another run may take
the work over; a live one keeps it however long the work takes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

logger = logging.getLogger(__name__)


class Heartbeat:
    """`with Heartbeat(renew, every=...):` calls `renew()` every `every` seconds until the
    block ends. A failed renewal is logged and tried again at the next beat (leases are
    sized to survive a missed beat or two)."""

    def __init__(self, renew: Callable[[], object], *, every: float, name: str = "lease") -> None:
        self._renew, self._every = renew, every
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{name}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._every):
            try:
                self._renew()
            except Exception as error:  # the database blinked: the next beat tries again
                logger.warning("%s: renewal failed: %s", self._thread.name, error)
