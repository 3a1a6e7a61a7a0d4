"""`hivenode tune`: successive halving over the learning rate, local epochs and FedProx's μ,
each trial a short federated run of the job on a simulated swarm (`sim.fl.run_fl_sim`).

The job file is the federated job TOML (`hivenode jobs submit`'s) with a `[tune]` table,
because the job's own dataset lives on volunteers' nodes and the tuner needs a stand-in it
can partition and simulate:

    [tune]
    dataset = "digits"          # required: any `hivenode sim fl --dataset` spec
    partition = "iid"           # or "dirichlet:ALPHA" (label skew), for scikit-learn sets
    nodes = 3                   # simulated trainers
    lr = [0.005, 0.5]           # learning rates: drawn log-uniformly from [low, high]
    local_epochs = [1, 2, 3]    # drawn from these
    mu = [0.0, 0.001, 0.01, 0.1, 1.0]   # FedProx's μ, drawn from these (0: FedAvg's update)

Only `dataset` is required. The model, batch size, clients per round, stragglers, deadline
and seed come from the job. μ is searched only for fedavg and fedprox jobs (trials then run
FedProx, whose μ = 0 is FedAvg's update); other strategies keep their own and μ = 0.

Successive halving (Jamieson & Talwalkar, AISTATS 2016): `budget` configurations drawn with
the job's seed each run `min_rounds` rounds; the best ⌈n/eta⌉ by final test accuracy (then
lower training loss) run again from scratch with twice the rounds, until one is left and has
run its rounds: the defaults 9 configurations, eta 3, rounds 2 → 4 → 8 (38 rounds in all).
A rerun starts from scratch rather than from the rung's checkpoint: `run_fl_sim` starts a
fresh swarm per run, and a fresh run keeps every trial a plain function of its config.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from hivenode.aggregator.job_spec import JobSpec
from hivenode.sim.fl import FlSimConfig, StrategyRun, run_fl_sim

DEFAULT_BUDGET = 9
DEFAULT_MIN_ROUNDS = 2
DEFAULT_ETA = 3
ROUNDS_GROWTH = 2
"""Rounds multiply by this from one rung to the next."""
LR_RANGE = (0.005, 0.5)
LOCAL_EPOCHS = (1, 2, 3)
MUS = (0.0, 0.001, 0.01, 0.1, 1.0)
MU_STRATEGIES = frozenset({"fedavg", "fedprox"})
TUNE_KEYS = frozenset({"dataset", "partition", "nodes", "lr", "local_epochs", "mu"})
MAX_DRAWS_PER_CONFIG = 100
"""Draws tried per wanted configuration before a small space counts as exhausted."""


class TuneError(Exception):
    """A job file or search space the tuner cannot use; the message says what to change."""


@dataclass(frozen=True)
class TuneSpace:
    dataset: str
    partition: str = "iid"
    nodes: int = 3
    lr: tuple[float, float] = LR_RANGE
    local_epochs: tuple[int, ...] = LOCAL_EPOCHS
    mu: tuple[float, ...] = MUS


@dataclass(frozen=True)
class TrialConfig:
    lr: float
    local_epochs: int
    mu: float


@dataclass(frozen=True)
class Trial:
    config: TrialConfig
    strategy: str
    rung: int
    rounds: int
    accuracy: float | None
    loss: float | None
    wall_s: float

    def rank_key(self) -> tuple[float, float]:
        """Sort key, best first: higher accuracy, then lower loss; missing ones last."""
        accuracy = -math.inf if self.accuracy is None else self.accuracy
        loss = math.inf if self.loss is None else self.loss
        return (-accuracy, loss)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self.config), **{k: v for k, v in asdict(self).items() if k != "config"}}


@dataclass(frozen=True)
class TuneResult:
    job: str
    strategy: str
    space: TuneSpace
    trials: tuple[Trial, ...]
    best: Trial
    """The winner of the last rung: the configuration that survived every halving."""

    def as_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "strategy": self.strategy,
            "space": asdict(self.space),
            "best": self.best.as_json(),
            "trials": [t.as_json() for t in self.trials],
        }


def read_job(path: Path) -> tuple[JobSpec, TuneSpace]:
    """The job (validated as `jobs submit`'s daemon does) and its [tune] table."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TuneError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TuneError(f"{path} is not valid TOML: {exc}") from exc
    table = raw.pop("tune", None)
    raw.pop("plan", None)  # `hivenode plan`'s table: not the tuner's business
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise TuneError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
    return spec, tune_space(table)


def tune_space(table: Any) -> TuneSpace:
    if not isinstance(table, dict) or "dataset" not in table:
        raise TuneError(
            'add a [tune] table with dataset = "digits" (or another `hivenode sim fl` '
            "dataset): the simulated runs need a stand-in for the job's own data"
        )
    unknown = set(table) - TUNE_KEYS
    if unknown:
        raise TuneError(f"[tune] takes only {', '.join(sorted(TUNE_KEYS))}, not {sorted(unknown)}")
    try:
        space = TuneSpace(
            dataset=str(table["dataset"]),
            partition=str(table.get("partition", "iid")),
            nodes=int(table.get("nodes", 3)),
            lr=_lr_range(table.get("lr", LR_RANGE)),
            local_epochs=tuple(int(e) for e in table.get("local_epochs", LOCAL_EPOCHS)),
            mu=tuple(float(m) for m in table.get("mu", MUS)),
        )
    except (TypeError, ValueError) as exc:
        raise TuneError(f"[tune]: {exc}") from exc
    if space.nodes < 1 or not space.local_epochs or not space.mu:
        raise TuneError("[tune] needs nodes ≥ 1 and non-empty local_epochs and mu")
    if min(space.local_epochs) < 1 or min(space.mu) < 0:
        raise TuneError("[tune] local_epochs must be ≥ 1 and mu ≥ 0")
    return space


def _lr_range(value: Any) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0 < low <= high:
        raise ValueError(f"lr must be [low, high] with 0 < low ≤ high, not {value!r}")
    return low, high


def draw_configs(
    space: TuneSpace, count: int, seed: int, *, search_mu: bool, default_mu: float
) -> list[TrialConfig]:
    """`count` distinct configurations: lr log-uniform, epochs and μ uniform over their
    choices; fewer when the space has fewer distinct points (one lr value, say)."""
    rng = np.random.default_rng(seed)
    configs: list[TrialConfig] = []
    low, high = (math.log(v) for v in space.lr)
    for _ in range(count * MAX_DRAWS_PER_CONFIG):
        if len(configs) == count:
            break
        config = TrialConfig(
            # 3 significant digits: a table a person reads, and configs that print distinctly
            lr=float(f"{math.exp(rng.uniform(low, high)):.3g}"),
            local_epochs=int(space.local_epochs[rng.integers(len(space.local_epochs))]),
            mu=float(space.mu[rng.integers(len(space.mu))]) if search_mu else default_mu,
        )
        if config not in configs:
            configs.append(config)
    return configs


async def successive_halving(
    spec: JobSpec,
    space: TuneSpace,
    *,
    budget: int = DEFAULT_BUDGET,
    min_rounds: int = DEFAULT_MIN_ROUNDS,
    eta: int = DEFAULT_ETA,
    on_trial: Callable[[Trial], None] | None = None,
    work_dir: Path | None = None,
) -> TuneResult:
    """Run the halving (see the module docstring); every trial is one `run_fl_sim` job."""
    if budget < 1 or min_rounds < 1 or eta < 2:
        raise TuneError("need budget ≥ 1, min_rounds ≥ 1 and eta ≥ 2")
    search_mu = spec.strategy.name in MU_STRATEGIES
    strategy = "fedprox" if search_mu else spec.strategy.name
    configs = draw_configs(
        space, budget, spec.seed, search_mu=search_mu, default_mu=spec.strategy.mu
    )
    trials: list[Trial] = []
    rung, rounds = 0, min_rounds
    while True:
        results = []
        for config in configs:
            trial = await _run_trial(spec, space, strategy, config, rung, rounds, work_dir)
            trials.append(trial)
            results.append(trial)
            if on_trial is not None:
                on_trial(trial)
        results.sort(key=Trial.rank_key)  # stable: ties keep the draw order
        if len(results) == 1:
            return TuneResult(spec.name, strategy, space, tuple(trials), results[0])
        configs = [t.config for t in results[: math.ceil(len(results) / eta)]]
        rung, rounds = rung + 1, rounds * ROUNDS_GROWTH


async def _run_trial(
    spec: JobSpec,
    space: TuneSpace,
    strategy: str,
    config: TrialConfig,
    rung: int,
    rounds: int,
    work_dir: Path | None,
) -> Trial:
    if strategy == "fedprox" and config.mu == 0:
        strategy = "fedavg"  # FedProx with μ = 0 is FedAvg (Flower warns so): run it as such
    run = StrategyRun(
        label=f"{strategy} μ={config.mu:g}",
        name=strategy,
        mu=config.mu,
        drop_stragglers=spec.straggler_policy == "drop",
    )
    sim = FlSimConfig(
        nodes=space.nodes,
        dataset=space.dataset,
        partition=space.partition,
        strategies=[run],
        framework=spec.model.framework,
        model=spec.model.name,
        model_options=dict(spec.model.options),
        rounds=rounds,
        clients_per_round=min(spec.clients_per_round, space.nodes),
        local_epochs=config.local_epochs,
        batch_size=spec.train.batch_size,
        lr=config.lr,
        stragglers=spec.train.straggler_fraction,
        seed=spec.seed,
        deadline_s=spec.deadline_s,
        evaluate_fraction=spec.evaluate_fraction,
    )
    (outcome,) = await run_fl_sim(sim, work_dir=work_dir)
    summary = outcome.summary()
    return Trial(
        config=config,
        strategy=strategy,
        rung=rung,
        rounds=int(summary["rounds"]),
        accuracy=summary["final_accuracy"],
        loss=summary["final_loss"],
        wall_s=float(summary["wall_s"]),
    )


def trials_table(trials: Sequence[Trial]) -> list[list[str]]:
    """Rows for people: lr, local epochs, μ, rung, rounds, accuracy, loss, seconds."""
    return [
        [
            f"{t.config.lr:g}",
            str(t.config.local_epochs),
            f"{t.config.mu:g}",
            str(t.rung),
            str(t.rounds),
            "-" if t.accuracy is None else f"{t.accuracy:.4f}",
            "-" if t.loss is None else f"{t.loss:.4f}",
            f"{t.wall_s:.1f}",
        ]
        for t in trials
    ]
