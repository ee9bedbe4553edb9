"""Known-harmless warnings stay hidden even behind a broader filter a library adds later."""

import os
import subprocess
import sys
import warnings

from finetune.logs import HARMLESS_WARNINGS, filter_harmless_warnings, harmless, harmless_warnings_env


def test_harmless_warnings_are_dropped_even_when_a_library_puts_a_filter_in_front():
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
        filter_harmless_warnings()
        warnings.filterwarnings("once", category=DeprecationWarning)  # what flwr.simulation.ray_transport does at import
        warnings.warn("`torch.jit.script_method` is deprecated. Please switch to `torch.compile`", DeprecationWarning)
        warnings.warn("a new deprecation", DeprecationWarning)
        warnings.warn("Could not find a config file in tiny", RuntimeWarning)  # same text, other category: shown
    assert shown == ["a new deprecation", "Could not find a config file in tiny"]


def test_the_filters_reach_child_processes_in_pythonwarnings_form():
    env = harmless_warnings_env()
    assert env.count("ignore:") == len(HARMLESS_WARNINGS) - 1  # Ray's "Tip: ..." has a colon; it is raised in the driver only
    completed = subprocess.run([sys.executable, "-c", "import warnings; print(len(warnings.filters))"], env={**os.environ, "PYTHONWARNINGS": env}, capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr  # every entry is valid
    assert harmless("Tip: In future versions of Ray, Ray will no longer override", FutureWarning)
    assert not harmless("Tip: In future versions of Ray", UserWarning)


def test_a_simulation_worker_logs_to_its_own_file_and_not_twice(tmp_path, monkeypatch):
    import logging

    from finetune.logs import LOG_DIR_ENV, VERBOSE_ENV, setup_logging

    root, fedsite = logging.getLogger(), logging.getLogger("fedsite")
    saved = (list(root.handlers), list(fedsite.handlers), root.level)
    opacus_like = logging.StreamHandler()
    root.addHandler(opacus_like)
    fedsite.handlers.clear()
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(VERBOSE_ENV, "0")
    try:
        setup_logging()
        assert opacus_like not in root.handlers
        assert not [h for h in fedsite.handlers if type(h) is logging.StreamHandler]  # quiet: no console
        logging.getLogger("flwr.test").warning("Manually terminating ClientAppActor")
        fedsite.info("client 1 round 1: 10 steps")
        text = (tmp_path / f"worker-{os.getpid()}.log").read_text()
        assert text.count("Manually terminating ClientAppActor") == 1 and "client 1 round 1" in text
    finally:
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and str(tmp_path) in h.baseFilename]:
            root.removeHandler(h)
            h.close()
        logging.captureWarnings(False)
        root.handlers[:], fedsite.handlers[:] = saved[0], saved[1]
        root.setLevel(saved[2])
