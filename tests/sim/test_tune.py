"""`hivenode tune`: the job file's [tune] table, the configurations drawn, and a tiny
successive halving on digits over real in-process nodes, mounted as cli.py mounts it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hivenode.cli_learn import tune_command
from hivenode.sim.tune import TuneError, TuneSpace, draw_configs, read_job

app = typer.Typer()
app.command("tune")(tune_command)
app.command("noop")(lambda: None)  # two commands keep "tune" a subcommand, as in cli.py

JOB = """
name = "digits-mlp"
dataset = "digits-on-the-swarm"
rounds = 20
clients_per_round = 3
seed = 0

[model]
framework = "torch"
name = "mlp"

[strategy]
name = "fedprox"
mu = 0.01

[train]
batch_size = 10
"""
TUNE = """
[tune]
dataset = "digits"
partition = "iid"
nodes = 3
lr = [0.05, 0.3]
"""


def job_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_a_job_without_a_tune_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TuneError, match=r"\[tune\]"):
        read_job(job_file(tmp_path, JOB))
    result = CliRunner().invoke(app, ["tune", str(job_file(tmp_path, JOB))])
    assert result.exit_code == 2
    assert result.stderr.startswith("hivenode: error:") and "Traceback" not in result.output


def test_unknown_tune_keys_and_bad_ranges_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TuneError, match="takes only"):
        read_job(job_file(tmp_path, JOB + TUNE + "rounds = 3\n"))
    with pytest.raises(TuneError, match="lr"):
        read_job(job_file(tmp_path, JOB + TUNE.replace("[0.05, 0.3]", "[0.3, 0.05]")))


def test_configs_are_distinct_in_the_space_and_follow_the_seed() -> None:
    space = TuneSpace(dataset="digits", lr=(0.01, 0.1), local_epochs=(1, 2), mu=(0.0, 0.1))
    configs = draw_configs(space, 6, seed=3, search_mu=True, default_mu=0.0)
    assert len(set(configs)) == 6
    assert all(0.01 <= c.lr <= 0.1 and c.local_epochs in (1, 2) for c in configs)
    assert {c.mu for c in configs} <= {0.0, 0.1}
    assert draw_configs(space, 6, seed=3, search_mu=True, default_mu=0.0) == configs
    fixed = draw_configs(space, 4, seed=3, search_mu=False, default_mu=0.5)
    assert {c.mu for c in fixed} == {0.5}


def test_a_space_smaller_than_the_budget_gives_each_point_once() -> None:
    space = TuneSpace(dataset="digits", lr=(0.1, 0.1), local_epochs=(1,), mu=(0.0, 0.1))
    assert len(draw_configs(space, 9, seed=0, search_mu=True, default_mu=0.0)) == 2


def test_halving_keeps_the_better_config_and_reports_it_as_best(tmp_path: Path) -> None:
    path = job_file(tmp_path, JOB + TUNE)
    args = ["tune", str(path), "--budget", "2", "--min-rounds", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    trials, best = report["trials"], report["best"]
    first = [t for t in trials if t["rung"] == 0]
    last = [t for t in trials if t["rung"] == max(t["rung"] for t in trials)]
    assert [t["rounds"] for t in trials] == [1, 1, 2]
    assert best in trials and best == last[0]
    # the promoted config is the first rung's most accurate one
    top = max(first, key=lambda t: (t["accuracy"], -t["loss"]))
    assert (best["lr"], best["local_epochs"], best["mu"]) == (
        top["lr"],
        top["local_epochs"],
        top["mu"],
    )
    assert all(math.isfinite(t["loss"]) and 0 <= t["accuracy"] <= 1 for t in trials)
