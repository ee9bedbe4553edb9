"""Fedsite's progress lines go to stderr through the "fedsite" logger, beside Flower's own.

A simulation (simulations/console.py) sends every library's log to files under OUT/logs/ and
keeps the console for Fedsite's headline lines. Ray's workers are other processes: they learn
the folder and the verbosity from the environment (`LOG_DIR_ENV`, `VERBOSE_ENV`), which they
inherit from the driver, and `setup_logging` (called by the ClientApp on its first message)
opens their own `worker-PID.log` there.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

LOG_DIR_ENV = "FEDSITE_LOG_DIR"  # set by a simulation: the run's OUT/logs/
VERBOSE_ENV = "FEDSITE_VERBOSE"  # "1": library logs reach the console too
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Warnings known to be harmless here, ignored where they are raised: (message prefix, category, why).
HARMLESS_WARNINGS = (
    # PEFT reads the deprecated property when it wraps a model; nothing of ours uses it, and
    # transformers v6 removes the property and PEFT's read of it together
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
    # torch marks its own TorchScript decorators as deprecated at import of torch.jit internals
    # (pulled in by bitsandbytes and opacus); Fedsite never scripts a model
    ("`torch.jit.script_method` is deprecated", DeprecationWarning),
    # Ray's notice of a future default; we rely on today's behaviour (a worker without a GPU
    # share sees no GPU, see simulations/runner.py gpus_per_worker), so it changes nothing now
    ("Tip: In future versions of Ray", FutureWarning),
    # PEFT looks for a config.json next to the base model to see if the vocabulary grew; the
    # built-in 'tiny' model has no folder, and no run changes the vocabulary
    ("Could not find a config file in", UserWarning),
)


def harmless(message: Warning | str, category: type[Warning]) -> bool:
    text = str(message)
    return any(issubclass(category, kind) and text.startswith(prefix) for prefix, kind in HARMLESS_WARNINGS)


def filter_harmless_warnings() -> None:
    """Ignore HARMLESS_WARNINGS. Besides the filters, the display itself skips them: a library
    may put a broader filter in front later (Flower's ray_transport sets "once" for every
    DeprecationWarning at import), and filters are matched in order."""
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f"^{message}", category=category)
    show = warnings.showwarning
    if getattr(show, "drops_harmless", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202 (warnings' signature)
        if not harmless(message, category):
            show(message, category, filename, lineno, file, line)

    showwarning.drops_harmless = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def harmless_warnings_env() -> str:
    """The same filters as PYTHONWARNINGS, for child processes' import-time warnings (a message
    with ':' or ',' cannot be written there; Ray's is raised in the driver only)."""
    return ",".join(f"ignore:{message}:{category.__name__}" for message, category in HARMLESS_WARNINGS if not set(message) & {":", ","})


class _Once(logging.Filter):
    """Writes a record once though it reaches the handler twice: a run's file handler sits on the
    root logger and on "fedsite", which propagates to the root where setup_logging never ran."""

    def __init__(self) -> None:
        super().__init__()
        self._last: logging.LogRecord | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record is self._last:
            return False
        self._last = record
        return True


def file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.DEBUG)
    handler.addFilter(_Once())
    return handler


def setup_logging(level: int = logging.INFO) -> None:
    """Attach one plain handler to "fedsite"; no propagation, so Flower's lines are not doubled.

    In a simulation's worker ($FEDSITE_LOG_DIR set) everything goes to OUT/logs/worker-PID.log
    instead, and to the console as well only with $FEDSITE_VERBOSE=1."""
    logger = logging.getLogger("fedsite")
    log_dir = os.environ.get(LOG_DIR_ENV, "")
    if log_dir and Path(log_dir).is_dir() and not any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        handler = file_handler(Path(log_dir) / f"worker-{os.getpid()}.log")
        root = logging.getLogger()
        for doubled in [h for h in root.handlers if type(h) is logging.StreamHandler]:
            root.removeHandler(doubled)  # opacus' logging.basicConfig: Flower's lines a second time, timestamped
        root.addHandler(handler)  # Flower, Ray, transformers, bitsandbytes (they propagate)
        root.setLevel(logging.DEBUG)
        logging.captureWarnings(True)
        filter_harmless_warnings()
        logger.addHandler(handler)
    console = not log_dir or os.environ.get(VERBOSE_ENV) == "1"
    if console and not any(type(h) is logging.StreamHandler for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
