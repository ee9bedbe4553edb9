"""Flower's own SuperNode (`flower-supernode`), polling the coordinator more often.

Flower 1.41's SuperNode sleeps a hard-coded 3 s whenever a pull finds no message, and 0.5 s
between checks for the ClientApp's reply (`flwr/supernode/start_client_internal.py`): every
networked message waits 1.5 s on average before it is even pulled. No option sets either.

`python -m client.supernode --poll-interval S FLOWER-SUPERNODE-ARGS...` runs Flower's unchanged
`flower_supernode()` entry point in this process, with the `time` module that
`start_client_internal` sees replaced by one whose `sleep` lasts at most `S` seconds. Nothing
else of the SuperNode changes: its connection, authentication, state and SuperExec are Flower's.
Each idle poll is one Fleet API request to the coordinator (`S` = 0.5: two a second per device).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import ModuleType

DEFAULT_POLL_SECONDS = 0.5
MIN_POLL_SECONDS = 0.05  # below this a device's idle polls would load the coordinator for no gain
FLOWER_POLL_SECONDS = 3.0  # the SuperNode's own idle sleep, for the record


class PollClock:
    """A stand-in for the `time` module whose `sleep` lasts at most `poll` seconds."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def sleep(self, seconds: float) -> None:
        time.sleep(min(float(seconds), self.poll))

    def __getattr__(self, name: str):  # noqa: ANN204 (time.time, time.monotonic, ...: unchanged)
        return getattr(time, name)


def check_poll(poll: float) -> float:
    if not MIN_POLL_SECONDS <= poll <= FLOWER_POLL_SECONDS:
        raise ValueError(f"--poll-interval must be between {MIN_POLL_SECONDS} and {FLOWER_POLL_SECONDS} seconds, got {poll}")
    return poll


def quicken(module: ModuleType, poll: float) -> None:
    """Make the sleeps of `module` (Flower's SuperNode loop) last at most `poll` seconds."""
    if not hasattr(module, "time") or not hasattr(module, "start_client_internal"):
        raise RuntimeError(f"{module.__name__} has no `time` or `start_client_internal`: this Flower version's SuperNode loop differs")
    module.time = PollClock(check_poll(poll))


def split_args(argv: Sequence[str]) -> tuple[float, list[str]]:
    """`--poll-interval S` (first, if given) and the rest, which are flower-supernode's."""
    args = list(argv)
    if args[:1] == ["--poll-interval"] and len(args) >= 2:
        return check_poll(float(args[1])), args[2:]
    return DEFAULT_POLL_SECONDS, args


def command(poll: float, flower_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "client.supernode", "--poll-interval", repr(float(check_poll(poll))), *flower_args]


def main(argv: Sequence[str] | None = None) -> None:
    poll, flower_args = split_args(sys.argv[1:] if argv is None else argv)
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    quicken(loop, poll)
    sys.argv = ["flower-supernode", *flower_args]  # Flower parses its own arguments
    flower_supernode()


if __name__ == "__main__":
    main()
