"""Replies collected every 0.1 s: Flower's deployed grid checks for them only every 3 s.

`flwr.superlink.grid.http_grid.HttpGrid.send_and_receive` pushes the round's messages and then
sleeps 3 s between pulls, so every networked round, and every SecAgg+ stage, waits up to 3 s
after its last reply. `QuickGrid` wraps any Grid and collects replies with `push_messages` /
`pull_messages` at `interval` instead; everything else is the wrapped grid's. The simulation's
in-memory grid already polls every 0.1 s and is used as it is. Deployed, a reply's objects
are pulled with quick retries too (finetune/processes.py `quick_object_pulls`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from finetune.processes import quick_object_pulls
from finetune.progress import bar, progress_wanted

POLL_SECONDS = 0.1


class QuickGrid(Grid):
    def __init__(self, grid: Grid, interval: float = POLL_SECONDS) -> None:
        self.grid, self.interval = grid, interval

    def __getattr__(self, name: str):  # noqa: ANN204 (anything else a workflow reads off the grid)
        return getattr(self.__dict__["grid"], name)

    def set_run(self, run) -> None:  # noqa: ANN001 (flwr's Run)
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull every `interval` until every message has a reply or `timeout` passed;
        a progress bar (finetune/progress.py) counts the replies."""
        messages = list(messages)
        first = getattr(messages[0], "metadata", None) if messages else None
        desc = f"round {first.group_id} {first.message_type}" if first is not None else "replies"
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        with bar(len(waiting), desc, "client") as shown:
            while waiting:
                got = list(self.pull_messages(waiting))
                replies += got
                shown.update(len(got))
                waiting -= {m.metadata.reply_to_message_id for m in got}
                if not waiting or (end is not None and time.monotonic() >= end):
                    break
                time.sleep(self.interval)
        return replies


def quick(grid: Grid) -> Grid:
    """`grid` with replies collected every POLL_SECONDS (the in-memory grid already does; it is
    wrapped too when a progress bar is wanted, to count its replies)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if isinstance(grid, QuickGrid) or (isinstance(grid, InMemoryGrid) and not progress_wanted()):
        return grid
    if not isinstance(grid, InMemoryGrid):  # deployed: the replies' objects, from the SuperLink
        from flwr.superlink.grid import http_grid

        quick_object_pulls(http_grid)
    return QuickGrid(grid)
