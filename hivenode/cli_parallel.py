"""`hivenode sim parallel`: data-, pipeline- or model-parallel training on real local nodes,
checked against single-node training.

Mounted by `cli.py` (`sim_app.command("parallel")(sim_parallel)`); imports typer and the
stdlib only at module level.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hivenode.cli_common import EXIT_FAILURE, EXIT_USAGE, JsonOpt, console, emit_json, fail

MODE_HELP = "data (all-reduce of gradients) | pipeline (GPipe micro-batches) | model (one)"


def sim_parallel(
    mode: Annotated[str, typer.Option(help=MODE_HELP)] = "data",
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=1, max=64)] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int, typer.Option(min=2)] = 50,
    batch_size: Annotated[
        int,
        typer.Option(min=1, help="data: per node (one node gets N×); pipeline/model: the batch"),
    ] = 32,
    micro_batches: Annotated[int, typer.Option(min=1, help="pipeline only")] = 4,
    compression: Annotated[str, typer.Option(help="data only: none | fp16 | int8")] = "none",
    fault: Annotated[
        str | None,
        typer.Option(
            help="data only: the last node fails: kill-mid-step | die-while-replying | hang"
        ),
    ] = None,
    fault_step: Annotated[int, typer.Option(min=1)] = 10,
    kill_stage: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="pipeline/model: this stage's node dies; a spare takes over from the last "
            "checkpoint",
        ),
    ] = None,
    kill_step: Annotated[
        int | None, typer.Option(min=1, help="with --kill-stage; default: half way")
    ] = None,
    spares: Annotated[int, typer.Option(min=0, help="with --kill-stage: spare nodes")] = 1,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="with --kill-stage: steps between checkpoints")
    ] = 10,
    peer_timeout: Annotated[
        float, typer.Option(min=0.1, help="seconds before a silent peer or stage is left out")
    ] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Train on N real nodes on 127.0.0.1, then the same on one node: samples/s, bytes moved
    per step, and whether the weights agree."""
    from hivenode.parallel.errors import ParallelError

    try:
        config = _config(
            mode, nodes, seed, steps, batch_size, micro_batches, compression, fault, fault_step,
            peer_timeout,
        )  # fmt: skip
        if kill_stage is not None:
            config = _with_kill(config, kill_stage, kill_step, spares, checkpoint_every)
    except ParallelError as exc:
        fail(str(exc), EXIT_USAGE)
    import trio

    from hivenode.models.training.backend import TrainingError
    from hivenode.parallel.simulation import run_parallel_sim
    from hivenode.sim.swarm import quiet_libp2p

    quiet_libp2p()
    status = None if as_json else console().status(f"training on {nodes} nodes ({mode})…")
    try:
        if status is not None:
            status.start()
        report = trio.run(run_parallel_sim, config)
    except* (ParallelError, TrainingError) as group:
        fail(str(group.exceptions[0]), EXIT_FAILURE)
    finally:
        if status is not None:
            status.stop()
    if as_json:
        emit_json(report.to_json())
        return
    _print_report(report.to_json())


def _config(
    mode: str,
    nodes: int,
    seed: int,
    steps: int,
    batch_size: int,
    micro_batches: int,
    compression: str,
    fault: str | None,
    fault_step: int,
    peer_timeout: float,
) -> Any:
    from hivenode.parallel.errors import ParallelError
    from hivenode.parallel.faults import Fault
    from hivenode.parallel.simulation import SimConfig
    from hivenode.protocol.compression import Compression, CompressionError

    try:
        chosen_fault = Fault(fault) if fault else None
    except ValueError:
        choices = ", ".join(f.value for f in Fault)
        raise ParallelError(f"--fault must be one of {choices}, not {fault!r}") from None
    try:
        codec = Compression.parse(compression)
    except CompressionError as exc:
        raise ParallelError(str(exc)) from None
    if codec is not Compression.NONE and mode != "data":
        raise ParallelError("--compression applies to data parallelism only")
    return SimConfig(
        mode=mode,
        nodes=nodes,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        micro_batches=micro_batches,
        compression=codec,
        peer_timeout=peer_timeout,
        fault=chosen_fault,
        fault_step=fault_step,
    )


def _with_kill(
    config: Any, kill_stage: int, kill_step: int | None, spares: int, checkpoint_every: int
) -> Any:
    from dataclasses import replace

    return replace(
        config,
        kill_stage=kill_stage,
        kill_step=kill_step,
        spares=spares,
        checkpoint_every=checkpoint_every,
    )


def _print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    title = f"{report['mode']} parallel, {report['nodes']} nodes, seed {report['seed']}"
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    theoretical = report["theoretical_bytes_per_node"]
    rows = [
        ("steps × batch", f"{report['steps']} × {report['global_batch']}"),
        ("parameters", f"{report['parameters']:,}"),
        ("samples/s", f"{report['samples_per_s']:.0f}"),
        ("single node samples/s", f"{report['single_node_samples_per_s']:.0f}"),
        ("step (median)", f"{report['step_ms_p50']:.1f} ms"),
        ("bytes moved per step (all nodes)", f"{report['bytes_per_step']:,.0f}"),
        ("bytes sent per node per step", f"{report['bytes_per_node_per_step']:,.0f}"),
    ]
    if theoretical is not None:
        ratio = report["bytes_per_node_per_step"] / theoretical if theoretical else 0.0
        rows.append(("all-reduce minimum per node", f"{theoretical:,.0f} (× {ratio:.3f})"))
    rows.append(("max |Δparam| vs one node", f"{report['max_param_diff']:.2e}"))
    if report["equivalent"] is not None:
        rows.append(("equivalent (≤ 1e-5)", "yes" if report["equivalent"] else "NO"))
    if report["replicas_identical"] is not None:
        rows.append(("replicas identical", "yes" if report["replicas_identical"] else "NO"))
    if report["fault"]:
        rows.append(("fault", f"{report['fault']}: {report['time_lost_s']:.3f} s lost"))
    if report.get("failover_step") is not None:
        rows.append(
            (
                f"stage {report['kill_stage']} failed over at step",
                f"{report['failover_step']}, from checkpoint {report['checkpoint_step']} "
                f"in {report['recovery_s']:.3f} s",
            )
        )
    for name, value in rows:
        table.add_row(name, value)
    console().print(table)
