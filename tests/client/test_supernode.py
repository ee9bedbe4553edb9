import time
import types

import pytest

from client import supernode
from client.supernode import PollClock, check_poll, quicken, split_args


def test_poll_clock_caps_sleeps_and_keeps_the_rest_of_time():
    clock = PollClock(0.05)
    started = time.monotonic()
    clock.sleep(3)  # Flower's idle sleep
    assert time.monotonic() - started < 2.0  # capped at 0.05 s, far below the 3 s asked for
    assert clock.time is time.time and clock.monotonic is time.monotonic


def test_poll_clock_caps_local_waits_below_the_idle_poll(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = PollClock(0.5)
    clock.sleep(3)  # idle: one Fleet API request per poll
    clock.sleep(0.5)  # waiting for this device's own reply: local, capped harder
    clock.sleep(0.01)
    assert slept == [0.5, supernode.LOCAL_WAIT_SECONDS, 0.01]


def test_quicken_patches_flowers_supernode_loop():
    import flwr.supernode.start_client_internal as loop

    original = loop.time
    try:
        quicken(loop, 0.25)
        assert isinstance(loop.time, PollClock) and loop.time.poll == 0.25
    finally:
        loop.time = original


def test_quicken_refuses_a_module_without_the_loop():
    with pytest.raises(RuntimeError, match="differs"):
        quicken(types.ModuleType("elsewhere"), 0.5)


@pytest.mark.parametrize("poll", [0.0, 0.01, -1.0, 3.5, float("nan")])
def test_poll_interval_out_of_range_is_refused(poll):
    with pytest.raises(ValueError, match="--poll-interval"):
        check_poll(poll)


def test_arguments_split_into_ours_and_flowers():
    assert split_args(["--poll-interval", "0.2", "--superlink", "h:1"]) == (0.2, None, ["--superlink", "h:1"])
    assert split_args(["--superlink", "h:1"]) == (supernode.DEFAULT_POLL_SECONDS, None, ["--superlink", "h:1"])
    assert split_args(["--executor-secret", "/s", "--poll-interval", "1", "--port", "9"]) == (1.0, "/s", ["--port", "9"])
    command = supernode.command(1.0, ["--insecure"])
    assert command[1:] == ["-m", "client.supernode", "--poll-interval", "1.0", "--insecure"]
    command = supernode.command(1.0, ["--insecure"], "/home/x/secret")
    assert command[1:] == ["-m", "client.supernode", "--poll-interval", "1.0", "--executor-secret", "/home/x/secret", "--insecure"]


def test_runtime_address_follows_flowers_host_and_port():
    assert supernode.runtime_address(["--superlink", "h:1"]) == "127.0.0.1:9094"
    assert supernode.runtime_address(["--port", "9200", "--insecure"]) == "127.0.0.1:9200"
    assert supernode.runtime_address(["--host", "::1", "--port", "9"]) == "::1:9"


def test_the_supernode_entry_runs_flowers_own_parser(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        supernode.main(["--poll-interval", "0.5", "--help"])
    assert exit_info.value.code == 0
    assert "--superlink" in capsys.readouterr().out  # Flower's flower-supernode arguments
