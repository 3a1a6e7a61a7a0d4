"""The trainer role: runs a job's Flower ClientApp on this node's own data.

The aggregator sends one Flower Message per request on `FL_PROTOCOL`; the trainer runs the
ClientApp off the event loop (training is CPU work), and answers the reply Message — or a
Flower error reply when the app raised, so the aggregator never waits on a failure. Each job
keeps a Flower `Context` whose `state` (SCAFFOLD's c_i, for one) is written atomically under
`<state_dir>/jobs/<job>/` after every message, so it survives a restart of the node.

Only apps this node already has run here: the built-in ClientApp (framework adapters from
`hivenode.models.training`); nothing a peer sends is executed.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from hivenode.agent.errors import RpcError
from hivenode.agent.flower_wire import (
    decode_flower,
    decode_records,
    encode_flower,
    encode_records,
    node_id_of,
)
from hivenode.agent.rpc import Reply
from hivenode.agent.update_codec import encode_update_off_loop
from hivenode.fsutil import atomic_write
from hivenode.protocol.advert import DatasetInfo
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import BUILTIN_APP
from hivenode.protocol.limits import DEFAULT_LIMITS
from hivenode.protocol.message import Message as WireMessage
from hivenode.protocol.message import decode_message, encode_message

log = logging.getLogger(__name__)

MAX_ROUND_S = 24 * 3600.0
"""The longest a trainer works on one message; the aggregator's deadline is usually far less."""
_JOB_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

ClientAppLike = Callable[[Message, Context], Message]


MAX_JOB_CONTEXTS = 64
"""Jobs whose Flower Context a trainer keeps in memory; older ones are reloaded from disk."""


@dataclass
class JobContext:
    context: Context
    path: Path
    messages: int = 0
    saved: bytes = b""
    """The state as last written: unchanged state (most apps keep none) costs no fsync."""


@dataclass
class Trainer:
    """Serves FL_PROTOCOL for the node `peer_id`, with `apps` by name and a worker limit."""

    state_dir: Path
    peer_id: str
    apps: Mapping[str, ClientAppLike]
    limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    datasets: Callable[[], tuple[DatasetInfo, ...]] = tuple
    """What the node's adverts say about its local data (names, sizes; never the data)."""
    max_round_s: float = MAX_ROUND_S
    _jobs: dict[str, JobContext] = field(default_factory=dict)
    messages_handled: int = 0

    async def handle(self, request: WireMessage, caller: str) -> Reply:
        job, app, node_config, run_config = _request_fields(request.body)
        if app not in self.apps:
            raise RpcError("unknown_app", f"this node does not run the app {app!r}")
        try:
            message = decode_flower(_field(request.body, "message", dict), request.tensors)
        except ProtocolError as exc:
            raise RpcError("bad_request", exc.reason) from exc
        if message.has_error():
            raise RpcError("bad_request", "an instruction cannot carry an error")
        job_context = self._context(job, caller, node_config, run_config)
        job_context.context.run_id = message.metadata.run_id  # as Flower's runtime sets it
        started = time.monotonic()
        reply = await self._run(self.apps[app], message, job_context.context)
        compute_s = time.monotonic() - started
        # the job may ask for a compressed update; top-k's residual is job state, saved below
        reply = await encode_update_off_loop(message, reply, job_context.context.state)
        job_context.messages += 1
        self.messages_handled += 1
        await trio.to_thread.run_sync(_save_state, job_context)
        body, tensors = encode_flower(reply)
        # beside the Flower reply: the aggregator tells its own overhead from our work
        return Reply(body={**body, "compute_s": compute_s}, tensors=tuple(tensors))

    async def _run(self, app: ClientAppLike, message: Message, context: Context) -> Message:
        remaining = message.metadata.created_at + message.metadata.ttl - time.time()
        limit = min(MAX_ROUND_S, max(remaining, 1.0))
        with trio.move_on_after(limit) as scope:
            # the thread cannot be stopped; it finishes on its own and only then frees the
            # limiter, so abandoned rounds never pile up (trio-typing's stub predates the name)
            reply: Message = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                _call_app, app, message, context, limiter=self.limiter, abandon_on_cancel=True
            )
            return reply
        assert scope.cancelled_caught
        raise RpcError("timeout", f"the message's TTL ran out after {limit:.0f} s")

    def _context(
        self, job: str, aggregator: str, node_config: dict[str, Any], run_config: dict[str, Any]
    ) -> JobContext:
        known = self._jobs.pop(job, None)
        if known is not None:
            self._jobs[job] = known  # most recently used last
            known.context.node_config.update(node_config)
            known.context.run_config.update(run_config)
            return known
        while len(self._jobs) >= MAX_JOB_CONTEXTS:
            # the least recently used job's context: its state is on disk after every
            # message, so a job that comes back reloads it (kept forever, they grew without
            # bound: ~1 KB per FedAvg job, 16 B per parameter per SCAFFOLD job)
            del self._jobs[next(iter(self._jobs))]
        path = self.state_dir / "jobs" / job / "trainer-state.bin"
        state = _load_state(path)
        context = Context(
            run_id=0,
            node_id=node_id_of(self.peer_id),
            node_config=node_config,
            state=state,
            run_config=run_config,
        )
        log.info("job %s: training for aggregator %s", job, aggregator)
        self._jobs[job] = JobContext(context, path)
        return self._jobs[job]


def _call_app(app: ClientAppLike, message: Message, context: Context) -> Message:
    try:
        return app(message, context)
    except Exception as exc:  # the app's failure is the aggregator's to see, as Flower does
        log.warning("the ClientApp raised on %s: %r", message.metadata.message_type, exc)
        error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}")
        return Message(error, reply_to=message)


def _request_fields(body: Mapping[str, Any]) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    job = _field(body, "job", str)
    if not _JOB_ID.fullmatch(job):
        raise RpcError("bad_request", f"job id {job!r} is not [A-Za-z0-9._-]{{1,64}}")
    app = _field(body, "app", str)
    node_config = _scalars(_field(body, "node_config", dict), "node_config")
    run_config = _scalars(_field(body, "run_config", dict), "run_config")
    return job, app, node_config, run_config


def _field(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise RpcError("bad_request", f"field {name!r} must be a {kind.__name__}")
    return value


def _scalars(raw: dict[Any, Any], name: str) -> dict[str, Any]:
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise RpcError("bad_request", f"{name} must map strings to scalars")
        if isinstance(value, float) and not math.isfinite(value):
            raise RpcError("bad_request", f"{name}[{key!r}] is not finite")
    return dict(raw)


def _save_state(job: JobContext) -> None:
    records, tensors = encode_records(job.context.state)
    wire = WireMessage("trainer-state", 0, "", {"records": records}, tuple(tensors))
    data = b"".join(bytes(part) for part in encode_message(wire))
    if data != job.saved:
        atomic_write(job.path, data)
        job.saved = data


def _load_state(path: Path) -> RecordDict:
    if not path.exists():
        return RecordDict()
    try:
        wire = decode_message(path.read_bytes(), DEFAULT_LIMITS)
        return decode_records(wire.body.get("records"), wire.tensors)
    except (OSError, ProtocolError) as exc:
        # a corrupt state cannot come from an atomic write; start clean rather than refuse
        log.error("ignoring unreadable trainer state %s: %s", path, exc)
        return RecordDict()


def builtin_trainer(
    state_dir: Path,
    peer_id: str,
    limiter: trio.CapacityLimiter | None = None,
    flower_apps: Mapping[str, ClientAppLike] | None = None,
) -> Trainer:
    """A trainer running the built-in ClientApp on the datasets registered in `state_dir`,
    and the operator's allowed Flower apps (`agent.flower_apps.allowed_client_apps`)."""
    from hivenode.models.datasets import DatasetCatalog
    from hivenode.models.training.clientapp import build_client_app
    from hivenode.privacy.client_mods import with_privacy_mods

    catalog = DatasetCatalog(state_dir)
    # Flower's SecAgg+ and DP clipping mods, each active only when a job's messages ask
    app = with_privacy_mods(build_client_app(catalog.load))
    return Trainer(
        state_dir,
        peer_id,
        {BUILTIN_APP: app, **(flower_apps or {})},
        limiter=limiter or trio.CapacityLimiter(1),
        datasets=catalog.advert_datasets,
    )
