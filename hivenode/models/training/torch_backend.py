"""The "torch" adapter (zoo models), and the torch training loop the "hf" adapter shares.

Arrays are a module's state_dict: its names, as numpy. Training is plain SGD on cross-entropy
with FedProx's proximal gradient and SCAFFOLD's correction added to each step's gradient, so
every adapter built on `train_model` follows the same round semantics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
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
    missing = [key for key in expected if key not in arrays]
    unexpected = [key for key in arrays if key not in expected]
    if missing or unexpected:
        raise TrainingError(
            f"arrays do not fit the model: missing {_listing(missing)}, "
            f"unexpected {_listing(unexpected)}"
        )
    for key, tensor in expected.items():
        array = arrays[key]
        if tuple(array.shape) != tuple(tensor.shape):
            raise TrainingError(
                f"array {key!r} has shape {tuple(array.shape)}, the model's is "
                f"{tuple(tensor.shape)}"
            )
        if array.dtype.kind not in "biuf":
            raise TrainingError(f"array {key!r} has dtype {array.dtype}, not a number type")
    copies = as_float_arrays(arrays)
    module.load_state_dict({key: torch.from_numpy(copies[key]) for key in expected}, strict=True)


def export_arrays(module: nn.Module, like: Mapping[str, NDArray]) -> dict[str, NDArray]:
    """The module's state in the key order and dtypes of `like` (the arrays it was given)."""
    state = module.state_dict()
    return {key: _to_numpy(state[key], like[key].dtype) for key in like}


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
    _check_settings(settings)
    if len(data.y_train) == 0:
        raise TrainingError("the local training set is empty")
    x, y = _examples(model, data.x_train, data.y_train, data.num_classes)
    module = model.module.to(device())
    load_arrays(module, arrays)
    terms = _GradientTerms.of(module, list(arrays), settings.proximal_mu, scaffold)
    optimizer = torch.optim.SGD(terms.params, lr=settings.lr)
    loss_sum = torch.zeros((), device=device())
    seen = steps = epochs_completed = 0
    epochs = settings.local_epochs
    if settings.max_epochs is not None:  # a straggler
        epochs = min(epochs, settings.max_epochs)
    module.train()
    with zoo.seeded(settings.seed):  # dropout, if the model has any, draws from torch's RNG
        for index, ends_epoch in _batches(len(y), settings.batch_size, epochs, settings.seed):
            # Checked before each batch: training stops after the batch that crossed it.
            if settings.deadline is not None and time.monotonic() >= settings.deadline:
                break
            batch = torch.from_numpy(index)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model.logits(x[batch].to(device())), y[batch].to(device()))
            torch.autograd.backward(loss)
            terms.add_to_gradients()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
            seen += len(index)
            steps += 1
            epochs_completed += ends_epoch
    return TrainOutcome(
        arrays=export_arrays(module, arrays),
        # no batch seen (the deadline had passed): there is no loss to report
        train_loss=loss_sum.item() / seen if seen else math.nan,
        epochs_completed=epochs_completed,
        examples_seen=seen,
        local_steps=steps,
    )


def evaluate_model(
    model: TorchModel, arrays: Mapping[str, NDArray], x: NDArray, y: NDArray, num_classes: int
) -> Evaluation:
    """Mean cross-entropy and accuracy of `arrays` on (x, y); an empty set scores 0 with
    weight 0, so it drops out of weighted means."""
    if len(y) == 0:
        return Evaluation(loss=0.0, accuracy=0.0, num_examples=0)
    inputs, labels = _examples(model, x, y, num_classes)
    module = model.module.to(device())
    load_arrays(module, arrays)
    module.eval()
    loss_sum = torch.zeros((), device=device())
    correct = torch.zeros((), dtype=torch.long, device=device())
    with torch.inference_mode():
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            batch_y = labels[start : start + EVAL_BATCH_SIZE].to(device())
            logits = model.logits(inputs[start : start + EVAL_BATCH_SIZE].to(device()))
            loss_sum += F.cross_entropy(logits, batch_y, reduction="sum")
            correct += (logits.argmax(dim=1) == batch_y).sum()
    n = len(labels)
    return Evaluation(loss=loss_sum.item() / n, accuracy=correct.item() / n, num_examples=n)


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


def _check_settings(settings: TrainSettings) -> None:
    problems = [
        f"{name} must be {rule}, got {value}"
        for name, value, ok, rule in (
            ("lr", settings.lr, settings.lr > 0, "> 0"),
            ("local_epochs", settings.local_epochs, settings.local_epochs >= 1, "≥ 1"),
            ("batch_size", settings.batch_size, settings.batch_size >= 1, "≥ 1"),
            ("proximal_mu", settings.proximal_mu, settings.proximal_mu >= 0, "≥ 0"),
            ("max_epochs", settings.max_epochs, (settings.max_epochs or 0) >= 0, "≥ 0"),
        )
        if not ok
    ]
    if problems:
        raise TrainingError("bad training settings: " + "; ".join(problems))


def _examples(
    model: TorchModel, x: NDArray, y: NDArray, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) as CPU tensors, after checking the labels: an out-of-range class would fail
    inside cross-entropy (on CUDA as an unrecoverable device assert)."""
    if len(x) != len(y):
        raise TrainingError(f"{len(x)} inputs but {len(y)} labels")
    if y.dtype.kind not in "iu":
        raise TrainingError(f"labels must be integer classes, got dtype {y.dtype}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise TrainingError(
            f"labels span {int(y.min())}..{int(y.max())}, the model has {num_classes} classes"
        )
    if x.dtype.kind not in "biuf":
        raise TrainingError(f"inputs must be numbers, got dtype {x.dtype}")
    # copies: the node's cached data is read-only, and torch wants tensors it may write
    return torch.tensor(x, dtype=model.input_dtype), torch.tensor(y, dtype=torch.long)


def _batches(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[tuple[NDArray, bool]]:
    """Shuffled minibatch indices for `epochs` epochs, each flagged when it ends its epoch;
    the shuffle depends on `seed` alone, so a round replays exactly."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size], start + batch_size >= n


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
        cls, module: nn.Module, keys: list[str], mu: float, scaffold: ScaffoldState | None
    ) -> _GradientTerms:
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        return cls(
            params=[p for _, p in named],
            mu=mu,
            anchors=[p.detach().clone() for _, p in named] if mu > 0 else [],
            corrections=_corrections(named, keys, scaffold) if scaffold else [],
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


def _corrections(
    params: list[tuple[str, nn.Parameter]], keys: list[str], scaffold: ScaffoldState
) -> list[torch.Tensor]:
    """SCAFFOLD's c − c_i for each trained parameter, on its device and in its dtype.

    The control variates come in the arrays' key order; a tied parameter appears under
    several keys but is trained once, under the name `named_parameters` gives it.
    """
    if not len(keys) == len(scaffold.control) == len(scaffold.client_control):
        raise TrainingError(
            f"SCAFFOLD controls have {len(scaffold.control)} and "
            f"{len(scaffold.client_control)} tensors, the model {len(keys)} arrays"
        )
    control = dict(zip(keys, scaffold.control, strict=True))
    client_control = dict(zip(keys, scaffold.client_control, strict=True))
    corrections = []
    for name, param in params:
        difference = np.asarray(control[name], np.float64) - np.asarray(client_control[name])
        if difference.shape != tuple(param.shape):
            raise TrainingError(
                f"SCAFFOLD control {name!r} has shape {difference.shape}, the model's is "
                f"{tuple(param.shape)}"
            )
        corrections.append(torch.from_numpy(difference).to(param.device, param.dtype))
    return corrections


def _to_numpy(tensor: torch.Tensor, dtype: npt.DTypeLike | None) -> NDArray:
    array = tensor.detach().cpu().numpy()
    # astype copies, so the result never shares memory with the module
    return array.astype(dtype if dtype is not None else array.dtype)


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]"
