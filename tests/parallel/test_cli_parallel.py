"""`hivenode sim parallel` (mounted here as the lead mounts it: `sim parallel`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from hivenode.cli_parallel import sim_parallel

REQUIRED = {"mode", "nodes", "samples_per_s", "single_node_samples_per_s", "max_param_diff"}


def _app() -> typer.Typer:
    app = typer.Typer()
    sim = typer.Typer()
    app.add_typer(sim, name="sim")
    sim.command("parallel")(sim_parallel)
    return app


@pytest.mark.parametrize(
    ("mode", "nodes"), [("data", 2), ("pipeline", 3), ("model", 2)], ids=lambda v: str(v)
)
def test_sim_parallel_reports_throughput_traffic_and_equivalence(mode: str, nodes: int) -> None:
    args = ["sim", "parallel", "--mode", mode, "--nodes", str(nodes), "--steps", "6", "--json"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= REQUIRED
    assert report["mode"] == mode and report["nodes"] == nodes
    assert report["samples_per_s"] > 0 and report["single_node_samples_per_s"] > 0
    assert report["equivalent"] is True and report["max_param_diff"] <= 1e-5
    assert report["bytes_per_step"] > 0


def test_sim_parallel_refuses_bad_options_with_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(_app(), ["sim", "parallel", "--mode", "tensor"])
    assert result.exit_code == 2
    assert "mode must be one of data, pipeline, model" in result.output
    result = CliRunner().invoke(
        _app(), ["sim", "parallel", "--mode", "pipeline", "--fault", "hang"]
    )
    assert result.exit_code == 2


def test_the_command_module_imports_no_framework() -> None:
    code = (
        "import sys, hivenode.cli_parallel; "
        "print(sorted(m for m in ('torch', 'libp2p', 'trio', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
