"""Federated jobs through real `hivenode run` daemons and the `hivenode jobs` CLI."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Daemons, run_cli, wait_for

from hivenode.sim.fl_datasets import federated_dataset, save_partition

JOB = """\
name = "{name}"
dataset = "digits"
rounds = {rounds}
clients_per_round = 3
deadline_s = 30

[model]
framework = "torch"
name = "logreg"

[train]
lr = 0.1
batch_size = 16
"""
FAST = {"HIVENODE_ADVERT_PERIOD": "2", "OMP_NUM_THREADS": "1"}


def add_digits(daemon: Daemon, part: Any) -> None:
    path = daemon.base / "digits.npz"
    save_partition(part, path)
    result = daemon.cli_offline(
        "data", "add", "digits", str(path), "--state-dir", str(daemon.state_dir)
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def three(daemons: Daemons) -> list[Daemon]:
    """An aggregator-and-trainer hub plus two trainers, each with a third of digits."""
    parts = federated_dataset("digits", 3, partition="iid", seed=1)
    hub = daemons.start("hub", env=FAST)
    nodes = [hub, daemons.start("t1", bootstrap=hub, env=FAST)]
    nodes.append(daemons.start("t2", bootstrap=hub, env=FAST))
    for node, part in zip(nodes, parts, strict=True):
        add_digits(node, part)
    return nodes


def submit(hub: Daemon, name: str, rounds: int) -> Any:
    job_file = hub.base / f"{name}.toml"
    job_file.write_text(JOB.format(name=name, rounds=rounds))
    return hub.cli_json("jobs", "submit", str(job_file))


def test_a_submitted_job_runs_to_the_end_on_three_daemons(three: list[Daemon]) -> None:
    hub = three[0]
    started = submit(hub, "digits", rounds=3)
    assert started["state"] == "running"
    job = json.loads(hub.cli("jobs", "watch", "digits", "--json", timeout=180).stdout)
    assert job["state"] == "finished", job["error"]
    history = job["history"]
    assert [r["round"] for r in history] == [1, 2, 3]
    assert all(r["participants"] == 3 for r in history)
    assert history[-1]["global_train_loss"] < history[0]["global_train_loss"]
    assert Path(job["model_path"]).exists()
    assert job["registered"] == "digits@1"
    versions = hub.cli_offline(
        "models", "versions", "digits", "--state-dir", str(hub.state_dir), "--json"
    )
    (version,) = json.loads(versions.stdout)
    assert version["metrics"]["rounds"] == 3
    (listed,) = hub.cli_json("jobs", "list")
    assert listed["name"] == "digits" and listed["round"] == 3
    assert listed["epsilon"] is None  # no DP, no privacy spent to report

    # the same job with central DP: the privacy it spent is in `jobs show`
    private = hub.base / "private.toml"
    dp = '\n[privacy]\ndp = "server-fixed"\nnoise_multiplier = 1.0\nclipping_norm = 1.0\n'
    private.write_text(JOB.format(name="private", rounds=2) + dp)
    assert hub.cli_json("jobs", "submit", str(private))["state"] == "running"
    done = json.loads(hub.cli("jobs", "watch", "private", "--json", timeout=180).stdout)
    assert done["state"] == "finished", done["error"]
    assert 0 < done["history"][0]["epsilon"] < done["history"][1]["epsilon"] == done["epsilon"]
    shown = hub.cli("jobs", "show", "private").stdout
    assert f"ε = {done['epsilon']:.3g} at δ = 1e-05" in shown


def test_a_killed_aggregator_resumes_the_job_where_it_stopped(
    daemons: Daemons, three: list[Daemon]
) -> None:
    hub = three[0]
    submit(hub, "resumable", rounds=8)
    wait_for(lambda: hub.api("/v1/jobs/resumable")["round"] >= 2, 120, what="two rounds")
    hub.signal(signal.SIGKILL)
    hub.wait_exit()
    restarted = daemons.restart(hub, bootstrap=three[1])
    job = json.loads(restarted.cli("jobs", "watch", "resumable", "--json", timeout=240).stdout)
    assert job["state"] == "finished", job["error"]
    assert job["resumed_from"] >= 2
    assert [r["round"] for r in job["history"]] == list(range(1, 9))


def test_bad_job_files_are_one_line_usage_errors(three: list[Daemon], tmp_path: Path) -> None:
    hub = three[0]
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = \n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('name = "x"\ndataset = "digits"\nrounds = 2\nroundz = 3\n')
    for path, needle in ((bad_toml, "not valid TOML"), (unknown, "roundz")):
        result = hub.cli("jobs", "submit", str(path))
        assert result.returncode == 2
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    missing = hub.cli("jobs", "show", "nope")
    assert missing.returncode == 1 and "no job named 'nope'" in missing.stderr
    assert run_cli("jobs", "list", "--runtime-dir", str(tmp_path), env=hub.env).returncode == 1


def test_an_unmodified_flower_app_runs_on_the_daemons_that_allowed_it(
    daemons: Daemons,
) -> None:
    from hivenode.models.flower_app import content_hash

    app_dir = Path(__file__).parent / "flower_apps" / "quickstart_sklearn"
    allowed = json.dumps([{"path": str(app_dir), "sha256": content_hash(app_dir)}])
    env = {**FAST, "HIVENODE_FLOWER_APPS": allowed}
    hub = daemons.start("hub", env=env)
    daemons.start("t1", bootstrap=hub, env=env)
    daemons.start("t2", bootstrap=hub, env=FAST)  # did not allow it: not a trainer of it
    result = hub.cli(
        "jobs", "submit", "--flower-app", str(app_dir), "--watch", "--json", timeout=180
    )
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "finished", job["error"]
    assert [r["round"] for r in job["history"]] == [1, 2, 3]
    assert all(r["participants"] == 2 for r in job["history"])
    assert job["history"][-1]["eval_accuracy"] > job["history"][0]["eval_accuracy"]


PARALLEL_JOB = """\
name = "{name}"
dataset = "digits"
rounds = {rounds}

[model]
framework = "torch"
name = "mlp"
options = {{ hidden = [32, 32] }}

[train]
lr = 0.2
batch_size = 32

[parallel]
mode = "{mode}"
momentum = 0.5
peer_timeout_s = {timeout}
"""


@pytest.fixture
def four(daemons: Daemons) -> list[Daemon]:
    """A coordinating hub plus three trainers, each with a third of digits."""
    parts = federated_dataset("digits", 3, partition="iid", seed=1)
    hub = daemons.start("hub", env=FAST)
    nodes = [hub] + [daemons.start(f"t{i}", bootstrap=hub, env=FAST) for i in range(3)]
    for node, part in zip(nodes[1:], parts, strict=True):
        add_digits(node, part)
    return nodes


def submit_parallel(hub: Daemon, name: str, mode: str, rounds: int, timeout: float) -> Any:
    """`timeout`: how long a member waits for a silent peer (the first step includes each
    daemon's torch import, seconds on a loaded machine)."""
    job_file = hub.base / f"{name}.toml"
    job_file.write_text(PARALLEL_JOB.format(name=name, mode=mode, rounds=rounds, timeout=timeout))
    return hub.cli_json("jobs", "submit", str(job_file))


def test_a_data_parallel_job_survives_a_killed_replica(four: list[Daemon]) -> None:
    hub, victim = four[0], four[3]
    submit_parallel(hub, "dp", "data", rounds=150, timeout=3)  # the kill is found in 3 s
    wait_for(lambda: hub.api("/v1/jobs/dp")["round"] >= 20, 120, what="20 steps")
    victim.signal(signal.SIGKILL)
    job = json.loads(hub.cli("jobs", "watch", "dp", "--json", timeout=240).stdout)
    assert job["state"] == "finished", job["error"]
    history = job["history"]
    assert [r["round"] for r in history] == list(range(1, 151))
    assert history[0]["participants"] == 3 and history[-1]["participants"] == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert job["strategy"] == "data-parallel" and job["registered"] == "dp@1"
    assert history[-1]["eval_accuracy"] > 0.6


def test_a_pipeline_job_runs_across_the_daemons(four: list[Daemon]) -> None:
    hub = four[0]
    submit_parallel(hub, "pp", "pipeline", rounds=30, timeout=60)
    job = json.loads(hub.cli("jobs", "watch", "pp", "--json", timeout=240).stdout)
    assert job["state"] == "finished", job["error"]
    losses = [r["train_loss"] for r in job["history"]]
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert Path(job["model_path"]).exists()
