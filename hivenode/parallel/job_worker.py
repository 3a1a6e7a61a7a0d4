"""A node's part in the parallel jobs that `hivenode jobs submit` runs.

The job's coordinator (the daemon it was submitted to, `aggregator/parallel_runner.py`)
sends each member a `parallel_start` order on `/hivenode/parallel-job/1.0.0`: the mode, the
members in rank order, the member's rank, the dataset, the model (a torch zoo model: every
member builds the same initial weights from the same seed) and the SGD settings. The member
answers at once and trains in the background:

- data parallel: a `Replica` on batches drawn from this node's own copy of the dataset (a
  seeded choice per step and rank, so a rerun draws the same batches); gradients are
  averaged with the other members by the all-reduce, so every replica stays identical;
- pipeline / model parallel: `Stage` `rank` of the model cut into `len(members)` balanced
  stages; only the first stage reads data (labels travel with the activations).

The coordinator then polls `parallel_status` for the steps done since the last poll; once
the member has finished it sends the final weights (all of them for a replica, its own
layers for a stage, under the whole model's names) and, for a replica, its accuracy on its
own test split. Only the coordinator that started a run may ask about it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import trio

from hivenode.agent.control import ControlApi
from hivenode.agent.node import Node
from hivenode.agent.rpc import Reply
from hivenode.models.datasets import DatasetCatalog, DatasetError
from hivenode.models.training.backend import LocalData
from hivenode.parallel.errors import ParallelError
from hivenode.parallel.router import ParallelRouter
from hivenode.parallel.wire import field as body_field
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import PARALLEL_JOB_PROTOCOL
from hivenode.protocol.limits import DEFAULT_LIMITS
from hivenode.protocol.message import Message
from hivenode.protocol.parallel_job import FAILED, FINISHED, RUNNING, START, STATUS, JobOrder

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 60.0
MAX_RUNS = 64
"""Finished runs kept for their coordinator to collect; the oldest go first."""


@dataclass
class _Run:
    order: JobOrder
    coordinator: str
    state: str = RUNNING
    error: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    weights: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    accuracy: float | None = None
    test_count: int = 0
    failovers: list[dict[str, Any]] = field(default_factory=list)
    """Pipeline stages moved to spares (on the member that keeps the checkpoints)."""


class ParallelJobWorker:
    """Serves `/hivenode/parallel-job/1.0.0` on `node`; create before the node runs, then
    `await nursery.start(worker.run)`: the runs live in its nursery."""

    def __init__(self, node: Node, router: ParallelRouter, catalog: DatasetCatalog) -> None:
        self.node = node
        self.router = router
        self.catalog = catalog
        self._runs: dict[str, _Run] = {}
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(1)
        node.add_handler(PARALLEL_JOB_PROTOCOL, self._handle, DEFAULT_LIMITS, REQUEST_TIMEOUT_S)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _handle(self, request: Message, caller: str) -> Reply | Mapping[str, Any]:
        if request.type == START:
            return self._start(JobOrder.from_body(request.body), caller)
        if request.type == STATUS:
            return self._status(request.body, caller)
        raise ProtocolError(f"unknown method {request.type!r}")

    def _start(self, order: JobOrder, caller: str) -> dict[str, Any]:
        if self._nursery is None:
            raise ParallelError("this node is not running parallel jobs yet")
        if order.members[order.rank] != self.node.peer_id:
            raise ProtocolError("the order's rank names another peer")
        known = self._runs.get(order.job)
        if known is not None:
            if known.order != order or known.coordinator != caller:
                raise ProtocolError(f"job {order.job!r} already runs here with other settings")
            return {"job": order.job, "state": known.state}
        while len(self._runs) >= MAX_RUNS:
            oldest = next(iter(self._runs))
            if self._runs[oldest].state == RUNNING:
                raise ParallelError(f"{MAX_RUNS} parallel jobs already run on this node")
            del self._runs[oldest]
        run = _Run(order, caller)
        self._runs[order.job] = run
        self._nursery.start_soon(self._train, run)
        return {"job": order.job, "state": run.state}

    def _status(self, body: Mapping[str, Any], caller: str) -> Reply:
        job = body_field(body, "job", str)
        since = body_field(body, "since", int)
        run = self._runs.get(job)
        if run is None or run.coordinator != caller:
            raise ProtocolError(f"no parallel job {job!r} started here by {caller[-8:]}")
        reply: dict[str, Any] = {
            "state": run.state,
            "error": run.error,
            # by step: after a pipeline fail-over, redone steps come again (the same numbers)
            "records": [r for r in run.records if r["step"] >= since],
            "accuracy": run.accuracy,
            "test_count": run.test_count,
            "failovers": run.failovers,
            "names": [],
        }
        tensors: tuple[np.ndarray[Any, Any], ...] = ()
        if run.state == FINISHED and body.get("weights") is True:
            reply["names"] = list(run.weights)
            tensors = tuple(np.ascontiguousarray(a) for a in run.weights.values())
        return Reply(reply, tensors)

    async def _train(self, run: _Run) -> None:
        order = run.order
        for peer in order.members:
            if peer != self.node.peer_id:
                self.node.make_dialable(peer)
        try:
            # torch takes seconds to import: on the loop it would stall every reply of this
            # node (the start order's own included), so the training modules load in a thread
            await trio.to_thread.run_sync(_load_training_modules)
            if order.mode == "data":
                await self._train_replica(run)
            else:
                await self._train_stage(run)
            run.state = FINISHED
        except (ParallelError, DatasetError, ProtocolError, OSError, ValueError) as exc:
            run.state, run.error = FAILED, str(exc)
            log.error("parallel job %s failed here: %s", order.job, exc)
        except Exception as exc:  # one job's bug must not take the daemon down
            run.state, run.error = FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("parallel job %s crashed here", order.job)

    def _data(self, order: JobOrder) -> LocalData:
        data = self.catalog.load(order.dataset)
        if tuple(data.feature_shape) != order.feature_shape:
            raise ParallelError(
                f"dataset {order.dataset!r} here has features {data.feature_shape}, "
                f"the job expects {order.feature_shape}"
            )
        return data

    async def _train_replica(self, run: _Run) -> None:
        from hivenode.parallel.allreduce import AllReduceConfig
        from hivenode.parallel.data_parallel import DataParallelConfig, Replica
        from hivenode.protocol.compression import Compression

        order = run.order
        data = await trio.to_thread.run_sync(self._data, order)
        config = DataParallelConfig(
            order.job,
            _recipe(order),
            _sgd(order),
            order.steps,
            AllReduceConfig(order.peer_timeout, Compression.parse(order.compression)),
        )
        replica = Replica(self.node, self.router, config, order.members, self._limiter)
        try:
            await replica.train(
                _sampled_batches(data, order),
                on_step=lambda record: run.records.append(asdict(record)),
            )
        finally:
            await replica.aclose()
        state = replica.model.state_dict()
        run.weights = {name: tensor.detach().numpy().copy() for name, tensor in state.items()}
        run.accuracy = await trio.to_thread.run_sync(_accuracy, replica.model, data)
        run.test_count = len(data.y_test)

    async def _train_stage(self, run: _Run) -> None:
        from hivenode.parallel.pipeline import PipelineConfig, Stage

        order = run.order
        recipe = _recipe(order)
        micro = 1 if order.mode == "model" else order.micro_batches
        config = PipelineConfig(
            order.job, recipe, _sgd(order), order.steps, micro, stage_timeout=order.peer_timeout
        )
        stage_peers = order.members[: order.stage_count]
        cuts = weighted_stage_cuts(recipe, len(stage_peers))
        is_stage = order.rank < len(stage_peers)
        if order.stages and order.rank == len(order.members) - 1:
            await self._keep_checkpoints(run, config, cuts)
            return
        stage = (
            Stage(self.node, self.router, config, stage_peers, order.rank, cuts)
            if is_stage
            else None
        )
        batches = None
        if order.rank == 0 or not is_stage:  # a spare may have to take the first stage
            data = await trio.to_thread.run_sync(self._data, order)
            batches = _sampled_batches(data, replace(order, rank=0))

        def record(step: Any) -> None:
            run.records.append(asdict(step))

        if len(stage_peers) < len(order.members):  # the fail-over part closes the stage
            await self._train_with_spares(run, config, stage, batches, cuts, record)
            return
        assert stage is not None
        try:
            await stage.train(batches, on_step=record)
        finally:
            await stage.aclose()
        run.weights = _stage_weights(stage)

    async def _keep_checkpoints(self, run: _Run, config: Any, cuts: list[int]) -> None:
        """The member that keeps a pipeline's checkpoints and moves dead stages to spares
        (`parallel.pipeline_failover.PipelineCoordinator`). It holds no stage: libp2p does
        not dial itself, so the coordinator cannot be one of the nodes it directs."""
        from hivenode.parallel.pipeline_failover import PipelineCoordinator

        order = run.order
        keeper = PipelineCoordinator(
            self.node,
            self.router,
            config,
            order.members[: order.stages],
            cuts,
            order.members[order.stages : -1],
        )
        for failover in await keeper.run():
            run.failovers.append(
                {
                    "failed_step": failover.failed_step,
                    "checkpoint_step": failover.checkpoint_step,
                    "replaced": [list(r) for r in failover.replaced],
                    "recovery_s": round(failover.recovery_s, 3),
                }
            )

    async def _train_with_spares(
        self,
        run: _Run,
        config: Any,
        stage: Any,
        batches: Any,
        cuts: list[int],
        record: Any,
    ) -> None:
        """A stage or a spare of a pipeline whose dead stages move to the spares."""
        from hivenode.parallel.pipeline_failover import FailoverStage

        part = FailoverStage(
            self.node,
            self.router,
            config,
            run.order.members[-1],
            stage,
            batches if stage is None or stage.first else None,
            self._limiter,
        )
        try:
            await part.train(on_step=record)
        finally:
            await part.aclose()
        if part.stage is not None:  # its own stage, or the one a fail-over moved here
            run.weights = _stage_weights(part.stage)


class ParallelJobService:
    """The member side of parallel jobs in the daemon (every node with the trainer role)."""

    def __init__(self) -> None:
        self.worker: ParallelJobWorker | None = None

    def install(self, node: Node, api: ControlApi, state_dir: Path) -> None:
        router = ParallelRouter(node)
        self.worker = ParallelJobWorker(node, router, DatasetCatalog(state_dir))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self.worker is not None, "install() first"
        await self.worker.run(task_status=task_status)


def _recipe(order: JobOrder) -> Any:
    from hivenode.parallel.torch_state import ModelRecipe

    return ModelRecipe(
        order.model, dict(order.options), order.feature_shape, order.num_classes, order.seed
    )


def _sgd(order: JobOrder) -> Any:
    from hivenode.parallel.torch_state import SgdConfig

    return SgdConfig(lr=order.lr, momentum=order.momentum)


def _sampled_batches(data: LocalData, order: JobOrder) -> Any:
    """step → a batch of this member's training examples, drawn without replacement by a
    generator seeded with (job seed, rank, step): reproducible, independent across ranks."""
    count = len(data.y_train)
    if count == 0:
        raise ParallelError(f"dataset {order.dataset!r} has no training examples here")
    size = min(order.batch_size, count)

    def batch(step: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        rng = np.random.default_rng([order.seed, order.rank, step])
        rows = rng.choice(count, size=size, replace=False)
        return data.x_train[rows], data.y_train[rows]

    return batch


def _load_training_modules() -> None:
    import importlib

    for name in ("data_parallel", "pipeline", "pipeline_failover"):
        importlib.import_module(f"hivenode.parallel.{name}")


def _stage_weights(stage: Any) -> dict[str, np.ndarray[Any, Any]]:
    """A stage's layers under the whole model's state_dict names."""
    return {name: t.detach().numpy().copy() for name, t in stage.state().items()}


def weighted_stage_cuts(recipe: Any, stages: int) -> list[int]:
    """Balanced cuts in which every stage holds weights: the layers with parameters are cut by
    cost, and each parameter-free layer (an activation, a reshape) stays with the weighted
    layer before it. Every member computes the same cuts from the same recipe."""
    from hivenode.parallel.pipeline import balanced_cuts, layer_costs, leaf_layers

    layers = leaf_layers(recipe.build())
    weighted = [i for i, (_, module) in enumerate(layers) if any(True for _ in module.parameters())]
    if len(weighted) < stages:
        raise ParallelError(
            f"the model has {len(weighted)} layers with weights: it cannot be cut into "
            f"{stages} stages; set parallel.nodes lower or use a deeper model"
        )
    costs = layer_costs(layers)
    cuts = balanced_cuts([costs[i] for i in weighted], stages)
    return [0, *(weighted[c] for c in cuts[1:-1]), len(layers)]


def _accuracy(model: Any, data: LocalData) -> float | None:
    import torch

    if len(data.y_test) == 0:
        return None
    model.eval()  # safe: torch's train/eval switch, not code evaluation
    with torch.no_grad():
        x = torch.from_numpy(np.array(data.x_test, dtype=np.float32))  # a writable copy
        predicted = model(x).argmax(dim=1).numpy()
    return float((predicted == data.y_test).mean())
