"""Serving variants: int8 and ONNX measured against the model as loaded, the fastest within
budget served, and a model replaced while requests wait for it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import trio
from inference_support import FEATURES, inference_swarm, reference
from swarm_helpers import wait_until

from hivenode.inference.runtime import LoadedModel, NDArray, Signature
from hivenode.inference.settings import InferenceSettings


async def test_variants_are_measured_and_the_fastest_within_budget_is_served(
    tmp_path: Path, mlp_file: tuple[Path, Any]
) -> None:
    path, module = mlp_file
    async with inference_swarm(tmp_path) as start:
        node = await start("worker", models={"digits": path})
        worker = node.worker
        assert worker is not None
        await wait_until(lambda: worker.models == ("digits@1",), 20, "loaded")
        report = await worker.optimize("digits", accuracy_budget=0.05, apply=True)
        rows = {row["variant"]: row for row in report["variants"]}
        assert set(rows) == {"as loaded", "int8", "onnx"}
        assert rows["as loaded"]["agreement"] == 1.0 and rows["as loaded"]["max_abs_diff"] == 0
        assert rows["onnx"]["error"] is None and rows["onnx"]["agreement"] == 1.0
        chosen = rows[report["chosen"]]
        assert 1 - chosen["agreement"] <= 0.05
        assert report["serving"] == report["chosen"]
        x = np.random.default_rng(3).normal(size=(4, FEATURES)).astype(np.float32)
        _, outputs = await worker.infer("digits", (x,))
        assert (outputs[0].argmax(1) == reference(module, x).argmax(1)).all()


async def test_replacing_a_model_lets_waiting_requests_finish(tmp_path: Path) -> None:
    opened = threading.Event()

    def model(variant: str) -> LoadedModel:
        def predict(batch: NDArray) -> tuple[NDArray, ...]:
            opened.wait(10)
            return (batch,)

        sig = Signature((1,), np.dtype(np.float32))
        return LoadedModel("m@1", "test", sig, predict, variant=variant)

    async with inference_swarm(tmp_path) as start:
        node = await start("worker", settings=InferenceSettings(concurrency=1, max_batch=1))
        worker = node.worker
        assert worker is not None
        worker.serve_loaded("m", model("old"))
        answered: list[str] = []

        async def call() -> None:
            await worker.infer("m", (np.ones((1, 1), np.float32),), 5)
            answered.append("ok")

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                nursery.start_soon(call)
                await wait_until(lambda: worker.queue_length == 1, 5, "one waiting")
                worker.serve_loaded("m", model("new"))
                opened.set()
        assert answered == ["ok", "ok"]
        assert worker.served()[0]["variant"] == "new"
