"""Fedsite's progress lines go to stderr through the "fedsite" logger, beside Flower's own."""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    """Attach one plain handler to "fedsite"; no propagation, so Flower's lines are not doubled."""
    logger = logging.getLogger("fedsite")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
