"""The CLI's one console, shared by progress bars and logging.

A log line written through the console a live progress bar draws on is printed above the bar;
any other stream would tear it apart. Quiet by default: warnings and errors, one line each and
without tracebacks, because an expected input error (a corrupt file) is an outcome, not a crash;
Prefect's per-run logs (every task at INFO) stay in the Prefect UI. `--verbose` shows INFO,
Prefect's run logs and tracebacks.

Kept free of Prefect and PyMuPDF imports, so `ocrflow --help` stays fast.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.text import Text

console = Console(stderr=True)
log = logging.getLogger("ocrflow.cli")

# Loggers of our own packages: INFO only with --verbose (the root logger stays at WARNING, so a
# chatty library does not join in).
OWN_LOGGERS = ("ocrflow", "flows", "tasks", "services", "infra", "models", "pymupdf")
# Prefect's per-run loggers: on the console only with --verbose; their API handler keeps them
# for the Prefect UI either way.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ConsoleLogHandler(logging.Handler):
    """Log records as lines on the shared console; Prefect's run logs only when verbose.

    Lines are never wrapped by us (a path cut in two cannot be searched for); the terminal
    wraps them, and a live progress bar is redrawn below them.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.formatter = self.console_formatter = ConsoleFormatter()

    @property
    def verbose(self) -> bool:
        return self.console_formatter.verbose

    def set_verbose(self, verbose: bool) -> None:
        self.console_formatter.verbose = verbose
        self.setLevel(logging.INFO if verbose else logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.verbose and record.name.startswith(RUN_LOGGERS):
            return
        try:
            style = LEVEL_STYLES.get(record.levelno, "")
            console.print(Text(self.format(record), style=style), soft_wrap=True)
        except Exception:
            self.handleError(record)


class ConsoleFormatter(logging.Formatter):
    """`warning: broken.pdf failed: ...`; when verbose, with the time (to the millisecond: where
    a run's start-up goes), the Prefect run's name and the traceback."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.verbose = False

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        if not self.verbose:
            return line
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        stamp = f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d}"
        line = f"{stamp} {f'{run}: ' if run else ''}{line}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


LEVEL_STYLES = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "bold red"}


handler = ConsoleLogHandler()


def configure_logging(verbose: bool) -> None:
    """Routes logging to the shared console at WARNING (INFO when verbose).

    Idempotent. Importing Prefect replaces the root logger's handlers with its own console
    handler (a second console), so commands call `reclaim_logging()` after that import.
    """
    handler.set_verbose(verbose)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.NOTSET)
    reclaim_logging()


def reclaim_logging() -> None:
    """Puts the shared console's handler back on the root logger, in place of Prefect's."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing is handler or type(existing).__name__ == "PrefectConsoleHandler":
            root.removeHandler(existing)
    root.addHandler(handler)
    if "pymupdf" in sys.modules:  # imported before our environment default could apply
        route_mupdf_messages()


def route_mupdf_messages() -> None:
    """PyMuPDF prints MuPDF's complaints to stdout, which would corrupt `--json` output; send
    them to the log instead. `infra.prefect_env` sets the same through the environment for
    processes that import PyMuPDF later (the CPU worker pool)."""
    import pymupdf

    pymupdf.set_messages(pylogging_name="pymupdf", pylogging_level=logging.WARNING)
    pymupdf.set_log(pylogging_name="pymupdf", pylogging_level=logging.DEBUG)


def report_failures(outcomes: list[dict], ok: frozenset[str]) -> None:
    """One warning line per document that did not end in one of the `ok` statuses."""
    for outcome in outcomes:
        if outcome["status"] not in ok:
            what = outcome.get("source") or f"document {outcome['id']}"
            reason = outcome.get("error") or "no reason recorded"
            log.warning("%s %s: %s", what, outcome["status"], reason)
