"""`hivenode sim fl`: compare federated strategies on a local swarm of real nodes.

Mounted by `cli.py`; imports typer and the stdlib only at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from hivenode.cli_common import EXIT_FAILURE, EXIT_USAGE, JsonOpt, console, emit_json, fail

STRATEGY_HELP = (
    "Comma-separated: fedavg, fedprox[:MU], scaffold, fedmedian, fedtrimmedavg, krum, multikrum"
)


def sim_fl(
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=2, max=200)] = 10,
    dataset: Annotated[
        str,
        typer.Option(
            help="synthetic:ALPHA,BETA | synthetic:iid | digits | iris | breast_cancer | wine"
            " | file:PATH.npz"
        ),
    ] = "digits",
    partition: Annotated[str, typer.Option(help="iid | dirichlet:ALPHA (label skew)")] = "iid",
    strategy: Annotated[str, typer.Option(help=STRATEGY_HELP)] = "fedavg",
    mu: Annotated[float, typer.Option(min=0, help="FedProx's μ where fedprox has none")] = 0.01,
    model: Annotated[str, typer.Option(help="torch zoo: logreg | mlp | cnn")] = "mlp",
    framework: Annotated[str, typer.Option(help="torch | keras | sklearn | hf")] = "torch",
    rounds: Annotated[int, typer.Option(min=1)] = 10,
    clients_per_round: Annotated[int, typer.Option(min=1)] = 10,
    local_epochs: Annotated[int, typer.Option(min=1)] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 10,
    lr: Annotated[float, typer.Option(min=0)] = 0.1,
    stragglers: Annotated[
        float, typer.Option(min=0, max=1, help="fraction of trainers doing fewer epochs")
    ] = 0.0,
    straggler_policy: Annotated[
        str | None,
        typer.Option(help="drop | partial (default: fedavg drops, the others keep partial work)"),
    ] = None,
    deadline: Annotated[float, typer.Option(min=1, help="a round's deadline in seconds")] = 600.0,
    seed: Annotated[int, typer.Option()] = 0,
    attackers: Annotated[
        float, typer.Option(min=0, max=1, help="Share of trainers sending attacked updates.")
    ] = 0.0,
    attack: Annotated[
        str, typer.Option(help="sign-flip | scale | nan | inf | random | mixed")
    ] = "sign-flip",
    screen: Annotated[
        bool, typer.Option(help="Screen train updates (finite, norm bound) before aggregating.")
    ] = True,
    compression: Annotated[
        str,
        typer.Option(
            help="How trainers compress updates: none | fp16 | int8 | topk:F"
            " | topk:F:no-feedback (F: the share of each array's update sent)."
        ),
    ] = "none",
    secagg: Annotated[
        bool, typer.Option(help="Secure aggregation (SecAgg+): the aggregator sees only the sum.")
    ] = False,
    dp: Annotated[
        str, typer.Option(help="Central DP with fixed clipping: none | server-fixed | client-fixed")
    ] = "none",
    dp_noise: Annotated[
        str,
        typer.Option(
            help="DP noise multiplier(s), comma-separated: one job per value (e.g. 0.5,1,2)."
        ),
    ] = "1.0",
    dp_clip: Annotated[float, typer.Option(min=0, help="DP clipping norm of an update.")] = 1.0,
    dp_delta: Annotated[float, typer.Option(min=0, max=1, help="the δ ε is reported at")] = 1e-5,
    baseline: Annotated[
        bool, typer.Option(help="Also run each strategy without privacy, for comparison.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="write metrics JSON/CSV and a plot here")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run each strategy as a federated job over N real nodes on 127.0.0.1, then compare."""
    import trio

    from hivenode.aggregator.runner import JobError
    from hivenode.models.training.backend import TrainingError
    from hivenode.protocol.compression import CompressionError, UpdateCompression
    from hivenode.sim.fl import FlSimConfig, StrategyRun, run_fl_sim, write_results
    from hivenode.sim.fl_datasets import DatasetSpecError
    from hivenode.sim.hostile import hostile_trainers

    if straggler_policy not in (None, "drop", "partial"):
        fail(f"--straggler-policy must be drop or partial, not {straggler_policy!r}", EXIT_USAGE)
    try:
        runs = [StrategyRun.parse(s, mu, straggler_policy) for s in strategy.split(",") if s]
    except ValueError as exc:
        fail(f"--strategy: {exc}", EXIT_USAGE)
    try:
        hostile_trainers(nodes, attackers, attack)
    except ValueError as exc:
        fail(f"--attack: {exc}", EXIT_USAGE)
    try:
        scheme = str(UpdateCompression.parse(compression))
    except CompressionError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        variants = _privacy_variants(secagg, dp, dp_noise, dp_clip, dp_delta)
    except ValueError as exc:
        fail(f"--dp-noise: {exc}", EXIT_USAGE)
    if variants:
        plain = runs if baseline else []
        runs = plain + [run.with_privacy(v) for run in runs for v in variants]
    from pydantic import ValidationError

    from hivenode.sim.fl import job_for

    for run in runs:  # a refused combination, e.g. secagg with krum, in one line, now
        try:
            job_for(FlSimConfig(nodes=nodes, clients_per_round=clients_per_round), run, [])
        except ValidationError as exc:
            fail(f"{run.label}: {exc.errors()[0]['msg']}", EXIT_USAGE)
    config = FlSimConfig(
        nodes=nodes,
        dataset=dataset,
        partition=partition,
        strategies=runs,
        framework=framework,
        model=model,
        rounds=rounds,
        clients_per_round=clients_per_round,
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        stragglers=stragglers,
        seed=seed,
        attackers=attackers,
        attack=attack,
        screen_updates=screen,
        deadline_s=deadline,
        compression=scheme,
    )
    with _progress(not as_json, [r.label for r in runs], rounds) as on_round:
        try:
            outcomes = trio.run(lambda: run_fl_sim(config, on_round=on_round))
        except* DatasetSpecError as group:
            fail(str(group.exceptions[0]), EXIT_USAGE)
        except* (JobError, TrainingError) as group:
            fail(str(group.exceptions[0]), EXIT_FAILURE)
    split = "" if dataset.startswith(("synthetic:", "file:")) else f" ({partition})"
    title = f"{dataset}{split}, {nodes} nodes, {model}, stragglers {stragglers:g}"
    if scheme != "none":
        title += f", updates {scheme}"
    summary = {o.label: o.summary() for o in outcomes}
    written = write_results(outcomes, out, title) if out else []
    if as_json:
        emit_json({"title": title, "strategies": summary, "files": [str(p) for p in written]})
        return
    _print_summary(title, summary, written)


def _privacy_variants(
    secagg: bool, dp: str, noises: str, clip: float, delta: float
) -> list[dict[str, Any]]:
    """The [privacy] sections to run each strategy under: one per noise level with DP."""
    if dp == "none":
        return [{"secure_aggregation": True}] if secagg else []
    levels = [float(text) for text in noises.split(",") if text.strip()]
    if not levels:
        raise ValueError("give at least one noise multiplier")
    return [
        {
            "secure_aggregation": secagg,
            "dp": dp,
            "noise_multiplier": level,
            "clipping_norm": clip,
            "delta": delta,
        }
        for level in levels
    ]


def _progress(show: bool, labels: list[str], rounds: int) -> Any:
    from contextlib import contextmanager

    @contextmanager
    def progress() -> Any:
        if not show:
            yield None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console(),
        ) as bar:
            tasks = {label: bar.add_task(label, total=rounds, stats="") for label in labels}

            def on_round(label: str, record: Any) -> None:
                loss = record.global_train_loss or record.train_loss
                accuracy = record.eval_accuracy
                stats = f"loss {loss:.4f} acc {accuracy:.3f}" if loss and accuracy else ""
                stats += f"  {record.participants} trainers, {record.stragglers} stragglers"
                bar.update(tasks[label], completed=record.round, stats=stats)

            yield on_round

    return progress()


def _print_summary(title: str, summary: dict[str, Any], written: list[Path]) -> None:
    from rich.table import Table

    table = Table(title=title)
    columns = (
        "strategy",
        "rounds",
        "final accuracy",
        "final loss",
        "ε (δ)",
        "round",
        "overhead/round",
        "in/round",
    )
    for column in (*columns, "wall"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for label, row in summary.items():
        accuracy, loss = row["final_accuracy"], row["final_loss"]
        table.add_row(
            label,
            str(row["rounds"]),
            f"{accuracy:.4f}" if accuracy is not None else "-",
            f"{loss:.4f}" if loss is not None else "-",
            _epsilon(row),
            f"{row['round_s']:.2f} s" if row["round_s"] is not None else "-",
            f"{row['round_overhead_ms']:.1f} ms" if row["round_overhead_ms"] is not None else "-",
            f"{row['bytes_in_per_round'] / 1e3:.1f} kB" if row["bytes_in_per_round"] else "-",
            f"{row['wall_s']:.1f} s",
        )
    out = console()
    out.print(table)
    for path in written:
        out.print(f"wrote {path}")


def _epsilon(row: dict[str, Any]) -> str:
    epsilon = row.get("epsilon")
    return "-" if epsilon is None else f"{epsilon:.3g} ({row['delta']:g})"
