"""`hivenode sim swarm`: real nodes on 127.0.0.1 converge, and the report says so honestly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hivenode.sim.swarm import run_swarm


def test_in_process_swarm_converges_and_reports_its_figures() -> None:
    report = run_swarm(nodes=6, processes=False, seed=1, timeout=60, progress=False)
    assert report.converged
    assert report.convergence_s is not None and report.convergence_s > 0
    assert report.adverts_received >= 6 * 5  # each node learned each other at least once
    assert report.rss_mb_total > 0


def test_cli_prints_the_json_keys_scripts_rely_on() -> None:
    hivenode = Path(sys.executable).parent / "hivenode"
    result = subprocess.run(
        [str(hivenode), "sim", "swarm", "--nodes", "3", "--processes", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["nodes"] == 3
    assert report["converged"] is True
    assert report["convergence_s"] > 0
    assert report["rss_mb_total"] > 3 * 30  # three interpreters with libp2p loaded
    assert report["mode"] == "one process per node"
