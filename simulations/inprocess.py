"""A federation in one process, without Ray: for experiments and tests only.

``fedpriv simulate`` runs Flower's simulation engine (Ray), where every client
is its own worker and Ray's start-up costs ~10-20 s. Sweeps of many small runs
(``simulations/robustness.py``) and tests of the server loop do not need that
isolation: :class:`InProcessGrid` is a Flower ``Grid`` that hands each message
to the same ``ClientApp`` object, one client after another, in this process.
The server loop, the strategies and the ClientApp are the very code a real
run executes; only the transport is replaced. Each client gets its own copy of
the message, as it would after deserialisation.

Not a deployment path: nothing here is isolated, authenticated or concurrent.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from server.config import RunConfig
from server.rundir import RunDir

__all__ = ["InProcessGrid", "run_in_process"]

RUN_ID = 4242


class InProcessGrid(Grid):
    """``num_clients`` virtual nodes served by ``client_app`` in this process.

    Node ``i + 1`` is the client with ``partition-id`` ``i`` (node config as
    Flower's simulation engine sets it).
    """

    clients_on_this_machine = True  # the server may leave files for them (server.app.serve)

    def __init__(self, client_app: ClientApp, num_clients: int, *,
                 node_config: dict[int, dict[str, Any]] | None = None) -> None:
        self.client_app = client_app
        self.contexts = {
            i + 1: Context(run_id=RUN_ID, node_id=i + 1,
                           node_config={"partition-id": i, "num-partitions": num_clients,
                                        **(node_config or {}).get(i, {})},
                           state=RecordDict(), run_config={})
            for i in range(num_clients)
        }
        self._replies: dict[str, Message] = {}  # pushed message id -> reply, until pulled

    # Grid's abstract interface -------------------------------------------------
    def set_run(self, run: Any) -> None:  # the run id is fixed
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError("an in-process grid has no SuperLink run")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message to its node's ClientApp, in order, now; the replies wait for a pull."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_created_at"] = time.time()
            mine = make_message(copy.copy(msg.metadata), copy.deepcopy(msg.content))
            self._replies[msg.metadata.message_id] = self.client_app(
                mine, self.contexts[msg.metadata.dst_node_id])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Each message to its node's ClientApp, in order; their replies."""
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def _server_identity() -> Iterator[None]:
    """Flower's ``Message(...)`` reads the run and task of the ServerApp's process."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def run_in_process(cfg: RunConfig, run_dir: str | Path, resolved_yaml: str = "",
                   *, client_app: ClientApp | None = None) -> dict[str, Any]:
    """Run ``cfg`` (already validated) with its clients in this process; the summary."""
    from clients.app import app as default_app
    from server.app import serve
    from server.console import remove_log_handler, route_logs_to_file

    grid = InProcessGrid(client_app or default_app, cfg.simulation.num_clients)
    rd = RunDir(Path(run_dir), tensorboard=False)
    handler = route_logs_to_file(rd.path)
    try:
        with _server_identity():
            return serve(grid, cfg, rd, resolved_yaml)
    finally:
        remove_log_handler(handler)
