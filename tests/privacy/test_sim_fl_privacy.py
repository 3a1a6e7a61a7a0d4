"""`hivenode sim fl` with privacy: ε in its report, refused combinations in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def test_sim_fl_refuses_secure_aggregation_with_krum_in_one_line(
    cli: Callable[..., Any],
) -> None:
    done = cli("sim", "fl", "--strategy", "krum", "--secagg")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "hivenode: error: krum secagg: Value error, privacy: secure aggregation needs a mean"
        " of the updates (fedavg, fedprox); krum needs each update"
    ]


def test_sim_fl_reports_epsilon_per_noise_level(cli: Callable[..., Any]) -> None:
    done = cli(
        *("sim", "fl", "--nodes", "3", "--clients-per-round", "3", "--rounds", "2"),
        *("--model", "logreg", "--dp", "server-fixed", "--dp-noise", "1,4", "--json"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["strategies"]
    assert list(runs) == ["fedavg dp z=1", "fedavg dp z=4"]
    low, high = runs["fedavg dp z=1"], runs["fedavg dp z=4"]
    assert low["delta"] == high["delta"] == 1e-5
    assert low["epsilon"] > high["epsilon"] > 0
    assert low["final_accuracy"] is not None
