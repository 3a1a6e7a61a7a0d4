"""`hivenode sim chaos`: a fault scenario on real in-process nodes, beside its fault-free run.

Mounted by `cli.py`; imports typer and the stdlib only at module level.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hivenode.cli_common import EXIT_FAILURE, EXIT_USAGE, JsonOpt, console, emit_json, fail

SCENARIOS = (
    "kill-trainers",
    "slow-nodes",
    "lossy-links",
    "partition-heal",
    "byzantine",
    "kill-aggregator",
    "kill-aggregator-daemon",
    "restart-all",
)
ATTACKS = "sign-flip | scale | nan | inf | random | mixed"
SHOWN_DETAILS = (
    "killed_trainers",
    "first_round_after_rejoin",
    "slow_trainers",
    "median_round_s",
    "round_at_standby_at_kill",
    "resumed_from_round",
    "standby_recovery_s",
    "replication",
    "attackers",
    "messages_lost",
    "partitioned_rounds",
    "participants_after_heal",
    "rounds_reported_before_kill",
    "registry_intact",
    "qtable_intact",
    "first_job_intact",
    "error",
)
"""What the table shows of a report's details besides the figures (--json has them all)."""


def sim_chaos(
    scenario: Annotated[str, typer.Option(help=" | ".join(SCENARIOS))],
    seed: Annotated[int, typer.Option()] = 0,
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=3, max=100, help="Trainers.")] = 10,
    rounds: Annotated[int, typer.Option(min=2)] = 20,
    fraction: Annotated[
        float | None,
        typer.Option(
            "--fraction",
            "--attackers",
            min=0,
            max=1,
            help="Share of trainers killed or slowed (0.3), hostile (byzantine: 0.2), with "
            "lossy links (1.0) or cut off (partition-heal: 0.5).",
        ),
    ] = None,
    at: Annotated[
        int, typer.Option(min=0, help="The round the fault strikes in (0: a third of the way).")
    ] = 0,
    rejoin_after: Annotated[
        int,
        typer.Option(
            min=0,
            help="kill-trainers: rounds until they restart (0: never); partition-heal: rounds "
            "until the partition heals.",
        ),
    ] = 3,
    loss: Annotated[
        float, typer.Option(min=0, max=0.99, help="lossy-links: chance a message is lost.")
    ] = 0.1,
    jitter: Annotated[
        float, typer.Option(min=0, help="lossy-links: each message held up U(0, JITTER) s.")
    ] = 0.2,
    delay: Annotated[
        float, typer.Option(min=0, help="slow-nodes: seconds added to every train message.")
    ] = 3.0,
    attack: Annotated[str, typer.Option(help=f"byzantine: {ATTACKS}")] = "scale",
    defences: Annotated[
        str,
        typer.Option(help="byzantine: comma-separated strategies; NAME+screen adds the screen."),
    ] = "fedavg,fedavg+screen,fedmedian,fedtrimmedavg,krum",
    strategy: Annotated[
        str | None,
        typer.Option(
            help="The job's strategy (fedavg); byzantine: the headline defence (fedavg+screen)."
        ),
    ] = None,
    dataset: Annotated[str, typer.Option(help="As `hivenode sim fl --dataset`.")] = "digits",
    partition: Annotated[str, typer.Option(help="iid | dirichlet:ALPHA")] = "dirichlet:0.5",
    model: Annotated[str, typer.Option(help="torch zoo: logreg | mlp | cnn")] = "mlp",
    lr: Annotated[float, typer.Option(min=0)] = 0.1,
    deadline: Annotated[float, typer.Option(min=1, help="A round's deadline in seconds.")] = 20.0,
    as_json: JsonOpt = False,
) -> None:
    """Run a fault scenario on real nodes on 127.0.0.1, and the same job without the fault;
    print the figures of both (accuracy on every device's test set, recovery, lost updates)."""
    import logging

    import trio

    from hivenode.aggregator.runner import JobError
    from hivenode.models.training.backend import TrainingError
    from hivenode.sim.chaos import ChaosConfig, ChaosError, Scenario, run_chaos
    from hivenode.sim.fl_datasets import DatasetSpecError

    if scenario not in SCENARIOS:
        fail(f"--scenario must be one of {', '.join(SCENARIOS)}, not {scenario!r}", EXIT_USAGE)
    config = ChaosConfig(
        scenario=Scenario(scenario),
        nodes=nodes,
        rounds=rounds,
        seed=seed,
        dataset=dataset,
        partition=partition,
        model=model,
        lr=lr,
        deadline_s=deadline,
        strategy=strategy,
        fraction=fraction,
        at_round=at,
        rejoin_after=rejoin_after,
        delay_s=delay,
        loss=loss,
        jitter_s=jitter,
        attack=attack,
        defences=tuple(d.strip() for d in defences.split(",") if d.strip()),
    )
    logging.basicConfig(level=logging.ERROR)
    out = None if as_json else console()

    def say(line: str) -> None:
        if out is not None:
            out.print(line, markup=False, highlight=False)

    try:
        report = trio.run(lambda: run_chaos(config, say))
    except* (ChaosError, DatasetSpecError, ValueError) as group:
        fail(str(group.exceptions[0]), EXIT_USAGE)
    except* (JobError, TrainingError) as group:
        fail(str(group.exceptions[0]), EXIT_FAILURE)
    figures = report.as_json()
    if as_json:
        emit_json(figures)
    else:
        _print_report(figures)
    if not report.completed:
        raise typer.Exit(EXIT_FAILURE)


def _print_report(figures: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"chaos: {figures['scenario']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in ("completed", "rounds_completed", "final_accuracy", "baseline_accuracy"):
        table.add_row(key, _shown(figures[key]))
    table.add_row("recovery_s", _shown(figures["recovery_s"]))
    table.add_row("lost_updates", _shown(figures["lost_updates"]))
    details = figures["details"]
    for key in SHOWN_DETAILS:
        if details.get(key) is not None:
            table.add_row(key, _shown(details[key]))
    runs = details.get("runs", {})
    for label, run in runs.items():
        table.add_row(
            f"  {label}",
            f"clean {_shown(run['baseline_accuracy'])}, attacked "
            f"{_shown(run['final_accuracy'])}, {run['rejected']} updates rejected",
        )
    out = console()
    out.print(table)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)
