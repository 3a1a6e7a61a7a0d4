"""Reads every file of a node's state directory the way the daemon would, and says what is
damaged: the check `durability.py` runs after each SIGKILL.

Everything is read through the product's own readers (`load_checkpoint`, `JobSpec`,
`QTable.load`, `Registry`, `DatasetCatalog`, the identity loader), plus what those readers
take on trust: SQLite's `PRAGMA integrity_check` and every blob's sha256 against its name.
A damaged file is a *problem*; a temp file a killed writer left beside its target is a
*stray* (the atomic rename never happened, so the target is intact), counted apart.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRAY_PATTERN = re.compile(r"^\..+\.tmp$")
"""`fsutil.atomic_write`'s `.<name>.<random>.tmp` and the blob store's `.incoming-*.tmp`."""


@dataclass
class StateReport:
    """What one pass over a state directory found."""

    checked: list[str] = field(default_factory=list)
    """Files read and found sound, relative to the state directory."""
    problems: list[str] = field(default_factory=list)
    """Files that exist but cannot be read back, or disagree with their own index."""
    strays: list[str] = field(default_factory=list)
    checkpoint_rounds: dict[str, int] = field(default_factory=dict)
    """Job name → the round its checkpoint holds (0: no round finished yet)."""
    job_states: dict[str, str] = field(default_factory=dict)
    registry_versions: dict[str, list[int]] = field(default_factory=dict)
    qtable_cells: int = 0
    qtable_origins: list[str] = field(default_factory=list)

    @property
    def corrupt(self) -> bool:
        return bool(self.problems)


def check_state(state_dir: Path, peer_id: str | None = None) -> StateReport:
    """Check every state file under `state_dir`; `peer_id`: the identity it must still hold."""
    report = StateReport()
    # strays first: opening the registry may tidy the blob store's old temp files
    report.strays = sorted(
        str(p.relative_to(state_dir)) for p in state_dir.rglob(".*.tmp") if p.is_file()
    )
    _check_identity(state_dir, peer_id, report)
    _check_datasets(state_dir, report)
    _check_qtable(state_dir, report)
    _check_registry(state_dir, report)
    for job_dir in sorted(p for p in (state_dir / "checkpoints").glob("*") if p.is_dir()):
        _check_job(job_dir, report)
    for state_file in sorted((state_dir / "jobs").glob("*/trainer-state.bin")):
        _check_trainer_state(state_dir, state_file, report)
    deployments = state_dir / "inference" / "deployments.json"
    if deployments.exists():
        _attempt(report, state_dir, deployments, lambda: _json_object(deployments))
    return report


def _attempt(report: StateReport, state_dir: Path, path: Path, read: Any) -> Any:
    """Run `read()`; record `path` as checked, or as a problem with the reason."""
    name = str(path.relative_to(state_dir))
    try:
        value = read()
    except Exception as exc:  # any failure to read back is the finding itself
        report.problems.append(f"{name}: {type(exc).__name__}: {exc}")
        return None
    report.checked.append(name)
    return value


def _json_object(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _check_identity(state_dir: Path, peer_id: str | None, report: StateReport) -> None:
    from hivenode.agent.identity import IDENTITY_FILE, load_or_create_identity, peer_id_of

    path = state_dir / IDENTITY_FILE
    if not path.exists():
        if peer_id is not None:  # the node had one: losing it is a new peer id
            report.problems.append(f"{IDENTITY_FILE}: missing")
        return

    def read() -> None:
        found = peer_id_of(load_or_create_identity(state_dir))
        if peer_id is not None and found != peer_id:
            raise ValueError(f"holds peer id {found}, the node had {peer_id}")

    _attempt(report, state_dir, path, read)


def _check_datasets(state_dir: Path, report: StateReport) -> None:
    from hivenode.models.datasets import CATALOG_NAME, DatasetCatalog

    path = state_dir / CATALOG_NAME
    if path.exists():
        _attempt(report, state_dir, path, DatasetCatalog(state_dir).entries)


def _check_qtable(state_dir: Path, report: StateReport) -> None:
    from hivenode.agent.qtable_gossip import verify_delta
    from hivenode.planner.qtable import QTABLE_FILE, QTable

    path = state_dir / QTABLE_FILE
    if not path.exists():
        return
    # verify_delta as the daemon loads it: the kept signed messages are checked again
    table = _attempt(report, state_dir, path, lambda: QTable.load(state_dir, verify=verify_delta))
    if table is not None:
        report.qtable_origins = table.swarm.origins()
        report.qtable_cells = sum(len(table.swarm.cells(o)) for o in report.qtable_origins)


def _check_registry(state_dir: Path, report: StateReport) -> None:
    from hivenode.models.blobs import SHA256_PATTERN, file_sha256
    from hivenode.models.registry import BLOBS_DIR, DATABASE_NAME, Registry

    database = state_dir / DATABASE_NAME
    blobs = state_dir / BLOBS_DIR
    for blob in sorted(blobs.glob("*")) if blobs.is_dir() else []:
        if blob.is_file() and SHA256_PATTERN.fullmatch(blob.name):
            # a blob is only ever renamed in under its hash: any other content is a torn write
            def same_hash(blob: Path = blob) -> None:
                if (actual := file_sha256(blob)) != blob.name:
                    raise ValueError(f"bytes hash to {actual}")

            _attempt(report, state_dir, blob, same_hash)
    if not database.exists():
        return

    def read_database() -> None:
        with closing(sqlite3.connect(database)) as db:
            (verdict,) = db.execute("PRAGMA integrity_check").fetchone()
            if verdict != "ok":
                raise ValueError(f"integrity_check: {verdict}")
            rows = db.execute("SELECT name, version, sha256 FROM versions").fetchall()
            last = dict(db.execute("SELECT name, last_version FROM names").fetchall())
        for name, version, sha in rows:
            if not (blobs / sha).is_file():
                raise ValueError(f"{name}@{version} names blob {sha}, which is missing")
            if version > last.get(name, 0):
                raise ValueError(f"{name}@{version} is past names.last_version")
            report.registry_versions.setdefault(name, []).append(int(version))
        with Registry(state_dir) as registry:  # and the product's own reader
            registry.list()

    _attempt(report, state_dir, database, read_database)
    for versions in report.registry_versions.values():
        versions.sort()


def _check_job(job_dir: Path, report: StateReport) -> None:
    from safetensors.numpy import load_file

    from hivenode.aggregator.checkpoint import CHECKPOINT_FILE, load_checkpoint
    from hivenode.aggregator.job_spec import JobSpec

    state_dir = job_dir.parent.parent
    spec: JobSpec | None = None
    job_file = job_dir / "job.json"
    if job_file.exists():

        def read_job() -> JobSpec:
            raw = _json_object(job_file)
            report.job_states[job_dir.name] = str(raw.get("state"))
            return JobSpec.model_validate(raw["spec"])

        spec = _attempt(report, state_dir, job_file, read_job)
    index = job_dir / CHECKPOINT_FILE
    if index.exists():

        def read_checkpoint() -> int:
            checkpoint = load_checkpoint(job_dir)
            assert checkpoint is not None
            rounds = [int(r["round"]) for r in checkpoint.history]
            if rounds != list(range(1, checkpoint.round + 1)):
                raise ValueError(f"round {checkpoint.round} with history rounds {rounds}")
            if spec is not None and checkpoint.round > spec.rounds:
                raise ValueError(f"round {checkpoint.round} of a {spec.rounds}-round job")
            for kept in (checkpoint.arrays, checkpoint.control or {}):
                for key, array in kept.items():
                    if array.size and not math.isfinite(float(array.sum())):
                        raise ValueError(f"array {key} is not finite")
            return checkpoint.round

        found = _attempt(report, state_dir, index, read_checkpoint)
        report.checkpoint_rounds[job_dir.name] = int(found or 0)
    elif job_file.exists():
        report.checkpoint_rounds[job_dir.name] = 0
    model = job_dir / "model.safetensors"
    if model.exists():
        _attempt(report, state_dir, model, lambda: load_file(str(model)))
    result = job_dir / "result.json"
    if result.exists():
        _attempt(report, state_dir, result, lambda: _json_object(result))


def _check_trainer_state(state_dir: Path, path: Path, report: StateReport) -> None:
    from hivenode.protocol.limits import DEFAULT_LIMITS
    from hivenode.protocol.message import decode_message

    _attempt(report, state_dir, path, lambda: decode_message(path.read_bytes(), DEFAULT_LIMITS))
