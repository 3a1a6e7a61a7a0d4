"""`hivenode sim learn`: several planners learn the swarm's Q-table from simulated jobs,
gossip it through the CRDT's wire path, and are scored against an exhaustive oracle.

Cost model (wall seconds T and nodes held n for one job; node-hours H = n·T/3600). A job has
P parameters, N samples, E epochs and batch B per node; a sample is TOKENS_PER_SAMPLE (64)
tokens, so F = 6·P·64 training FLOPs per sample (forward 2P, backward 4P per token), and
W = 4·P bytes of float32 weights. A node runs at its GPU's FLOP/s
when the memory it needs fits the GPU (less CUDA_CONTEXT_BYTES), else at its CPU's when it fits
RAM, else not at all. ρ is the nearest-rank p90 of the RTTs of the nodes involved (as the
planner's latency bin: a synchronous step waits for the slowest link).

- single_node: the fastest node that fits; T = E·N·F/f. Private data spread over k > 1
  holders cannot be trained on one of them (the target assumes all samples): the job fails.
- data_parallel: every fitting node (as `breakdown` does), batches ∝ throughput, so a step of
  n·B samples computes in n·B·F/Σf; ring all-reduce per step: 2(n−1)/n·W/bulk + (n−1)·ρ
  (2(n−1) sequential one-way hops of ρ/2); ⌈N/(n·B)⌉ steps an epoch.
- federated: every fitting node (for private data every holder must fit, or its share is
  lost and the job fails), equal shares N/n, FED_LOCAL_EPOCHS local epochs a round and
  R = ⌈E·FED_EPOCH_FACTOR/FED_LOCAL_EPOCHS⌉ rounds; a round waits for the slowest client,
  then every client's download and upload through the aggregator's link, 2·n·W/bulk + 2ρ,
  and the aggregation, n·W/AGGREGATE_BYTES_PER_S.
- pipeline / model parallel: the layers as a continuous chain; for S = 2..MAX_STAGES stages
  on the S fastest (or the S largest) nodes, each stage's share of the model ∝ its node's
  speed, capped by its memory (water-filling); per-sample stage time t_i = x_i·F/f_i; a
  hand-off moves the boundary activation a·b bytes forward and its gradient back over a
  libp2p stream plus ρ. Pipeline (GPipe, m micro-batches as `breakdown` picks them): a step
  is (m+S−1) slots of max_i t_i·B/m + 2·a·B/m/stream + ρ, so the bubble (S−1)/(m+S−1)
  is priced. Model parallel: B·Σt_i + (S−1)·(2·a·B/stream + ρ). The best S counts.
- Masked actions cannot be chosen; an action the planner allows but the cost model cannot
  run (memory, private data on one node) fails: reward −1, as the aggregator would report.
  Shipping the dataset to the nodes and evaluation are not priced.

Calibration: bulk transfers (weights, gradients, updates) at 390 MiB/s and activations at
114 MiB/s, the bulk channel and the default libp2p stream on loopback (docs/performance.md,
bench_transfer); aggregation at 5 GB/s (bench_aggregate); a CPU core at CORE_FLOPS = 40
GFLOP/s (numpy's float32 matmul reached 94 GFLOP/s on one core of the benchmark machine;
training is part matmul, part memory-bound); a GPU at 20 cores, the planner's own guess
(state.SAMPLES_PER_S_PER_GPU / SAMPLES_PER_S_PER_CORE). RTTs: per job one network regime
per latency bin, LAN 1–20 ms, regional 20–100 ms, WAN 100–300 ms; docs/performance.md
records no RTTs, so these are assumptions, as is FED_EPOCH_FACTOR (FedAvg needs more passes
than centralised SGD for the same accuracy). Bandwidth is the same on every link: the state
does not see it, and loopback's figure flatters a WAN.

Jobs: each state variable from a uniformly drawn bin (log-uniform within it), epochs from
EPOCHS, private with probability `private_share` (its data then spread evenly over every
candidate, the federated premise), candidates from CATALOGUE with ±30 % speed. A job that
no allowed action can run is drawn again (`redrawn_jobs`).

Learning and gossip: job i is planned by node i mod M with `QTable.choose` over the
planner's own `masked_actions` (no breakdown: `partition_layers` costs up to a second);
the node updates its table and publishes `deltas` since its last; each copy to each peer
travels as `to_wire` bytes and is lost (LOSS), delayed by up to MAX_DELAY_JOBS jobs (DELAY)
or also delivered again later (DUPLICATE), then `from_wire` and `SwarmTable.apply` with the
origin as signer. Every ANTI_ENTROPY_EVERY jobs each node resends all its cells (what repairs
losses); at the end everything in flight lands and a lossless full resend is the quiet round
after which `max_table_divergence` is measured.

Reward: `planner.rewards.reward` with the target reached on success and T_ref the job's
budget, DEADLINE_SLACK (2) × the compute alone on the median candidate: the slack the planner
gives a federated round's deadline. (With 1× instead, one typical node earns exactly 0, and
the table's unvisited cells, also 0, then outrank every slightly negative visited one.)

Oracle: per job, the allowed action of best reward by evaluating every action (regret =
its reward − the chosen one's). The table sees only the binned state and the mask, so per
*decision context* (state, allowed actions) the oracle's action is the one with the best
**mean reward over the jobs drawn in that context** (failures at −1): the best any policy
that sees what the planner sees can do on these jobs. `oracle_agreement` is the share of
visited contexts that allow two or more actions (one leaves nothing to get wrong) whose
greedy action after the quiet round is that action (or ties with it).
`oracle_agreement_exact_means` scores a table holding every (state, action)'s exact mean
reward over the drawn jobs: where endless exploration leads. Private data is not in the
state, so those means mix private and public jobs; and `masked_actions` lets single_node run
a private job on a candidate holding only part of the data, which fails here: that −1 drags
Q(state, single_node) down for the public jobs of the same state as well.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hivenode.models.analysis import CUDA_CONTEXT_BYTES
from hivenode.planner.breakdown import (
    BYTES_PER_PARAM_TRAINING,
    DEADLINE_SLACK,
    MICRO_BATCHES_PER_STAGE,
)
from hivenode.planner.crdt import DeltaRejected, Key, QDelta
from hivenode.planner.qtable import TIE_ORDER, Hyper, QTable
from hivenode.planner.rewards import JobOutcome, reward
from hivenode.planner.state import (
    ACTIONS,
    SAMPLES_PER_S_PER_CORE,
    SAMPLES_PER_S_PER_GPU,
    Action,
    JobShape,
    Layer,
    NodeView,
    State,
    capacity_bytes,
    encode,
    latency_percentile,
    masked_actions,
)

MIB = 2**20
GIB = 2**30
CORE_FLOPS = 40e9
GPU_FLOPS = CORE_FLOPS * SAMPLES_PER_S_PER_GPU / SAMPLES_PER_S_PER_CORE
BULK_BYTES_PER_S = 390 * MIB
STREAM_BYTES_PER_S = 114 * MIB
AGGREGATE_BYTES_PER_S = 5e9
FLOPS_PER_PARAM = 6
WEIGHT_BYTES = 4
FED_LOCAL_EPOCHS = 2
FED_EPOCH_FACTOR = 1.5
MAX_STAGES = 8
BUDGET_SLACK = DEADLINE_SLACK
LAYERS = 8
TOKENS_PER_SAMPLE = 64
"""Sequence length of a sample: sets the activation a stage boundary hands on."""
BATCH_SIZE = 32

PARAMS_RANGES = ((1e4, 1e6), (1e6, 1e8), (1e8, 1e9), (1e9, 1e10))
SAMPLES_RANGES = ((1e3, 1e4), (1e4, 1e5), (1e5, 1e6))
NODES_RANGES = ((1, 2), (3, 5), (6, 10), (11, 16))
RTT_RANGES_MS = ((1.0, 19.0), (20.0, 99.0), (100.0, 300.0))
"""One range per planner bin (p90 of RTTs drawn inside a range stays in its bin)."""
EPOCHS = (1, 2, 3, 5, 10)
PRIVATE_SHARE = 0.3


@dataclass(frozen=True)
class Machine:
    kind: str
    cores: int
    ram_gib: int
    gpu_gib: int
    weight: float


CATALOGUE = (
    Machine("laptop", 4, 16, 0, 0.30),
    Machine("desktop", 8, 32, 0, 0.25),
    Machine("workstation", 16, 64, 0, 0.15),
    Machine("gaming", 8, 32, 12, 0.20),
    Machine("gpu-server", 32, 256, 24, 0.10),
)
"""Volunteer hardware the candidates are drawn from, with how common each kind is."""

JOB_INTERVAL_S = 10.0
SIM_START = 1_700_000_000.0
"""A fixed simulated clock: the same seed gives the same sequence numbers and output."""
LOSS, DELAY, DUPLICATE = 0.1, 0.2, 0.1
MAX_DELAY_JOBS = 20
ANTI_ENTROPY_EVERY = 25
"""Jobs between full resends of every node's own cells: what repairs lost deltas."""
REGRET_WINDOW = 25


@dataclass(frozen=True)
class SimNode:
    view: NodeView
    cpu_flops: float
    gpu_flops: float

    def flops(self, need_bytes: float) -> float:
        """FLOP/s holding `need_bytes`: on the GPU when it fits, else the CPU, else 0."""
        gpu = self.view.gpu_memory_bytes - CUDA_CONTEXT_BYTES
        if self.view.gpu_memory_bytes and need_bytes <= gpu:
            return self.gpu_flops
        return self.cpu_flops if need_bytes <= self.view.memory_bytes else 0.0


@dataclass(frozen=True)
class SimJob:
    shape: JobShape
    nodes: tuple[SimNode, ...]
    handoff_bytes: int
    """Activation bytes per sample at a stage boundary."""

    @property
    def flops_per_sample(self) -> float:
        return float(FLOPS_PER_PARAM * self.shape.params * TOKENS_PER_SAMPLE)

    @property
    def need_bytes(self) -> int:
        assert self.shape.memory_bytes is not None
        return self.shape.memory_bytes

    @property
    def budget_s(self) -> float:
        """T_ref: the whole compute on the median candidate, at its best device."""
        speeds = sorted(max(n.cpu_flops, n.gpu_flops) for n in self.nodes)
        work = self.shape.epochs * self.shape.samples * self.flops_per_sample
        return BUDGET_SLACK * work / speeds[len(speeds) // 2]

    def rtt_s(self, nodes: Sequence[SimNode]) -> float:
        return latency_percentile([n.view.rtt_ms for n in nodes]) / 1000


@dataclass(frozen=True)
class Cost:
    wall_s: float
    nodes: int


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw_job(rng: np.random.Generator, private_share: float = PRIVATE_SHARE) -> SimJob:
    """A job and its candidates, each of the four state variables drawn from a uniform bin."""
    params = int(_log_uniform(rng, *PARAMS_RANGES[rng.integers(len(PARAMS_RANGES))]))
    samples = int(_log_uniform(rng, *SAMPLES_RANGES[rng.integers(len(SAMPLES_RANGES))]))
    low, high = NODES_RANGES[rng.integers(len(NODES_RANGES))]
    count = int(rng.integers(low, high + 1))
    rtt_low, rtt_high = RTT_RANGES_MS[rng.integers(len(RTT_RANGES_MS))]
    private = bool(rng.random() < private_share)
    epochs = int(EPOCHS[rng.integers(len(EPOCHS))])
    weights = np.array([m.weight for m in CATALOGUE])
    nodes = []
    for i in range(count):
        machine = CATALOGUE[rng.choice(len(CATALOGUE), p=weights / weights.sum())]
        jitter = float(rng.uniform(0.7, 1.3))  # same kind, different clocks and load
        view = NodeView(
            peer_id=f"cand-{i}",
            cores=machine.cores,
            memory_bytes=machine.ram_gib * GIB,
            gpu_memory_bytes=machine.gpu_gib * GIB,
            rtt_ms=round(float(rng.uniform(rtt_low, rtt_high)), 3),
            datasets={"data": samples // count} if private else {},
        )
        gpu = GPU_FLOPS * jitter if machine.gpu_gib else 0.0
        nodes.append(SimNode(view, machine.cores * CORE_FLOPS * jitter, gpu))
    # equal blocks of ~12·h² parameters (a transformer block), TOKENS_PER_SAMPLE wide
    width = max(8, round(math.sqrt(params / LAYERS / 12)))
    handoff = TOKENS_PER_SAMPLE * width * WEIGHT_BYTES
    saved = 2 * handoff  # a block's output and its nonlinearity, as models.analysis counts
    forward = 2.0 * params * TOKENS_PER_SAMPLE
    layers = tuple(
        Layer(f"block{i}", forward / LAYERS, params // LAYERS, saved, (TOKENS_PER_SAMPLE, width))
        for i in range(LAYERS)
    )
    need = BYTES_PER_PARAM_TRAINING * params + BATCH_SIZE * LAYERS * saved
    shape = JobShape(
        params=params,
        samples=samples,
        private=private,
        memory_bytes=need,
        dataset="data" if private else "",
        batch_size=BATCH_SIZE,
        epochs=epochs,
        layers=layers,
    )
    # the planner sees measured throughput for this job, as a trainer's advert would carry
    measured = tuple(
        replace(n, view=replace(n.view, throughput=n.flops(need) / (3 * forward) or None))
        for n in nodes
    )
    return SimJob(shape, measured, handoff)


def _single(job: SimJob) -> Cost | None:
    if job.shape.private and len(job.nodes) > 1:
        return None
    best = max(n.flops(job.need_bytes) for n in job.nodes)
    if best <= 0:
        return None
    return Cost(job.shape.epochs * job.shape.samples * job.flops_per_sample / best, 1)


def _data_parallel(job: SimJob) -> Cost | None:
    fitting = [n for n in job.nodes if n.flops(job.need_bytes) > 0]
    if not fitting:
        return None
    n, weights = len(fitting), WEIGHT_BYTES * job.shape.params
    batch = job.shape.batch_size * n
    compute = batch * job.flops_per_sample / sum(x.flops(job.need_bytes) for x in fitting)
    sync = 2 * (n - 1) / n * weights / BULK_BYTES_PER_S + (n - 1) * job.rtt_s(fitting)
    steps = math.ceil(job.shape.samples / batch)
    return Cost(job.shape.epochs * steps * (compute + sync), n)


def _federated(job: SimJob) -> Cost | None:
    fitting = [n for n in job.nodes if n.flops(job.need_bytes) > 0]
    if not fitting or (job.shape.private and len(fitting) < len(job.nodes)):
        return None
    n, weights = len(fitting), WEIGHT_BYTES * job.shape.params
    share = job.shape.samples / n
    slowest = min(x.flops(job.need_bytes) for x in fitting)
    compute = FED_LOCAL_EPOCHS * share * job.flops_per_sample / slowest
    transfer = 2 * n * weights / BULK_BYTES_PER_S + 2 * job.rtt_s(fitting)
    aggregate = n * weights / AGGREGATE_BYTES_PER_S
    rounds = math.ceil(job.shape.epochs * FED_EPOCH_FACTOR / FED_LOCAL_EPOCHS)
    return Cost(rounds * (compute + transfer + aggregate), n)


def _stage_shares(need: float, nodes: Sequence[SimNode]) -> list[float] | None:
    """Water-filling: shares of the model ∝ speed, each capped by its node's memory."""
    speed = [max(n.cpu_flops, n.gpu_flops) for n in nodes]
    cap = [capacity_bytes(n.view) / need for n in nodes]
    shares = [0.0] * len(nodes)
    free, left = set(range(len(nodes))), 1.0
    while free:
        total = sum(speed[i] for i in free)
        for i in free:
            shares[i] = left * speed[i] / total
        over = [i for i in free if shares[i] > cap[i]]
        if not over:
            return shares
        for i in over:
            shares[i] = cap[i]
            left -= cap[i]
            free.discard(i)
    return shares if left <= 1e-12 else None


def _micro_batches(batch: int, stages: int) -> int:
    wanted = MICRO_BATCHES_PER_STAGE * stages
    return next((d for d in range(wanted, batch + 1) if batch % d == 0), batch)


def _staged(job: SimJob, pipelined: bool) -> Cost | None:
    """The best stage count S on the S fastest or the S largest candidates."""
    best: Cost | None = None
    batch, need = job.shape.batch_size, job.need_bytes
    orders = (
        sorted(job.nodes, key=lambda n: -max(n.cpu_flops, n.gpu_flops)),
        sorted(job.nodes, key=lambda n: -max(n.view.memory_bytes, n.view.gpu_memory_bytes)),
    )
    for stages in range(2, min(len(job.nodes), MAX_STAGES) + 1):
        for order in orders:
            chosen = order[:stages]
            shares = _stage_shares(need, chosen)
            if shares is None:
                continue
            flops = [n.flops(x * need) for n, x in zip(chosen, shares, strict=True)]
            if min(flops) <= 0:
                continue
            per_sample = [x * job.flops_per_sample / f for x, f in zip(shares, flops, strict=True)]
            rtt = job.rtt_s(chosen)
            if pipelined:
                micro = _micro_batches(batch, stages)
                per_micro = batch / micro
                hop = 2 * job.handoff_bytes * per_micro / STREAM_BYTES_PER_S + rtt
                step = (micro + stages - 1) * (max(per_sample) * per_micro + hop)
            else:
                hop = 2 * job.handoff_bytes * batch / STREAM_BYTES_PER_S + rtt
                step = batch * sum(per_sample) + (stages - 1) * hop
            wall = job.shape.epochs * math.ceil(job.shape.samples / batch) * step
            if best is None or wall < best.wall_s:
                best = Cost(wall, stages)
    return best


COST_MODEL: dict[Action, Callable[[SimJob], Cost | None]] = {
    Action.DATA_PARALLEL: _data_parallel,
    Action.MODEL_PARALLEL: lambda job: _staged(job, pipelined=False),
    Action.PIPELINE_PARALLEL: lambda job: _staged(job, pipelined=True),
    Action.FEDERATED: _federated,
    Action.SINGLE_NODE: _single,
}


def job_reward(job: SimJob, cost: Cost | None) -> float:
    """What the aggregator would report: `planner.rewards` on the simulated outcome."""
    return reward(
        JobOutcome(
            succeeded=cost is not None,
            metric=1.0 if cost is not None else None,
            target=1.0,
            wall_s=cost.wall_s if cost else 0.0,
            node_hours=cost.nodes * cost.wall_s / 3600 if cost else 0.0,
            reference_wall_s=job.budget_s,
        )
    )


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
    """Draw `jobs` jobs, let `nodes` planners choose (round-robin, ε-greedy), learn and
    gossip; then a quiet round and the scores (see the module docstring)."""
    if jobs < 1 or nodes < 1 or not 0 <= private_share <= 1:
        raise ValueError("need jobs ≥ 1, nodes ≥ 1 and private_share in [0, 1]")
    hyper = hyper or Hyper()
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
