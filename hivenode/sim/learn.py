"""`hivenode sim learn`: several planners learn the swarm's Q-table from simulated jobs,
gossip it through the CRDT's wire path, and are scored against an exhaustive oracle.

The jobs, what each action costs and the reward are `sim.learn_costs`'s.

Learning and gossip: job i is planned by node i mod M with `QTable.choose` over the
planner's own `masked_actions` (no breakdown: `partition_layers` costs up to a second);
the node updates its table and publishes `deltas` since its last; each copy to each peer
travels as `to_wire` bytes and is lost (LOSS), delayed by up to MAX_DELAY_JOBS jobs (DELAY)
or also delivered again later (DUPLICATE), then `from_wire` and `SwarmTable.apply` with the
origin as signer. Every ANTI_ENTROPY_EVERY jobs each node resends all its cells (what repairs
losses); at the end everything in flight lands and a lossless full resend is the quiet round
after which `max_table_divergence` is measured.

Learning phase (LEARNING_PHASE, the flags of `sim learn`): the learners run with the settings
an operator would give a swarm that is still filling its table, not the planner's day-to-day
defaults (`qtable.Hyper`): the default prior (untried actions valued at 0) and a constant
ε = 0.02. What explores is the prior: in each state greedy first tries the least-coordinated
allowed action (TIE_ORDER's first, see `planner.qtable`), then runs the allowed actions in
turn until one earns more than 0 (a typical node alone earns about +1/3, see
`sim.learn_costs`), and keeps the best. Random ε draws explore far worse here: 500 jobs over
~140 states leave ~3.6 jobs a state, and a random draw spends one of them on one noisy sample
of an arbitrary action. The small ε stays so that a state whose first good enough action is
not its best can still find out. Measured over seeds 5–24 (500 jobs, 5 nodes; seeds 0–4, the
acceptance's, took no part in choosing), mean (lowest) of the 20, with the rule that tries
the least-coordinated action first (before it, 2026-11-27, in brackets):

    untried_value  ε                                 oracle_agreement            final_regret
    0              0.1, ×0.995 a choice, floor 0.01  0.946 (0.915) [0.867]       0.031 [0.063]
    −1             0.1, ×0.995 a choice, floor 0.01  0.956 (0.939) [0.741]       0.030 [0.126]
    0              1, ×0.97 a choice, floor 0.05     0.931 (0.883) [0.746]       0.025 [0.084]
    0              0.02                              0.950 (0.906) [0.887]       0.019 [0.049]
    +0.1           0.02                              0.946 (0.901) [0.915]       0.019 [0.030]
    +0.1           0                                 0.949 (0.906) [0.924]       0.007 [0.018]
    +1/3           0.02                              0.825 (0.772) [0.817]       0.053 [0.055]
    (an untrained table)                             0.968 (0.947)

LEARNING_PHASE is the fourth row: near the best agreement at a third of the regret of the
rows that beat it. On the acceptance seeds 0–4 it gives 0.907, 0.969, 0.974, 0.981, 0.964.

The last row is the honest caveat: the cost model makes single_node, TIE_ORDER's first, the
best action in most contexts that allow it (federated where data is private, pipeline
parallel where no node fits the model), so an empty table, whose greedy action is the first
allowed one in TIE_ORDER, agrees more than any learner does after ~3.6 jobs a state: each
learner's disagreements are states where one noisy sample of single node lost to another
action. Every run reports it as `oracle_agreement_untrained` (seeds 0–4: 0.957, 0.981,
0.980, 0.994, 0.964).

Oracle: per job, the allowed action of best reward by evaluating every action (regret =
its reward − the chosen one's). The table sees only the binned state and the mask, so per
*decision context* (state, allowed actions) the oracle's action is the one with the best
**mean reward over the jobs drawn in that context** (failures at −1): the best any policy
that sees what the planner sees can do on these jobs. `oracle_agreement` is the share of
visited contexts that allow two or more actions (one leaves nothing to get wrong) whose
greedy action after the quiet round is that action (or ties with it).
`oracle_agreement_exact_means` scores a table holding every (state, action)'s exact mean
reward over the drawn jobs: where endless exploration leads. Private data is not in the
state, so those means mix private and public jobs. `oracle_agreement_untrained` scores an
empty table, whose greedy action is TIE_ORDER's first allowed one: the baseline.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hivenode.planner.crdt import DeltaRejected, Key, QDelta
from hivenode.planner.qtable import TIE_ORDER, Hyper, QTable
from hivenode.planner.state import ACTIONS, Action, State, encode, masked_actions
from hivenode.sim.learn_costs import (
    AGGREGATE_BYTES_PER_S,
    BULK_BYTES_PER_S,
    CORE_FLOPS,
    COST_MODEL,
    FED_EPOCH_FACTOR,
    FED_LOCAL_EPOCHS,
    GPU_FLOPS,
    PRIVATE_SHARE,
    RTT_RANGES_MS,
    STREAM_BYTES_PER_S,
    draw_job,
    job_reward,
)

LEARNING_PHASE = Hyper(epsilon=0.02, epsilon_decay=1.0, epsilon_min=0.02)
"""The learners' settings unless the caller gives others (see the module docstring)."""

JOB_INTERVAL_S = 10.0
SIM_START = 1_700_000_000.0
"""A fixed simulated clock: the same seed gives the same sequence numbers and output."""
LOSS, DELAY, DUPLICATE = 0.1, 0.2, 0.1
MAX_DELAY_JOBS = 20
ANTI_ENTROPY_EVERY = 25
"""Jobs between full resends of every node's own cells: what repairs lost deltas."""
REGRET_WINDOW = 25


@dataclass(frozen=True)
class JobRecord:
    index: int
    state: State
    allowed: tuple[Action, ...]
    rewards: dict[Action, float]
    """Every allowed action's reward (−1 where the cost model cannot run it)."""
    chosen: Action
    explored: bool
    planner: int

    @property
    def oracle_reward(self) -> float:
        return max(self.rewards.values())

    @property
    def regret(self) -> float:
        return self.oracle_reward - self.rewards[self.chosen]

    @property
    def context(self) -> tuple[State, tuple[Action, ...]]:
        return self.state, self.allowed


@dataclass
class GossipStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    delayed: int = 0
    duplicated: int = 0
    rejected: int = 0
    """Deliveries the CRDT refused: duplicates and copies superseded by a newer delta."""
    resends: int = 0


@dataclass
class _Swarm:
    """M planners and the lossy gossip between them: deltas travel as bytes."""

    tables: list[QTable]
    rng: np.random.Generator
    stats: GossipStats = field(default_factory=GossipStats)
    published: list[int] = field(default_factory=list)
    queue: list[tuple[float, int, int, bytes]] = field(default_factory=list)
    """(due job, send order, recipient, wire bytes): deterministic delivery order."""
    sends: int = 0

    def publish(self, sender: int, job: int, now: float, *, resend: bool, lossy: bool) -> None:
        table = self.tables[sender]
        since = -1 if resend else self.published[sender]
        for delta in table.swarm.deltas(since=since, now=now):
            self.published[sender] = max(self.published[sender], delta.seq)
            wire = delta.to_wire()
            for recipient in range(len(self.tables)):
                if recipient != sender:
                    self._send(recipient, wire, job, lossy)

    def _send(self, recipient: int, wire: bytes, job: int, lossy: bool) -> None:
        self.stats.sent += 1
        fate = self.rng.random() if lossy else 1.0
        later = job + int(self.rng.integers(1, MAX_DELAY_JOBS + 1)) if lossy else job
        if fate < LOSS:
            self.stats.lost += 1
            return
        if fate < LOSS + DELAY:
            self.stats.delayed += 1
            self._enqueue(later, recipient, wire)
            return
        if fate < LOSS + DELAY + DUPLICATE:
            self.stats.duplicated += 1
            self._enqueue(later, recipient, wire)
        self._enqueue(job, recipient, wire)

    def _enqueue(self, due: int, recipient: int, wire: bytes) -> None:
        self.sends += 1
        self.queue.append((due, self.sends, recipient, wire))

    def deliver(self, upto: float, now: float) -> None:
        """Apply every delta due by job `upto`, in the order they were due."""
        due = sorted(item for item in self.queue if item[0] <= upto)
        self.queue = [item for item in self.queue if item[0] > upto]
        for _, _, recipient, wire in due:
            delta = QDelta.from_wire(wire)
            try:  # the agent verified the libp2p signature: here the signer is the origin
                self.tables[recipient].swarm.apply(delta, delta.origin, now=now)
                self.stats.delivered += 1
            except DeltaRejected:
                self.stats.rejected += 1

    def quiet_round(self, job: int, now: float) -> None:
        """Deliver everything in flight, then every node resends all its cells, losslessly."""
        self.deliver(math.inf, now)
        for sender in range(len(self.tables)):
            self.publish(sender, job, now, resend=True, lossy=False)
        self.deliver(job, now)

    def divergence(self) -> float:
        values = [table.values for table in self.tables]
        return max((float(np.max(np.abs(a - b))) for a in values for b in values), default=0.0)


@dataclass(frozen=True)
class Agreement:
    contexts: int
    """Visited decision contexts with a choice (two or more allowed actions)."""
    agreeing: int
    without_choice: int
    """Visited contexts with one allowed action: nothing to get wrong, not counted."""
    by_state: float
    job_weighted: float
    greedy_loss: float
    """Job-weighted mean of (oracle's mean reward − greedy action's) over contexts."""
    disagreements: tuple[dict[str, Any], ...]

    @property
    def share(self) -> float:
        return self.agreeing / self.contexts if self.contexts else 0.0


def oracle_agreement(table: QTable, records: Sequence[JobRecord]) -> Agreement:
    """The greedy action per decision context against the best mean reward there."""
    groups: dict[tuple[State, tuple[Action, ...]], list[JobRecord]] = defaultdict(list)
    for record in records:
        groups[record.context].append(record)
    agreeing = weighted = without_choice = counted = 0
    loss = 0.0
    per_state: dict[State, list[tuple[int, bool]]] = defaultdict(list)
    disagreements = []
    for (state, allowed), jobs in groups.items():
        if len(allowed) < 2:
            without_choice += 1
            continue
        means = {a: float(np.mean([r.rewards[a] for r in jobs])) for a in allowed}
        best = max(means.values())
        oracle = [a for a in TIE_ORDER if a in allowed and means[a] >= best - 1e-12]
        greedy = table.greedy(state, allowed)
        ok = greedy in oracle
        agreeing += ok
        counted += len(jobs)
        weighted += len(jobs) * ok
        loss += len(jobs) * (best - means[greedy])
        per_state[state].append((len(jobs), ok))
        if not ok:
            disagreements.append(
                {
                    "state": state.key(),
                    "allowed": [a.value for a in allowed],
                    "jobs": len(jobs),
                    "oracle": oracle[0].value,
                    "greedy": greedy.value,
                    "mean_reward_gap": round(best - means[greedy], 4),
                }
            )
    by_state = [
        sum(n for n, ok in rows if ok) / sum(n for n, _ in rows) for rows in per_state.values()
    ]
    return Agreement(
        contexts=len(groups) - without_choice,
        agreeing=agreeing,
        without_choice=without_choice,
        by_state=float(np.mean(by_state)) if by_state else 0.0,
        job_weighted=weighted / counted if counted else 0.0,
        greedy_loss=loss / counted if counted else 0.0,
        disagreements=tuple(
            sorted(disagreements, key=lambda d: (-d["jobs"] * d["mean_reward_gap"], d["state"]))
        ),
    )


def exact_table(records: Sequence[JobRecord]) -> QTable:
    """A table holding, per (state, action), the mean reward over every job of that state
    that allowed the action: what the table converges to with endless exploration and
    averaging (1/n steps rather than a constant α)."""
    rewards: dict[Key, list[float]] = defaultdict(list)
    for record in records:
        for action, value in record.rewards.items():
            rewards[(*record.state.index, ACTIONS.index(action))].append(value)
    table = QTable("exact")
    for key, values in sorted(rewards.items()):
        table.swarm.set_own(key, len(values), float(np.mean(values)), SIM_START)
    return table


@dataclass(frozen=True)
class LearnResult:
    records: tuple[JobRecord, ...]
    agreement: Agreement
    untrained: Agreement
    """The agreement of an empty table (greedy = TIE_ORDER's first allowed action): the
    baseline learning has to beat."""
    exact_means: Agreement
    """The agreement of `exact_table`: where endless exploration would lead. Not a bound
    (another table can agree by chance in more contexts), but what the binning allows."""
    curve: tuple[tuple[int, float], ...]
    """(jobs seen, node 0's agreement on the contexts seen so far) along the run."""
    divergence: float
    gossip: GossipStats
    redrawn: int
    nodes: int
    seed: int
    hyper: Hyper
    private_share: float

    def regrets(self) -> list[float]:
        return [r.regret for r in self.records]

    def summary(self) -> dict[str, Any]:
        regrets = self.regrets()
        tail = regrets[-max(1, len(regrets) // 10) :]
        last = self.records[-len(tail) :]
        chosen = {a.value: sum(r.chosen is a for r in self.records) for a in ACTIONS}
        return {
            "jobs": len(self.records),
            "nodes": self.nodes,
            "seed": self.seed,
            "private_share": self.private_share,
            "oracle_agreement": round(self.agreement.share, 6),
            "oracle_agreement_by_state": round(self.agreement.by_state, 6),
            "oracle_agreement_job_weighted": round(self.agreement.job_weighted, 6),
            "oracle_agreement_exact_means": round(self.exact_means.share, 6),
            "oracle_agreement_untrained": round(self.untrained.share, 6),
            "oracle_definition": (
                "per decision context (Q-table state + allowed actions): the action with the "
                "best mean reward over the jobs drawn in it; share of the visited contexts "
                "that allow two or more actions"
            ),
            "contexts_visited": self.agreement.contexts,
            "contexts_without_choice": self.agreement.without_choice,
            "states_visited": len({r.state for r in self.records}),
            "greedy_loss": round(self.agreement.greedy_loss, 6),
            "job_oracle_agreement_final": round(
                float(np.mean([r.rewards[r.chosen] >= r.oracle_reward - 1e-12 for r in last])), 6
            ),
            "final_regret": round(float(np.mean(tail)), 6),
            "mean_regret": round(float(np.mean(regrets)), 6),
            "cumulative_regret": round(float(np.sum(regrets)), 6),
            "explored": sum(r.explored for r in self.records),
            "chosen": chosen,
            "redrawn_jobs": self.redrawn,
            "max_table_divergence": self.divergence,
            "gossip": self.gossip.__dict__,
            "hyper": self.hyper.__dict__,
            "disagreements": list(self.agreement.disagreements[:10]),
            "calibration": {
                "core_flops": CORE_FLOPS,
                "gpu_flops": GPU_FLOPS,
                "bulk_bytes_per_s": BULK_BYTES_PER_S,
                "stream_bytes_per_s": STREAM_BYTES_PER_S,
                "aggregate_bytes_per_s": AGGREGATE_BYTES_PER_S,
                "rtt_ranges_ms": [list(r) for r in RTT_RANGES_MS],
                "fed_local_epochs": FED_LOCAL_EPOCHS,
                "fed_epoch_factor": FED_EPOCH_FACTOR,
            },
        }


def run_learning(
    jobs: int,
    nodes: int = 5,
    seed: int = 0,
    *,
    hyper: Hyper | None = None,
    private_share: float = PRIVATE_SHARE,
) -> LearnResult:
    """Draw `jobs` jobs, let `nodes` planners choose (round-robin, ε-greedy with `hyper`,
    LEARNING_PHASE by default), learn and gossip; then a quiet round and the scores (see the
    module docstring)."""
    if jobs < 1 or nodes < 1 or not 0 <= private_share <= 1:
        raise ValueError("need jobs ≥ 1, nodes ≥ 1 and private_share in [0, 1]")
    hyper = hyper or LEARNING_PHASE
    streams = np.random.SeedSequence(seed).spawn(nodes + 2)
    job_rng, gossip_rng = np.random.default_rng(streams[0]), np.random.default_rng(streams[1])
    tables = [
        QTable(f"sim-node-{i}", hyper=hyper, seed=int(streams[2 + i].generate_state(1)[0]))
        for i in range(nodes)
    ]
    swarm = _Swarm(tables, gossip_rng, published=[-1] * nodes)
    records: list[JobRecord] = []
    curve: list[tuple[int, float]] = []
    redrawn = 0
    every = max(1, jobs // 50)
    for index in range(jobs):
        now = SIM_START + index * JOB_INTERVAL_S
        swarm.deliver(index, now)
        while True:  # a job no action can run teaches nothing: draw another
            job = draw_job(job_rng, private_share)
            masked = masked_actions(job.shape, [n.view for n in job.nodes])
            allowed = tuple(a for a in ACTIONS if a not in masked)
            costs = {a: COST_MODEL[a](job) for a in allowed}
            if any(cost is not None for cost in costs.values()):
                break
            redrawn += 1
        state = encode(job.shape, [n.view for n in job.nodes]).state
        planner = index % nodes
        chosen, explored = tables[planner].choose(state, list(allowed))
        rewards = {a: job_reward(job, cost) for a, cost in costs.items()}
        tables[planner].update(state, chosen, rewards[chosen], now=now)
        records.append(JobRecord(index, state, allowed, rewards, chosen, explored, planner))
        swarm.publish(planner, index, now, resend=False, lossy=True)
        if (index + 1) % ANTI_ENTROPY_EVERY == 0:
            swarm.stats.resends += 1
            for sender in range(nodes):
                swarm.publish(sender, index, now, resend=True, lossy=True)
        if (index + 1) % every == 0 or index + 1 == jobs:
            curve.append((index + 1, oracle_agreement(tables[0], records).share))
    swarm.quiet_round(jobs, SIM_START + jobs * JOB_INTERVAL_S)
    return LearnResult(
        records=tuple(records),
        agreement=oracle_agreement(tables[0], records),
        untrained=oracle_agreement(QTable("untrained", hyper=hyper), records),
        exact_means=oracle_agreement(exact_table(records), records),
        curve=tuple(curve),
        divergence=swarm.divergence(),
        gossip=swarm.stats,
        redrawn=redrawn,
        nodes=nodes,
        seed=seed,
        hyper=hyper,
        private_share=private_share,
    )


def plot_learning(result: LearnResult, out: Path) -> Path:
    """Regret per job (moving average and cumulative) and the agreement along the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    regrets = np.array(result.regrets())
    window = min(REGRET_WINDOW, len(regrets))
    moving = np.convolve(regrets, np.ones(window) / window, mode="valid")
    x = np.arange(1, len(regrets) + 1)
    figure, (per_job, cumulative, agreement) = plt.subplots(1, 3, figsize=(15, 4))
    per_job.plot(x, regrets, ".", alpha=0.25, label="regret")
    per_job.plot(x[window - 1 :], moving, label=f"moving average ({window})")
    per_job.set(xlabel="job", ylabel="oracle reward − chosen", title="regret per job")
    per_job.legend()
    cumulative.plot(x, np.cumsum(regrets))
    cumulative.set(xlabel="job", ylabel="Σ regret", title="cumulative regret")
    agreement.plot([c[0] for c in result.curve], [c[1] for c in result.curve])
    agreement.set(xlabel="job", ylabel="share of contexts", ylim=(0, 1.02), title="greedy = oracle")
    figure.suptitle(
        f"{len(regrets)} jobs, {result.nodes} nodes, seed {result.seed}: "
        f"agreement {result.agreement.share:.3f}"
    )
    figure.tight_layout()
    path = out / "learn.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
