"""What every `hivenode` command shares: options, one-line errors, JSON output, the console.

Imports typer and the stdlib only: client commands must start fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

EXIT_FAILURE = 1
EXIT_USAGE = 2

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (else $HIVENODE_CONFIG)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="The node's state directory (registry, datasets, Q-table)."),
]
RuntimeDirOpt = Annotated[
    Path | None, typer.Option("--runtime-dir", help="Where the daemon's control socket lives.")
]


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """One line on stderr and an exit code: never a traceback."""
    typer.echo(f"hivenode: error: {message}", err=True)
    raise typer.Exit(code)


def emit_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def console() -> Any:
    from rich.console import Console

    return Console()


def ask_daemon(
    config: Path | None,
    runtime_dir: Path | None,
    path: str,
    method: str = "GET",
    body: Any = None,
    timeout: float = 15.0,
) -> Any:
    """One control-API call to the local daemon; its failure is one line and exit 1."""
    from hivenode.agent.control_client import ControlError, call
    from hivenode.agent.paths import client_socket_path

    try:
        return call(client_socket_path(config, runtime_dir), method, path, timeout, body)
    except ControlError as exc:  # the daemon refusing our input is a usage error
        fail(str(exc), EXIT_USAGE if exc.status == 400 else EXIT_FAILURE)
