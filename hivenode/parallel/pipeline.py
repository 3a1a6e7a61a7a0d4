"""Pipeline-parallel training: an `nn.Sequential` cut into contiguous stages on different
nodes, GPipe micro-batches, activations forward and gradients back over streams.

Each step the first stage cuts its batch into m micro-batches and runs them forward one after
another; each stage sends its output (with the labels) to the next as soon as it has it, so
the stages work on different micro-batches at once. The last stage computes the loss of each
micro-batch, scaled by its share of the batch, and sends the gradient of its input back;
every stage accumulates its parameters' gradients over the m micro-batches, then steps its
own optimizer. The accumulated gradient is the whole batch's, so a step equals one
single-node step on the batch. Model parallelism is the same with one micro-batch.

A stage whose neighbour sends nothing for `stage_timeout` seconds fails the step with a
`ParallelError`. Moving a dead stage to a spare node is `pipeline_failover.py`'s work; for it
a stage can `snapshot` and `restore` its weights and momentum and `rewind` to a step of a new
attempt (`epoch`) with new peers. Every activation and gradient names its epoch, and a stage
refuses those of any other, so nothing sent before a fail-over is mixed into the steps redone
after it. A peer that sends no epoch is in epoch 0, as every job without fail-over stays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import trio
from torch import nn

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rpc import StreamPool
from hivenode.parallel import wire
from hivenode.parallel.allreduce import wire_size
from hivenode.parallel.data_parallel import Batches
from hivenode.parallel.errors import ParallelError, first_error
from hivenode.parallel.router import ParallelRouter
from hivenode.parallel.torch_state import MOMENTUM_PREFIX, ModelRecipe, SgdConfig
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import PIPELINE_PROTOCOL
from hivenode.protocol.message import Message

log = logging.getLogger(__name__)

ACTIVATION = "activation"
GRADIENT = "gradient"
AHEAD_STEPS = 1
"""A neighbour may be this many steps ahead of us (it stepped its optimizer first)."""

Arrays = dict[str, np.ndarray[Any, Any]]
"""A stage's weights and momentum buffers by whole-model name (momentum under
`MOMENTUM_PREFIX`): a checkpoint's part."""


@dataclass(frozen=True)
class PipelineConfig:
    """One pipeline job, the same on every stage."""

    job_id: str
    recipe: ModelRecipe = field(default_factory=ModelRecipe)
    sgd: SgdConfig = field(default_factory=SgdConfig)
    steps: int = 50
    micro_batches: int = 4
    stage_timeout: float = 30.0
    """Seconds a stage waits for its neighbour's activation or gradient."""
    checkpoint_every: int = 10
    """With fail-over (`pipeline_failover.py`): every stage checkpoints its weights and
    momentum before each step that is a multiple of this; a fail-over redoes at most this
    many steps. Stages run without fail-over ignore it."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ParallelError(f"checkpoint_every must be at least 1, not {self.checkpoint_every}")


@dataclass(frozen=True)
class StageStep:
    step: int
    seconds: float
    compute_s: float
    bytes_sent: int
    loss: float | None
    """The batch's mean loss, on the last stage only."""


def leaf_layers(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules a nested `nn.Sequential` runs, in order, with their state_dict prefixes."""
    if not isinstance(model, nn.Sequential):
        return [(prefix.rstrip("."), model)]
    layers: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        layers += leaf_layers(child, f"{prefix}{name}.")
    return layers


def balanced_cuts(costs: Sequence[float], stages: int) -> list[int]:
    """Boundaries 0 = c_0 < c_1 < … < c_S = len(costs) of S contiguous, non-empty stages that
    minimise the largest stage cost Σ costs[c_i:c_{i+1}] (exact, O(S·L²) dynamic program;
    ties: the earliest cut)."""
    count = len(costs)
    if not 1 <= stages <= count:
        raise ParallelError(f"cannot cut {count} layers into {stages} non-empty stages")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(stages + 1)]
    cut = [[0] * (count + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, count - (stages - s) + 1):
            for p in range(s - 1, j):
                value = max(best[s - 1][p], prefix[j] - prefix[p])
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, p
    bounds = [count]
    for s in range(stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def layer_costs(layers: Sequence[tuple[str, nn.Module]]) -> list[float]:
    """A layer's work ∝ its parameters; a parameter-free layer (ReLU) still costs a little."""
    return [1.0 + sum(p.numel() for p in module.parameters()) for _, module in layers]


def stage_cuts(recipe: ModelRecipe, stages: int) -> list[int]:
    """Balanced cuts of the recipe's model into `stages` (the planner's stages may replace
    them: any contiguous cut with one or more layers per stage works)."""
    return balanced_cuts(layer_costs(leaf_layers(recipe.build())), stages)


@dataclass
class _Inbox:
    """Messages from the neighbours, by (step, kind, micro-batch)."""

    items: dict[tuple[int, str, int], Message] = field(default_factory=dict)
    arrived: trio.Event = field(default_factory=trio.Event)

    def put(self, key: tuple[int, str, int], message: Message) -> None:
        self.items[key] = message
        self.arrived.set()
        self.arrived = trio.Event()

    async def take(self, key: tuple[int, str, int], timeout: float, sender: str) -> Message:
        with trio.move_on_after(timeout):
            while key not in self.items:
                await self.arrived.wait()
            return self.items.pop(key)
        step, kind, micro = key
        raise ParallelError(
            f"no {kind} for micro-batch {micro} of step {step} from {sender} in {timeout:g} s"
        )


class Stage:
    """Layers [cuts[index], cuts[index+1]) of the recipe's model, on this node."""

    def __init__(
        self,
        node: Node,
        router: ParallelRouter,
        config: PipelineConfig,
        peers: Sequence[str],
        index: int,
        cuts: Sequence[int],
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        if len(cuts) != len(peers) + 1 or not 0 <= index < len(peers):
            raise ParallelError(f"{len(peers)} stages need {len(peers) + 1} cuts, got {cuts}")
        self.node = node
        self.config = config
        self.peers = tuple(peers)
        self.index = index
        self.first = index == 0
        self.last = index == len(peers) - 1
        layers = leaf_layers(config.recipe.build())
        self.layers = layers[cuts[index] : cuts[index + 1]]
        if not self.layers:
            raise ParallelError(f"stage {index} has no layers (cuts {list(cuts)})")
        self.params = [p for _, module in self.layers for p in module.parameters()]
        self.optimizer = config.sgd.optimizer(self.params)
        self.records: list[StageStep] = []
        self.step = 0
        self.epoch = 0
        """The attempt this stage runs: a fail-over starts the next one."""
        self._router = router
        self._pool = StreamPool(node.swarm.host, PIPELINE_PROTOCOL)
        self._inbox = _Inbox()
        self._limiter = limiter or trio.CapacityLimiter(1)
        router.attach(PIPELINE_PROTOCOL, config.job_id, self._serve)

    @property
    def previous(self) -> str | None:
        return None if self.first else self.peers[self.index - 1]

    @property
    def next(self) -> str | None:
        return None if self.last else self.peers[self.index + 1]

    def state(self) -> dict[str, torch.Tensor]:
        """This stage's weights under the whole model's state_dict names."""
        return {
            f"{prefix}.{name}": tensor
            for prefix, module in self.layers
            for name, tensor in module.state_dict().items()
        }

    async def aclose(self) -> None:
        self._router.detach(PIPELINE_PROTOCOL, self.config.job_id)
        await self._pool.aclose()

    # --- checkpoints and fail-over -------------------------------------------------------

    def _named_params(self) -> dict[str, nn.Parameter]:
        return {
            f"{prefix}.{name}": p
            for prefix, module in self.layers
            for name, p in module.named_parameters()
        }

    def snapshot(self) -> Arrays:
        """Copies of this stage's weights and momentum buffers: its part of a checkpoint.
        Take it between steps (the optimizer has stepped, no gradient is half summed)."""
        arrays = {name: t.detach().numpy().copy() for name, t in self.state().items()}
        for name, param in self._named_params().items():
            buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                arrays[MOMENTUM_PREFIX + name] = buffer.detach().numpy().copy()
        return arrays

    def restore(self, arrays: Arrays) -> None:
        """Load a `snapshot` of these layers (this stage's, or a dead one's from a
        checkpoint); a name or shape that does not fit is a ParallelError.

        The optimizer is rebuilt first: a rollback to a step before momentum existed (step
        0) must drop the buffers the later steps made, not keep them."""
        expected = self.state()
        weights = {k: v for k, v in arrays.items() if not k.startswith(MOMENTUM_PREFIX)}
        if set(weights) != set(expected):
            diff = sorted(set(weights) ^ set(expected))[:5]
            raise ParallelError(f"stage {self.index}: the checkpoint's names differ: {diff}")
        params = self._named_params()
        momentum = {k[len(MOMENTUM_PREFIX) :]: v for k, v in arrays.items() if k not in weights}
        for name, value in [*weights.items(), *momentum.items()]:
            target = expected.get(name, params.get(name))
            if target is None or tuple(value.shape) != tuple(target.shape):
                raise ParallelError(f"stage {self.index}: {name!r} does not fit its layers")
        self.optimizer = self.config.sgd.optimizer(self.params)
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(torch.from_numpy(np.array(weights[name])))
        for name, value in momentum.items():
            buffer = torch.from_numpy(np.array(value, dtype=np.float32))
            self.optimizer.state[params[name]]["momentum_buffer"] = buffer

    def rewind(self, step: int, epoch: int, peers: Sequence[str]) -> None:
        """Run `step` next, in attempt `epoch`, with `peers` (a spare in the dead stage's
        place). Messages of earlier attempts are dropped and refused from now on, and the
        records of the steps to be redone are forgotten."""
        if len(peers) != len(self.peers) or peers[self.index] != self.node.peer_id:
            raise ParallelError(f"stage {self.index}: {list(peers)} does not keep us in place")
        if epoch < self.epoch or not 0 <= step <= self.config.steps:
            raise ParallelError(f"stage {self.index}: cannot rewind to step {step} of {epoch}")
        self.peers = tuple(peers)
        self.epoch = epoch
        self.step = step
        self._inbox = _Inbox()
        self.records = [r for r in self.records if r.step < step]

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for _, module in self.layers:
            inputs = module(inputs)
        return inputs

    # --- training ------------------------------------------------------------------------

    async def train(
        self, batches: Batches | None = None, on_step: Callable[[StageStep], None] | None = None
    ) -> list[StageStep]:
        """Run every step; the first stage needs `batches` (features and labels)."""
        if self.first and batches is None:
            raise ParallelError("the first stage needs the batches")
        for step in range(self.config.steps):
            record = await self.run_step(step, batches(step) if batches else None)
            self.records.append(record)
            if on_step is not None:
                on_step(record)
        return self.records

    async def run_step(self, step: int, batch: tuple[Any, Any] | None) -> StageStep:
        started = time.perf_counter()
        self.step = step
        compute = [0.0]
        sent = [0]
        losses: list[float] = []
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        m = self.config.micro_batches
        self.optimizer.zero_grad(set_to_none=False)
        try:
            async with trio.open_nursery() as sends:
                for micro in range(m):
                    inputs, labels, total = await self._inputs(step, micro, batch)
                    if self.last:
                        loss = await self._timed(
                            compute, self._loss_backward, inputs, labels, total
                        )
                        losses.append(loss)
                        if not self.first:
                            self._send_gradient(sends, step, micro, inputs, sent)
                    else:
                        outputs = await self._timed(compute, self._forward, inputs)
                        saved.append((inputs, outputs))
                        body = self._body(step, micro)
                        body["total"] = total
                        tensors = (outputs.detach().numpy(), labels)
                        sends.start_soon(self._send, self.next, ACTIVATION, body, tensors, sent)
                if not self.last:
                    for micro in range(m):
                        message = await self._inbox.take(
                            (step, GRADIENT, micro), self.config.stage_timeout, str(self.next)
                        )
                        inputs, outputs = saved[micro]
                        grad = _one_tensor(message, tuple(outputs.shape))
                        await self._timed(compute, _backward, outputs, grad)
                        if not self.first:
                            self._send_gradient(sends, step, micro, inputs, sent)
        except* ParallelError as group:
            raise first_error(group) from None
        await self._timed(compute, self.optimizer.step)
        return StageStep(
            step=step,
            seconds=time.perf_counter() - started,
            compute_s=compute[0],
            bytes_sent=sent[0],
            loss=sum(losses) if self.last else None,
        )

    async def _inputs(
        self, step: int, micro: int, batch: tuple[Any, Any] | None
    ) -> tuple[torch.Tensor, np.ndarray[Any, Any], int]:
        if batch is not None:
            features, labels = batch
            rows = np.array_split(np.arange(len(labels)), self.config.micro_batches)[micro]
            x = np.ascontiguousarray(features[rows], dtype=np.float32)
            return torch.from_numpy(x), labels[rows].astype(np.int64), len(labels)
        message = await self._inbox.take(
            (step, ACTIVATION, micro), self.config.stage_timeout, str(self.previous)
        )
        tensors = message.tensors
        inputs = torch.from_numpy(tensors[0]).requires_grad_()
        return inputs, tensors[1], wire.field(message.body, "total", int)

    def _loss_backward(
        self, inputs: torch.Tensor, labels: np.ndarray[Any, Any], total: int
    ) -> float:
        logits = self._forward(inputs)
        # each micro-batch's mean loss weighted by its share: their sum is the batch's mean
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(labels)) * (len(labels) / total)
        torch.autograd.backward(loss)
        return float(loss.detach())

    def _send_gradient(
        self, sends: trio.Nursery, step: int, micro: int, inputs: torch.Tensor, sent: list[int]
    ) -> None:
        grad = inputs.grad
        if grad is None:
            raise ParallelError(f"stage {self.index}: no input gradient for micro-batch {micro}")
        body = self._body(step, micro)
        sends.start_soon(self._send, self.previous, GRADIENT, body, (grad.numpy(),), sent)

    def _body(self, step: int, micro: int) -> dict[str, Any]:
        return {"job": self.config.job_id, "epoch": self.epoch, "step": step, "micro": micro}

    async def _send(
        self,
        peer: str | None,
        kind: str,
        body: dict[str, Any],
        tensors: tuple[np.ndarray[Any, Any], ...],
        sent: list[int],
    ) -> None:
        assert peer is not None
        try:
            self.node.make_dialable(peer)
            await self._pool.request(
                peer, kind, body, timeout=self.config.stage_timeout, tensors=tensors
            )
        except RpcError as exc:
            raise ParallelError(
                f"stage {self.index}: could not send the {kind} of step {body['step']} to "
                f"{peer}: {exc}"
            ) from exc
        sent[0] += wire_size(kind, self.node.peer_id, body, tensors)

    async def _timed(self, compute: list[float], fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            compute[0] += time.perf_counter() - started

    # --- receiving -----------------------------------------------------------------------

    async def _serve(self, request: Message, caller: str) -> dict[str, Any]:
        step = wire.field(request.body, "step", int)
        micro = wire.field(request.body, "micro", int)
        if request.type == ACTIVATION:
            expected = self.previous
        elif request.type == GRADIENT:
            expected = self.next
        else:
            raise RpcError("unknown_method", f"expected activation or gradient: {request.type!r}")
        if caller != expected:
            raise RpcError("not_neighbour", f"{request.type} must come from {expected}")
        epoch = request.body.get("epoch", 0)
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ProtocolError(f"request field 'epoch' must be int, got {epoch!r:.60}")
        if epoch != self.epoch:  # sent before a fail-over, or by a stage not rewound yet
            raise RpcError("stale_epoch", f"{request.type} of attempt {epoch}, at {self.epoch}")
        if request.type == ACTIVATION:
            self._check_activation(request)
        elif len(request.tensors) != 1 or request.tensors[0].dtype != np.float32:
            raise ProtocolError("a gradient is one float32 tensor")
        if not self.step <= step <= self.step + AHEAD_STEPS or not 0 <= micro < (
            self.config.micro_batches
        ):
            raise RpcError("unexpected", f"micro-batch {micro} of step {step} (at {self.step})")
        self._inbox.put((step, request.type, micro), request)
        return {}

    def _check_activation(self, request: Message) -> None:
        """One float32 activation and its int64 labels, one per row, within the classes."""
        total = wire.field(request.body, "total", int)
        tensors = request.tensors
        if (
            len(tensors) != 2
            or tensors[0].dtype != np.float32
            or tensors[1].dtype != np.int64
            or tensors[1].shape != tensors[0].shape[:1]
            or not 0 < len(tensors[1]) <= total
        ):
            raise ProtocolError("an activation is float32 rows and one int64 label per row")
        labels = tensors[1]
        if not ((labels >= 0).all() and (labels < self.config.recipe.num_classes).all()):
            raise ProtocolError(f"labels outside 0 … {self.config.recipe.num_classes - 1}")


def _one_tensor(message: Message, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if len(message.tensors) != 1 or message.tensors[0].shape != shape:
        raise ParallelError(f"expected one gradient of shape {shape}")
    tensor: np.ndarray[Any, Any] = message.tensors[0]
    if tensor.dtype != np.float32:
        raise ParallelError(f"gradients must be float32, got {tensor.dtype}")
    return tensor


def _backward(outputs: torch.Tensor, grad: np.ndarray[Any, Any]) -> None:
    torch.autograd.backward(outputs, torch.from_numpy(grad))
