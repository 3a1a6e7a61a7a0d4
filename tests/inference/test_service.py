"""Inference in the daemon: the control-API routes on a real unix socket, the Python client,
and `hivenode infer` as a user runs it."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from inference_support import CLASSES, FEATURES, reference, register
from swarm_helpers import node_settings

from hivenode.agent.control import ControlApi
from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.node import Node
from hivenode.agent.paths import SOCKET_NAME
from hivenode.inference.client import InferenceClient
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.service import InferenceService
from hivenode.inference.settings import InferenceSettings

CLI = [
    sys.executable,
    "-c",
    "import typer; from hivenode.cli_infer import infer_command, stats_command; "
    "app = typer.Typer(); app.command('infer')(infer_command); "
    "app.command('stats')(stats_command); app()",
]
"""`hivenode infer` as cli.py mounts it (the lead adds the same line there)."""


async def test_the_daemon_routes_serve_infer_and_report(
    tmp_path: Path, mlp_file: tuple[Path, Any]
) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    path, module = mlp_file
    settings = node_settings(tmp_path, "daemon")
    assert settings.state_dir is not None
    register(settings.state_dir, path, "digits")
    node = Node(settings, create_new_key_pair(), HardwareProbe(tmp_path))
    api = ControlApi()
    service = InferenceService(InferenceSettings())
    service.install(node, api, settings.state_dir)
    runtime = Path(tempfile.mkdtemp(prefix="hn-", dir="/tmp"))  # a socket path < 108 bytes
    client = InferenceClient(runtime / SOCKET_NAME)
    x = np.random.default_rng(2).normal(size=(4, FEATURES)).astype(np.float32)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(api.serve, runtime / SOCKET_NAME)
        await nursery.start(service.run)

        with pytest.raises(InferenceError) as caught:
            await trio.to_thread.run_sync(client.infer, "digits", x)
        assert caught.value.kind is Code.NO_WORKER  # registered, not served yet

        view = await trio.to_thread.run_sync(client.serve, "digits")
        assert view["model"] == "digits@1" and view["input"]["shape"] == [FEATURES]
        result = await trio.to_thread.run_sync(client.infer, "digits", x)
        assert result.model == "digits@1" and result.worker == node.peer_id
        np.testing.assert_allclose(result.outputs[0], reference(module, x), rtol=1e-5, atol=1e-6)

        with pytest.raises(InferenceError) as caught:
            await trio.to_thread.run_sync(client.infer, "digits", x[:, :3])
        assert caught.value.kind is Code.BAD_INPUT

        inputs = tmp_path / "x.json"
        inputs.write_text(json.dumps(x.tolist()))
        command = [*CLI, "infer", "digits", "--input", str(inputs), "--json"]
        done = await trio.run_process(
            [*command, "--runtime-dir", str(runtime)], capture_stdout=True, check=False
        )
        assert done.returncode == 0, done
        printed = json.loads(done.stdout)
        assert np.asarray(printed["outputs"][0]).shape == (4, CLASSES)
        missing = await trio.run_process(
            [*CLI, "infer", "digits", "--input", str(tmp_path / "none.npy"),
             "--runtime-dir", str(runtime)],
            capture_stderr=True,
            check=False,
        )  # fmt: skip
        assert missing.returncode == 2 and b"unreadable" in missing.stderr

        stats = await trio.to_thread.run_sync(client.stats, "digits")
        assert stats["all"]["requests"] == 3 and stats["all"]["succeeded"] == 2
        assert list(stats["workers"]) == [node.peer_id]
        assert node.hardware is not None
        assert node.build_advert(node.hardware).models == ("digits@1",)
        node.stop()
        await node.wait_stopped()
        nursery.cancel_scope.cancel()
