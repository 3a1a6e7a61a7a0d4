"""Registry across the swarm: add on one node, fetch by hash on another, bytes identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import Daemons, run_cli
from safetensors.numpy import save_file


def make_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    save_file(
        {
            "layer1.weight": rng.standard_normal((64, 32)).astype(np.float32),
            "layer1.bias": np.zeros(64, np.float32),
            "head.weight": rng.standard_normal((10, 64)).astype(np.float32),
        },
        str(path),
    )
    return path


def test_model_added_on_one_node_is_fetched_by_hash_on_another(
    daemons: Daemons, tmp_path: Path
) -> None:
    a = daemons.start("a")
    b = daemons.start("b", bootstrap=a)
    original = make_model(tmp_path / "mlp.safetensors")
    added = run_cli(
        "models",
        "add",
        str(original),
        "--name",
        "mlp",
        "--state-dir",
        str(a.state_dir),
        "--json",
        env=a.env,
    )
    assert added.returncode == 0, added.stderr
    sha = json.loads(added.stdout)["sha256"]

    fetched = b.cli_json("models", "fetch", sha, "--from", a.peer_id, "--name", "mlp")
    assert fetched["fetched"] is True
    assert fetched["model"]["version"] == 1
    assert fetched["model"]["framework"] == json.loads(added.stdout)["framework"]

    out = tmp_path / "exported.safetensors"
    exported = run_cli(
        "models", "export", "mlp@1", str(out), "--state-dir", str(b.state_dir), env=b.env
    )
    assert exported.returncode == 0, exported.stderr
    assert out.read_bytes() == original.read_bytes()

    again = b.cli_json("models", "fetch", sha, "--from", a.peer_id)
    assert again["fetched"] is False, "a blob already held is not fetched twice"


def test_fetching_an_unknown_hash_is_one_line_and_exit_1(daemons: Daemons) -> None:
    a = daemons.start("a")
    b = daemons.start("b", bootstrap=a)
    result = b.cli("models", "fetch", "ab" * 32, "--from", a.peer_id)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "hivenode: error:" in result.stderr
    assert "no blob" in result.stderr
