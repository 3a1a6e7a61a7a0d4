"""The contract every framework adapter meets, and the lookup by framework name.

A model travels as data (see "Models are data" in DESIGN.md): a `ModelSpec` names code the
node already has (a zoo architecture, a Hugging Face config, a Keras JSON config, an
allow-listed scikit-learn estimator) plus JSON options, and its weights travel as named numpy
arrays. An adapter builds the model from the spec, loads the arrays, trains or evaluates on
`LocalData`, and hands arrays back in the same order and dtypes.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

NDArray = npt.NDArray[Any]

FRAMEWORKS = ("torch", "keras", "sklearn", "hf")
_MODULES = {
    "torch": "hivenode.models.training.torch_backend",
    "hf": "hivenode.models.training.hf_backend",
    "keras": "hivenode.models.training.keras_backend",
    "sklearn": "hivenode.models.training.sklearn_backend",
}


MODEL_SPEC_KEY = "hivenode-model"
"""safetensors metadata of a job's model: its ModelSpec as JSON."""
INPUT_SHAPE_KEY = "hivenode-input-shape"
"""safetensors metadata: the per-sample input shape, a JSON list (what serving takes)."""
NUM_CLASSES_KEY = "hivenode-num-classes"


class TrainingError(Exception):
    """A spec, data or arrays that cannot be trained; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build: `framework` and `name` pick local code, `options` configure it.

    - torch: name in the zoo ("logreg", "mlp", "cnn"); options e.g. {"hidden": [64]}.
    - hf: name an `AutoModelFor...` class ("AutoModelForSequenceClassification"); options
      {"config": {...}} a config dict with "model_type" (built with `from_config`).
    - keras: name "json"; options {"config": <model.to_json() as a dict>}.
    - sklearn: name an allow-listed estimator ("SGDClassifier", "MLPClassifier", ...);
      options its constructor parameters.
    """

    framework: str
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise TrainingError(
                f"unknown framework {self.framework!r}; expected one of {', '.join(FRAMEWORKS)}"
            )

    def to_config(self) -> dict[str, str]:
        """Flat string entries for a Flower ConfigRecord."""
        return {
            "model-framework": self.framework,
            "model-name": self.name,
            "model-options": json.dumps(dict(self.options), sort_keys=True),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        try:
            options = json.loads(str(config.get("model-options", "{}")))
            return cls(str(config["model-framework"]), str(config["model-name"]), options)
        except (KeyError, ValueError) as exc:
            raise TrainingError(f"the job's config has no valid model spec: {exc}") from exc


@dataclass(frozen=True)
class LocalData:
    """A node's own examples, already split and preprocessed. Labels are integer classes."""

    x_train: NDArray
    y_train: NDArray
    x_test: NDArray
    y_test: NDArray
    num_classes: int

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])


@dataclass(frozen=True)
class TrainSettings:
    """Local training of one round.

    `max_epochs` < `local_epochs` makes this trainer a straggler that stops early (the
    simulator's systems heterogeneity); `deadline` (a `time.monotonic()` value) stops training
    after the batch that crosses it. Either way the outcome reports the work really done.
    """

    lr: float
    local_epochs: int
    batch_size: int
    proximal_mu: float = 0.0
    seed: int = 0
    max_epochs: int | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class ScaffoldState:
    """SCAFFOLD's control variates, in the model's array order: c (server) and c_i (own)."""

    control: list[NDArray]
    client_control: list[NDArray]


@dataclass(frozen=True)
class TrainOutcome:
    """Arrays after local training (same keys, order and dtypes as given) and the work done.

    `train_loss` is the mean loss over the examples seen (without the proximal term);
    `local_steps` is K_i, the optimizer steps taken.
    """

    arrays: dict[str, NDArray]
    train_loss: float
    epochs_completed: int
    examples_seen: int
    local_steps: int


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    num_examples: int


class Backend(Protocol):
    def init_arrays(
        self, spec: ModelSpec, feature_shape: tuple[int, ...], num_classes: int, seed: int
    ) -> dict[str, NDArray]:
        """The model's initial weights, deterministic for a seed."""
        ...

    def train(
        self,
        spec: ModelSpec,
        arrays: Mapping[str, NDArray],
        data: LocalData,
        settings: TrainSettings,
        scaffold: ScaffoldState | None = None,
    ) -> TrainOutcome:
        """Local training from `arrays`: SGD with the proximal term μ/2·‖w − w_global‖² when
        μ > 0, SCAFFOLD's corrected steps y ← y − η·(g + c − c_i) when `scaffold` is given."""
        ...

    def evaluate(
        self, spec: ModelSpec, arrays: Mapping[str, NDArray], x: NDArray, y: NDArray
    ) -> Evaluation:
        """Mean loss and accuracy of the model `arrays` on (x, y)."""
        ...


def backend_for(framework: str) -> Backend:
    """The adapter for `framework`, imported on first use (frameworks load slowly)."""
    if framework not in _MODULES:
        raise TrainingError(
            f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}"
        )
    module = importlib.import_module(_MODULES[framework])
    backend: Backend = module.BACKEND
    return backend


def as_float_arrays(arrays: Mapping[str, NDArray]) -> dict[str, NDArray]:
    """Writable copies, so an adapter never trains in place on buffers it was handed."""
    return {k: np.array(v, copy=True) for k, v in arrays.items()}
