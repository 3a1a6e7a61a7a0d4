"""`hivenode jobs ...`: submit federated jobs to the local daemon and follow them.

Thin like `cli.py`: reads the job file, asks the daemon, prints. typer and the stdlib only
at import time.
"""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from hivenode.cli_common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    ConfigOpt,
    JsonOpt,
    RuntimeDirOpt,
    ask_daemon,
    console,
    emit_json,
    fail,
)

jobs_app = typer.Typer(
    help="Federated jobs this node aggregates: submit, list, show, watch.",
    no_args_is_help=True,
    add_completion=False,
)
WATCH_PERIOD = 1.0
DONE = ("finished", "failed")


@jobs_app.command("submit")
def submit(
    job_file: Annotated[Path | None, typer.Argument(help="the job, as TOML")] = None,
    flower_app: Annotated[
        Path | None,
        typer.Option("--flower-app", help="run this Flower app directory unchanged instead"),
    ] = None,
    run_config: Annotated[
        str, typer.Option("--run-config", help="the app's run-config overrides: 'k=v k2=v2'")
    ] = "",
    name: Annotated[str | None, typer.Option("--name", help="job name (a Flower app's)")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow it until it ends.")] = False,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start the job in JOB_FILE (TOML: name, dataset, rounds, [model], [strategy], [train]),
    or the Flower app in --flower-app DIR on the trainers that allowed it."""
    if (job_file is None) == (flower_app is None):
        fail("give either a job file or --flower-app DIR", EXIT_USAGE)
    spec = _job_file(job_file) if job_file else _flower_job(flower_app, run_config, name)
    summary = ask_daemon(config, runtime_dir, "/v1/jobs", "POST", spec)
    if watch:
        _watch(config, runtime_dir, summary["name"], as_json)
    elif as_json:
        emit_json(summary)
    else:
        typer.echo(f"job {summary['name']} started: `hivenode jobs watch {summary['name']}`")


def _job_file(path: Path) -> Any:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE)
    except tomllib.TOMLDecodeError as exc:
        fail(f"{path} is not valid TOML: {exc}", EXIT_USAGE)


def _flower_job(app_dir: Path | None, run_config: str, name: str | None) -> dict[str, Any]:
    """The job body of a Flower app: its directory (the daemon reads it) and its rounds."""
    from hivenode.models.flower_app import FlowerAppError, parse_run_config, read_flower_app

    assert app_dir is not None
    try:
        app = read_flower_app(app_dir)
        values = parse_run_config(run_config, app.config_defaults)
    except FlowerAppError as exc:
        fail(str(exc), EXIT_USAGE)
    rounds = values.get("num-server-rounds", 1)
    return {
        "name": name or re.sub(r"[^A-Za-z0-9._-]", "-", app.name)[:64],
        "flower_app": str(app.root.resolve()),
        "run_config": run_config,
        "rounds": rounds if isinstance(rounds, int) and rounds > 0 else 1,
    }


@jobs_app.command("list")
def list_jobs(
    config: ConfigOpt = None, runtime_dir: RuntimeDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Every job this node has run or runs, oldest first."""
    jobs = ask_daemon(config, runtime_dir, "/v1/jobs")
    if as_json:
        emit_json(jobs)
        return
    from rich.table import Table

    table = Table()
    for column in ("job", "state", "strategy", "round", "loss", "accuracy", "trainers"):
        table.add_column(column)
    for job in jobs:
        table.add_row(
            job["name"],
            job["state"] + (f": {job['error']}" if job["error"] else ""),
            job["strategy"],
            f"{job['round']}/{job['rounds']}",
            _number(job["loss"]),
            _number(job["accuracy"]),
            str(job["participants"]),
        )
    console().print(table)


@jobs_app.command("show")
def show(
    name: str, config: ConfigOpt = None, runtime_dir: RuntimeDirOpt = None, as_json: JsonOpt = False
) -> None:
    """One job: its spec, its state and every round's metrics."""
    job = ask_daemon(config, runtime_dir, f"/v1/jobs/{name}")
    if as_json:
        emit_json(job)
        return
    from rich.table import Table

    out = console()
    out.print(
        f"[bold]{job['name']}[/bold]: {job['state']} ({job['strategy']}, "
        f"round {job['round']}/{job['rounds']})"
    )
    if job["error"]:
        out.print(f"[red]error:[/red] {job['error']}")
    if job.get("epsilon") is not None:
        delta = job["spec"]["privacy"]["delta"]
        out.print(
            f"privacy spent: ε = {job['epsilon']:.3g} at δ = {delta:g} (Rényi DP, an upper bound)"
        )
    if job.get("took_over"):
        took = job["took_over"]
        out.print(
            f"taken over from {took['from']} at round {took['at_round']}"
            f" ({_number(took['recovery_s'])} s without an aggregator)"
        )
    table = Table()
    for column in (
        "round",
        "train loss",
        "eval loss",
        "accuracy",
        "trainers",
        "stragglers",
        "failures",
        "MB out",
        "MB in",
        "seconds",
    ):
        table.add_column(column, justify="right")
    for r in job["history"]:
        table.add_row(
            str(r["round"]),
            _number(r["global_train_loss"] or r["train_loss"]),
            _number(r["eval_loss"]),
            _number(r["eval_accuracy"]),
            str(r["participants"]),
            str(r["stragglers"]),
            str(r["failures"]),
            f"{r['bytes_out'] / 1e6:.2f}",
            f"{r['bytes_in'] / 1e6:.2f}",
            f"{r['duration_s']:.2f}",
        )
    out.print(table)
    if job["model_path"]:
        registered = f" (registry: {job['registered']})" if job.get("registered") else ""
        out.print(f"model: {job['model_path']}{registered}")


@jobs_app.command("watch")
def watch(
    name: str, config: ConfigOpt = None, runtime_dir: RuntimeDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Follow a job: round x/N, loss, accuracy, trainers and the time left, until it ends."""
    _watch(config, runtime_dir, name, as_json)


def _watch(config: Path | None, runtime_dir: Path | None, name: str, as_json: bool) -> None:
    job = ask_daemon(config, runtime_dir, f"/v1/jobs/{name}")
    if as_json:
        while job["state"] not in DONE:
            time.sleep(WATCH_PERIOD)
            job = ask_daemon(config, runtime_dir, f"/v1/jobs/{name}")
        emit_json(job)
    else:
        job = _follow(config, runtime_dir, name, job)
        console().print(
            f"job {name} {job['state']}: round {job['round']}/{job['rounds']}, "
            f"loss {_number(job['loss'])}, accuracy {_number(job['accuracy'])}"
        )
    if job["state"] == "failed":
        fail(f"job {name} failed: {job['error']}", EXIT_FAILURE)


def _follow(config: Path | None, runtime_dir: Path | None, name: str, job: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=console(),
    ) as bar:
        task = bar.add_task(name, total=job["rounds"], stats="")
        while True:
            stats = (
                f"loss {_number(job['loss'])} acc {_number(job['accuracy'])} "
                f"{job['participants']} trainers"
            )
            bar.update(task, completed=job["round"], stats=stats)
            if job["state"] in DONE:
                return job
            time.sleep(WATCH_PERIOD)
            job = ask_daemon(config, runtime_dir, f"/v1/jobs/{name}")


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
