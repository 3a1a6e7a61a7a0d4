"""How a job runs on the chosen nodes: data shards, layer stages or federated participants,
and the coordination that holds them together. Pure functions of `JobShape` and `NodeView`s.

Node speed is its throughput T (samples/s running the whole model, measured or guessed, see
`state.throughput_of`); only ratios between nodes matter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hivenode.models.analysis import OPTIMIZER_STATE_COPIES, Optimizer
from hivenode.models.dtypes import DTYPE_BYTES
from hivenode.planner.state import (
    Action,
    JobShape,
    Layer,
    NodeView,
    PlannerError,
    capacity_bytes,
    holders,
    memory_need_bytes,
    throughput_of,
    whole_holders,
)

BYTES_PER_PARAM_TRAINING = DTYPE_BYTES["float32"] * (2 + OPTIMIZER_STATE_COPIES[Optimizer.ADAM])
"""float32 weights, gradients and Adam's two moments: 16 bytes per parameter."""
ACTIVATION_BYTES = DTYPE_BYTES["float32"]
MICRO_BATCHES_PER_STAGE = 4
"""GPipe: m ≥ 4·S micro-batches keep the bubble (S−1)/(m+S−1) under about 20 %."""
ORDER_WORK_BUDGET = 3_000_000
"""DP cells × orders we spend on trying every node order (about a second of Python)."""
EXHAUSTIVE_MAX_NODES = 8
"""Above this many nodes the k! orders are not even enumerated."""
CHECKPOINT_PERIOD_S = 600.0
"""Volunteer nodes leave without notice; a checkpoint every ten minutes bounds lost work."""
DEADLINE_SLACK = 2.0
"""A federated round's deadline: twice the median participant's estimated round time."""


@dataclass(frozen=True)
class Shard:
    peer_id: str
    start: int
    end: int
    """Sample range [start, end) of the dataset."""
    batch_size: int
    """This node's part of the global batch, ∝ its throughput so every step ends together."""


@dataclass(frozen=True)
class Stage:
    index: int
    peer_id: str
    first: int
    end: int
    """Layers [first, end)."""
    layers: tuple[str, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    seconds_per_sample: float
    memory_bytes: int
    capacity_bytes: int


@dataclass(frozen=True)
class Participants:
    peer_ids: tuple[str, ...]
    clients_per_round: int
    deadline_s: float


@dataclass(frozen=True)
class Coordination:
    barriers: tuple[str, ...] = ()
    allreduce_groups: tuple[tuple[str, ...], ...] = ()
    stage_order: tuple[str, ...] = ()
    checkpoint_every: int = 1
    checkpoint_unit: str = "steps"


@dataclass(frozen=True)
class Breakdown:
    action: Action
    shards: tuple[Shard, ...] = ()
    stages: tuple[Stage, ...] = ()
    micro_batches: int = 0
    federated: Participants | None = None
    coordination: Coordination = field(default_factory=Coordination)
    notes: tuple[str, ...] = ()


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers ∝ `weights` summing to `total` (Hamilton's method): the floors of the exact
    quotas q_i = total·w_i/Σw, then one more to each of the largest remainders q_i − ⌊q_i⌋
    (ties: earlier first)."""
    if not weights or min(weights) < 0 or sum(weights) <= 0:
        raise PlannerError("weights must be ≥ 0 with a positive sum")
    scale = sum(weights)
    quotas = [total * w / scale for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: max(total - sum(counts), 0)]:
        counts[i] += 1
    return counts


def data_parallel(job: JobShape, nodes: Sequence[NodeView]) -> tuple[Shard, ...]:
    """Contiguous shards and per-step batches ∝ each node's throughput: a node 4× as fast
    gets 4× the samples, so all finish an epoch (and every step) together."""
    speeds = [throughput_of(node) for node in nodes]
    counts = largest_remainder(job.samples, speeds)
    batches = largest_remainder(job.batch_size * len(nodes), speeds)
    starts = [0, *itertools.accumulate(counts)]
    return tuple(
        Shard(node.peer_id, starts[i], starts[i + 1], max(batches[i], 1))
        for i, node in enumerate(nodes)
    )


def partition_layers(
    layers: Sequence[Layer],
    nodes: Sequence[NodeView],
    *,
    batch_size: int,
    input_shape: tuple[int, ...] = (),
    bandwidth_bytes_per_s: float | None = None,
) -> tuple[Stage, ...]:
    """Contiguous layer stages minimising the slowest stage, each within its node's memory.

    With F[j] the forward FLOPs of layers [0, j), F = F[m] and T_i node i's throughput:

        t_i(p, j) = (F[j] − F[p]) / (F · T_i) + x(j)       seconds per sample
        x(j)      = 2 · out_bytes(j−1) / bandwidth for j < m (activations forward, gradients
                    back); 0 when no bandwidth is given
        M(p, j)   = 16 · Σ params + batch_size · Σ activation_bytes  ≤  capacity_i

    For a fixed order of the nodes (stage s+1 runs on a node after stage s's in the order),
    dynamic programming over (nodes used, layer prefix) is exact in O(k·m²):

        B[i][j] = min over p ≤ j of max(B[i−1][p], t_i(p, j))    (p = j: node i unused)

    The order is the assumption. Every distinct order (nodes of equal speed and memory are
    interchangeable) is tried while that stays within ORDER_WORK_BUDGET, which makes the result
    the optimum; beyond it, the best of fastest-first, slowest-first, most-memory-first and
    the given order, improved by swapping pairs of nodes while the budget lasts.
    """
    if not layers:
        raise PlannerError("no layers to cut into stages")
    flops = [layer.flops if layer.flops > 0 else 2.0 * max(layer.params, 1) for layer in layers]
    prefix_flops = [0.0, *itertools.accumulate(flops)]
    memory = [
        BYTES_PER_PARAM_TRAINING * la.params + batch_size * la.activation_bytes for la in layers
    ]
    prefix_memory = [0, *itertools.accumulate(memory)]
    m = len(layers)

    def send(j: int) -> float:
        if j >= m or not bandwidth_bytes_per_s:
            return 0.0
        return 2 * math.prod(layers[j - 1].output_shape) * ACTIVATION_BYTES / bandwidth_bytes_per_s

    def solve(order: Sequence[NodeView]) -> Solved:
        best = [0.0] + [math.inf] * m
        choices: list[list[int]] = []
        for node in order:
            per_flop = 1.0 / (prefix_flops[m] * throughput_of(node))
            capacity = capacity_bytes(node)
            new, arg = list(best), list(range(m + 1))
            for j in range(1, m + 1):
                for p in range(j - 1, -1, -1):
                    if prefix_memory[j] - prefix_memory[p] > capacity:
                        break  # earlier p only add layers
                    value = max(best[p], (prefix_flops[j] - prefix_flops[p]) * per_flop + send(j))
                    if value < new[j]:
                        new[j], arg[j] = value, p
            choices.append(arg)
            best = new
        stages, j = [], m
        for node, arg in zip(reversed(order), reversed(choices), strict=True):
            p = arg[j]
            if p < j:
                time = (prefix_flops[j] - prefix_flops[p]) / (prefix_flops[m] * throughput_of(node))
                stages.append((node, p, j, time + send(j)))
            j = p
        return best[m], stages[::-1]

    bottleneck, plan = _search(solve, nodes, m)
    if math.isinf(bottleneck):
        raise PlannerError("the layers fit in no contiguous split over these nodes' memory")
    return tuple(
        Stage(
            index=s,
            peer_id=node.peer_id,
            first=p,
            end=j,
            layers=tuple(layer.name for layer in layers[p:j]),
            input_shape=input_shape if p == 0 else layers[p - 1].output_shape,
            output_shape=layers[j - 1].output_shape,
            seconds_per_sample=time,
            memory_bytes=prefix_memory[j] - prefix_memory[p],
            capacity_bytes=capacity_bytes(node),
        )
        for s, (node, p, j, time) in enumerate(plan)
    )


Solved = tuple[float, list[tuple[NodeView, int, int, float]]]


def _rank(result: Solved) -> tuple[float, int, float]:
    """Slowest stage first; among equals, fewer stages (fewer hand-offs), then less total time."""
    return result[0], len(result[1]), sum(stage[3] for stage in result[1])


def _search(
    solve: Callable[[Sequence[NodeView]], Solved], nodes: Sequence[NodeView], m: int
) -> Solved:
    """The best of every distinct node order while ORDER_WORK_BUDGET allows (exact); else
    steepest descent by pairwise swaps from each of five seed orders, within the budget."""
    k = len(nodes)
    budget = ORDER_WORK_BUDGET // max(k * m * m, 1)
    if k <= EXHAUSTIVE_MAX_NODES and math.factorial(k) <= 8 * budget:
        distinct: dict[tuple[tuple[float, int], ...], tuple[NodeView, ...]] = {}
        for permutation in itertools.permutations(nodes):
            kinds = tuple((throughput_of(n), capacity_bytes(n)) for n in permutation)
            distinct.setdefault(kinds, permutation)
        if len(distinct) <= budget:
            return min((solve(o) for o in distinct.values()), key=_rank)
    seeds = [
        sorted(nodes, key=lambda n: -throughput_of(n)),
        sorted(nodes, key=throughput_of),
        sorted(nodes, key=lambda n: -capacity_bytes(n)),
        sorted(nodes, key=capacity_bytes),
        list(nodes),
    ]
    best: Solved = (math.inf, [])
    share = budget // len(seeds)  # multi-start: each seed climbs on its share of the budget
    for seed in seeds:
        order, result, left = seed, solve(seed), share - 1
        while left > 0:  # steepest descent: the best of all swaps, until none improves
            moved, next_order, next_result = False, order, result
            for a, b in itertools.combinations(range(k), 2):
                if left <= 0:
                    break
                left -= 1
                swapped = list(order)
                swapped[a], swapped[b] = swapped[b], swapped[a]
                candidate = solve(swapped)
                if _rank(candidate) < _rank(next_result):
                    moved, next_order, next_result = True, swapped, candidate
            if not moved:
                break
            order, result = next_order, next_result
        best = min(best, result, key=_rank)
    return best


def federated(job: JobShape, nodes: Sequence[NodeView]) -> Participants:
    """Participants: the candidates holding the dataset (every candidate when nobody reports
    datasets) that fit the model; the job's clients per round and deadline, else all of them
    and DEADLINE_SLACK × the median estimated round time (local samples × epochs / T)."""
    need = memory_need_bytes(job)
    pool = holders(job, nodes)
    members = [n for n in (nodes if pool is None else pool) if capacity_bytes(n) >= need]
    if not members:
        raise PlannerError("no candidate both holds the dataset and fits the model")
    per_client = job.samples / len(members)
    times = sorted(
        n.datasets.get(job.dataset, per_client) * job.epochs / throughput_of(n) for n in members
    )
    deadline = job.deadline_s or DEADLINE_SLACK * max(times[len(times) // 2], 1.0)
    clients = min(job.clients_per_round or len(members), len(members))
    return Participants(tuple(n.peer_id for n in members), clients, deadline)


def breakdown(
    action: Action,
    job: JobShape,
    nodes: Sequence[NodeView],
    *,
    bandwidth_bytes_per_s: float | None = None,
) -> Breakdown:
    """The work of `action` per node, with its coordination plan."""
    need = memory_need_bytes(job)
    fitting = [n for n in nodes if capacity_bytes(n) >= need]
    notes = [f"{n.peer_id}: throughput guessed from hardware" for n in nodes if not n.throughput]
    if action is Action.DATA_PARALLEL or action is Action.SINGLE_NODE:
        chosen = fitting
        if action is Action.SINGLE_NODE:  # the fastest node; if private, one holding it all
            pool = (whole_holders(job, fitting) or []) if job.private else fitting
            chosen = pool and [max(pool, key=throughput_of)]
        if not chosen:
            raise PlannerError("the model fits on no candidate node that may run it")
        shards = data_parallel(job, chosen)
        speed = sum(throughput_of(n) for n in chosen)
        step_s = sum(s.batch_size for s in shards) / speed
        group = (tuple(s.peer_id for s in shards),) if len(shards) > 1 else ()
        barriers = ("all-reduce gradients after every step",) if group else ()
        coordination = Coordination(
            barriers=(*barriers, "evaluate at every epoch end"),
            allreduce_groups=group,
            checkpoint_every=_every(step_s),
        )
        return Breakdown(action, shards=shards, coordination=coordination, notes=tuple(notes))
    if action in (Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL):
        stages = partition_layers(
            job.layers,
            nodes,
            batch_size=job.batch_size,
            input_shape=job.input_shape,
            bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        )
        if bandwidth_bytes_per_s is None:
            notes.append("no bandwidth measured: stage hand-offs not priced")
        pipelined = action is Action.PIPELINE_PARALLEL
        micro = _micro_batches(job.batch_size, len(stages)) if pipelined else 1
        slowest = max(s.seconds_per_sample for s in stages)
        per_micro = job.batch_size / micro
        step_s = (
            (micro + len(stages) - 1) * per_micro * slowest
            if pipelined
            else job.batch_size * sum(s.seconds_per_sample for s in stages)
        )
        coordination = Coordination(
            barriers=("flush the pipeline and step every stage's optimizer per mini-batch",),
            stage_order=tuple(s.peer_id for s in stages),
            checkpoint_every=_every(step_s),
        )
        return Breakdown(
            action,
            stages=stages,
            micro_batches=micro,
            coordination=coordination,
            notes=tuple(notes),
        )
    participants = federated(job, nodes)
    coordination = Coordination(
        barriers=("aggregate at every round end (or its deadline)",),
        checkpoint_every=1,
        checkpoint_unit="rounds",
    )
    return Breakdown(action, federated=participants, coordination=coordination, notes=tuple(notes))


def _micro_batches(batch_size: int, stages: int) -> int:
    """The smallest divisor of the batch that is ≥ MICRO_BATCHES_PER_STAGE × stages (equal
    micro-batches), else one sample per micro-batch."""
    wanted = MICRO_BATCHES_PER_STAGE * stages
    return next((d for d in range(wanted, batch_size + 1) if batch_size % d == 0), batch_size)


def _every(step_s: float) -> int:
    """Steps between checkpoints: about CHECKPOINT_PERIOD_S of work."""
    return max(1, round(CHECKPOINT_PERIOD_S / max(step_s, 1e-9)))
