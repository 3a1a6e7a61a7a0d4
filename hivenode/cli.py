"""The `hivenode` command: parses, calls the control API or the library, prints.

Client commands (status, peers) import neither libp2p nor any ML framework, nor pydantic:
they must answer in well under 300 ms. Everything heavy is imported inside the command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hivenode.cli_chaos import sim_chaos
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
from hivenode.cli_data import data_app
from hivenode.cli_fl import sim_fl
from hivenode.cli_flower import flower_app_app, sim_flower_app
from hivenode.cli_infer import (
    deploy_command,
    infer_command,
    optimize_command,
    serve_command,
    stats_command,
    undeploy_command,
)
from hivenode.cli_jobs import jobs_app
from hivenode.cli_learn import sim_learn, tune_command
from hivenode.cli_models import models_app  # typer and the stdlib only at import time
from hivenode.cli_parallel import sim_parallel
from hivenode.cli_planner import plan_command, qtable_app

app = typer.Typer(
    name="hivenode",
    help="HiveMind node agent: join the swarm, advertise this machine, train and serve models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
sim_app = typer.Typer(help="Run many real nodes on this machine.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")
app.add_typer(qtable_app, name="qtable")
app.command("plan")(plan_command)
app.command("infer")(infer_command)
models_app.command("serve")(serve_command)
models_app.command("deploy")(deploy_command)
models_app.command("undeploy")(undeploy_command)
models_app.command("optimize")(optimize_command)
models_app.command("stats")(stats_command)
sim_app.command("fl")(sim_fl)
sim_app.command("flower-app")(sim_flower_app)
sim_app.command("learn")(sim_learn)
sim_app.command("chaos")(sim_chaos)
sim_app.command("parallel")(sim_parallel)
app.command("tune")(tune_command)
app.add_typer(flower_app_app, name="flower-app")


def _load_settings(config: Path | None, **flags: Any) -> Any:
    from hivenode.agent.errors import ConfigError
    from hivenode.agent.settings import load_settings

    try:
        return load_settings(config, **flags)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


@app.command()
def status(
    peer: Annotated[
        str | None, typer.Option("--peer", help="Ask this remote peer, through the local daemon.")
    ] = None,
    config: ConfigOpt = None,
    runtime_dir: RuntimeDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """This node's identity, addresses, roles, uptime, peers, hardware and health."""
    path = f"/v1/peers/{peer}/status" if peer else "/v1/status"
    result = ask_daemon(config, runtime_dir, path)
    if as_json:
        emit_json(result)
        return
    from hivenode.cli_views import show_status

    show_status(console(), result)


@app.command()
def peers(
    config: ConfigOpt = None, runtime_dir: RuntimeDirOpt = None, as_json: JsonOpt = False
) -> None:
    """The peer table: every peer's address, roles, hardware, RTT and last advert."""
    result = ask_daemon(config, runtime_dir, "/v1/peers")
    if as_json:
        emit_json(result)
        return
    from hivenode.cli_views import show_peers

    show_peers(console(), result)


@app.command()
def hardware(
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="Disk whose free space to report.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """This machine's CPU, memory, disk, GPUs and ML frameworks (no daemon needed)."""
    from hivenode.agent.hardware import probe_hardware
    from hivenode.agent.paths import state_dir as default_state_dir

    result = probe_hardware(state_dir or default_state_dir(None)).model_dump(mode="json")
    if as_json:
        emit_json(result)
        return
    from hivenode.cli_views import show_hardware

    show_hardware(console(), result)


@app.command()
def init(
    config: ConfigOpt = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a commented config file and create this node's identity."""
    from platformdirs import user_config_path

    from hivenode.agent.errors import AgentError
    from hivenode.agent.identity import load_or_create_identity, peer_id_of
    from hivenode.agent.paths import state_dir as resolve_state_dir
    from hivenode.agent.settings import config_template
    from hivenode.fsutil import atomic_write

    target = config or user_config_path("hivenode") / "config.toml"
    if target.exists() and not force:
        fail(f"{target} already exists; pass --force to overwrite it")
    template = config_template()
    if state_dir is not None:
        # a JSON string is a valid TOML basic string: quotes and backslashes escaped
        quoted = json.dumps(str(state_dir.absolute()), ensure_ascii=False)
        template = template.replace("# state_dir = ", f"state_dir = {quoted}\n# state_dir = ", 1)
    try:
        atomic_write(target, template.encode(), mode=0o644)
        settings = _load_settings(target)
        directory = resolve_state_dir(settings.state_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        peer_id = peer_id_of(load_or_create_identity(directory))
    except (OSError, AgentError) as exc:
        fail(str(exc))
    result = {"config": str(target), "state_dir": str(directory), "peer_id": peer_id}
    if as_json:
        emit_json(result)
        return
    typer.echo(f"config:    {target}\nstate dir: {directory}\npeer id:   {peer_id}")
    typer.echo("start the node with: hivenode run" + (f" --config {target}" if config else ""))


@app.command()
def run(
    config: ConfigOpt = None,
    listen: Annotated[
        list[str] | None, typer.Option("--listen", help="Multiaddr to listen on (repeatable).")
    ] = None,
    bootstrap: Annotated[
        list[str] | None, typer.Option("--bootstrap", help="/…/p2p/<id> to join through.")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir")] = None,
    runtime_dir: RuntimeDirOpt = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port")] = None,
    no_metrics: Annotated[bool, typer.Option("--no-metrics")] = False,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """Run the node daemon until SIGTERM or Ctrl-C."""
    settings = _load_settings(
        config,
        listen_addrs=listen or None,
        bootstrap_peers=bootstrap or None,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        metrics_port=metrics_port,
        metrics_enabled=False if no_metrics else None,
        log_level=log_level,
    )
    import trio

    from hivenode.agent.daemon import DaemonService, run_daemon
    from hivenode.agent.errors import AgentError
    from hivenode.agent.systemd import configure_logging
    from hivenode.protocol.advert import Role

    configure_logging(settings.log_level)
    services: list[DaemonService] = []
    if Role.AGGREGATOR in settings.roles:
        from hivenode.aggregator.service import JobService

        services.append(JobService())
    if Role.TRAINER in settings.roles:
        from hivenode.parallel.job_worker import ParallelJobService

        services.append(ParallelJobService())  # a member of data/pipeline-parallel jobs
    from hivenode.inference.service import InferenceService

    services.append(InferenceService())  # the router on every node; the worker with its role
    try:
        trio.run(run_daemon, settings, services)
    except AgentError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot start: {exc}")


@sim_app.command("swarm")
def sim_swarm(
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=1, max=2000)] = 20,
    processes: Annotated[
        bool, typer.Option("--processes", help="One OS process per node instead of one loop.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Give up after this many seconds.")
    ] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Start N real nodes on 127.0.0.1, wait until every peer table holds all N, report."""
    from hivenode.sim.swarm import SwarmReport, run_swarm

    report: SwarmReport = run_swarm(
        nodes=nodes, processes=processes, seed=seed, timeout=timeout, progress=not as_json
    )
    if as_json:
        emit_json(report.as_dict())
    else:
        report.print(console())
    if not report.converged:
        raise typer.Exit(EXIT_FAILURE)


@sim_app.command("demo")
def sim_demo(nodes: Annotated[int, typer.Option("--nodes", "-n", min=2, max=20)] = 5) -> None:
    """A local swarm of real `hivenode run` daemons, then `status` and `peers` against one."""
    from hivenode.sim.demo import run_demo

    raise typer.Exit(run_demo(nodes))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
