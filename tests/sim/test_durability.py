"""Durability (issue 9): a daemon SIGKILLed while it writes leaves state that loads, and
its job resumes; the check that says so names every damaged file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from safetensors.numpy import save_file

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
LOOP_TIMEOUT = 280.0
"""The loop below takes about a minute on 2 idle cores; a shared machine may triple that."""


def state_check() -> ModuleType:
    """benchmarks/_state_check.py (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("_state_check", BENCHMARKS / "_state_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_state(state_dir: Path) -> str:
    """A state directory holding one of every file the daemon keeps; its peer id."""
    from hivenode.agent.identity import load_or_create_identity, peer_id_of
    from hivenode.aggregator.checkpoint import Checkpoint, save_checkpoint
    from hivenode.aggregator.job_spec import JobSpec
    from hivenode.fsutil import atomic_write
    from hivenode.models.datasets import DatasetCatalog
    from hivenode.models.identify import identify
    from hivenode.models.registry import Registry
    from hivenode.planner.qtable import QTable
    from hivenode.protocol.message import Message, encode_message

    peer_id = peer_id_of(load_or_create_identity(state_dir))
    DatasetCatalog(state_dir).add("digits", "sklearn:digits")
    table = QTable(peer_id)
    table.swarm.set_own((0, 0, 0, 0, 0), 1, 0.5, time.time())
    table.save(state_dir)
    weights = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}
    model = state_dir.parent / "model.safetensors"
    save_file(weights, str(model))
    with Registry(state_dir) as registry:
        registry.add(model, "digits", identify(model))
    job_dir = state_dir / "checkpoints" / "digits"
    spec = JobSpec.model_validate({"name": "digits", "dataset": "digits", "rounds": 3})
    state = {"spec": spec.model_dump(mode="json"), "state": "running"}
    atomic_write(job_dir / "job.json", json.dumps(state).encode())
    history = [{"round": r} for r in (1, 2)]
    save_checkpoint(job_dir, Checkpoint(2, weights, dict(weights), history))
    save_file(weights, str(job_dir / "model.safetensors"))
    trainer_state = Message("trainer-state", 0, "", {"records": {}}, (weights["w"],))
    blob = b"".join(bytes(part) for part in encode_message(trainer_state))
    atomic_write(state_dir / "jobs" / "digits" / "trainer-state.bin", blob)
    return peer_id


def test_the_state_check_names_every_file_a_torn_write_would_damage(tmp_path: Path) -> None:
    check = state_check()
    state_dir = tmp_path / "state"
    peer_id = make_state(state_dir)
    sound = check.check_state(state_dir, peer_id)
    assert sound.problems == []
    assert sound.checkpoint_rounds == {"digits": 2}
    files = [
        "identity.key",
        "datasets.json",
        "qtable.json",
        "registry.sqlite",
        "checkpoints/digits/job.json",
        "checkpoints/digits/checkpoint.json",
        "checkpoints/digits/model.safetensors",
        "jobs/digits/trainer-state.bin",
    ]
    blobs = [f"blobs/{p.name}" for p in (state_dir / "blobs").glob("*") if p.is_file()]
    assert len(blobs) == 1
    assert set(files + blobs) <= set(sound.checked)
    arrays = "checkpoints/digits/rounds/round-000002/arrays.safetensors"
    for name in [*files, *blobs, arrays]:
        path = state_dir / name
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])  # what a non-atomic write leaves mid-way
        try:
            problems = check.check_state(state_dir, peer_id).problems
        finally:
            path.write_bytes(whole)
        # a torn round file surfaces through the checkpoint index that names it
        named = "checkpoints/digits/checkpoint.json" if name == arrays else name
        assert any(p.startswith(named) for p in problems), (name, problems)
    assert check.check_state(state_dir, "12D3KooWsomeoneelse").problems != []


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and ext4-style renames: Linux")
def test_sigkilled_aggregator_leaves_readable_state_and_resumes_its_job() -> None:
    loop = [str(BENCHMARKS / "durability.py"), "--json", "--kills", "2", "--rounds", "4"]
    result = subprocess.run(
        [sys.executable, *loop, "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=LOOP_TIMEOUT,
        check=False,
    )
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["kills"] == 2
    assert report["corrupt"] == 0, report["problems"]
    assert report["round_regressions"] == 0, report["per_kill"]
    assert report["checked_files"] >= 2 * 10  # identity, catalog, registry, blobs, a job...
    assert report["resume_expected"] >= 1, report["per_kill"]
    assert report["resumed"] == report["resume_expected"], report["per_kill"]
    assert result.returncode == 0, result.stderr[-3000:]
