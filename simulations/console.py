"""The console of `fedsite simulate`: Fedsite's headline lines, with every library's log in OUT/logs/.

Without `--verbose` the console shows only Fedsite's "[fedsite] ..." lines (one per round, plus
start and end), its warnings and errors, and progress bars on a terminal. Everything else,
Flower's strategy banners and DEBUG lines, Ray, transformers, bitsandbytes and Python warnings,
goes to OUT/logs/fedsite.log (this process) and OUT/logs/worker-PID.log (Ray's workers, which
get the folder through the environment and `finetune.logs.setup_logging`). With `--verbose` the
libraries reach the console as well, each line once: the root logger's stderr handler that
opacus installs at import (`logging.basicConfig`), which printed every Flower line a second time
with a timestamp, is taken off for the run.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.logs import LOG_DIR_ENV, VERBOSE_ENV, file_handler, filter_harmless_warnings, harmless_warnings_env
from finetune.progress import PROGRESS_ENV

HEADLINE = "[fedsite]"  # the prefix of the lines a quiet console keeps


class Headlines(logging.Filter):
    """Fedsite's "[fedsite] ..." lines and anything at WARNING or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or str(record.msg).startswith(HEADLINE)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables for this process and the workers it starts; restore them afterwards."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stderr_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)]


@contextmanager
def run_console(out: Path, verbose: bool = False) -> Iterator[Path]:
    """Route the run's logs into OUT/logs/ (returned) and keep the console to the headlines."""
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root, fedsite, flwr = logging.getLogger(), logging.getLogger("fedsite"), logging.getLogger("flwr")
    handler = file_handler(logs / "fedsite.log")
    doubled = _stderr_handlers(root)  # opacus' basicConfig: every propagated Flower line a second time
    flwr_console = [h for h in flwr.handlers if type(h).__name__ == "ConsoleHandler"]
    saved = (root.level, [h.level for h in flwr_console])
    quiet = Headlines()
    env = {LOG_DIR_ENV: str(logs.resolve()), VERBOSE_ENV: "1" if verbose else "0", PROGRESS_ENV: "1"}
    env["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), harmless_warnings_env()]))
    for h in doubled:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    fedsite.addHandler(handler)
    if not verbose:
        for h in flwr_console:
            h.setLevel(logging.CRITICAL + 1)  # Flower's lines: in the file only
        for h in fedsite.handlers:
            if h is not handler:
                h.addFilter(quiet)
    transformers_quiet = _transformers_to_file(verbose)
    try:
        with warnings.catch_warnings(), environment(env):
            logging.captureWarnings(True)  # Python warnings -> "py.warnings" -> the file
            filter_harmless_warnings()  # after it: the display that logs them skips the harmless ones
            yield logs
    finally:
        logging.captureWarnings(False)
        transformers_quiet()
        for h in fedsite.handlers:
            h.removeFilter(quiet)
        fedsite.removeHandler(handler)
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved[0])
        for h, level in zip(flwr_console, saved[1]):
            h.setLevel(level)
        for h in doubled:
            root.addHandler(h)


def _transformers_to_file(verbose: bool):  # noqa: ANN202 (returns the undo)
    """transformers logs through its own stderr handler; without --verbose it propagates to the file instead."""
    if verbose or "transformers" not in sys.modules:
        return lambda: None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()

    def undo() -> None:
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()

    return undo
