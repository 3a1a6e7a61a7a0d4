"""Compressed updates in federated jobs over real in-process nodes on 127.0.0.1."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from fl_swarm import DATASET, FlSwarm, fl_swarm
from safetensors.numpy import load_file
from swarm_helpers import local_swarm, wait_until

from hivenode.agent.rpc import Reply
from hivenode.agent.trainer import Trainer, builtin_trainer
from hivenode.agent.update_codec import PARTS
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import JobResult, run_job
from hivenode.models.datasets import DatasetCatalog
from hivenode.models.training.backend import LocalData
from hivenode.protocol.advert import Role
from hivenode.protocol.message import Message as WireMessage
from hivenode.sim.fl_datasets import federated_dataset, save_partition

NDArray = np.ndarray[Any, Any]


def job(name: str, trainers: list[str], **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": name,
        "dataset": DATASET,
        "rounds": 4,
        "clients_per_round": len(trainers),
        "trainers": trainers,
        "deadline_s": 30,
        "model": {"framework": "torch", "name": "logreg"},
        "train": {"lr": 0.1, "local_epochs": 1, "batch_size": 32},
    }
    values.update(overrides)
    return JobSpec.model_validate(values)


@pytest.fixture(scope="module")
def digits() -> list[Any]:
    return federated_dataset("digits", 3, partition="iid", seed=0)


async def test_compressed_jobs_learn_and_bring_fewer_bytes_in(tmp_path: Path, digits: Any) -> None:
    results: dict[str, JobResult] = {}
    async with fl_swarm(tmp_path, digits) as swarm:
        for scheme in ("none", "int8", "topk:0.1"):
            spec = job(f"c-{scheme}".replace(":", "_"), swarm.trainer_ids, compression=scheme)
            results[scheme] = await run_job(swarm.aggregator, spec, tmp_path / spec.name)
    plain = results["none"].history
    for scheme, result in results.items():
        history = result.history
        assert [(r.participants, r.failures) for r in history] == [(3, 0)] * 4, scheme
        losses = [r.global_train_loss or math.inf for r in history]
        assert all(b < a for a, b in itertools.pairwise(losses)), (scheme, losses)
        # the aggregator → trainer direction is not compressed: the same model goes out
        assert [r.bytes_out for r in history] == [r.bytes_out for r in plain], scheme
    # 8-bit updates cost nothing visible; top-k learns, more slowly (it sends a tenth a round)
    assert results["int8"].history[-1].global_train_loss == pytest.approx(
        plain[-1].global_train_loss, rel=0.01
    )
    for scheme, bound in (("int8", 0.27), ("topk:0.1", 0.22)):
        ratio = [
            c.bytes_in / p.bytes_in for c, p in zip(results[scheme].history, plain, strict=True)
        ]
        assert max(ratio) < bound, (scheme, ratio)
    # top-k's residual is the trainers' job state, on their disks
    state = tmp_path / "trainer0" / "state" / "jobs" / "c-topk_0.1" / "trainer-state.bin"
    assert b"hivenode.residual.arrays" in state.read_bytes()


# --- hostile trainers ------------------------------------------------------------------------

Tamper = Callable[[str, list[NDArray]], list[NDArray]]
"""(job, the reply's update parts in order) → the parts a hostile trainer sends instead."""


@dataclass
class TamperingTrainer(Trainer):
    """An honest trainer whose replies are altered on their way out: a hostile peer."""

    tamper: Tamper = field(default=lambda job, parts: parts)

    async def handle(self, request: WireMessage, caller: str) -> Reply:
        reply = await super().handle(request, caller)
        used, records = 0, reply.body.get("records", [])
        tensors = list(reply.tensors)
        for name, kind, keys in records:
            if kind == "arrays" and name == PARTS:
                tensors[used : used + len(keys)] = self.tamper(
                    request.body["job"], tensors[used : used + len(keys)]
                )
            if kind == "arrays":
                used += len(keys)
        return Reply(reply.body, tuple(tensors))


@asynccontextmanager
async def swarm_with_a_hostile_trainer(
    tmp: Path, partitions: list[LocalData], tamper: Tamper
) -> AsyncIterator[FlSwarm]:
    """`fl_swarm`, whose last trainer tampers with its compressed replies."""
    limiter = trio.CapacityLimiter(2)
    hostile_index = len(partitions) - 1

    async with local_swarm(tmp) as start:
        aggregator = await start("aggregator", roles=[Role.AGGREGATOR])
        swarm = FlSwarm(aggregator)
        for index, data in enumerate(partitions):
            state_dir = tmp / f"trainer{index}" / "state"
            state_dir.mkdir(parents=True)
            save_partition(data, state_dir / "data.npz")
            DatasetCatalog(state_dir).add(DATASET, f"npz:{state_dir / 'data.npz'}")

            def make_trainer(
                state: Path, peer: str, hostile: bool = index == hostile_index
            ) -> Trainer:
                honest = builtin_trainer(state, peer, limiter)
                if not hostile:
                    return honest
                kept = {f.name: getattr(honest, f.name) for f in fields(Trainer)}
                return TamperingTrainer(**kept, tamper=tamper)

            node = await start(
                f"trainer{index}",
                bootstrap=[aggregator],
                make_trainer=make_trainer,
                roles=[Role.TRAINER],
            )
            swarm.trainers.append(node)
        await wait_until(
            lambda: all(peer in aggregator.peer_table for peer in swarm.trainer_ids),
            20,
            "the aggregator knows every trainer",
        )
        yield swarm


def index_beyond_the_array(parts: list[NDArray]) -> list[NDArray]:
    indices = parts[0].copy()
    indices[-1] = np.iinfo(indices.dtype).max
    return [indices, *parts[1:]]


def nan_block_scale(parts: list[NDArray]) -> list[NDArray]:
    scales = parts[1].copy()
    scales[0, 1] = np.nan
    return [parts[0], scales, *parts[2:]]


HOSTILE = {
    "index-beyond": ("topk:0.1", index_beyond_the_array, "strictly ascending"),
    "values-short": ("topk:0.1", lambda p: [p[0], p[1][:-1], *p[2:]], "float32 values"),
    "nan-scale": ("int8", nan_block_scale, "scales must be finite"),
}


async def test_hostile_compressed_replies_become_error_replies_and_the_job_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    partitions = federated_dataset("digits", 4, partition="iid", seed=0)

    def tamper(job_name: str, parts: list[NDArray]) -> list[NDArray]:
        _, change, _ = HOSTILE[job_name]
        return change(parts)

    caplog.set_level(logging.INFO, logger="hivenode.aggregator.grid")
    results: dict[str, JobResult] = {}
    async with swarm_with_a_hostile_trainer(tmp_path, partitions, tamper) as swarm:
        for name, (scheme, _, _) in HOSTILE.items():
            spec = job(name, swarm.trainer_ids, rounds=2, compression=scheme)
            results[name] = await run_job(swarm.aggregator, spec, tmp_path / name)
    hostile = swarm.trainer_ids[-1]
    for name, (_, _, reason) in HOSTILE.items():
        result = results[name]
        assert [(r.participants, r.failures) for r in result.history] == [(3, 1)] * 2, name
        model = load_file(str(result.model_path))
        assert all(math.isfinite(float(np.abs(v).max())) for v in model.values()), name
        said = [r.getMessage() for r in caplog.records if f"job {name}:" in r.getMessage()]
        assert said and all(hostile in line and reason in line for line in said), (name, said)
