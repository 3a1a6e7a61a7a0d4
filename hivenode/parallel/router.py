"""Serves the parallel protocols on a node and hands each request to the job it names.

A node may take part in several parallel jobs; each job attaches an endpoint per protocol.
Peers start a job within moments of each other, so a request for a job not attached yet
waits up to `ATTACH_WAIT_S` for it before it is refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rpc import Reply
from hivenode.parallel.wire import PROTOCOLS, field
from hivenode.protocol.limits import DEFAULT_LIMITS
from hivenode.protocol.message import Message

ATTACH_WAIT_S = 10.0
"""How long a request for a job this node has not started yet waits for it."""
HANDLER_TIMEOUT_S = 3600.0
"""The server's bound on one request; each job bounds its own waits far tighter."""

Endpoint = Callable[[Message, str], Awaitable[Reply | Mapping[str, Any]]]


class ParallelRouter:
    """Create before `node.run()`: it registers the parallel protocols on `node`."""

    def __init__(self, node: Node, attach_wait: float = ATTACH_WAIT_S) -> None:
        self.node = node
        self.attach_wait = attach_wait
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self._attached = trio.Event()
        for protocol_id in PROTOCOLS:
            node.add_handler(
                protocol_id,
                self._handler_for(protocol_id),
                DEFAULT_LIMITS,
                HANDLER_TIMEOUT_S,
                session=True,
            )

    def attach(self, protocol_id: str, job_id: str, endpoint: Endpoint) -> None:
        self._endpoints[(protocol_id, job_id)] = endpoint
        self._attached.set()
        self._attached = trio.Event()

    def detach(self, protocol_id: str, job_id: str) -> None:
        self._endpoints.pop((protocol_id, job_id), None)

    def _handler_for(self, protocol_id: str) -> Endpoint:
        async def handle(request: Message, caller: str) -> Reply | Mapping[str, Any]:
            job_id = field(request.body, "job", str)
            endpoint = await self._wait_for(protocol_id, job_id)
            return await endpoint(request, caller)

        return handle

    async def _wait_for(self, protocol_id: str, job_id: str) -> Endpoint:
        with trio.move_on_after(self.attach_wait):
            while (protocol_id, job_id) not in self._endpoints:
                await self._attached.wait()
        endpoint = self._endpoints.get((protocol_id, job_id))
        if endpoint is None:
            raise RpcError("unknown_job", f"this node runs no parallel job {job_id!r}")
        return endpoint
