"""The "torch" adapter (zoo models), and the torch training loop the "hf" adapter shares.

Arrays are a module's state_dict: its names, as numpy. Training is plain SGD on cross-entropy
with FedProx's proximal gradient and SCAFFOLD's correction added to each step's gradient, so
every adapter built on `train_model` follows the same round semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from hivenode.models.training import zoo
from hivenode.models.training.backend import (
    Evaluation,
    LocalData,
    ModelSpec,
    NDArray,
    ScaffoldState,
    TrainingError,
    TrainOutcome,
    TrainSettings,
    as_float_arrays,
)
from hivenode.models.training.loop import (
    LocalWork,
    as_given,
    check_arrays,
    checked_labels,
    checked_training,
    evaluation,
    minibatches,
    scaffold_corrections,
)

EVAL_BATCH_SIZE = 512


@dataclass(frozen=True)
class TorchModel:
    """A module, the call that turns a batch of inputs into class logits, and the tensor
    type its inputs take (float features, or int64 token ids)."""

    module: nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor]
    input_dtype: torch.dtype


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_arrays(module: nn.Module) -> dict[str, NDArray]:
    """The module's state_dict as numpy, floating tensors as float32 (the wire's dtype)."""
    return {
        key: _to_numpy(tensor, np.float32 if tensor.is_floating_point() else None)
        for key, tensor in module.state_dict().items()
    }


def load_arrays(module: nn.Module, arrays: Mapping[str, NDArray]) -> None:
    """Load `arrays` into `module`: exactly its state_dict keys (tied names included), with
    its shapes, or a TrainingError that says which differ."""
    expected = module.state_dict()
    check_arrays(arrays, {key: tuple(tensor.shape) for key, tensor in expected.items()})
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise TrainingError(f"array {key!r} has dtype {array.dtype}, not a number type")
    copies = as_float_arrays(arrays)
    module.load_state_dict({key: torch.from_numpy(copies[key]) for key in expected}, strict=True)


def export_arrays(module: nn.Module, like: Mapping[str, NDArray]) -> dict[str, NDArray]:
    """The module's state in the key order and dtypes of `like` (the arrays it was given)."""
    state = module.state_dict()
    return as_given(like, {key: state[key].detach().cpu().numpy() for key in like})


def infer_num_classes(
    build: Callable[[int], nn.Module], arrays: Mapping[str, NDArray], what: str
) -> int:
    """The number of classes `arrays` were made for.

    Evaluation is handed arrays but no class count. Building the model for 2 and for 3
    classes on the meta device (no memory, no initialisation) shows which dimension of which
    tensor is the class count; the arrays' size there is the answer.
    """
    with torch.device("meta"):
        two, three = build(2).state_dict(), build(3).state_dict()
    for key, tensor in two.items():
        if tensor.shape == three[key].shape:
            continue
        if key not in arrays:
            raise TrainingError(f"arrays for {what} lack the output tensor {key!r}")
        dim = next(
            i for i, (a, b) in enumerate(zip(tensor.shape, three[key].shape, strict=True)) if a != b
        )
        if arrays[key].ndim != tensor.ndim:
            raise TrainingError(
                f"array {key!r} has shape {arrays[key].shape}, expected {tensor.ndim} dimensions"
            )
        return int(arrays[key].shape[dim])
    raise TrainingError(f"{what} has no tensor sized by the number of classes")


def train_model(
    model: TorchModel,
    arrays: Mapping[str, NDArray],
    data: LocalData,
    settings: TrainSettings,
    scaffold: ScaffoldState | None = None,
) -> TrainOutcome:
    """One round of local training from `arrays` (see `Backend.train`)."""
    labels = checked_training(data, settings)
    x, y = _tensors(model, data.x_train, labels)
    module = model.module.to(device())
    load_arrays(module, arrays)
    terms = _GradientTerms.of(module, arrays, settings.proximal_mu, scaffold)
    optimizer = torch.optim.SGD(terms.params, lr=settings.lr)
    # Summed on the device and read once: a float per batch would wait for the GPU each step.
    loss_sum = torch.zeros((), device=device())
    work = LocalWork()
    module.train()
    with zoo.seeded(settings.seed):  # dropout, if the model has any, draws from torch's RNG
        for index in minibatches(len(y), settings, work):
            batch = torch.from_numpy(index)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model.logits(x[batch].to(device())), y[batch].to(device()))
            torch.autograd.backward(loss)
            terms.add_to_gradients()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
    work.loss_sum = loss_sum.item()
    return work.outcome(export_arrays(module, arrays))


def evaluate_model(
    model: TorchModel, arrays: Mapping[str, NDArray], x: NDArray, y: NDArray, num_classes: int
) -> Evaluation:
    """Mean cross-entropy and accuracy of `arrays` on (x, y); an empty set scores 0 with
    weight 0, so it drops out of weighted means."""
    if len(y) == 0:
        return evaluation(0.0, 0, 0)
    inputs, labels = _tensors(model, x, checked_labels(y, num_classes, len(x)))
    module = model.module.to(device())
    load_arrays(module, arrays)
    module.eval()  # safe: nn.Module.eval() switches to inference mode; nothing is evaluated
    loss_sum = torch.zeros((), device=device())
    correct = torch.zeros((), dtype=torch.long, device=device())
    with torch.inference_mode():
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            batch_y = labels[start : start + EVAL_BATCH_SIZE].to(device())
            logits = model.logits(inputs[start : start + EVAL_BATCH_SIZE].to(device()))
            loss_sum += F.cross_entropy(logits, batch_y, reduction="sum")
            correct += (logits.argmax(dim=1) == batch_y).sum()
    return evaluation(loss_sum.item(), int(correct.item()), len(labels))


class TorchBackend:
    """`Backend` for framework "torch": architectures from the built-in zoo."""

    def init_arrays(
        self, spec: ModelSpec, feature_shape: tuple[int, ...], num_classes: int, seed: int
    ) -> dict[str, NDArray]:
        return state_arrays(
            zoo.build_model(spec.name, spec.options, feature_shape, num_classes, seed=seed)
        )

    def train(
        self,
        spec: ModelSpec,
        arrays: Mapping[str, NDArray],
        data: LocalData,
        settings: TrainSettings,
        scaffold: ScaffoldState | None = None,
    ) -> TrainOutcome:
        module = zoo.build_model(spec.name, spec.options, data.feature_shape, data.num_classes)
        return train_model(_zoo_model(module), arrays, data, settings, scaffold)

    def evaluate(
        self, spec: ModelSpec, arrays: Mapping[str, NDArray], x: NDArray, y: NDArray
    ) -> Evaluation:
        feature_shape = tuple(int(d) for d in x.shape[1:])

        def build(num_classes: int) -> nn.Module:
            return zoo.build_model(spec.name, spec.options, feature_shape, num_classes)

        num_classes = infer_num_classes(build, arrays, f"zoo model {spec.name!r}")
        return evaluate_model(_zoo_model(build(num_classes)), arrays, x, y, num_classes)


BACKEND = TorchBackend()


def _zoo_model(module: nn.Module) -> TorchModel:
    return TorchModel(module=module, logits=module, input_dtype=torch.float32)


def _tensors(model: TorchModel, x: NDArray, labels: NDArray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and checked labels (see `checked_labels`) as CPU tensors."""
    if x.dtype.kind not in "biuf":
        raise TrainingError(f"inputs must be numbers, got dtype {x.dtype}")
    # copies: the node's cached data is read-only, and torch wants tensors it may write
    return torch.tensor(x, dtype=model.input_dtype), torch.tensor(labels, dtype=torch.long)


@dataclass(frozen=True)
class _GradientTerms:
    """What a round adds to every step's loss gradient: FedProx's μ·(w − w_global), the
    gradient of μ/2·‖w − w_global‖², and SCAFFOLD's c − c_i; so the SGD step on the sum is
    the proximal or corrected step."""

    params: list[nn.Parameter]
    mu: float
    anchors: list[torch.Tensor]  # w_global, when μ > 0
    corrections: list[torch.Tensor]  # c − c_i, with SCAFFOLD

    @classmethod
    def of(
        cls,
        module: nn.Module,
        arrays: Mapping[str, NDArray],
        mu: float,
        scaffold: ScaffoldState | None,
    ) -> _GradientTerms:
        """The terms for `module` once `arrays` are loaded into it; SCAFFOLD's control
        variates follow the arrays' key order."""
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        differences = scaffold_corrections(arrays, scaffold)
        # A tied parameter appears under several keys but is trained once, under the name
        # `named_parameters` gives it, so it is corrected once.
        corrections = (
            []
            if differences is None
            else [torch.from_numpy(differences[name]).to(p.device, p.dtype) for name, p in named]
        )
        return cls(
            params=[p for _, p in named],
            mu=mu,
            anchors=[p.detach().clone() for _, p in named] if mu > 0 else [],
            corrections=corrections,
        )

    def add_to_gradients(self) -> None:
        if not self.anchors and not self.corrections:
            return
        for i, param in enumerate(self.params):
            if param.grad is None:  # unused by this batch's loss, but still pulled and corrected
                param.grad = torch.zeros_like(param)
            if self.anchors:
                param.grad.add_(param.detach() - self.anchors[i], alpha=self.mu)
            if self.corrections:
                param.grad.add_(self.corrections[i])


def _to_numpy(tensor: torch.Tensor, dtype: npt.DTypeLike | None) -> NDArray:
    array = tensor.detach().cpu().numpy()
    # astype copies, so the result never shares memory with the module
    return array.astype(dtype if dtype is not None else array.dtype)
