"""For strategy tests: Flower's task identity, and the one part of a Grid configure_* uses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class NodeList:
    """A Grid's connected node ids, nothing else."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def as_grid(node_ids: list[int]) -> Grid:
    return cast(Grid, NodeList(node_ids))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's Message needs the process's task identity, as its runtimes set it (autouse in
    every module that imports it)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    yield
