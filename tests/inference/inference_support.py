"""Real in-process nodes with the inference worker role on 127.0.0.1, and real model files
made with the frameworks, registered in each node's own registry.

(Not conftest.py: tests elsewhere import the root conftest by that module name.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio
from swarm_helpers import node_settings

from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.model_fetch import blob_resolver
from hivenode.agent.node import Node
from hivenode.inference.deploy import DeployHandler
from hivenode.inference.metrics import InferenceMetrics
from hivenode.inference.router import Router
from hivenode.inference.settings import InferenceSettings
from hivenode.inference.worker import InferenceWorker
from hivenode.models.registry import ModelVersion, Registry

FEATURES = 8
CLASSES = 3
MLP = {"framework": "torch", "name": "mlp", "options": {"hidden": [16]}}


def save_zoo_model(
    path: Path,
    spec: dict[str, Any] = MLP,
    feature_shape: tuple[int, ...] = (FEATURES,),
    num_classes: int = CLASSES,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
) -> Any:
    """A zoo model's weights as a job writes them (aggregator/runner.py `save_model`);
    returns the torch module, the in-process reference."""
    from safetensors.numpy import save_file

    from hivenode.models.training import zoo
    from hivenode.models.training.torch_backend import state_arrays

    module = zoo.build_model(
        spec["name"], spec["options"], feature_shape, num_classes, seed=seed
    ).eval()
    meta = {"hivenode-model": json.dumps(spec), "job": "test", **(metadata or {})}
    save_file(state_arrays(module), str(path), metadata=meta)
    return module


def register(state_dir: Path, path: Path, name: str) -> ModelVersion:
    from hivenode.models.identify import identify

    with Registry(state_dir) as registry:
        return registry.add(path, name, identify(path))


def reference(module: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out: np.ndarray = module(torch.from_numpy(np.asarray(x, np.float32))).numpy()
    return out


@dataclass
class Started:
    node: Node
    worker: InferenceWorker | None
    router: Router
    state_dir: Path


StartNode = Callable[..., Awaitable[Started]]


@asynccontextmanager
async def inference_swarm(tmp: Path) -> AsyncIterator[StartNode]:
    """Yields `start(name, bootstrap=[...], models={name: path}, settings=..., worker=True)`:
    a node whose registry holds `models`, serving them when it is a worker, with a router."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    probe = HardwareProbe(tmp)
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:

        async def start(
            name: str,
            bootstrap: list[Started] | None = None,
            models: dict[str, Path] | None = None,
            settings: InferenceSettings | None = None,
            worker: bool = True,
            available_memory: Callable[[], int] | None = None,
        ) -> Started:
            """Start a node; again under the same name, it starts on the same state dir
            (a restart: a new process would find what the last one left there)."""
            addrs = [s.node.swarm.listen_addrs()[0] for s in bootstrap or []]
            config = node_settings(tmp, name, bootstrap_peers=addrs, advert_period=1.0)
            assert config.state_dir is not None
            for model_name, path in (models or {}).items():
                register(config.state_dir, path, model_name)
            chosen = settings or InferenceSettings(serve=list(models or {}))
            resolver = blob_resolver(config.state_dir)  # every node shares its registry
            node = Node(config, create_new_key_pair(), probe, blob_resolver=resolver)
            metrics = InferenceMetrics(node.metrics.registry)
            role = deployments = None
            if worker:
                extra = {} if available_memory is None else {"available_memory": available_memory}
                role = InferenceWorker(node, config.state_dir, chosen, metrics, **extra)
                role.install()
                deployments = DeployHandler(role)
                deployments.install()
            await nursery.start(node.run)
            nodes.append(node)
            if role is not None and deployments is not None:
                await nursery.start(role.run)
                await deployments.restore()
            return Started(node, role, Router(node, chosen, metrics, local=role), config.state_dir)

        try:
            yield start
        finally:
            for node in nodes:
                node.stop()
            with trio.fail_after(15):
                for node in nodes:
                    await node.wait_stopped()
            nursery.cancel_scope.cancel()
