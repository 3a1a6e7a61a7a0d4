"""Fuzzed requests to a real node's handlers over libp2p on 127.0.0.1.

A server node runs every handler a peer can reach without a model deployed: status, peer
table, blobs, the Q-table snapshot, the FL trainer (with an echo ClientApp), the parallel
protocols with the job worker, and the bulk receiver. A client node sends each input as raw
bytes on a fresh stream, half-closes it and reads the reply. An input fails when:

- the reply is an `internal` error (the RpcServer caught an exception the handler does not
  document), or a hivenode logger recorded an exception while handling it (crash);
- no reply came within the deadline (hang);
- the node stops answering a valid status request, checked every LIVENESS_EVERY inputs
  (hang: a stalled or dead node).
"""

from __future__ import annotations

import hashlib
import logging
import resource
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fuzz_corpus as corpus
import trio
from fuzz_engines import Deadline, Runner, Tally, judge, run_hypothesis
from fuzz_strategies import Strategy, altered, mutated, values
from fuzz_structured import envelope
from fuzz_targets import Target
from hypothesis import strategies as st

LIVENESS_EVERY = 20
AMPLIFICATION_BYTES = 512 * 1024**2
"""A request that raises the process's peak RSS by this much made the node allocate for
bytes that were never sent (the fuzzer's requests are kilobytes); a torch import is less."""
REQUEST_TIMEOUT_S = 5.0
"""The server's own bound per request (its `request_timeout`)."""


class HandlerCrash(Exception):
    """The node answered `internal`, or logged an exception, for one request."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


class CapturedErrors(logging.Handler):
    """Keeps the exceptions hivenode logs while serving (a handler's crash is caught and
    answered as `internal`; the traceback is only in the log)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        swallowed = record.levelno == logging.DEBUG and "broke" in record.getMessage()
        if record.exc_info or swallowed:
            with self._lock:
                self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        with self._lock:
            taken, self.records = self.records, []
        return taken


def _where(record: logging.LogRecord) -> str:
    import traceback

    if record.exc_info and record.exc_info[2] is not None:
        frames = [f for f in traceback.extract_tb(record.exc_info[2]) if "/hivenode/" in f.filename]
        if frames:
            last = frames[-1]
            return (
                f"hivenode/{last.filename.split('/hivenode/', 1)[-1]}:{last.lineno} ({last.name})"
            )
    return f"{record.name}: {record.msg}"


class Swarm:
    """The server and client nodes, and what the fuzzer needs to address the server."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.server: Any = None
        self.client: Any = None
        self.blob_sha = ""
        self.captured = CapturedErrors()
        self.protocols: list[tuple[str, list[bytes], Strategy[bytes]]] = []
        self._saved_level = logging.NOTSET

    async def start(self, nursery: trio.Nursery) -> None:
        from flwr.app import Context, Message

        from hivenode.agent.bulk import BulkReceiver
        from hivenode.agent.trainer import Trainer
        from hivenode.models.datasets import DatasetCatalog
        from hivenode.parallel.job_worker import ParallelJobWorker
        from hivenode.parallel.router import ParallelRouter

        def echo(message: Message, context: Context) -> Message:
            return Message(message.content, reply_to=message)

        blob = self.base / "blob.bin"
        blob.write_bytes(bytes(range(256)) * 8)
        self.blob_sha = hashlib.sha256(blob.read_bytes()).hexdigest()

        def setup(node: Any) -> None:
            router = ParallelRouter(node, attach_wait=0.1)
            self.jobs = ParallelJobWorker(node, router, DatasetCatalog(self.base / "server"))

        self.server = await self._node(
            nursery,
            "server",
            blob_resolver=lambda sha: blob if sha == self.blob_sha else None,
            trainer=lambda state, peer: Trainer(state, peer, {"echo": echo}),
            qtable=True,
            setup=setup,
        )
        await nursery.start(self.jobs.run)
        bulk = BulkReceiver(self.server, self._received)
        await nursery.start(bulk.run)
        self.client = await self._node(nursery, "client", bootstrap=[self.server])
        package = logging.getLogger("hivenode")
        self._saved_level = package.level
        package.addHandler(self.captured)
        package.setLevel(logging.DEBUG)
        package.propagate = False  # thousands of expected refusals are not worth printing
        self.protocols = self._requests()

    async def _received(self, sender: str, meta: Any, tensors: Any) -> None:
        pass

    def stop(self) -> None:
        """Stop both nodes and give the "hivenode" logger back as it was."""
        for node in (self.client, self.server):
            if node is not None:
                node.stop()
        package = logging.getLogger("hivenode")
        package.removeHandler(self.captured)
        package.setLevel(self._saved_level)
        package.propagate = True

    async def _node(
        self,
        nursery: trio.Nursery,
        name: str,
        bootstrap: list[Any] | None = None,
        blob_resolver: Callable[[str], Path | None] | None = None,
        trainer: Callable[[Path, str], Any] | None = None,
        qtable: bool = False,
        setup: Callable[[Any], None] | None = None,
    ) -> Any:
        from libp2p.crypto.ed25519 import create_new_key_pair

        from hivenode.agent.hardware import HardwareProbe
        from hivenode.agent.identity import peer_id_of
        from hivenode.agent.node import Node
        from hivenode.agent.qtable_gossip import QTableGossip
        from hivenode.agent.settings import Settings

        state = self.base / name / "state"
        settings = Settings(
            listen_addrs=["/ip4/127.0.0.1/tcp/0"],
            bootstrap_peers=[n.swarm.listen_addrs()[0] for n in bootstrap or []],
            state_dir=state,
            runtime_dir=self.base / name / "run",
            metrics_enabled=False,
            mdns=False,
            request_timeout=REQUEST_TIMEOUT_S,
        )
        # fixed keys: the same peer ids every run, so a saved input that names them replays
        keys = create_new_key_pair(hashlib.sha256(name.encode()).digest())
        peer = peer_id_of(keys)
        probe = await trio.to_thread.run_sync(HardwareProbe, self.base)
        node = Node(
            settings,
            keys,
            probe,
            blob_resolver=blob_resolver,
            trainer=trainer(state, peer) if trainer else None,
            qtable=QTableGossip(state, peer) if qtable else None,
        )
        if setup is not None:
            setup(node)
        await nursery.start(node.run)
        with trio.fail_after(30):
            await node.joined.wait()
        return node

    def _requests(self) -> list[tuple[str, list[bytes], Strategy[bytes]]]:
        """Per protocol: valid requests (wire bytes) and a strategy of fuzzed ones."""
        from hivenode.agent.blob_transfer import BLOB_PROTOCOL
        from hivenode.agent.bulk.keys import AES_GCM, CHACHA20_POLY1305
        from hivenode.agent.bulk.wire import BULK_PROTOCOL
        from hivenode.protocol import ids
        from hivenode.protocol.message import Message

        server, client = self.server.peer_id, self.client.peer_id
        flower_body, flower_tensors = corpus.flower_bodies()[0]
        order = corpus.order_bodies()[0] | {
            "members": [client, server],
            "rank": 1,
            "dataset": "fuzz-missing",
            "mode": "pipeline",
        }
        table: dict[str, list[tuple[str, dict[str, Any], tuple[Any, ...]]]] = {
            ids.STATUS_PROTOCOL: [("status", {}, ())],
            ids.PEER_TABLE_PROTOCOL: [("peer_table", {}, ())],
            ids.QTABLE_PROTOCOL: [("snapshot", {}, ())],
            BLOB_PROTOCOL: [
                ("blob_read", {"sha256": self.blob_sha, "offset": 0, "length": 256}, ())
            ],
            ids.FL_PROTOCOL: [
                (
                    "fl",
                    {
                        "job": "fuzz-1",
                        "app": "echo",
                        "node_config": {},
                        "run_config": {"lr": 0.1},
                        "message": flower_body,
                    },
                    tuple(flower_tensors),
                )
            ],
            ids.PARALLEL_JOB_PROTOCOL: [
                ("parallel_status", {"job": "j", "since": 0}, ()),
                ("parallel_start", order, ()),
            ],
            ids.ALLREDUCE_PROTOCOL: [("allreduce", {"job": "j", "step": 0}, ())],
            ids.DP_STATE_PROTOCOL: [("dp_join", {"job": "j"}, ())],
            ids.PIPELINE_PROTOCOL: [("forward", {"job": "j", "epoch": 0}, ())],
            BULK_PROTOCOL: [
                (
                    "bulk_offer",
                    {
                        "manifest": corpus.manifest_corpus()[0],
                        "ciphers": [AES_GCM, CHACHA20_POLY1305],
                        "timeout": 5.0,
                        "max_resumes": 1,
                    },
                    (),
                ),
                ("bulk_resume", {"transfer": b"\x01" * 16, "manifest_digest": b"\x02" * 32}, ()),
            ],
        }

        def encoded(method: str, tensors: tuple[Any, ...]) -> Callable[[Any], bytes]:
            return lambda body: corpus.wire_bytes(Message(method, 1, client, body, tensors))

        out = []
        for protocol, requests in table.items():
            wires = [encoded(method, tensors)(body) for method, body, tensors in requests]
            methods = tuple(method for method, _, _ in requests)
            names = tuple(sorted({key for _, body, _ in requests for key in body}))
            fuzzed = st.one_of(
                st.sampled_from(wires),  # the valid requests themselves: the ok paths run too
                # the valid request with one field of its body altered, its tensors kept
                *(
                    altered(st.just(body), names).map(encoded(method, tensors))
                    for method, body, tensors in requests
                ),
                envelope(st.dictionaries(st.sampled_from(names or ("x",)), values(names)), methods),
                mutated(wires),
                st.binary(max_size=128),
            )
            out.append((protocol, wires, fuzzed))
        return out


async def exchange(swarm: Swarm, protocol: str, payload: bytes, deadline: float) -> str:
    """Send `payload` raw on a new stream, half-close, read one reply: its type and code."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    from hivenode.agent.rpc import StreamAdapter, close_quietly
    from hivenode.protocol.errors import ProtocolError
    from hivenode.protocol.limits import Limits
    from hivenode.protocol.streams import read_message

    limits = Limits(max_header_bytes=16 * 1024**2, max_tensors=64, max_total_bytes=64 * 1024**2)
    stream = None
    outcome = "timeout"
    with trio.move_on_after(deadline):
        try:
            stream = await swarm.client.swarm.host.new_stream(
                ID.from_base58(swarm.server.peer_id), [TProtocol(protocol)]
            )
            if payload:
                await stream.write(payload)
            await stream.close_write()
            reply = await read_message(StreamAdapter(stream), limits)
            code = reply.body.get("code", "") if reply.type == "error" else ""
            outcome = f"{reply.type}:{code}" if code else reply.type
        except ProtocolError:
            outcome = "no_reply"  # the server closed without answering
        except Exception as exc:  # the server reset the stream while we wrote
            outcome = f"stream_error:{type(exc).__name__}"
    if stream is not None:
        with trio.move_on_after(1):
            await close_quietly(stream)
    return outcome


async def alive(swarm: Swarm, deadline: float) -> bool:
    from hivenode.agent.errors import RpcError
    from hivenode.agent.rpc import request
    from hivenode.protocol.ids import STATUS_PROTOCOL

    try:
        reply = await request(
            swarm.client.swarm.host,
            swarm.server.peer_id,
            STATUS_PROTOCOL,
            "status",
            timeout=deadline,
        )
    except RpcError:
        return False
    return reply.type == "ok"


def network_target(
    swarm: Swarm, deadline: float, token: trio.lowlevel.TrioToken
) -> tuple[Target, dict[str, int]]:
    """The node's handlers as one fuzz target (byte 0 picks the protocol, the rest is sent),
    and the count of each (protocol, reply) seen."""
    sent = [0]
    outcomes: dict[str, int] = {}

    def feed(data: bytes) -> None:
        protocol, _, _ = swarm.protocols[(data[0] if data else 0) % len(swarm.protocols)]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        outcome = trio.from_thread.run(
            exchange, swarm, protocol, data[1:], deadline, trio_token=token
        )
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
        if grown > AMPLIFICATION_BYTES:
            raise HandlerCrash(
                f"MemoryAmplification: a {len(data) - 1}-byte request raised the node's peak "
                f"memory by {grown / 2**20:.0f} MiB ({outcome})",
                f"{protocol} handler",
            )
        outcomes[f"{protocol} {outcome}"] = outcomes.get(f"{protocol} {outcome}", 0) + 1
        if outcome == "timeout":  # what the log holds then is the next input's to report
            raise Deadline(f"no reply within {deadline:g} s", f"{protocol} handler")
        for record in swarm.captured.take():
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f": {record.exc_info[1]!r}"
            raise HandlerCrash(f"{protocol}: {text}", _where(record))
        if outcome.endswith(":internal"):
            raise HandlerCrash(f"{protocol} answered internal", f"{protocol} handler")
        sent[0] += 1
        if sent[0] % LIVENESS_EVERY == 0 and not trio.from_thread.run(
            alive, swarm, deadline, trio_token=token
        ):
            # the node stopped answering status: a hang of the whole node
            raise Deadline(f"status unanswered for {deadline:g} s after this input", "the node")

    def prefixed(index: int, fuzzed: Strategy[bytes]) -> Strategy[bytes]:
        return fuzzed.map(lambda payload: bytes([index]) + payload)

    def strategy() -> Strategy[bytes]:
        return st.one_of(*(prefixed(i, fuzzed) for i, (_, _, fuzzed) in enumerate(swarm.protocols)))

    def corpus_bytes() -> list[bytes]:
        return [bytes([i]) + w for i, (_, wires, _) in enumerate(swarm.protocols) for w in wires]

    target = Target(
        "handlers",
        "every libp2p request handler of a real node, over 127.0.0.1",
        feed,
        lambda: (),
        strategy,
        corpus_bytes,
    )
    return target, outcomes


def run_network(seconds: float, seed: int, deadline: float, base: Path) -> Tally:
    """Start the nodes, run hypothesis in a thread against them, stop them."""
    import warnings

    from hypothesis.errors import HypothesisDeprecationWarning

    # the nodes' own loops use `random` while hypothesis draws in another thread: harmless
    warnings.filterwarnings("ignore", category=HypothesisDeprecationWarning)
    result: list[Tally] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            swarm = Swarm(base)
            with trio.fail_after(60):
                await swarm.start(nursery)
            token = trio.lowlevel.current_trio_token()
            target, outcomes = network_target(swarm, deadline, token)
            runner = Runner(target, "hypothesis", deadline, None)
            # no warm-up: a valid request that stalls the node the first time is a finding
            tally = await trio.to_thread.run_sync(run_hypothesis, runner, seconds, seed, False)
            tally.extra["outcomes"] = dict(sorted(outcomes.items()))
            tally.extra["node_alive_at_end"] = await alive(swarm, deadline)
            result.append(tally)
            swarm.stop()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result[0]


def replay_network(data: bytes, deadline: float) -> tuple[str, str]:
    """Send one saved input to fresh nodes: (outcome, what went wrong)."""
    import tempfile

    result: list[tuple[str, str]] = []

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="hivenode-fuzz-replay-") as base:
            async with trio.open_nursery() as nursery:
                swarm = Swarm(Path(base))
                await swarm.start(nursery)
                token = trio.lowlevel.current_trio_token()
                target, _ = network_target(swarm, deadline, token)
                outcome, finding = await trio.to_thread.run_sync(
                    judge, target, data, deadline, "replay"
                )
                result.append((outcome, (finding.traceback or finding.error) if finding else ""))
                swarm.stop()
                nursery.cancel_scope.cancel()

    trio.run(main)
    return result[0]
