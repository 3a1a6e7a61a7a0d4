"""Secure aggregation jobs over real in-process nodes: Flower's SecAgg+ mod on the trainers,
our SecAgg+ strategy over the swarm Grid on the aggregator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fl_swarm import DATASET, fl_swarm
from flwr.app import Context, Message
from safetensors.numpy import load_file

from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import JobResult, run_id_of, run_job
from hivenode.privacy.client_mods import MASKED_RECORD
from hivenode.sim.fl_datasets import federated_dataset


def job(name: str, trainers: list[str], **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": name,
        "dataset": DATASET,
        "rounds": 2,
        "clients_per_round": len(trainers),
        "trainers": trainers,
        "deadline_s": 30,
        "evaluate_fraction": 0.0,
        "model": {"framework": "torch", "name": "logreg"},
        "train": {"lr": 0.1, "local_epochs": 1, "batch_size": 32},
    }
    values.update(overrides)
    return JobSpec.model_validate(values)


def weights(result: JobResult) -> dict[str, np.ndarray[Any, Any]]:
    return load_file(str(result.model_path))


@pytest.fixture(scope="module")
def digits() -> list[Any]:
    return federated_dataset("digits", 3, partition="iid", seed=0)


async def test_secure_aggregation_gives_fedavgs_model_from_masked_updates(
    tmp_path: Path, digits: Any
) -> None:
    replies: list[Message] = []

    def capture(app: Any) -> Any:
        def wrapped(message: Message, context: Context) -> Message:
            reply: Message = app(message, context)
            if "arrays" in message.content.array_records and not reply.has_error():
                replies.append(reply)  # what leaves the trainer for the aggregator
            return reply

        return wrapped

    async with fl_swarm(tmp_path, digits, wrap=capture) as swarm:
        ids = swarm.trainer_ids
        plain = await run_job(swarm.aggregator, job("plain", ids), tmp_path / "plain")
        replies.clear()
        secure = await run_job(
            swarm.aggregator,
            job("secure", ids, privacy={"secure_aggregation": True}),
            tmp_path / "secure",
        )
    expected, got = weights(plain), weights(secure)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-4)
        assert not np.array_equal(got[key], value)  # it did go through quantization
    assert [r.participants for r in secure.history] == [3, 3]
    assert len(replies) == 6
    for reply in replies:
        assert set(reply.content.array_records) == {MASKED_RECORD}
        masked = np.concatenate(
            [np.asarray(a.numpy()).ravel() for a in reply.content[MASKED_RECORD].values()]
        )[1:]
        # uniform in [0, 2³²): a plain quantized update would sit near 2²¹
        assert abs(masked.mean() / 2**32 - 0.5) < 0.05


async def test_a_trainer_lost_after_sharing_its_keys_is_unmasked_from_the_others_shares(
    tmp_path: Path, digits: Any
) -> None:
    def partition_2_fails_to_train(app: Any) -> Any:
        # it took part in setup and key sharing, then fails the masked round: its pairwise
        # masks sit in the others' vectors and only its neighbours' shares can remove them
        def wrapped(message: Message, context: Context) -> Message:
            if (
                message.metadata.run_id == run_id_of("dropout")
                and context.node_config.get("partition-id") == 2
                and "arrays" in message.content.array_records
            ):
                raise RuntimeError("killed mid-protocol")
            reply: Message = app(message, context)
            return reply

        return wrapped

    async with fl_swarm(tmp_path, digits, wrap=partition_2_fails_to_train) as swarm:
        ids = swarm.trainer_ids
        survivors = await run_job(
            swarm.aggregator, job("survivors", ids[:2], rounds=1), tmp_path / "survivors"
        )
        secure = await run_job(
            swarm.aggregator,
            job(
                "dropout",
                ids,
                rounds=1,
                min_clients=2,
                privacy={"secure_aggregation": True, "secagg_reconstruction_threshold": 2},
            ),
            tmp_path / "dropout",
        )
    (only,) = secure.history
    assert only.participants == 2 and only.failures == 1
    expected, got = weights(survivors), weights(secure)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-4)
