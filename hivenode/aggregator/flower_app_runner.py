"""Runs an unmodified Flower app's ServerApp on this node, its ClientApp on the job's trainers.

The ServerApp gets what Flower's own runtime gives it: a Grid (ours, over the swarm), a
`Context` with the run config, and the process-global `TaskIdentity` that Flower's `Message`
reads. Trainers run the app only if their operator allowed the very same files (the app key
carries the content hash, see `hivenode.agent.flower_apps`).

We do not control the app's round loop, so the round is read from the messages (Flower's
strategies put "server-round" in every instruction's config), and the per-round metrics are
made from the replies the Grid carried, aggregated as Flower's built-in strategies do by
default (`aggregate_metricrecords`, weighted by "num-examples"). An app that aggregates
differently still runs unchanged; only our record of it then differs from its own.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore.task_identity import TaskIdentity

from hivenode.agent.flower_wire import node_id_of
from hivenode.agent.node import Node
from hivenode.aggregator.grid import GridError, JobAddress, RoundTraffic, SwarmGrid
from hivenode.aggregator.runner import TRAINER_WAIT_S, JobError, run_id_of
from hivenode.fsutil import atomic_write
from hivenode.models.flower_app import (
    ConfigValue,
    FlowerApp,
    app_key,
    content_hash,
    load_server_app,
)

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"
"""The metric Flower's built-in strategies weight replies by (their `weighted_by_key`)."""
_UNIT_WEIGHT = "_hivenode-unit-weight"
MIN_POLLS = 3
"""Node-id polls without a send that, over `short_wait_s`, mean the app waits for nodes."""
SHORT_WAIT_S = 60.0
"""How long a job may lack trainers before it fails (Flower's own runtime would wait forever)."""


@dataclass(frozen=True)
class FlowerRound:
    """One round of an app as the Grid saw it."""

    round: int
    train_metrics: dict[str, Any]
    evaluate_metrics: dict[str, Any]
    """The replies' metrics, aggregated as Flower's FedAvg does by default."""
    participants: int
    """Trainers whose train reply was not an error."""
    failures: int
    """Error replies, train and evaluate (a refused app, a raising ClientApp, a timeout)."""
    errors: dict[str, str]
    """Peer id → why its reply was an error."""
    bytes_out: int
    bytes_in: int
    compute_s: float


@dataclass
class FlowerAppResult:
    job: str
    app: str
    """The app key the trainers were asked for: `flower:<name>@<sha256>`."""
    trainers: list[str]
    run_config: dict[str, ConfigValue]
    rounds: list[FlowerRound] = field(default_factory=list)
    wall_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class FlowerAppGrid(SwarmGrid):
    """SwarmGrid for a round loop we do not control: rounds and metrics come from messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reply_metrics: dict[tuple[int, str], list[RecordDict]] = {}
        """(round, message type) → the metric records of the replies that were not errors."""
        self._draws = 0
        self._polls_since_send = 0
        self._polling_since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        ids = list(super().get_node_ids())
        self._check_not_waiting_forever(len(ids))
        # the base seeds Flower's sampling with the round, which we learn only after the
        # sampling; a count of draws keeps selections reproducible and different per draw
        self._draws += 1
        random.seed(self._seed * 1_000_003 + self._draws)
        return ids

    def _check_not_waiting_forever(self, available: int) -> None:
        """Flower's `sample_nodes` polls once a second, for ever, until the strategy's
        minimum of nodes is connected; a job's trainers are fixed, so none will come."""
        now = time.monotonic()
        self._polls_since_send += 1
        self._polling_since = self._polling_since or now
        waited = now - self._polling_since
        if self._polls_since_send >= MIN_POLLS and waited > self._short_wait_s:
            raise GridError(
                f"the app has waited {waited:.0f} s for more trainers than the {available} "
                "this job can reach"
            )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return super().push_messages(self._follow_round(messages))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return super().send_and_receive(self._follow_round(messages), timeout=timeout)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            if reply.has_content():
                key = (self.round, reply.metadata.message_type)
                metrics = RecordDict(dict(reply.content.metric_records))
                self.reply_metrics.setdefault(key, []).append(metrics)
        return replies

    def _follow_round(self, messages: Iterable[Message]) -> list[Message]:
        self._polls_since_send, self._polling_since = 0, None
        batch = list(messages)
        known = [n for n in map(_server_round, batch) if n is not None]
        if known:
            self.round = max(known)
        return batch


def _server_round(message: Message) -> int | None:
    if not message.has_content():
        return None
    for record in message.content.config_records.values():
        value = record.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


async def run_flower_app(
    node: Node,
    app: FlowerApp,
    job_name: str,
    trainers: Sequence[str],
    run_config: Mapping[str, ConfigValue],
    job_dir: Path,
    *,
    digest: str | None = None,
    seed: int = 0,
    trainer_wait_s: float = TRAINER_WAIT_S,
    min_trainers: int | None = None,
    short_wait_s: float = SHORT_WAIT_S,
) -> FlowerAppResult:
    """Run `app`'s ServerApp here against `trainers` (peer ids; their order gives the
    partition ids) and write the result to `job_dir/result.json`.

    `run_config` is the app's defaults with the overrides (`parse_run_config`); `digest`
    the app's content hash when the caller has it. The job fails (JobError) when the
    ServerApp raises, when fewer than `min_trainers` (default: all) stay reachable for
    `short_wait_s`, or when no trainer ran the app at all.
    """
    started = time.monotonic()
    if digest is None:
        digest = await trio.to_thread.run_sync(content_hash, app.root)
    server_app = await trio.to_thread.run_sync(load_server_app, app, digest)
    await _wait_for_trainers(node, trainers, trainer_wait_s)
    result = FlowerAppResult(job_name, app_key(app, digest), list(trainers), dict(run_config))
    log.info("job %s: running %s on %d trainers", job_name, result.app, len(trainers))
    grid = await _run_server_app(
        node,
        server_app,
        JobAddress(job_name, result.app, result.run_config),
        trainers,
        seed=seed,
        min_available=min_trainers or len(trainers),
        short_wait_s=short_wait_s,
    )
    _check_someone_ran_it(grid, result.app)
    result.rounds = _rounds(grid)
    result.wall_s = time.monotonic() - started
    await trio.to_thread.run_sync(_save_result, job_dir, result)
    return result


async def _run_server_app(
    node: Node,
    server_app: ServerApp,
    address: JobAddress,
    trainers: Sequence[str],
    *,
    seed: int,
    min_available: int,
    short_wait_s: float,
) -> FlowerAppGrid:
    """The ServerApp's whole run, off the loop; the Grid it used, with what it carried."""
    job_name = address.job_id
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        grid = FlowerAppGrid(
            node,
            address,
            trainers,
            trio.lowlevel.current_trio_token(),
            nursery,
            run_id=run_id_of(job_name),
            local=node.trainer.handle if node.trainer else None,
            seed=seed,
            min_available=min_available,
            short_wait_s=short_wait_s,
        )
        context = _server_context(node, job_name, dict(address.run_config))
        try:
            await trio.to_thread.run_sync(_serve, server_app, grid, context)
        except Exception as exc:  # the app's failure, whatever it is, fails the job
            failure = exc  # raised in here, it would leave wrapped in an ExceptionGroup
        finally:
            await grid.aclose()
        nursery.cancel_scope.cancel()
    if isinstance(failure, GridError):
        raise JobError(f"job {job_name} stopped: {failure}") from failure
    if failure is not None:
        raise JobError(f"job {job_name}: the ServerApp raised {failure!r}") from failure
    return grid


async def _wait_for_trainers(node: Node, trainers: Sequence[str], timeout: float) -> None:
    """Flower's runtime starts with its SuperNodes connected: wait until ours are known."""
    if not trainers:
        raise JobError("a Flower app job needs at least one trainer")

    def missing() -> list[str]:
        return [p for p in trainers if p not in node.peer_table and p != node.peer_id]

    with trio.move_on_after(timeout):
        while missing():
            await trio.sleep(0.2)
        return
    raise JobError(f"trainers not seen after {timeout:.0f} s: {missing()}")


def _server_context(node: Node, job_name: str, run_config: dict[str, ConfigValue]) -> Context:
    return Context(
        run_id=run_id_of(job_name),
        node_id=node_id_of(node.peer_id),
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def _serve(server_app: ServerApp, grid: FlowerAppGrid, context: Context) -> None:
    """In a worker thread: the app's round loop blocks on the Grid, which waits on trio."""
    # Flower 1.4x's Message() reads its sender from this process-global identity, which
    # Flower's own runtime sets in the ServerApp's process
    TaskIdentity.run_id = context.run_id
    TaskIdentity.node_id = context.node_id
    TaskIdentity.task_id = 1
    server_app(grid=grid, context=context)


def _rounds(grid: FlowerAppGrid) -> list[FlowerRound]:
    numbers = sorted({number for number, _ in grid.traffic} | {n for n, _ in grid.reply_metrics})
    return [_round(grid, number) for number in numbers]


def _round(grid: FlowerAppGrid, number: int) -> FlowerRound:
    traffic = [t for (n, _), t in grid.traffic.items() if n == number]
    train = grid.traffic.get((number, MessageType.TRAIN), RoundTraffic())
    return FlowerRound(
        round=number,
        train_metrics=_aggregate(grid.reply_metrics.get((number, MessageType.TRAIN), [])),
        evaluate_metrics=_aggregate(grid.reply_metrics.get((number, MessageType.EVALUATE), [])),
        participants=train.replied,
        failures=sum(t.failed for t in traffic),
        errors={peer: reason for t in traffic for peer, reason in t.errors.items()},
        bytes_out=sum(t.bytes_out for t in traffic),
        bytes_in=sum(t.bytes_in for t in traffic),
        compute_s=sum(t.compute_s for t in traffic),
    )


def _aggregate(contents: list[RecordDict]) -> dict[str, Any]:
    """Flower's default aggregation; replies without "num-examples" count equally."""
    contents = [c for c in contents if c.metric_records]
    if not contents:
        return {}
    if all(WEIGHT_KEY in next(iter(c.metric_records.values())) for c in contents):
        return dict(aggregate_metricrecords(contents, WEIGHT_KEY))
    unit = MetricRecord({_UNIT_WEIGHT: 1})
    weighted = [RecordDict({_UNIT_WEIGHT: unit, **c.metric_records}) for c in contents]
    return dict(aggregate_metricrecords(weighted, _UNIT_WEIGHT))


def _check_someone_ran_it(grid: FlowerAppGrid, key: str) -> None:
    """Only error replies: no trainer has the app (or all failed), whatever the app did."""
    traffic = grid.traffic.values()
    if any(t.replied for t in traffic) or not any(t.failed for t in traffic):
        return
    reasons = sorted({reason for t in traffic for reason in t.errors.values()})
    raise JobError(f"no trainer ran {key}: {'; '.join(reasons)}")


def _save_result(job_dir: Path, result: FlowerAppResult) -> None:
    data = json.dumps(result.as_json(), indent=2).encode()
    atomic_write(job_dir / "result.json", data, mode=0o644)
