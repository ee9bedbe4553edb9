"""The Fedsite ClientApp: train, evaluate and query, each either forwarded or run in-process.

Deployed, Flower starts a fresh process for every message; `fedsite client` names its warm
worker in the node config (`worker-socket`), and the handlers here only forward the message
to it (client/forwarder.py), so this process imports flwr and numpy, not torch. Without a
worker (a simulation, `flwr run` on the local simulation engine, tests) the same handlers of
`client/handlers.py` run in this process: one handler code path serves both.

The handlers' helpers (`local_training`, `local_evaluation`, `run_config_from`, ...) stay
importable from here; they are loaded from `client.handlers` on first use.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.forwarder import SOCKET_KEY

app = ClientApp()

# names other modules import from here, served by client.handlers
_HELPERS = frozenset({
    "run_config_from", "client_label", "client_id", "local_training", "train_metrics", "train_locally_private", "declined",
    "encode_upload", "local_evaluation", "ROUND_KEY", "FACTORS_KEY", "PACKAGE_KEYS", "FEEDBACK_KEY", "HANDLERS",
})


def handle(kind: str, msg: Message, context: Context) -> Message:
    """Run handler `kind` on the device's worker when there is one, else in this process."""
    if context.node_config.get(SOCKET_KEY):
        from client.forwarder import forward

        return forward(kind, msg, context)
    from client.handlers import HANDLERS

    return HANDLERS[kind](msg, context)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received LoRA arrays locally; reply with the new arrays and metrics (client/handlers.py)."""
    return handle("train", msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Loss and exact-match accuracy of the global adapter on this client's test split."""
    return handle("evaluate", msg, context)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Who this client is (partition id, device profile), for the coordinator's planner."""
    return handle("query", msg, context)


def __getattr__(name: str) -> object:
    if name in _HELPERS:
        from client import handlers

        return getattr(handlers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
