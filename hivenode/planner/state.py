"""The planner's view of a job and of the swarm: the Q-table state, the actions, and which
actions a job cannot take.

Inputs are plain dataclasses (`JobShape`, `NodeView`, `Layer`) so the planner depends on
neither the agent nor the network; the agent and the CLI fill them from adverts and the peer
table.

State = (model complexity, dataset size, available nodes, network latency), the original
design's bins:

- complexity  P < 1M → 0, < 100M → 1, < 1B → 2, else 3 (P = parameters)
- dataset     N < 10k → 0, < 100k → 1, else 2 (N = training samples)
- nodes       k ≤ 2 → 0, ≤ 5 → 1, ≤ 10 → 2, else 3 (k = candidate nodes)
- latency     L < 20 ms → 0, < 100 ms → 1, else 2, with L the p90 of the RTTs measured to
              the remote candidates (nearest rank; an unmeasured RTT counts as +∞).

Why p90 and not the median: a synchronous step (all-reduce, pipeline hand-off) waits for its
slowest link, so the tail sets the pace; the 90th percentile still lets one outlier in a
large swarm not decide alone. On ≤ 10 candidates the nearest-rank p90 is the maximum: in a
small swarm every link is on the critical path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from hivenode.models.analysis import COMPLEXITY_UPPER_BOUNDS, CUDA_CONTEXT_BYTES, analyze
from hivenode.models.info import Framework, ModelInfo


class PlannerError(Exception):
    """A job, swarm or table the planner cannot use; the message says what to change."""


class Action(StrEnum):
    DATA_PARALLEL = "data_parallel"
    MODEL_PARALLEL = "model_parallel"
    PIPELINE_PARALLEL = "pipeline_parallel"
    FEDERATED = "federated"
    SINGLE_NODE = "single_node"


ACTIONS: tuple[Action, ...] = tuple(Action)
"""The table's last axis, in the original `q_table.pkl`'s order."""

SAMPLES_UPPER_BOUNDS = (10_000, 100_000)
"""Exclusive upper bounds on training samples; anything above the last is bin 2."""
NODES_UPPER_BOUNDS = (2, 5, 10)
"""Inclusive upper bounds on candidate nodes; more than the last is bin 3."""
LATENCY_UPPER_BOUNDS_MS = (20.0, 100.0)
"""Exclusive upper bounds on the latency percentile; anything above the last is bin 2."""
LATENCY_PERCENTILE = 90
STATE_SHAPE: tuple[int, int, int, int] = (
    len(COMPLEXITY_UPPER_BOUNDS) + 1,
    len(SAMPLES_UPPER_BOUNDS) + 1,
    len(NODES_UPPER_BOUNDS) + 1,
    len(LATENCY_UPPER_BOUNDS_MS) + 1,
)
TABLE_SHAPE: tuple[int, ...] = (*STATE_SHAPE, len(ACTIONS))

SAMPLES_PER_S_PER_CORE = 50.0
SAMPLES_PER_S_PER_GPU = 1000.0
"""Throughput guessed for a node that has not measured any: only the ratios between nodes
matter (shards and stages are proportional), and a GPU is taken as worth 20 cores."""


@dataclass(frozen=True)
class Layer:
    """One layer (or block) of the model, in execution order."""

    name: str
    flops: float
    """Forward FLOPs per sample (≈ 2·parameters for a dense layer)."""
    params: int
    activation_bytes: int
    """Bytes per sample kept for the backward pass."""
    output_shape: tuple[int, ...]
    """Per sample, without the batch dimension."""


@dataclass(frozen=True)
class JobShape:
    """What the planner needs to know of a training job."""

    params: int
    samples: int
    private: bool = False
    """The data must not leave the nodes that hold it."""
    memory_bytes: int | None = None
    """Training memory one full replica needs; None: `models.analysis` estimates it."""
    dataset: str = ""
    """The name nodes advertise the dataset under (federated participants hold it)."""
    batch_size: int = 32
    epochs: int = 1
    clients_per_round: int | None = None
    deadline_s: float | None = None
    input_shape: tuple[int, ...] = ()
    layers: tuple[Layer, ...] = ()
    """Needed for model/pipeline parallel stages; empty: those breakdowns cannot be made."""

    def __post_init__(self) -> None:
        if self.params < 0 or self.samples < 0:
            raise PlannerError("params and samples must be ≥ 0")
        if self.batch_size < 1 or self.epochs < 1:
            raise PlannerError("batch_size and epochs must be ≥ 1")


@dataclass(frozen=True)
class NodeView:
    """One candidate node as the peer table shows it."""

    peer_id: str
    cores: int = 1
    memory_bytes: int = 0
    gpu_memory_bytes: int = 0
    """The largest GPU's total memory; 0 without a GPU."""
    throughput: float | None = None
    """Measured samples/s for this kind of job; None: guessed from cores and GPU."""
    rtt_ms: float | None = None
    local: bool = False
    """The planning node itself: it has no RTT to itself."""
    datasets: Mapping[str, int] = field(default_factory=dict)
    """Datasets the node holds: name → samples."""


@dataclass(frozen=True)
class State:
    complexity: int
    dataset: int
    nodes: int
    latency: int

    @property
    def index(self) -> tuple[int, int, int, int]:
        return (self.complexity, self.dataset, self.nodes, self.latency)

    def key(self) -> str:
        return "-".join(str(i) for i in self.index)

    @classmethod
    def from_index(cls, index: Sequence[int]) -> State:
        if len(index) != len(STATE_SHAPE) or not all(
            0 <= i < n for i, n in zip(index, STATE_SHAPE, strict=True)
        ):
            raise PlannerError(f"state {tuple(index)} is outside {STATE_SHAPE}")
        return cls(*(int(i) for i in index))


@dataclass(frozen=True)
class Reading:
    """A state and how it was measured."""

    state: State
    latency_ms: float | None
    """The latency percentile; None when no RTT was known or there is no network."""
    notes: tuple[str, ...] = ()


def _bin_below(value: float, bounds: Sequence[float]) -> int:
    return next((i for i, bound in enumerate(bounds) if value < bound), len(bounds))


def _bin_at_most(value: float, bounds: Sequence[float]) -> int:
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))


def latency_percentile(rtts_ms: Sequence[float | None]) -> float:
    """Nearest-rank LATENCY_PERCENTILE of the RTTs, unknown ones counted as +∞."""
    values = sorted(math.inf if rtt is None else float(rtt) for rtt in rtts_ms)
    rank = math.ceil(LATENCY_PERCENTILE / 100 * len(values))
    return values[max(rank, 1) - 1]


def encode(job: JobShape, nodes: Sequence[NodeView]) -> Reading:
    """The Q-table state of `job` on the candidate `nodes`."""
    notes: list[str] = []
    complexity = _bin_below(job.params, [bound for _, bound in COMPLEXITY_UPPER_BOUNDS])
    size = _bin_below(job.samples, SAMPLES_UPPER_BOUNDS)
    count = _bin_at_most(len(nodes), NODES_UPPER_BOUNDS)
    remote = [node.rtt_ms for node in nodes if not node.local]
    latency_ms: float | None = None
    if not remote:
        latency = 0
        notes.append("latency bin 0: no remote candidate, no network in the way")
    else:
        value = latency_percentile(remote)
        unknown = sum(rtt is None for rtt in remote)
        if math.isinf(value):
            latency = len(LATENCY_UPPER_BOUNDS_MS)
            notes.append(
                f"latency taken as the worst bin: {unknown} of {len(remote)} remote "
                "candidates have no RTT measured"
            )
        else:
            latency_ms = value
            latency = _bin_below(value, LATENCY_UPPER_BOUNDS_MS)
            notes.append(
                f"latency p{LATENCY_PERCENTILE} {value:.1f} ms over {len(remote)} remote RTTs"
            )
    return Reading(State(complexity, size, count, latency), latency_ms, tuple(notes))


def memory_need_bytes(job: JobShape) -> int:
    """Training memory of one full replica: the job's figure, else `models.analysis`'s
    estimate (float32 weights, gradients, Adam's two moments and a batch of activations)."""
    if job.memory_bytes is not None:
        return job.memory_bytes
    info = ModelInfo(
        format="planner", framework=Framework.UNKNOWN, parameters=job.params, dtypes=("float32",)
    )
    return analyze(info, batch_size=job.batch_size).training.total_bytes


def capacity_bytes(node: NodeView) -> int:
    """The most training memory a node offers: its largest GPU less the CUDA context, or its
    RAM when that is larger (training then runs on the CPU)."""
    gpu = node.gpu_memory_bytes - CUDA_CONTEXT_BYTES if node.gpu_memory_bytes > 0 else 0
    return max(gpu, node.memory_bytes)


def throughput_of(node: NodeView) -> float:
    """Measured samples/s, else the guess from cores and GPU (see SAMPLES_PER_S_PER_CORE)."""
    if node.throughput is not None and node.throughput > 0:
        return node.throughput
    gpu = SAMPLES_PER_S_PER_GPU if node.gpu_memory_bytes > 0 else 0.0
    return max(node.cores, 1) * SAMPLES_PER_S_PER_CORE + gpu


def holders(job: JobShape, nodes: Sequence[NodeView]) -> list[NodeView] | None:
    """The candidates that hold the job's dataset; None when no candidate reports datasets
    (or the job names none), so who holds it is unknown."""
    if not job.dataset or not any(node.datasets for node in nodes):
        return None
    return [node for node in nodes if job.dataset in node.datasets]


def whole_holders(job: JobShape, nodes: Sequence[NodeView]) -> list[NodeView] | None:
    """The holders (see `holders`) that hold all of the job's samples: the only nodes that can
    train it alone without receiving data; None when who holds the dataset is unknown."""
    held = holders(job, nodes)
    if held is None:
        return None
    return [node for node in held if node.datasets[job.dataset] >= job.samples]


def masked_actions(job: JobShape, nodes: Sequence[NodeView]) -> dict[Action, str]:
    """The actions `job` cannot take on `nodes`, each with the first reason that rules it out.

    - fewer than 2 nodes: data, model and pipeline parallel are single-node training;
    - private data: the samples must stay on their holders. Data parallel ships shards, model
      and pipeline parallel ship the inputs to the first stage and the labels to the last (and
      activations leak inputs), so all three are masked. Federated stays (trainers read only
      their own data), single_node stays only on a node that holds all of the job's samples
      and fits the model (a holder of part of them would need the rest sent to it);
    - a model that fits on no node masks every action that keeps a full replica on one node
      (data parallel, federated, single node); a model larger than all nodes together also
      masks model and pipeline parallel;
    - federated needs at least one candidate holding the dataset, when holders are known;
    - model and pipeline parallel need the job's layers to cut into stages.
    """
    need = memory_need_bytes(job)
    fitting = [node for node in nodes if capacity_bytes(node) >= need]
    held = holders(job, nodes)
    masked: dict[Action, str] = {}

    def mask(action: Action, reason: str) -> None:
        masked.setdefault(action, reason)

    if not nodes:
        for action in ACTIONS:
            mask(action, "no candidate nodes")
        return masked
    if len(nodes) < 2:
        for action in (Action.DATA_PARALLEL, Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL):
            mask(action, "one node: nothing to split across")
    if job.private:
        for action in (Action.DATA_PARALLEL, Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL):
            mask(action, "private data: it would send samples off the nodes holding them")
        whole = whole_holders(job, nodes) or []
        if not held:
            mask(Action.SINGLE_NODE, "private data: no candidate is known to hold it")
        elif not whole:
            mask(
                Action.SINGLE_NODE,
                f"private data: no candidate holds all {job.samples} samples, they are "
                f"spread over {len(held)} holders and may not move",
            )
        elif not any(capacity_bytes(node) >= need for node in whole):
            mask(Action.SINGLE_NODE, "private data: the model fits on no node holding it all")
    if not fitting:
        gib = need / 1024**3
        for action in (Action.DATA_PARALLEL, Action.FEDERATED, Action.SINGLE_NODE):
            mask(action, f"the model ({gib:.1f} GiB to train) fits on no single node")
        if sum(capacity_bytes(node) for node in nodes) < need:
            for action in (Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL):
                mask(action, f"the model ({gib:.1f} GiB) exceeds all nodes' memory together")
    if held is not None and not held:
        mask(Action.FEDERATED, f"no candidate holds dataset {job.dataset!r}")
    elif held is not None and not any(capacity_bytes(node) >= need for node in held):
        mask(Action.FEDERATED, "the model fits on no node holding the dataset")
    if not job.layers:
        for action in (Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL):
            mask(action, "the job lists no layers to cut into stages")
    return {action: masked[action] for action in ACTIONS if action in masked}
