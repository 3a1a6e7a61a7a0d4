"""The cost model of `hivenode sim learn`: simulated jobs on volunteer candidates, the wall
time and nodes each action would take, and the reward the aggregator would report.

Cost model (wall seconds T and nodes held n for one job; node-hours H = n·T/3600). A job has
P parameters, N samples, E epochs and batch B per node; a sample is TOKENS_PER_SAMPLE (64)
tokens, so F = 6·P·64 training FLOPs per sample (forward 2P, backward 4P per token), and
W = 4·P bytes of float32 weights. A node runs at its GPU's FLOP/s when the memory it needs fits
the GPU (less CUDA_CONTEXT_BYTES), else at its CPU's when it fits RAM, else not at all. ρ is
the nearest-rank p90 of the RTTs of the nodes involved (as the planner's latency bin: a
synchronous step waits for the slowest link).

- single_node: the fastest node that fits; T = E·N·F/f. Private data spread over k > 1
  holders cannot be trained on one of them (the target assumes all samples): the job would
  fail, and `masked_actions` masks single_node there (no candidate holds every sample).
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
  run (a memory estimate the planner gets wrong, say) fails: reward −1, as the aggregator
  would report.
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

Reward: `planner.rewards.reward` with the target reached on success and T_ref the job's
budget, DEADLINE_SLACK (2) × the compute alone on the median candidate: the slack the planner
gives a federated round's deadline. One typical node alone then takes T_ref/2 and earns
r = 2/3 + 2/3 − 1 = +1/3; one node taking the whole budget earns r = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from hivenode.models.analysis import CUDA_CONTEXT_BYTES
from hivenode.planner.breakdown import (
    BYTES_PER_PARAM_TRAINING,
    DEADLINE_SLACK,
    MICRO_BATCHES_PER_STAGE,
)
from hivenode.planner.rewards import JobOutcome, reward
from hivenode.planner.state import (
    SAMPLES_PER_S_PER_CORE,
    SAMPLES_PER_S_PER_GPU,
    Action,
    JobShape,
    Layer,
    NodeView,
    capacity_bytes,
    latency_percentile,
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
