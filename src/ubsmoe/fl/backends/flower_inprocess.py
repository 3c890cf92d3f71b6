"""``backend.mode=inprocess``: a Flower Grid that runs the ClientApp in this process (no Ray, no sockets).

It implements Flower's :class:`~flwr.serverapp.Grid` the way the simulation's in-memory
Grid behaves where it matters for correctness: node ids are random per run, a ClientApp
that raises produces an error reply (not an exception at the server), and replies come
back in an arbitrary (here: shuffled) order. It exists so the Flower path (codec,
ClientApp, node discovery, reply handling) can be tested and debugged in seconds.
"""

from __future__ import annotations

import random
import secrets
import time
import traceback
from collections.abc import Iterable
from uuid import uuid4

from ubsmoe.fl.backends.flower_env import prepare_flower_env

prepare_flower_env()

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.app.user_config import UserConfig  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402


class InProcessGrid(Grid):
    """One virtual node per entry of ``node_configs``; messages run the ClientApp when pulled."""

    def __init__(self, client_app: ClientApp, node_configs: list[UserConfig], run_config: UserConfig | None = None):
        self.client_app = client_app
        self._run = Run.create_empty(run_id=secrets.randbits(63))
        # Who "this process" is when it creates messages (a ServerApp process is told by its SuperLink).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, self._run.run_id, SUPERLINK_NODE_ID
        self._contexts: dict[int, Context] = {}
        for node_config in node_configs:
            node_id = secrets.randbits(63)
            self._contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self._pending: dict[str, Message] = {}
        self._shuffle = random.Random(secrets.randbits(32))

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"unknown node {message.metadata.dst_node_id}")
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self._pending[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def _execute(self, message: Message) -> Message:
        context = self._contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(message, context)
        except Exception as err:  # noqa: BLE001 - Flower turns a raising ClientApp into an error reply
            traceback.print_exc()
            reason = f"{type(err)}:<'{err}'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = [self._execute(self._pending.pop(mid)) for mid in list(message_ids) if mid in self._pending]
        self._shuffle.shuffle(replies)  # completion order is not submission order
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        start = time.monotonic()
        replies = []
        for mid in ids:  # a reply that finishes after the timeout is missing, as on a real Grid
            reply = list(self.pull_messages([mid]))
            if timeout is None or time.monotonic() - start <= timeout:
                replies.extend(reply)
        self._shuffle.shuffle(replies)
        return replies
