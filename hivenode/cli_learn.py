"""`hivenode sim learn` (planners learning the Q-table from simulated jobs, scored against an
oracle) and `hivenode tune` (successive halving over a federated job's hyperparameters).

Mounted by `cli.py`; imports typer and the stdlib only at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hivenode.cli_common import EXIT_FAILURE, EXIT_USAGE, JsonOpt, console, emit_json, fail

if TYPE_CHECKING:
    from hivenode.sim.learn import LearnResult
    from hivenode.sim.tune import Trial, TuneResult

OutOpt = Annotated[Path | None, typer.Option("--out", help="Write the plot (PNG) here.")]


def sim_learn(
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Jobs to draw.")] = 500,
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=1, help="Learning planners.")] = 5,
    seed: Annotated[int, typer.Option()] = 0,
    epsilon: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="Initial ε (default: sim.learn.LEARNING_PHASE's)."),
    ] = None,
    epsilon_decay: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="ε's factor per choice, in (0, 1] (default: ditto)."),
    ] = None,
    epsilon_min: Annotated[
        float | None, typer.Option(min=0, max=1, help="ε's floor (default: ditto).")
    ] = None,
    untried_value: Annotated[
        float | None,
        typer.Option(min=-1, max=1, help="Q greedy gives an untried action (default: ditto)."),
    ] = None,
    private_share: Annotated[
        float, typer.Option(min=0, max=1, help="Share of jobs whose data is private.")
    ] = 0.3,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Planners choose strategies for simulated jobs, learn and gossip the Q-table; report
    the regret and how often the greedy choice matches the cost model's oracle. The learners'
    settings default to the learning phase's (the JSON's `hyper` shows those used)."""
    from dataclasses import replace

    from hivenode.planner.state import PlannerError
    from hivenode.sim.learn import LEARNING_PHASE, plot_learning, run_learning

    given = {
        "epsilon": epsilon,
        "epsilon_decay": epsilon_decay,
        "epsilon_min": epsilon_min,
        "untried_value": untried_value,
    }
    try:
        hyper = replace(LEARNING_PHASE, **{k: v for k, v in given.items() if v is not None})
    except PlannerError as exc:
        fail(str(exc), EXIT_USAGE)
    result = run_learning(jobs, nodes, seed, hyper=hyper, private_share=private_share)
    written = [plot_learning(result, out)] if out else []
    summary = result.summary()
    if as_json:
        emit_json({**summary, "files": [str(p) for p in written]})
        return
    _print_learning(result, summary, written)


def _print_learning(result: LearnResult, summary: dict[str, Any], written: list[Path]) -> None:
    from rich.table import Table

    rows = [
        ("jobs / planners", f"{summary['jobs']} / {summary['nodes']} (seed {summary['seed']})"),
        (
            "oracle agreement",
            f"{summary['oracle_agreement']:.3f} of {summary['contexts_visited']} contexts "
            f"(exact means {summary['oracle_agreement_exact_means']:.3f}, "
            f"untrained {summary['oracle_agreement_untrained']:.3f}, "
            f"by state {summary['oracle_agreement_by_state']:.3f})",
        ),
        ("final regret", f"{summary['final_regret']:.4f} (mean over the last 10 % of jobs)"),
        ("mean regret", f"{summary['mean_regret']:.4f}"),
        ("greedy loss", f"{summary['greedy_loss']:.4f} reward per job"),
        ("table divergence", f"{summary['max_table_divergence']:.3g} after a quiet round"),
        ("chosen", ", ".join(f"{k} {v}" for k, v in summary["chosen"].items())),
        ("gossip", ", ".join(f"{k} {v}" for k, v in summary["gossip"].items())),
    ]
    table = Table(title="sim learn", show_header=False)
    for name, value in rows:
        table.add_row(name, value)
    out = console()
    out.print(table)
    if result.agreement.disagreements:
        worst = Table(title="largest disagreements (state, allowed, jobs, oracle, greedy, gap)")
        for column in ("state", "allowed", "jobs", "oracle", "greedy", "gap"):
            worst.add_column(column)
        for d in result.agreement.disagreements[:8]:
            allowed = ",".join(a.split("_")[0] for a in d["allowed"])
            worst.add_row(
                d["state"],
                allowed,
                str(d["jobs"]),
                d["oracle"],
                d["greedy"],
                f"{d['mean_reward_gap']:.3f}",
            )
        out.print(worst)
    for path in written:
        out.print(f"wrote {path}")


def tune_command(
    job_file: Path,
    budget: Annotated[int, typer.Option(min=1, help="Configurations in the first rung.")] = 9,
    min_rounds: Annotated[int, typer.Option(min=1, help="Rounds of the first rung.")] = 2,
    eta: Annotated[int, typer.Option(min=2, help="Keep the best 1/eta at each rung.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Tune JOB_FILE's learning rate, local epochs and μ by successive halving over short
    simulated federated runs; JOB_FILE needs a [tune] table naming a stand-in dataset."""
    import trio

    from hivenode.aggregator.runner import JobError
    from hivenode.models.training.backend import TrainingError
    from hivenode.sim.fl_datasets import DatasetSpecError
    from hivenode.sim.tune import TuneError, read_job, successive_halving

    try:
        spec, space = read_job(job_file)
    except TuneError as exc:
        fail(str(exc), EXIT_USAGE)
    on_trial = None if as_json else _trial_line
    try:
        result = trio.run(
            lambda: successive_halving(
                spec, space, budget=budget, min_rounds=min_rounds, eta=eta, on_trial=on_trial
            )
        )
    except* (DatasetSpecError, TuneError) as group:
        fail(str(group.exceptions[0]), EXIT_USAGE)
    except* (JobError, TrainingError) as group:
        fail(str(group.exceptions[0]), EXIT_FAILURE)
    if as_json:
        emit_json(result.as_json())
        return
    _print_tuning(result)


def _trial_line(trial: Trial) -> None:
    accuracy = "-" if trial.accuracy is None else f"{trial.accuracy:.4f}"
    typer.echo(
        f"rung {trial.rung}: lr {trial.config.lr:g}, local epochs {trial.config.local_epochs}, "
        f"μ {trial.config.mu:g}, {trial.rounds} rounds → accuracy {accuracy}",
        err=True,
    )


def _print_tuning(result: TuneResult) -> None:
    from rich.table import Table

    from hivenode.sim.tune import trials_table

    table = Table(title=f"tune {result.job} ({result.strategy}, {result.space.dataset})")
    for column in ("lr", "local epochs", "μ", "rung", "rounds", "accuracy", "loss", "wall s"):
        table.add_column(column, justify="right")
    for row in trials_table(result.trials):
        table.add_row(*row)
    out = console()
    out.print(table)
    best = result.best
    out.print(
        f"best: lr {best.config.lr:g}, local epochs {best.config.local_epochs}, "
        f"μ {best.config.mu:g} ({best.rounds} rounds, accuracy "
        f"{'-' if best.accuracy is None else f'{best.accuracy:.4f}'})"
    )
