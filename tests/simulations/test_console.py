"""The simulation console: library logs go to OUT/logs/, the console keeps Fedsite's headlines."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
from flwr.common.logger import log as flwr_log

from finetune.logs import LOG_DIR_ENV, VERBOSE_ENV, setup_logging
from simulations.console import run_console


@pytest.fixture()
def console_logger():
    """Call it in the test: a "fedsite" console handler on the test's captured stderr
    (setup_logging adds one only once per process)."""
    logger = logging.getLogger("fedsite")
    before = list(logger.handlers)

    def fresh() -> None:
        logger.handlers.clear()
        setup_logging()

    yield fresh
    logger.handlers[:] = before


def test_quiet_console_keeps_headlines_and_files_everything_else(tmp_path, capsys, console_logger):
    console_logger()
    fedsite = logging.getLogger("fedsite.coordinator")
    with run_console(tmp_path, verbose=False) as logs:
        assert os.environ[LOG_DIR_ENV] == str(logs.resolve()) and os.environ[VERBOSE_ENV] == "0"
        flwr_log(logging.INFO, "Starting FedsiteStrategy strategy")
        flwr_log(logging.DEBUG, "Registered 4 nodes")
        logging.getLogger("bitsandbytes.cextension").warning("Failed to load CPU gemm_4bit_forward")
        fedsite.info("[fedsite] round 1/3 | eval accuracy 0.100")
        fedsite.info("round 1: training on 4 clients")
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning)
        warnings.warn("something new", UserWarning)
    console = capsys.readouterr()
    lines = (console.out + console.err).strip().splitlines()
    assert lines == ["[fedsite] round 1/3 | eval accuracy 0.100"], lines
    text = (tmp_path / "logs" / "fedsite.log").read_text()
    for expected in ("Starting FedsiteStrategy", "Registered 4 nodes", "Failed to load CPU gemm_4bit_forward", "round 1: training on 4 clients", "UserWarning: something new"):
        assert text.count(expected) == 1, expected
    assert "is_gradient_checkpointing" not in text  # harmless, filtered where it is raised
    assert LOG_DIR_ENV not in os.environ  # restored after the run
    fedsite.info("round 2: training on 4 clients")  # after the run the console is as before
    assert "round 2" in capsys.readouterr().err


def test_verbose_console_shows_each_library_line_once(tmp_path, capsys, console_logger):
    console_logger()
    root = logging.getLogger()
    doubling = logging.StreamHandler()  # what opacus' logging.basicConfig leaves on the root logger
    root.addHandler(doubling)
    try:
        with run_console(tmp_path, verbose=True):
            flwr_log(logging.INFO, "Starting FedsiteStrategy strategy")
            logging.getLogger("fedsite.coordinator").info("round 1: training on 4 clients")
    finally:
        root.removeHandler(doubling)
    console = capsys.readouterr()
    text = console.out + console.err
    assert "Starting FedsiteStrategy strategy" not in text, text  # not a second time through the root logger (Flower's own handler shows it)
    assert text.count("round 1: training on 4 clients") == 1, text
    assert (tmp_path / "logs" / "fedsite.log").read_text().count("Starting FedsiteStrategy strategy") == 1


def test_fedsite_lines_are_filed_once_when_fedsite_propagates(tmp_path):
    """In-process runs (benchmarks, notebooks) never call setup_logging: "fedsite" propagates to
    the root, where the run's file handler also sits."""
    fedsite = logging.getLogger("fedsite")
    saved = (list(fedsite.handlers), fedsite.propagate)
    fedsite.handlers.clear()
    fedsite.propagate = True
    try:
        with run_console(tmp_path):
            logging.getLogger("fedsite.emulator").info("distillation step 10/100")
    finally:
        fedsite.handlers[:], fedsite.propagate = saved
    assert (tmp_path / "logs" / "fedsite.log").read_text().count("distillation step 10/100") == 1
