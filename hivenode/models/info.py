"""What identification reports about a model file: the contract between identify, analysis,
the registry and the CLI's `--json`."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from hivenode.protocol.records import WireModel


class Framework(StrEnum):
    TORCH = "torch"
    TENSORFLOW = "tensorflow"
    KERAS = "keras"
    TRANSFORMERS = "transformers"
    SKLEARN = "sklearn"
    ONNX = "onnx"
    SAFETENSORS = "safetensors"
    """Bare safetensors weights whose framework the header does not say."""
    UNKNOWN = "unknown"


class Family(StrEnum):
    NLP = "nlp"
    COMPUTER_VISION = "computer_vision"
    TABULAR = "tabular"
    REINFORCEMENT_LEARNING = "reinforcement_learning"
    UNKNOWN = "unknown"


class LayerSummary(WireModel):
    name: str
    kind: str
    """Layer type as the framework names it: Conv2d, Dense, LSTM, Gemm, ..."""
    parameters: int = 0
    shape: tuple[int, ...] | None = None
    """The main weight's shape, when there is one."""


class ModelInfo(WireModel):
    """Everything identification learns without running code from the file."""

    format: str
    """torch_state_dict, torch_pickled_module, torch_pickle, torchscript, safetensors, keras,
    keras_h5, tf_savedmodel, sklearn_pickle, joblib, skops, onnx, hf_directory, or `pickle`
    (a pickle whose contents were not recognised, malicious ones included)."""
    framework: Framework
    family: Family = Family.UNKNOWN
    subtype: str | None = None
    """classification, generation, detection, regression, ... when knowable."""
    architecture: str = "unknown"
    """transformer, cnn, resnet, rnn, tree_based, linear, mlp, ..."""
    parameters: int | None = None
    input_shape: tuple[int | None, ...] | None = None
    dtypes: tuple[str, ...] = ()
    size_bytes: int = 0
    sha256: str = ""
    safe: bool = True
    unsafe_globals: tuple[str, ...] = ()
    layers: tuple[LayerSummary, ...] = ()
    details: dict[str, Any] = Field(default_factory=dict)
    """Framework-specific facts (sklearn: estimator class, n_features_in, classes, ...)."""

    def as_json(self) -> dict[str, Any]:
        """The `--json` object of `hivenode models identify`."""
        return self.model_dump(mode="json")
