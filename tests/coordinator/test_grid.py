"""QuickGrid: replies collected every 0.1 s, the rest delegated to the wrapped grid."""

from types import SimpleNamespace

from coordinator import grid as grid_module
from coordinator.grid import QuickGrid, quick


class SlowRepliesGrid:
    """A grid whose replies appear one pull at a time; counts pulls."""

    def __init__(self, replies_per_pull: list[int]) -> None:
        self.plan, self.pulls, self.pushed = list(replies_per_pull), 0, []
        self.run = SimpleNamespace(run_id=7)
        self.something_else = "delegated"

    def push_messages(self, messages):
        self.pushed = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = self.plan.pop(0) if self.plan else 0
        ids = sorted(message_ids)[:ready]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]

    def get_node_ids(self):
        return [1, 2, 3]


def test_replies_are_collected_every_interval_until_all_arrived(monkeypatch):
    sleeps = []
    monkeypatch.setattr(grid_module.time, "sleep", sleeps.append)
    inner = SlowRepliesGrid([0, 1, 0, 2])
    replies = list(QuickGrid(inner).send_and_receive(["a", "b", "c"], timeout=60))
    assert len(replies) == 3 and inner.pulls == 4
    assert sleeps == [0.1, 0.1, 0.1]  # never Flower's 3 s


def test_the_timeout_ends_the_wait_with_the_replies_so_far(monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(grid_module.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(grid_module.time, "sleep", lambda s: None)
    inner = SlowRepliesGrid([1])
    assert len(list(QuickGrid(inner).send_and_receive(["a", "b"], timeout=25))) == 1


def test_everything_else_is_the_wrapped_grids():
    inner = SlowRepliesGrid([])
    wrapped = quick(inner)
    assert wrapped.run.run_id == 7 and list(wrapped.get_node_ids()) == [1, 2, 3] and wrapped.something_else == "delegated"
    assert quick(wrapped) is wrapped


def test_the_in_memory_grid_is_left_as_it_is():
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    in_memory = InMemoryGrid.__new__(InMemoryGrid)
    assert quick(in_memory) is in_memory


def test_replies_are_counted_in_a_progress_bar(monkeypatch):
    shown = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.desc, self.done = total, desc, 0
            shown.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.done += n

    monkeypatch.setattr(grid_module, "bar", Bar)
    monkeypatch.setattr(grid_module.time, "sleep", lambda s: None)
    messages = [SimpleNamespace(metadata=SimpleNamespace(group_id="3", message_type="train")) for _ in range(2)]
    assert len(list(QuickGrid(SlowRepliesGrid([0, 1, 1])).send_and_receive(messages, timeout=60))) == 2
    assert [(b.desc, b.total, b.done) for b in shown] == [("round 3 train", 2, 2)]


def test_the_in_memory_grid_is_wrapped_only_to_show_progress(monkeypatch):
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    monkeypatch.setattr(grid_module, "progress_wanted", lambda: True)
    in_memory = InMemoryGrid.__new__(InMemoryGrid)
    assert isinstance(quick(in_memory), QuickGrid)
