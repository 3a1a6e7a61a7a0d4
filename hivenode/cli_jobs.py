"""`hivenode jobs ...`: submit federated jobs to the local daemon and follow them.

Thin like `cli.py`: reads the job file, asks the daemon, prints. typer and the stdlib only
at import time.
"""

from __future__ import annotations

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
    job_file: Path,
    watch: Annotated[bool, typer.Option("--watch", help="Follow it until it ends.")] = False,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start the job in JOB_FILE (TOML: name, dataset, rounds, [model], [strategy], [train])."""
    try:
        spec = tomllib.loads(job_file.read_text())
    except OSError as exc:
        fail(f"cannot read {job_file}: {exc.strerror or exc}", EXIT_USAGE)
    except tomllib.TOMLDecodeError as exc:
        fail(f"{job_file} is not valid TOML: {exc}", EXIT_USAGE)
    summary = ask_daemon(config, runtime_dir, "/v1/jobs", "POST", spec)
    if watch:
        _watch(config, runtime_dir, summary["name"], as_json)
    elif as_json:
        emit_json(summary)
    else:
        typer.echo(f"job {summary['name']} started: `hivenode jobs watch {summary['name']}`")


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
