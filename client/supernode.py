"""Flower's own SuperNode (`flower-supernode`), quicker: shorter polls and one long-lived executor.

Flower 1.41's SuperNode sleeps a hard-coded 3 s whenever a pull finds no message, and 0.5 s
between checks for the ClientApp's reply (`flwr/supernode/start_client_internal.py`): every
networked message waits 1.5 s on average before it is even pulled, and 0.25 s after its
reply is ready. No option sets either. Its SuperExec then starts a fresh `flwr-clientapp`
process for every message.

`python -m client.supernode [--poll-interval S] [--executor-secret FILE] FLOWER-SUPERNODE-ARGS...`
runs Flower's unchanged `flower_supernode()` entry point in this process, with the `time`
module that `start_client_internal` sees replaced by one whose idle sleep lasts at most `S`
seconds and whose local waits (for a reply this device has not finished) last at most
LOCAL_WAIT_SECONDS, and whose object pulls retry within 0.05-0.5 s (finetune/processes.py
`quick_object_pulls`; Flower's wait 1 s, then 2 s, ...). Each idle poll is one Fleet API request to the coordinator (`S` = 0.5: two
a second per device); local waits cost the coordinator nothing.

With `--executor-secret FILE` the SuperNode runs with `--isolation process` and a fresh
SuperExec secret in FILE (owner-only), and the device's executor (client/executor.py) claims
and runs every ClientApp task on a thread of this process. Nothing else of the SuperNode
changes: its connection, authentication, state and Runtime API are Flower's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import ModuleType

DEFAULT_POLL_SECONDS = 0.5
MIN_POLL_SECONDS = 0.05  # below this a device's idle polls would load the coordinator for no gain
FLOWER_POLL_SECONDS = 3.0  # the SuperNode's own idle sleep, for the record
LOCAL_WAIT_SECONDS = 0.05  # the SuperNode waiting on its own ClientApp's reply (Flower: 0.5 s)
RUNTIME_HOST, RUNTIME_PORT = "127.0.0.1", 9094  # Flower's defaults for the SuperNode's Runtime API


class PollClock:
    """A stand-in for the `time` module: the idle sleep (Flower's 3 s) lasts at most `poll`
    seconds, shorter local waits at most `local` seconds."""

    def __init__(self, poll: float, local: float = LOCAL_WAIT_SECONDS) -> None:
        self.poll, self.local = poll, local

    def sleep(self, seconds: float) -> None:
        seconds = float(seconds)
        time.sleep(min(seconds, self.poll if seconds >= FLOWER_POLL_SECONDS else self.local))

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


def split_args(argv: Sequence[str]) -> tuple[float, str | None, list[str]]:
    """`--poll-interval S` and `--executor-secret FILE` (first, in any order, if given) and the
    rest, which are flower-supernode's."""
    args, poll, secret = list(argv), DEFAULT_POLL_SECONDS, None
    while len(args) >= 2 and args[0] in ("--poll-interval", "--executor-secret"):
        if args[0] == "--poll-interval":
            poll = check_poll(float(args[1]))
        else:
            secret = args[1]
        args = args[2:]
    return poll, secret, args


def runtime_address(flower_args: Sequence[str]) -> str:
    """Where the SuperNode serves its Runtime API (its `--host` and `--port`, else Flower's defaults)."""
    args = list(flower_args)

    def value(flag: str, default: str) -> str:
        return args[args.index(flag) + 1] if flag in args[:-1] else default

    return f"{value('--host', RUNTIME_HOST)}:{value('--port', str(RUNTIME_PORT))}"


def command(poll: float, flower_args: Sequence[str], executor_secret: str | None = None) -> list[str]:
    ours = ["--poll-interval", repr(float(check_poll(poll)))]
    if executor_secret is not None:
        ours += ["--executor-secret", str(executor_secret)]
    return [sys.executable, "-m", "client.supernode", *ours, *flower_args]


def main(argv: Sequence[str] | None = None) -> None:
    poll, secret_file, flower_args = split_args(sys.argv[1:] if argv is None else argv)
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from finetune.processes import quick_object_pulls

    quicken(loop, poll)
    quick_object_pulls(loop)  # the message's objects, from the coordinator
    if secret_file is not None and "--help" not in flower_args:
        from client.executor import start_executor, write_secret

        start_executor(runtime_address(flower_args), write_secret(secret_file))
        flower_args = [*flower_args, "--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
    sys.argv = ["flower-supernode", *flower_args]  # Flower parses its own arguments
    flower_supernode()


if __name__ == "__main__":
    main()
