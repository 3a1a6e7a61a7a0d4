"""Federated jobs over real in-process nodes: Flower strategies through our Grid."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from fl_swarm import DATASET, fl_swarm
from flwr.app import Context, Message

from hivenode.aggregator.checkpoint import load_checkpoint
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import run_job
from hivenode.sim.fl_datasets import federated_dataset


def job(name: str, trainers: list[str], **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": name,
        "dataset": DATASET,
        "rounds": 3,
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


async def test_a_job_trains_checkpoints_and_saves_the_model(tmp_path: Path, digits: Any) -> None:
    async with fl_swarm(tmp_path, digits) as swarm:
        spec = job("digits-fedavg", swarm.trainer_ids)
        result = await run_job(swarm.aggregator, spec, tmp_path / "job")
    history = result.history
    assert [r.round for r in history] == [1, 2, 3]
    assert all(r.participants == 3 and r.failures == 0 for r in history)
    first, last = history[0], history[-1]
    assert first.global_train_loss is not None and last.global_train_loss is not None
    assert last.global_train_loss < first.global_train_loss
    assert last.eval_accuracy is not None and last.eval_accuracy > 0.5
    assert all(r.bytes_out > 0 and r.bytes_in > 0 for r in history)
    checkpoint = load_checkpoint(tmp_path / "job")
    assert checkpoint is not None and checkpoint.round == 3
    assert result.model_path.exists()


async def test_a_restarted_job_resumes_from_its_last_round(tmp_path: Path, digits: Any) -> None:
    rounds_seen: list[int] = []

    def record_rounds(app: Any) -> Any:
        def wrapped(message: Message, context: Context) -> Message:
            if message.metadata.message_type == "train":
                rounds_seen.append(int(message.content["config"]["server-round"]))
            reply: Message = app(message, context)
            return reply

        return wrapped

    async with fl_swarm(tmp_path, digits, wrap=record_rounds) as swarm:
        spec = job("resume", swarm.trainer_ids, rounds=2)
        await run_job(swarm.aggregator, spec, tmp_path / "job")
        longer = spec.model_copy(update={"rounds": 4})
        resumed = await run_job(swarm.aggregator, longer, tmp_path / "job")
    assert resumed.resumed_from == 2
    assert [r.round for r in resumed.history] == [1, 2, 3, 4]
    assert sorted(set(rounds_seen)) == [1, 2, 3, 4]  # trainers kept counting


async def test_a_dead_trainer_costs_an_error_reply_not_a_hang(tmp_path: Path, digits: Any) -> None:
    async with fl_swarm(tmp_path, digits) as swarm:
        dead = swarm.trainers[2]
        dead.stop()
        await dead.wait_stopped()
        spec = job("dead", swarm.trainer_ids, rounds=2, min_clients=1)
        started = time.monotonic()
        result = await run_job(swarm.aggregator, spec, tmp_path / "job")
        elapsed = time.monotonic() - started
    first, second = result.history
    assert first.participants == 2 and first.failures == 1
    assert second.participants == 2 and second.failures == 0  # no longer sampled
    assert elapsed < 20


async def test_a_trainer_past_the_deadline_is_cut_off(tmp_path: Path, digits: Any) -> None:
    def slow_for_partition_0(app: Any) -> Any:
        def wrapped(message: Message, context: Context) -> Message:
            if context.node_config.get("partition-id") == 0:
                time.sleep(4)
            reply: Message = app(message, context)
            return reply

        return wrapped

    async with fl_swarm(tmp_path, digits, wrap=slow_for_partition_0) as swarm:
        spec = job("slow", swarm.trainer_ids, rounds=1, deadline_s=1.0, evaluate_fraction=0.0)
        with trio.fail_after(15):
            result = await run_job(swarm.aggregator, spec, tmp_path / "job")
    (only,) = result.history
    assert only.participants == 2 and only.failures == 1
    assert only.duration_s < 4


async def test_scaffold_trainers_keep_their_control_variate_on_disk(
    tmp_path: Path, digits: Any
) -> None:
    async with fl_swarm(tmp_path, digits) as swarm:
        spec = job("scaffold", swarm.trainer_ids, rounds=2, strategy={"name": "scaffold"})
        result = await run_job(swarm.aggregator, spec, tmp_path / "job")
    assert result.history[-1].participants == 3
    for index in range(3):
        state = tmp_path / f"trainer{index}" / "state" / "jobs" / "scaffold" / "trainer-state.bin"
        assert state.exists()
    checkpoint = load_checkpoint(tmp_path / "job")
    assert checkpoint is not None and checkpoint.control is not None
    assert any(abs(v).sum() > 0 for v in checkpoint.control.values())


async def test_a_resumed_job_keeps_the_trainers_it_had(tmp_path: Path, digits: Any) -> None:
    async with fl_swarm(tmp_path, digits) as swarm:
        spec = job("former", [], rounds=2, clients_per_round=3)  # no list: every trainer
        first = await run_job(swarm.aggregator, spec, tmp_path / "job")
        checkpoint = load_checkpoint(tmp_path / "job")
        assert checkpoint is not None and checkpoint.trainers == first.trainers
        longer = spec.model_copy(update={"rounds": 3})
        resumed = await run_job(swarm.aggregator, longer, tmp_path / "job", trainer_wait_s=5.0)
    assert resumed.resumed_from == 2
    assert resumed.trainers == first.trainers  # the same partition ids, in the same order
    assert resumed.history[-1].participants == 3


def test_a_trainer_keeps_a_bounded_number_of_job_contexts(tmp_path: Path) -> None:
    from hivenode.agent.trainer import MAX_JOB_CONTEXTS, Trainer

    trainer = Trainer(tmp_path, "peer", {})
    first = trainer._context("job-0", "agg", {}, {})
    for index in range(1, MAX_JOB_CONTEXTS + 10):
        trainer._context(f"job-{index}", "agg", {}, {})
        trainer._context("job-0", "agg", {}, {})  # in use: stays
    assert len(trainer._jobs) == MAX_JOB_CONTEXTS
    assert trainer._context("job-0", "agg", {}, {}) is first
    assert "job-1" not in trainer._jobs  # the least recently used went
