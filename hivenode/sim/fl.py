"""`hivenode sim fl`: federated jobs on a swarm of real in-process nodes on 127.0.0.1.

One node aggregates; every other node is a trainer holding one device's partition of the
dataset, registered through its own dataset catalog exactly as `hivenode data add` does.
The strategies run one after another on the same swarm, each as its own job, so they see
the same data, the same selection seed and the same stragglers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.identity import peer_id_of
from hivenode.agent.node import Node
from hivenode.agent.trainer import Trainer, builtin_trainer
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import JobResult, RoundRecord, run_job
from hivenode.models.datasets import DatasetCatalog
from hivenode.protocol.advert import Role
from hivenode.protocol.ids import BUILTIN_APP
from hivenode.sim.fl_datasets import federated_dataset, save_partition
from hivenode.sim.hostile import Attack, hostile_app, hostile_trainers
from hivenode.sim.swarm import quiet_libp2p, sim_settings

log = logging.getLogger(__name__)

SIM_DATASET = "fl-sim"
JOIN_WAIT_S = 60.0


@dataclass(frozen=True)
class StrategyRun:
    """One strategy of the comparison, e.g. "fedprox:1" → FedProx with μ = 1."""

    label: str
    name: str
    mu: float
    drop_stragglers: bool
    privacy: tuple[tuple[str, Any], ...] = ()
    """The jobs' [privacy] section (`JobSpec.privacy`) as items; empty: none."""

    @classmethod
    def parse(cls, text: str, default_mu: float, policy: str | None) -> StrategyRun:
        name, _, mu_text = text.partition(":")
        name = name.strip().lower()
        mu = float(mu_text) if mu_text else (default_mu if name == "fedprox" else 0.0)
        # the FedProx paper's FedAvg drops stragglers; its FedProx keeps their partial work
        drop = policy == "drop" if policy else name == "fedavg"
        label = f"fedprox μ={mu:g}" if name == "fedprox" else name
        return cls(label, name, mu, drop)

    def with_privacy(self, privacy: dict[str, Any]) -> StrategyRun:
        """This run under `privacy` (a [privacy] section), labelled with what it adds."""
        tags = []
        if privacy.get("secure_aggregation"):
            tags.append("secagg")
        if privacy.get("dp", "none") != "none":
            tags.append(f"dp z={privacy.get('noise_multiplier', 1.0):g}")
        label = f"{self.label} {'+'.join(tags)}" if tags else self.label
        return replace(self, label=label, privacy=tuple(sorted(privacy.items())))


@dataclass
class FlSimConfig:
    nodes: int = 10
    dataset: str = "digits"
    partition: str = "iid"
    strategies: Sequence[StrategyRun] = ()
    framework: str = "torch"
    model: str = "mlp"
    rounds: int = 10
    clients_per_round: int = 10
    local_epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    stragglers: float = 0.0
    seed: int = 0
    deadline_s: float = 600.0
    evaluate_fraction: float = 1.0
    model_options: dict[str, Any] = field(default_factory=dict)
    attackers: float = 0.0
    """Share of the trainers that send attacked updates (`hivenode.sim.hostile`): the last ones."""
    attack: str = "sign-flip"
    """An `Attack` value, or "mixed" for each in turn."""
    screen_updates: bool = True
    """The jobs' update screen (off: hostile updates reach the strategy unchecked)."""
    compression: str = "none"
    """How trainers compress their updates (`JobSpec.compression`): none, fp16, int8, topk:F."""


@dataclass
class StrategyOutcome:
    label: str
    result: JobResult

    def summary(self) -> dict[str, Any]:
        history = self.result.history
        final = history[-1] if history else None
        overheads = [max(0.0, r.duration_s - r.compute_s) * 1000 for r in history]
        privacy = self.result.privacy
        return {
            "epsilon": privacy.epsilon if privacy else None,
            "delta": privacy.delta if privacy else None,
            "round_s": round(statistics.median(r.duration_s for r in history), 3)
            if history
            else None,
            # tensor bytes on the wire, as sent: compressed updates count compressed
            "bytes_in_per_round": _median([r.bytes_in for r in history]),
            "bytes_out_per_round": _median([r.bytes_out for r in history]),
            "final_accuracy": final.eval_accuracy if final else None,
            "final_loss": _loss(final) if final else None,
            "rounds": len(history),
            "wall_s": round(self.result.wall_s, 3),
            "round_overhead_ms": round(statistics.median(overheads), 2) if overheads else None,
            "history": [
                {
                    "round": r.round,
                    "loss": _loss(r),
                    "accuracy": r.eval_accuracy,
                    "bytes_in": r.bytes_in,
                    "bytes_out": r.bytes_out,
                }
                for r in history
            ],
        }


def _median(values: list[int]) -> float | None:
    return statistics.median(values) if values else None


def _loss(record: RoundRecord) -> float | None:
    """The paper's training loss: the global model on the trainers' own training data."""
    return record.global_train_loss if record.global_train_loss is not None else record.train_loss


def _job_name(config: FlSimConfig, run: StrategyRun) -> str:
    # the scheme is in the name: trainers keep top-k's residual per job, never across schemes
    scheme = "" if config.compression == "none" else f"-{config.compression}"
    # and the privacy: a SecAgg+ trainer keeps its protocol state per job
    private = "".join(f"-{value}" for _, value in run.privacy)
    name = f"sim-{run.name}-{run.mu:g}-{config.seed}{scheme}{private}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[-64:]


def job_for(config: FlSimConfig, run: StrategyRun, trainers: Sequence[str]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": _job_name(config, run),
            "dataset": SIM_DATASET,
            "rounds": config.rounds,
            "clients_per_round": min(config.clients_per_round, config.nodes),
            "deadline_s": config.deadline_s,
            "evaluate_fraction": config.evaluate_fraction,
            "straggler_policy": "drop" if run.drop_stragglers else "partial",
            "seed": config.seed,
            "trainers": list(trainers),
            "model": {
                "framework": config.framework,
                "name": config.model,
                "options": config.model_options,
            },
            "strategy": {
                "name": run.name,
                "mu": run.mu,
                "malicious": round(config.nodes * config.attackers),
            },
            "screen_updates": config.screen_updates,
            "privacy": dict(run.privacy),
            "compression": config.compression,
            "train": {
                "lr": config.lr,
                "local_epochs": config.local_epochs,
                "batch_size": config.batch_size,
                "straggler_fraction": config.stragglers,
            },
        }
    )


async def run_fl_sim(
    config: FlSimConfig,
    *,
    on_round: Any = None,
    work_dir: Path | None = None,
    faults: Callable[[RoundRecord, Sequence[Node]], None] | None = None,
    keep_jobs: Path | None = None,
) -> list[StrategyOutcome]:
    """Start the swarm, run every strategy as a job, stop the swarm.

    `faults`, called after every round with the trainer nodes, may stop some of them (the
    fault scenarios do); `on_round(label, record)` reports progress; `keep_jobs` keeps the
    jobs' directories (checkpoints, final models) there instead of deleting them."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    quiet_libp2p()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # a line per round per node otherwise
    devices = await trio.to_thread.run_sync(
        lambda: federated_dataset(
            config.dataset, config.nodes, partition=config.partition, seed=config.seed
        )
    )
    attacks = hostile_trainers(config.nodes, config.attackers, config.attack)
    with tempfile.TemporaryDirectory(prefix="hivenode-fl-", dir=work_dir) as tmp:
        base = Path(tmp)
        probe = HardwareProbe(base)
        # trainers share the machine: as many training threads as cores, not one per node
        limiter = trio.CapacityLimiter(max(1, os.cpu_count() or 1))
        if config.framework in ("torch", "hf"):
            _one_torch_thread()
        nodes: list[Node] = []
        outcomes: list[StrategyOutcome] = []
        async with trio.open_nursery() as nursery:
            aggregator_settings = sim_settings(base, 0, []).model_copy(
                update={"roles": [Role.AGGREGATOR]}
            )
            aggregator = Node(aggregator_settings, create_new_key_pair(), probe)
            await nursery.start(aggregator.run)
            nodes.append(aggregator)
            hub = [aggregator.swarm.listen_addrs()[0]]
            for index, device in enumerate(devices, start=1):
                settings = sim_settings(base, index, hub).model_copy(
                    update={"roles": [Role.TRAINER]}
                )
                state_dir = settings.state_dir
                assert state_dir is not None
                await trio.to_thread.run_sync(_register_partition, device, state_dir)
                key_pair = create_new_key_pair()
                trainer = builtin_trainer(state_dir, peer_id_of(key_pair), limiter)
                if index - 1 in attacks:
                    _turn_hostile(trainer, attacks[index - 1], config.seed)
                node = Node(settings, key_pair, probe, trainer=trainer)
                await nursery.start(node.run)
                nodes.append(node)
            try:
                for run in config.strategies:
                    job = job_for(config, run, [n.peer_id for n in nodes[1:]])
                    callback = _round_callback(run.label, on_round, faults, nodes[1:])
                    result = await run_job(
                        aggregator,
                        job,
                        (keep_jobs or base / "jobs") / job.name,
                        on_round=callback,
                        trainer_wait_s=JOIN_WAIT_S,
                    )
                    outcomes.append(StrategyOutcome(run.label, result))
            finally:
                for node in nodes:
                    node.stop()
    return outcomes


def _round_callback(
    label: str,
    on_round: Any,
    faults: Callable[[RoundRecord, Sequence[Node]], None] | None,
    trainers: Sequence[Node],
) -> Callable[[RoundRecord], None] | None:
    if on_round is None and faults is None:
        return None

    def callback(record: RoundRecord) -> None:
        if on_round is not None:
            on_round(label, record)
        if faults is not None:
            faults(record, trainers)

    return callback


def _turn_hostile(trainer: Trainer, attack: Attack, seed: int) -> None:
    trainer.apps = {
        **trainer.apps,
        BUILTIN_APP: hostile_app(trainer.apps[BUILTIN_APP], attack, seed),
    }


def _one_torch_thread() -> None:
    """Trainers already run one per core; torch's own intra-op threads would fight them."""
    import torch

    torch.set_num_threads(1)


def _register_partition(device: Any, state_dir: Path) -> None:
    path = state_dir / "partition.npz"
    state_dir.mkdir(parents=True, exist_ok=True)
    save_partition(device, path)
    DatasetCatalog(state_dir).add(SIM_DATASET, f"npz:{path}", preprocessing="none", replace=True)


def write_results(outcomes: Sequence[StrategyOutcome], out: Path, title: str) -> list[Path]:
    """Per-round metrics as JSON and CSV, and a PNG of loss and accuracy per round."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    summary = {o.label: o.summary() for o in outcomes}
    json_path = out / "metrics.json"
    json_path.write_text(json.dumps({"title": title, "strategies": summary}, indent=2))
    written.append(json_path)
    csv_path = out / "metrics.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        fields = list(RoundRecord.__dataclass_fields__)
        writer.writerow(["strategy", *fields])
        for outcome in outcomes:
            for record in outcome.result.history:
                row = record.as_json()
                writer.writerow([outcome.label, *(row[f] for f in fields)])
    written.append(csv_path)
    written.append(plot_results(outcomes, out / "metrics.png", title))
    return written


def plot_results(outcomes: Sequence[StrategyOutcome], path: Path, title: str) -> Path:
    histories = {
        o.label: [
            {"round": r.round, "loss": _loss(r), "accuracy": r.eval_accuracy}
            for r in o.result.history
        ]
        for o in outcomes
    }
    return plot_histories(histories, path, title)


def plot_histories(histories: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Loss and accuracy per round, one line per label; rows hold round, loss, accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in histories.items():
        rounds = [row["round"] for row in rows]
        loss_axis.plot(rounds, [row["loss"] for row in rows], label=label)
        accuracy_axis.plot(rounds, [row["accuracy"] for row in rows], label=label)
    loss_axis.set(xlabel="round", ylabel="training loss", title="loss")
    accuracy_axis.set(xlabel="round", ylabel="test accuracy", title="accuracy")
    accuracy_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
