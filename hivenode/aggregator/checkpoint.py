"""A job's checkpoint after every round: global arrays, strategy state, round and history.

Layout under the job's directory::

    rounds/round-000012/arrays.safetensors   global model after round 12
    rounds/round-000012/control.safetensors  SCAFFOLD's server control variate c (if any)
    checkpoint.json                          {"round": 12, "history": [...]}

Each file is written atomically, and `checkpoint.json` — the only thing `load_checkpoint`
trusts — is replaced last, so a crash at any point leaves the previous round readable.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from hivenode.fsutil import atomic_write

NDArray = np.ndarray[Any, Any]
CHECKPOINT_FILE = "checkpoint.json"


class CheckpointError(Exception):
    """A checkpoint that exists but cannot be read back."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, NDArray]
    control: dict[str, NDArray] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    trainers: list[str] = field(default_factory=list)
    """The job's trainers in partition order: a resumed job waits for the same ones."""


def save_checkpoint(job_dir: Path, checkpoint: Checkpoint) -> None:
    round_dir = _round_dir(job_dir, checkpoint.round)
    atomic_write(round_dir / "arrays.safetensors", _tensors(checkpoint.arrays))
    if checkpoint.control is not None:
        atomic_write(round_dir / "control.safetensors", _tensors(checkpoint.control))
    # safetensors sorts its keys; the model's own order (a state_dict's) is kept here
    index = {
        "round": checkpoint.round,
        "keys": list(checkpoint.arrays),
        "history": checkpoint.history,
        "trainers": checkpoint.trainers,
    }
    atomic_write(job_dir / CHECKPOINT_FILE, json.dumps(index).encode())
    for old in (job_dir / "rounds").glob("round-*"):
        if old != round_dir:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(job_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint, or None when the job never finished a round."""
    index_path = job_dir / CHECKPOINT_FILE
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        round_dir = _round_dir(job_dir, int(index["round"]))
        keys = [str(k) for k in index["keys"]]
        arrays = _ordered(load_safetensors((round_dir / "arrays.safetensors").read_bytes()), keys)
        control_path = round_dir / "control.safetensors"
        control = (
            _ordered(load_safetensors(control_path.read_bytes()), keys)
            if control_path.exists()
            else None
        )
        trainers = [str(p) for p in index.get("trainers", [])]  # absent: written before 0.x
        return Checkpoint(int(index["round"]), arrays, control, list(index["history"]), trainers)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint in {job_dir} is unreadable: {exc}") from exc


def _ordered(arrays: dict[str, NDArray], keys: list[str]) -> dict[str, NDArray]:
    return {key: arrays[key] for key in keys}


def _round_dir(job_dir: Path, round_number: int) -> Path:
    return job_dir / "rounds" / f"round-{round_number:06d}"


def _tensors(arrays: dict[str, NDArray]) -> bytes:
    data: bytes = save_safetensors({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return data
