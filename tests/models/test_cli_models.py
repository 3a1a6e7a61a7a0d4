"""`hivenode models ...`: identify, analyze (with real daemons for host fit) and the registry."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner, Result

from hivenode.agent.control_client import ControlError, call
from hivenode.cli_models import models_app
from hivenode.sim.environment import isolated_environment

HIVENODE = Path(sys.executable).parent / "hivenode"
READY_TIMEOUT = 30.0
MLP_PARAMETERS = 10 * 20 + 20 + 20 * 5 + 5


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(models_app, [str(a) for a in args], env={"COLUMNS": "120"})


def invoke_json(*args: str | Path) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hivenode: error:")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def weights_file(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    save_file(
        {
            "fc1.weight": rng.standard_normal((20, 10)).astype(np.float32),
            "fc1.bias": np.zeros(20, np.float32),
            "fc2.weight": rng.standard_normal((5, 20)).astype(np.float32),
            "fc2.bias": np.zeros(5, np.float32),
        },
        str(path),
    )
    return path


def torch_state_dict(path: Path) -> Path:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    torch.save(model.state_dict(), path)
    return path


# --- identify ----------------------------------------------------------------------------


def test_identify_json_reports_the_contract_keys(tmp_path: Path) -> None:
    source = weights_file(tmp_path / "mlp.safetensors")

    info = invoke_json("identify", source)

    assert info["parameters"] == MLP_PARAMETERS
    assert info["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert info["size_bytes"] == source.stat().st_size
    assert info["safe"] is True
    for key in ("framework", "family", "subtype", "architecture", "input_shape", "dtypes"):
        assert key in info


def test_identify_shows_a_table_to_a_person(tmp_path: Path) -> None:
    result = invoke("identify", weights_file(tmp_path / "mlp.safetensors"))

    assert result.exit_code == 0, result.output
    assert "parameters" in result.stdout and f"{MLP_PARAMETERS:,}" in result.stdout


@pytest.mark.parametrize(
    ("name", "content"), [("missing.pt", None), ("garbage.safetensors", b"\x00garbage")]
)
def test_identify_bad_input_is_one_line_and_exit_1(
    tmp_path: Path, name: str, content: bytes | None
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)

    assert_one_line_error(invoke("identify", path), 1, name)


# --- analyze -----------------------------------------------------------------------------


def test_analyze_without_a_daemon_prints_the_analysis_and_says_so(tmp_path: Path) -> None:
    source = torch_state_dict(tmp_path / "mlp.pt")
    no_daemon = tmp_path / "run"

    printed = invoke_json(
        "analyze", source, "--dataset-size", "1000", "--throughput", "50",
        "--runtime-dir", no_daemon,
    )  # fmt: skip
    human = invoke("analyze", source, "--runtime-dir", no_daemon)

    analysis = printed["analysis"]
    assert printed["model"]["parameters"] == MLP_PARAMETERS
    assert analysis["complexity"] == "small"
    assert analysis["training"]["weights_bytes"] == MLP_PARAMETERS * 4
    assert analysis["training"]["optimizer_bytes"] == 2 * MLP_PARAMETERS * 4
    assert analysis["epoch_seconds"] == 20.0
    assert printed["hosts"] is None
    assert printed["hosts_note"] == "no daemon running: peer fit not shown"
    assert human.exit_code == 0, human.output
    assert "no daemon running: peer fit not shown" in human.stdout
    assert "training" in human.stdout and "CPU cores" in human.stdout


def test_analyze_refuses_an_unknown_optimizer_as_a_usage_error(tmp_path: Path) -> None:
    result = invoke("analyze", tmp_path / "any.pt", "--optimizer", "lbfgs")

    assert_one_line_error(result, 2, "lbfgs", "adam")


class Node:
    """One real `hivenode run` on 127.0.0.1 with its own state and runtime directories."""

    def __init__(self, base: Path, bootstrap: str | None = None) -> None:
        self.runtime_dir = base / "run"
        env = isolated_environment()
        for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
            (base / name.lower()).mkdir(parents=True, exist_ok=True)
            env[name] = str(base / name.lower())
        args = [str(HIVENODE), "run", "--state-dir", str(base / "state")]
        args += ["--runtime-dir", str(self.runtime_dir), "--listen", "/ip4/127.0.0.1/tcp/0"]
        args += ["--no-metrics", *(["--bootstrap", bootstrap] if bootstrap else [])]
        self.log = (base / "daemon.log").open("wb")
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.status = self._wait_ready()

    def api(self, path: str) -> Any:
        return call(self.runtime_dir / "control.sock", "GET", path, timeout=10.0)

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "hivenode run exited early"
            try:
                return dict(self.api("/v1/status"))
            except ControlError:
                time.sleep(0.1)
        raise AssertionError("hivenode run did not answer in time")

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    """Node A, and node B which joined through A; yielded once A lists B as a peer."""
    base = tmp_path_factory.mktemp("nodes")
    started: list[Node] = []
    try:
        a = Node(base / "a")
        started.append(a)
        b = Node(base / "b", bootstrap=a.status["addrs"][0])
        started.append(b)
        deadline = time.monotonic() + READY_TIMEOUT
        while b.status["peer_id"] not in {p["peer_id"] for p in a.api("/v1/peers")}:
            assert time.monotonic() < deadline, "A never listed B as a peer"
            time.sleep(0.2)
        yield a, b
    finally:
        for node in started:
            node.close()


def test_analyze_lists_which_nodes_can_host_the_model(
    tmp_path: Path, two_nodes: tuple[Node, Node]
) -> None:
    a, b = two_nodes
    source = torch_state_dict(tmp_path / "mlp.pt")

    printed = invoke_json("analyze", source, "--runtime-dir", a.runtime_dir)
    human = invoke("analyze", source, "--runtime-dir", a.runtime_dir)

    hosts = printed["hosts"]
    assert [(h["peer_id"], h["self"]) for h in hosts] == [
        (a.status["peer_id"], True),
        (b.status["peer_id"], False),
    ]
    for host in hosts:  # a tiny torch model on machines with torch and GiBs of RAM
        for purpose in ("inference", "training"):
            assert host[purpose]["fits"] is True, host
            assert f"needed for {purpose}" in host[purpose]["reason"]
    assert human.exit_code == 0, human.output
    assert "which nodes can host it" in human.stdout and "(this node)" in human.stdout


# --- registry ----------------------------------------------------------------------------


def test_add_list_show_versions_export_rm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = weights_file(tmp_path / "v1.safetensors", seed=1)
    second = weights_file(tmp_path / "v2.safetensors", seed=2)

    added = invoke_json("add", first, "--name", "mlp", "--state-dir", state)
    again = invoke_json("add", first, "--name", "mlp", "--state-dir", state)
    newer = invoke_json("add", second, "--name", "mlp", "--parent", "mlp@1", "--state-dir", state)

    assert (added["version"], added["added"]) == (1, True)
    assert (again["version"], again["added"]) == (1, False)
    assert (newer["version"], newer["parent"]) == (2, "mlp@1")
    assert added["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert added["info"]["parameters"] == MLP_PARAMETERS

    listed = invoke_json("list", "--state-dir", state)
    assert [(m["name"], m["version"]) for m in listed] == [("mlp", 2)]
    shown = invoke_json("show", "mlp", "--state-dir", state)
    assert (shown["version"], shown["lineage"]) == (2, ["mlp@1"])
    versions = invoke_json("versions", "mlp", "--state-dir", state)
    assert [v["version"] for v in versions] == [1, 2]

    exported = invoke_json("export", "mlp@1", tmp_path / "out.safetensors", "--state-dir", state)
    assert (tmp_path / "out.safetensors").read_bytes() == first.read_bytes()
    assert exported["sha256"] == added["sha256"]

    removed = invoke_json("rm", "mlp@1", "--state-dir", state)
    assert removed == [{"model": "mlp@1", "sha256": added["sha256"]}]
    assert not (state / "blobs" / added["sha256"]).exists()
    assert [v["version"] for v in invoke_json("versions", "mlp", "--state-dir", state)] == [2]


def test_registry_commands_speak_to_a_person(tmp_path: Path) -> None:
    state = tmp_path / "state"
    source = weights_file(tmp_path / "m.safetensors")

    added = invoke("add", source, "--name", "mlp", "--state-dir", state)
    again = invoke("add", source, "--name", "mlp", "--state-dir", state)
    listed = invoke("list", "--state-dir", state)
    shown = invoke("show", "mlp@1", "--state-dir", state)
    removed = invoke("rm", "mlp", "--state-dir", state)
    empty = invoke("list", "--state-dir", state)

    assert added.stdout.startswith("added mlp@1 (")
    assert "already holds these bytes" in again.stdout
    assert "mlp@1" in listed.stdout
    assert "lineage" in shown.stdout and "parameters" in shown.stdout
    assert removed.stdout.strip() == "removed mlp@1"
    assert "the registry is empty" in empty.stdout


def test_registry_errors_are_one_line_with_the_right_exit_code(tmp_path: Path) -> None:
    state = tmp_path / "state"
    source = weights_file(tmp_path / "m.safetensors")
    invoke_json("add", source, "--name", "mlp", "--state-dir", state)
    taken = tmp_path / "taken"
    taken.write_bytes(b"keep me")

    assert_one_line_error(invoke("show", "nope", "--state-dir", state), 1, "no model named")
    assert_one_line_error(invoke("show", "mlp@9", "--state-dir", state), 1, "no version 9")
    assert_one_line_error(invoke("show", "mlp@x", "--state-dir", state), 2, "NAME@VERSION")
    assert_one_line_error(invoke("rm", "nope", "--state-dir", state), 1, "no model named")
    assert_one_line_error(
        invoke("export", "mlp@1", taken, "--state-dir", state), 1, "already exists"
    )
    assert_one_line_error(
        invoke("add", source, "--name", "bad name", "--state-dir", state), 2, "invalid model name"
    )
    assert_one_line_error(
        invoke("add", tmp_path / "gone.pt", "--name", "x", "--state-dir", state), 1, "gone.pt"
    )
    assert taken.read_bytes() == b"keep me"


class _RunsACommand:
    """Unpickling this would run `touch <marker>`; pickling it runs nothing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_an_unsafe_pickle_is_not_added_and_nothing_runs(tmp_path: Path) -> None:
    state, marker = tmp_path / "state", tmp_path / "pwned"
    malicious = tmp_path / "model.pkl"
    malicious.write_bytes(pickle.dumps(_RunsACommand(marker)))

    result = invoke("add", malicious, "--name", "evil", "--state-dir", state)

    assert_one_line_error(result, 1, "unsafe", "system")
    assert not marker.exists()
    assert invoke_json("list", "--state-dir", state) == []


def test_importing_the_commands_loads_nothing_heavy() -> None:
    code = (
        "import sys, hivenode.cli_models; "
        "print([m for m in ('pydantic', 'sqlite3', 'torch', 'numpy', 'rich') if m in sys.modules])"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
