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
