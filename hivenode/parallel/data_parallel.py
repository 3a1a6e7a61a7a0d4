"""Data-parallel training: every replica computes gradients on its own batch, the replicas
average them by all-reduce, and each applies the same SGD step, so they stay identical.

With per-replica batches b_i the average is weighted by b_i, which makes a step equal to one
SGD step on the union of the batches (the mean loss over Σ b_i examples), the same as a single
node training on the concatenated batch.

A replica that starts late, or was left out of a step (too slow, diverged), asks a member to
admit it: the member names it in its next contributions, and once that step is applied it
sends its weights and optimizer state; the joiner continues from the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import trio
from torch import nn

from hivenode.agent import rpc
from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.parallel import wire
from hivenode.parallel.allreduce import AllReduceConfig, Averager, StepResult
from hivenode.parallel.errors import ParallelError
from hivenode.parallel.router import ParallelRouter
from hivenode.parallel.torch_state import (
    ModelRecipe,
    SgdConfig,
    digest,
    flat_gradients,
    load_state_arrays,
    parameter_count,
    set_gradients,
    state_arrays,
)
from hivenode.protocol.ids import DP_STATE_PROTOCOL
from hivenode.protocol.limits import DEFAULT_LIMITS
from hivenode.protocol.message import Message

log = logging.getLogger(__name__)

JOIN = "join"

Batch = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
Batches = Callable[[int], Batch]
"""step → this replica's (features, integer labels) for that step."""


@dataclass(frozen=True)
class DataParallelConfig:
    """One data-parallel job, the same on every replica."""

    job_id: str
    recipe: ModelRecipe = field(default_factory=ModelRecipe)
    sgd: SgdConfig = field(default_factory=SgdConfig)
    steps: int = 50
    allreduce: AllReduceConfig = field(default_factory=AllReduceConfig)
    join_timeout: float = 60.0
    """Seconds a joiner waits to be admitted and sent the state."""


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    seconds: float
    compute_s: float
    bytes_sent: int
    bytes_received: int
    replicas: int
    recovered_parts: int


class Replica:
    """One peer's copy of the model and its side of the job. Create while the node runs."""

    def __init__(
        self,
        node: Node,
        router: ParallelRouter,
        config: DataParallelConfig,
        group: Sequence[str],
        limiter: trio.CapacityLimiter | None = None,
        averager_class: type[Averager] = Averager,
    ) -> None:
        self.node = node
        self.config = config
        self.model = config.recipe.build()
        self.params = list(self.model.parameters())
        self.optimizer = config.sgd.optimizer(self.params)
        self.size = parameter_count(self.model)
        self.averager = averager_class(
            node, router, config.job_id, self.size, group, config.allreduce
        )
        self.records: list[StepRecord] = []
        self._router = router
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._waiting_joiners: set[str] = set()
        self._snapshots: dict[int, dict[str, np.ndarray[Any, Any]]] = {}
        self._snapshot_ready: dict[int, trio.Event] = {}
        router.attach(DP_STATE_PROTOCOL, config.job_id, self._serve_join)

    async def aclose(self) -> None:
        self._router.detach(DP_STATE_PROTOCOL, self.config.job_id)
        await self.averager.aclose()

    # --- training ------------------------------------------------------------------------

    async def train(
        self,
        batches: Batches,
        start_step: int = 0,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> list[StepRecord]:
        """Steps `start_step` … `config.steps − 1`; a replica left out of a step rejoins."""
        step = start_step
        await self.averager.warm_up()
        while step < self.config.steps:
            started = time.perf_counter()
            features, labels = batches(step)
            grads, loss, params_digest = await trio.to_thread.run_sync(
                self._gradients, features, labels, limiter=self._limiter
            )
            compute_s = time.perf_counter() - started
            result = await self.averager.allreduce(step, grads, float(len(labels)), params_digest)
            if not result.included:
                log.warning("job %s: left out of step %d; rejoining", self.config.job_id, step)
                step = await self.join(result.next_group)
                continue
            await trio.to_thread.run_sync(self._apply, result.average, limiter=self._limiter)
            self._after_step(step, result)
            record = StepRecord(
                step=step,
                loss=loss,
                seconds=time.perf_counter() - started,
                compute_s=compute_s,
                bytes_sent=result.bytes_sent,
                bytes_received=result.bytes_received,
                replicas=len(result.contributors),
                recovered_parts=result.recovered_parts,
            )
            self.records.append(record)
            if on_step is not None:
                on_step(record)
            step += 1
        return self.records

    def _gradients(self, features: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> Any:
        params_digest = digest(self.params)
        self.optimizer.zero_grad(set_to_none=False)
        logits = self.model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(labels.astype(np.int64)))
        torch.autograd.backward(loss)
        return flat_gradients(self.params), float(loss.detach()), params_digest

    def _apply(self, average: np.ndarray[Any, Any]) -> None:
        set_gradients(self.params, average)
        self.optimizer.step()

    # --- joining -------------------------------------------------------------------------

    async def join(self, members: Sequence[str]) -> int:
        """Ask `members` in turn to admit us; load the state one sends; the next step."""
        failures = []
        for member in members:
            if member == self.node.peer_id:
                continue
            try:
                self.node.make_dialable(member)
                reply = await rpc.request(
                    self.node.swarm.host,
                    member,
                    DP_STATE_PROTOCOL,
                    JOIN,
                    {"job": self.config.job_id},
                    timeout=self.config.join_timeout + self.config.allreduce.reply_timeout,
                    limits=DEFAULT_LIMITS,
                )
            except RpcError as exc:
                failures.append(f"{member}: {exc}")
                continue
            return await trio.to_thread.run_sync(self._load_reply, reply)
        raise ParallelError(
            f"no member admitted us to job {self.config.job_id}: {'; '.join(failures) or 'none'}"
        )

    def _load_reply(self, reply: Message) -> int:
        names = wire.field(reply.body, "names", list)
        group = wire.peer_list(reply.body, "group")
        step = wire.field(reply.body, "step", int)
        if len(names) != len(reply.tensors) or self.node.peer_id not in group:
            raise ParallelError("the join reply does not hold our state and group")
        load_state_arrays(self.model, self.optimizer, dict(zip(names, reply.tensors, strict=True)))
        self.averager.group = group
        log.info("job %s: joined at step %d, group of %d", self.config.job_id, step, len(group))
        return step

    async def _serve_join(self, request: Message, caller: str) -> rpc.Reply:
        if request.type != JOIN:
            raise RpcError("unknown_method", f"expected {JOIN!r}, got {request.type!r}")
        if self.node.peer_id not in self.averager.group:
            raise RpcError("not_member", "this replica is not in the group now")
        self._waiting_joiners.add(caller)
        try:
            self.averager.announce(caller)
            step, group = await self.averager.admitted(caller, self.config.join_timeout)
            ready = self._snapshot_ready.setdefault(step, trio.Event())
            with trio.fail_after(self.config.join_timeout):
                await ready.wait()
        except (ParallelError, trio.TooSlowError) as exc:
            raise RpcError("not_admitted", str(exc) or "timed out") from exc
        finally:
            self._waiting_joiners.discard(caller)
        arrays = self._snapshots[step]
        return rpc.Reply(
            body={"step": step + 1, "group": list(group), "names": list(arrays)},
            tensors=tuple(arrays.values()),
        )

    def _after_step(self, step: int, result: StepResult) -> None:
        """Keep the state as of this step for the joiners admitted in it."""
        if self._waiting_joiners & set(result.joiners):
            self._snapshots[step] = state_arrays(self.model, self.optimizer)
            self._snapshot_ready.setdefault(step, trio.Event()).set()
        for old in [s for s in self._snapshots if s < step - 2]:
            self._snapshots.pop(old, None)
            self._snapshot_ready.pop(old, None)


def train_reference(
    recipe: ModelRecipe, sgd: SgdConfig, batches: Batches, steps: int
) -> tuple[nn.Sequential, list[float]]:
    """Single-node SGD on the whole batch each step: what the replicas must equal. Returns
    the model and each step's seconds."""
    model = recipe.build()
    optimizer = sgd.optimizer(list(model.parameters()))
    seconds = []
    for step in range(steps):
        started = time.perf_counter()
        features, labels = batches(step)
        optimizer.zero_grad()
        logits = model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(labels.astype(np.int64)))
        torch.autograd.backward(loss)
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return model, seconds


def global_batches(
    features: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], batch_size: int
) -> Batches:
    """Step t's batch: the `batch_size` rows from t·batch_size on, wrapping around."""

    def batch(step: int) -> Batch:
        rows = (step * batch_size + np.arange(batch_size)) % len(labels)
        return features[rows], labels[rows]

    return batch


def replica_batches(
    features: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    rank: int,
    replicas: int,
    batch_size: int,
) -> Batches:
    """Replica `rank`'s slice of `global_batches(..., replicas·batch_size)`: together the
    replicas see exactly the single node's batch."""
    whole = global_batches(features, labels, replicas * batch_size)

    def batch(step: int) -> Batch:
        x, y = whole(step)
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        return x[rows], y[rows]

    return batch
