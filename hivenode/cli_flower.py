"""`hivenode flower-app hash DIR` and `hivenode sim flower-app DIR`: Flower apps on the swarm.

typer and the stdlib only at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hivenode.cli_common import EXIT_FAILURE, EXIT_USAGE, JsonOpt, console, emit_json, fail

flower_app_app = typer.Typer(
    help="Flower apps this node may run: pin them by the hash of their files.",
    no_args_is_help=True,
    add_completion=False,
)


@flower_app_app.command("hash")
def hash_command(app_dir: Path, as_json: JsonOpt = False) -> None:
    """The content hash and key of the Flower app in APP_DIR, for `flower_apps` in the config."""
    from hivenode.models.flower_app import FlowerAppError, app_key, content_hash, read_flower_app

    try:
        app = read_flower_app(app_dir)
        digest = content_hash(app.root)
    except FlowerAppError as exc:
        fail(str(exc), EXIT_USAGE)
    key = app_key(app, digest)
    if as_json:
        emit_json({"name": app.name, "path": str(app.root), "sha256": digest, "key": key})
        return
    typer.echo(f"{key}\n\nAllow it on a trainer with, in its config file:\n")
    typer.echo(f'[[flower_apps]]\npath = "{app.root.resolve()}"\nsha256 = "{digest}"')


def sim_flower_app(
    app_dir: Path,
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=1, max=100)] = 3,
    run_config: Annotated[str, typer.Option("--run-config", help="'k=v k2=v2' overrides")] = "",
    seed: Annotated[int, typer.Option()] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Run an unmodified Flower app on N real trainer nodes on 127.0.0.1 and report its rounds."""
    import trio

    from hivenode.aggregator.runner import JobError
    from hivenode.models.flower_app import FlowerAppError
    from hivenode.sim.flower_app import run_flower_app_sim

    try:
        result = trio.run(run_flower_app_sim, app_dir, nodes, run_config, seed)
    except FlowerAppError as exc:
        fail(str(exc), EXIT_USAGE)
    except JobError as exc:
        fail(str(exc), EXIT_FAILURE)
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    table = Table(title=f"{result['app']} on {nodes} nodes")
    for column in ("round", "train metrics", "evaluate metrics", "trainers", "failures"):
        table.add_column(column)
    for row in result["rounds"]:
        table.add_row(
            str(row["round"]),
            _metrics(row["train_metrics"]),
            _metrics(row["evaluate_metrics"]),
            str(row["participants"]),
            str(row["failures"]),
        )
    console().print(table)


def _metrics(values: dict[str, object]) -> str:
    return ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
    )
