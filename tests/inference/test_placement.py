"""Placement: the plan as a pure function, then deploys on real workers that fetch the blob,
survive a restart and undeploy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inference_support import FEATURES, inference_swarm, reference, register
from swarm_helpers import wait_until

from hivenode.inference.deploy import deploy, undeploy
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.placement import WorkerView, plan_placement
from hivenode.inference.settings import InferenceSettings
from hivenode.models.registry import ModelVersion
from hivenode.protocol.advert import Hardware, Load, MemoryInfo

GIB = 1024**3


def worker(peer: str, ram: int = 8 * GIB, cpu: float = 0.0, models: tuple[str, ...] = ()) -> Any:
    hardware = Hardware(
        memory=MemoryInfo(total_bytes=ram, available_bytes=ram),
        frameworks={"torch": "2"},
    )
    return WorkerView(peer, hardware, Load(cpu_percent=cpu), models)


@pytest.fixture
def version(tmp_path: Path, mlp_file: tuple[Path, Any]) -> ModelVersion:
    return register(tmp_path / "state", mlp_file[0], "digits")


def test_the_least_loaded_fitting_workers_are_chosen(version: ModelVersion) -> None:
    workers = [
        worker("busy", cpu=90),
        worker("idle"),
        worker("tiny", ram=1024),
        worker("mid", cpu=30),
    ]
    plan = plan_placement(version, workers, replicas=2, max_batch=32)
    assert plan.chosen == ("idle", "mid")
    assert "tiny" in plan.refused and "RAM" in plan.refused["tiny"]


def test_workers_serving_the_name_count_as_replicas(version: ModelVersion) -> None:
    workers = [worker("a", models=("digits@3",)), worker("b"), worker("c", cpu=50)]
    plan = plan_placement(version, workers, replicas=2, max_batch=32)
    assert plan.already == ("a",) and plan.chosen == ("b",)


def test_a_model_no_worker_can_hold_is_refused_with_the_numbers(version: ModelVersion) -> None:
    with pytest.raises(InferenceError) as caught:
        plan_placement(version, [worker("a", ram=1000), worker("b", ram=2000)], 1, 32)
    assert caught.value.kind is Code.INSUFFICIENT_MEMORY
    assert "needs" in caught.value.message and "RAM 1000 B" in caught.value.message


async def test_deployed_replicas_serve_survive_a_restart_and_undeploy(
    tmp_path: Path, mlp_file: tuple[Path, Any]
) -> None:
    path, module = mlp_file
    async with inference_swarm(tmp_path) as start:
        origin = await start("origin", models={"digits": path}, settings=InferenceSettings())
        names = {f"w{i}": await start(f"w{i}", bootstrap=[origin]) for i in range(3)}
        workers = list(names.values())
        ids = {w.node.peer_id for w in workers}
        await wait_until(
            lambda: ids <= {e.peer_id for e in origin.node.peer_table.entries()}, 20, "workers"
        )
        result = await deploy(origin.node, None, origin.state_dir, "digits", replicas=2)
        assert result["replicas"] == 2 and set(result["deployed"]) <= ids
        placed = [w for w in workers if w.node.peer_id in result["deployed"]]
        assert all(w.worker is not None and w.worker.models == ("digits@1",) for w in placed)

        await wait_until(
            lambda: len(origin.router.workers_for("digits")) == 2, 20, "replicas advertised"
        )
        x = np.ones((2, FEATURES), np.float32)
        answer = await origin.router.infer("digits", x)
        np.testing.assert_allclose(answer.outputs[0], reference(module, x), rtol=1e-5)

        again = await deploy(origin.node, None, origin.state_dir, "digits", replicas=2)
        assert again["deployed"] == {} and len(again["already"]) == 2

        first = placed[0]
        first.node.stop()
        await first.node.wait_stopped()
        name = next(n for n, w in names.items() if w is first)
        restarted = await start(name, bootstrap=[origin])
        assert restarted.worker is not None and restarted.worker.models == ("digits@1",)

        await wait_until(
            lambda: (
                (e := origin.node.peer_table.get(restarted.node.peer_id)) is not None
                and e.advert.models == ("digits@1",)
            ),
            20,
            "the restarted worker advertises the model",
        )
        gone = await undeploy(origin.node, None, "digits")
        assert restarted.node.peer_id in gone["undeployed"]
        assert restarted.worker.models == ()
