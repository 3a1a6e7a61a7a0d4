"""`hivenode plan` and `hivenode qtable show|import|export`, mounted on a test app the way
cli.py mounts them."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner, Result

from hivenode.cli_planner import plan_command, qtable_app

app = typer.Typer()
app.command("plan")(plan_command)
app.add_typer(qtable_app, name="qtable")
GIB = 1024**3

JOB = """
name = "digits"
dataset = "digits"
rounds = 3
clients_per_round = 2

[model]
framework = "torch"
name = "mlp"

[plan]
params = 2000000
samples = 50000
"""


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "160"})


def one_line_error(result: Result, code: int, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("hivenode: error:"), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def peer_row(peer_id: str, rtt_ms: float | None, memory: int, **extra: Any) -> dict[str, Any]:
    """A row as the daemon's /v1/peers returns it (agent/node_views.py: peers_view)."""
    return {
        "peer_id": peer_id,
        "addrs": ["/ip4/127.0.0.1/tcp/4001"],
        "roles": ["trainer"],
        "agent_version": "0.1",
        "hardware": {
            "cpu": {"logical_cores": 8, "affinity_cores": 4},
            "memory": {"total_bytes": memory, "available_bytes": memory // 2},
            "gpus": [],
        },
        "load": {},
        "rtt_ms": rtt_ms,
        "last_seen_s": 1.0,
        "expires_in_s": 60.0,
        **extra,
    }


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    nodes = tmp_path / "nodes.json"
    rows = [
        {**peer_row("me", None, 16 * GIB), "local": True},
        peer_row("p1", 8.0, 16 * GIB),
        peer_row("p2", 15.0, 16 * GIB, throughput=800.0),
        {**peer_row("viewer", 1.0, 64 * GIB), "roles": ["inference"]},
    ]
    nodes.write_text(json.dumps(rows))
    return {"job": job, "nodes": nodes, "state": tmp_path / "state"}


def test_plan_prints_json_from_a_peer_table_dump(files: dict[str, Path]) -> None:
    result = invoke(
        "plan",
        files["job"],
        "--nodes-json",
        files["nodes"],
        "--state-dir",
        files["state"],
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["state"]["index"] == [1, 1, 1, 0]  # 2M params, 50k samples, 3 trainers, <20 ms
    assert doc["latency_ms"] == 15.0
    assert {row["peer_id"] for row in doc["nodes"]} == {"me", "p1", "p2"}  # no inference node
    assert doc["chosen"] == "single_node"
    assert doc["breakdown"]["shards"][0]["peer_id"] == "p2"  # the one measured fastest
    assert set(doc["masked"]) == {"model_parallel", "pipeline_parallel"}


def test_plan_explains_itself_to_people(files: dict[str, Path]) -> None:
    result = invoke(
        "plan", files["job"], "--nodes-json", files["nodes"], "--state-dir", files["state"]
    )
    assert result.exit_code == 0, result.output
    assert "Q-values" in result.stdout and "masked: the job lists no layers" in result.stdout
    assert "p2" in result.stdout and "(guessed)" in result.stdout


def test_plan_without_a_daemon_fails_in_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("plan", files["job"], "--runtime-dir", tmp_path, "--state-dir", files["state"])
    one_line_error(result, 1, "daemon is not running")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name = [", "not valid TOML"),
        (JOB.replace("params = 2000000", "paramz = 1"), "[plan] takes only"),
        (JOB.replace("params = 2000000\n", ""), "add [plan] params"),
        (JOB.replace("rounds = 3", "rounds = 0"), "rounds"),
        (JOB.replace("samples = 50000\n", ""), "add [plan] samples"),
    ],
)
def test_bad_job_files_are_usage_errors(files: dict[str, Path], text: str, fragment: str) -> None:
    files["job"].write_text(text)
    result = invoke("plan", files["job"], "--nodes-json", files["nodes"])
    one_line_error(result, 2, fragment)


def test_a_malformed_node_row_is_a_usage_error(files: dict[str, Path]) -> None:
    files["nodes"].write_text(json.dumps([{"rtt_ms": 3.0}]))
    one_line_error(invoke("plan", files["job"], "--nodes-json", files["nodes"]), 2, "peer_id")
    files["nodes"].write_text('{"not": "a list"}')
    one_line_error(invoke("plan", files["job"], "--nodes-json", files["nodes"]), 2, "JSON list")


def test_samples_can_come_from_the_nodes_datasets(files: dict[str, Path]) -> None:
    files["job"].write_text(JOB.replace("samples = 50000\n", ""))
    rows = [
        peer_row("a", 5.0, GIB, datasets=[{"name": "digits", "samples": 700}]),
        peer_row("b", 5.0, GIB, datasets={"digits": 300}),
    ]
    files["nodes"].write_text(json.dumps(rows))
    result = invoke("plan", files["job"], "--nodes-json", files["nodes"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["job"]["samples"] == 1000


def test_a_zoo_model_is_counted_and_cut_into_layers(files: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    from hivenode.models.training.zoo import build_model

    job = JOB.replace('name = "mlp"', 'name = "cnn"').replace("params = 2000000\n", "")
    files["job"].write_text(job + "feature_shape = [8, 8]\nnum_classes = 10\n")
    result = invoke("plan", files["job"], "--nodes-json", files["nodes"], "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    model = build_model("cnn", {}, (8, 8), 10)
    assert doc["job"]["params"] == sum(p.numel() for p in model.parameters())
    assert doc["job"]["layers"] == len(list(model.get_submodule("features").children())) + 1
    assert isinstance(torch.zeros(1), torch.Tensor)


def test_import_show_and_export_a_legacy_table(files: dict[str, Path], tmp_path: Path) -> None:
    values = np.zeros((4, 3, 4, 3, 5))
    values[1, 2, 1, 0, 2] = 0.8
    values[1, 2, 1, 0, 4] = 0.1
    legacy = tmp_path / "q_table.pkl"
    legacy.write_bytes(pickle.dumps(values))
    imported = invoke("qtable", "import", legacy, "--state-dir", files["state"], "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["imported_cells"] == 2
    shown = json.loads(invoke("qtable", "show", "--state-dir", files["state"], "--json").stdout)
    assert shown["states"] == [
        {
            "state": [1, 2, 1, 0],
            "best": "pipeline_parallel",
            "q": {
                "data_parallel": 0.0,
                "model_parallel": 0.0,
                "pipeline_parallel": 0.8,
                "federated": 0.0,
                "single_node": 0.1,
            },
            "visits": {
                "data_parallel": 0,
                "model_parallel": 0,
                "pipeline_parallel": 1,
                "federated": 0,
                "single_node": 1,
            },
        }
    ]
    assert "1 visited states" in invoke("qtable", "show", "--state-dir", files["state"]).stdout
    export = tmp_path / "export.json"
    assert invoke("qtable", "export", export, "--state-dir", files["state"]).exit_code == 0
    other = tmp_path / "other"
    assert invoke("qtable", "import", export, "--state-dir", other).exit_code == 0
    again = json.loads(invoke("qtable", "show", "--state-dir", other, "--json").stdout)
    assert again["states"] == shown["states"]


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned-by-qtable-import",))


def test_importing_a_malicious_pickle_is_refused(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "q_table.pkl"
    evil.write_bytes(pickle.dumps(_Exploit()))
    result = invoke("qtable", "import", evil, "--state-dir", files["state"])
    one_line_error(result, 2, "refused")
    assert not (tmp_path / "pwned-by-qtable-import").exists()
    assert not (files["state"] / "qtable.json").exists()


def test_the_cli_module_imports_only_typer_and_the_stdlib() -> None:
    code = (
        "import sys, hivenode.cli_planner; "
        "print([m for m in ('numpy', 'pydantic', 'rich', 'torch', 'hivenode.planner') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plan_reads_the_running_daemons_own_view(files: dict[str, Path], daemons: Any) -> None:
    node = daemons.start("planner")
    result = invoke(
        "plan",
        files["job"],
        "--runtime-dir",
        node.runtime_dir,
        "--json",
        "--state-dir",
        files["state"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [row["peer_id"] for row in doc["nodes"]] == [node.peer_id]
    assert doc["nodes"][0]["local"] is True
    assert doc["nodes"][0]["capacity_bytes"] > 0  # from the daemon's hardware probe
    assert doc["chosen"] == "single_node"
