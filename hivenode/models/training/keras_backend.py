"""Keras 3 adapter (TensorFlow backend): a model from its JSON config, trained by exact SGD.

The model is rebuilt from `model.to_json()` data with Keras' safe mode on, and Lambda layers
are refused outright, since their config carries Python code (see "Models are data" in
DESIGN.md). Training is a hand-written GradientTape loop rather than `model.fit`, so that the
proximal term and SCAFFOLD's correction enter each step exactly as written:
w ← w − η·(∇[CE + μ/2·‖w − w_global‖²] + c − c_i).

Outputs may be logits or probabilities: the output layer's activation in the config decides
("softmax", or a Softmax layer, means probabilities; "linear" or "log_softmax" means logits)
and cross-entropy is computed to match; any other output activation is refused.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np

from hivenode.models.identify_keras import unsafe_keras_layers
from hivenode.models.training.backend import (
    Evaluation,
    LocalData,
    ModelSpec,
    NDArray,
    ScaffoldState,
    TrainingError,
    TrainOutcome,
    TrainSettings,
)
from hivenode.models.training.loop import (
    as_given,
    check_arrays,
    checked_labels,
    checked_training,
    evaluation,
    run_minibatches,
    scaffold_corrections,
)

_PROBABILITY_ACTIVATIONS = frozenset({"softmax"})
_LOGIT_ACTIVATIONS = frozenset({"linear", "log_softmax"})
"""log_softmax outputs differ from logits by a per-example constant, which softmax removes."""

_EVALUATION_BATCH = 1024
"""Examples per forward pass in `evaluate`: bounds activation memory on large test sets."""


def _frameworks() -> tuple[Any, Any]:
    """keras and tensorflow, imported on first use (several seconds)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # TensorFlow's C++ INFO lines (oneDNN, CPU features) would flood the node's journal.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # type: ignore[import-untyped]
    import tensorflow as tf  # type: ignore[import-untyped]

    if keras.backend.backend() != "tensorflow":
        raise TrainingError(
            f"Keras runs on {keras.backend.backend()!r}; training needs KERAS_BACKEND=tensorflow"
        )
    return keras, tf


def keras_spec(model: Any) -> ModelSpec:
    """The spec of a built Keras model: its architecture as JSON data, no weights."""
    return ModelSpec("keras", "json", {"config": json.loads(model.to_json())})


def _config(spec: ModelSpec) -> dict[str, Any]:
    if spec.name != "json":
        raise TrainingError(f"Keras models travel as name 'json', got {spec.name!r}")
    config = spec.options.get("config")
    if not isinstance(config, dict):
        raise TrainingError("a Keras spec needs options {'config': <model.to_json() as a dict>}")
    unsafe = unsafe_keras_layers(config)
    if unsafe:
        raise TrainingError(
            f"the Keras config has layers that carry Python code ({', '.join(unsafe)}); "
            "a node builds models from data only"
        )
    return config


def _output_layer(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config of the layer that produces a model config's single output."""
    try:
        return _find_output_layer(config)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise TrainingError(f"the Keras config has no readable output layer: {exc!r}") from exc


def _find_output_layer(config: Mapping[str, Any]) -> Mapping[str, Any]:
    body = config.get("config") or {}
    layers = body.get("layers") or []
    if not layers:
        raise TrainingError("the Keras config has no layers")
    outputs = body.get("output_layers")
    if outputs is None:  # Sequential: the last layer is the output
        layer = layers[-1]
    else:  # Functional: ["name", 0, 0], or a list of those when there are several outputs
        names = [outputs] if outputs and isinstance(outputs[0], str) else outputs
        if len(names) != 1:
            raise TrainingError("a Keras model to train must have exactly one output")
        by_name = {entry.get("name", entry["config"].get("name")): entry for entry in layers}
        layer = by_name[names[0][0]]
    if layer.get("class_name") in ("Sequential", "Functional"):
        return _find_output_layer(layer)
    return layer  # type: ignore[no-any-return]


def _from_logits(config: Mapping[str, Any]) -> bool:
    """Whether the model outputs logits (True) or class probabilities (False)."""
    layer = _output_layer(config)
    if layer.get("class_name") == "Softmax":
        return False
    activation = (layer.get("config") or {}).get("activation", "linear")
    if isinstance(activation, str) and activation in _PROBABILITY_ACTIVATIONS:
        return False
    if isinstance(activation, str) and activation in _LOGIT_ACTIVATIONS:
        return True
    raise TrainingError(
        f"the Keras model's output activation is {activation!r}; cross-entropy training "
        "needs 'softmax' (probabilities) or 'linear' (logits)"
    )


@contextmanager
def _seeded(keras: Any, seed: int) -> Iterator[None]:
    """Keras draws initial weights and dropout seeds from the global generators, which
    `set_random_seed` also sets for Python and NumPy: put those two back afterwards, so that
    training does not make the rest of the node's randomness repeat every round."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _device(tf: Any) -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "/CPU:0"
    for gpu in gpus:
        # TensorFlow otherwise reserves the whole GPU, starving the node's other work; once
        # the GPU is initialised (an earlier round) the setting is fixed and this raises.
        with suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    # GPU kernels may reduce in any order; the contract is same inputs, same outputs.
    tf.config.experimental.enable_op_determinism()
    return "/GPU:0"


def _model(keras: Any, config: Mapping[str, Any], feature_shape: tuple[int, ...], seed: int) -> Any:
    """The model built from `config` for inputs of `feature_shape`, initialised from `seed`."""
    with _seeded(keras, seed):
        try:
            model = keras.models.model_from_json(json.dumps(config))
            if not model.built:  # a config without an input shape
                model.build((None, *feature_shape))
        except (ValueError, TypeError, KeyError) as exc:
            raise TrainingError(f"the Keras config does not build a model: {exc}") from exc
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise TrainingError("a Keras model to train must have exactly one input and one output")
    expected = tuple(model.inputs[0].shape[1:])
    if len(expected) != len(feature_shape) or any(
        want is not None and want != got for want, got in zip(expected, feature_shape, strict=True)
    ):
        raise TrainingError(
            f"the Keras model takes inputs of shape {expected}, the data has {feature_shape}"
        )
    return model


def _classes(model: Any) -> int:
    return int(model.outputs[0].shape[-1])


def _checked_classes(model: Any, num_classes: int) -> None:
    if _classes(model) != num_classes:
        raise TrainingError(
            f"the Keras model's output layer has {_classes(model)} units for {num_classes} classes"
        )


def _variables(model: Any) -> dict[str, Any]:
    """The model's weights by key, in `model.weights` order. A weight's `path` names it, but
    a nested model rebuilt from JSON drops its own prefix, so equal paths get "#2", "#3"..."""
    seen: Counter[str] = Counter()
    variables: dict[str, Any] = {}
    for weight in model.weights:
        seen[weight.path] += 1
        count = seen[weight.path]
        variables[weight.path if count == 1 else f"{weight.path}#{count}"] = weight
    return variables


def _load(model: Any, arrays: Mapping[str, NDArray]) -> dict[str, Any]:
    variables = _variables(model)
    check_arrays(arrays, {key: tuple(v.shape) for key, v in variables.items()})
    for key, variable in variables.items():
        variable.assign(np.asarray(arrays[key], dtype=variable.dtype))
    return variables


def _sgd_step(
    keras: Any,
    tf: Any,
    model: Any,
    variables: Mapping[str, Any],
    arrays: Mapping[str, NDArray],
    corrections: Mapping[str, NDArray] | None,
    settings: TrainSettings,
    from_logits: bool,
) -> Callable[[NDArray, NDArray], float]:
    """One SGD step on a batch, returning the batch's summed cross-entropy before the step.

    Compiled with tf.function (one trace a round): 1.5x (small MLP) to 5x (small CNN) faster
    than eager on CPU, and as deterministic. Only trainable weights step; the rest (BatchNorm
    statistics) update in the forward pass, and SCAFFOLD's entries for them are unused.
    """
    lr, mu = settings.lr, settings.proximal_mu
    trainable = [(key, v) for key, v in variables.items() if v.trainable]
    weights = [v for _, v in trainable]
    anchors = [tf.constant(np.asarray(arrays[key], dtype=v.dtype)) for key, v in trainable]
    shifts = [
        None if corrections is None else tf.constant(corrections[key], dtype=v.dtype)
        for key, v in trainable
    ]
    inputs = model.inputs[0]

    @tf.function(  # type: ignore[untyped-decorator]
        input_signature=[
            tf.TensorSpec((None, *inputs.shape[1:]), inputs.dtype),
            tf.TensorSpec((None,), tf.int64),
        ]
    )
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            per_example = keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=from_logits
            )
            loss = tf.reduce_mean(per_example)
            if model.losses:  # regularisers the config declares are part of the model
                loss += tf.add_n(model.losses)
            if mu > 0 and weights:
                drift = [
                    tf.reduce_sum(tf.square(w - a)) for w, a in zip(weights, anchors, strict=True)
                ]
                loss += mu / 2 * tf.add_n(drift)
        gradients = tape.gradient(loss, weights)
        for weight, gradient, shift in zip(weights, gradients, shifts, strict=True):
            update = tf.zeros_like(weight) if gradient is None else gradient
            if shift is not None:
                update += shift
            weight.assign_sub(lr * update)
        return tf.reduce_sum(per_example)

    def run(x: NDArray, y: NDArray) -> float:
        return float(step(x, y))

    return run


class KerasBackend:
    """Keras 3 models from a JSON config; arrays keyed by weight path, in `model.weights`
    order. Regularisers in the config are optimised too but not counted in the reported
    loss, which is cross-entropy only."""

    def init_arrays(
        self, spec: ModelSpec, feature_shape: tuple[int, ...], num_classes: int, seed: int
    ) -> dict[str, NDArray]:
        keras, tf = _frameworks()
        config = _config(spec)
        _from_logits(config)  # refuse an untrainable output before anyone trains it
        with tf.device(_device(tf)):
            model = _model(keras, config, feature_shape, seed)
        _checked_classes(model, num_classes)
        return {key: np.array(v.numpy()) for key, v in _variables(model).items()}

    def train(
        self,
        spec: ModelSpec,
        arrays: Mapping[str, NDArray],
        data: LocalData,
        settings: TrainSettings,
        scaffold: ScaffoldState | None = None,
    ) -> TrainOutcome:
        labels = checked_training(data, settings)
        keras, tf = _frameworks()
        config = _config(spec)
        from_logits = _from_logits(config)
        corrections = scaffold_corrections(arrays, scaffold)
        with tf.device(_device(tf)):
            # The seed fixes dropout's generators; the weights come from `arrays`.
            model = _model(keras, config, data.feature_shape, settings.seed)
            _checked_classes(model, data.num_classes)
            variables = _load(model, arrays)
            features = np.asarray(data.x_train, dtype=model.inputs[0].dtype)
            step = _sgd_step(
                keras, tf, model, variables, arrays, corrections, settings, from_logits
            )
            work = run_minibatches(
                len(features), settings, lambda batch: step(features[batch], labels[batch])
            )
            trained = {key: v.numpy() for key, v in variables.items()}
        return work.outcome(as_given(arrays, trained))

    def evaluate(
        self, spec: ModelSpec, arrays: Mapping[str, NDArray], x: NDArray, y: NDArray
    ) -> Evaluation:
        keras, tf = _frameworks()
        config = _config(spec)
        from_logits = _from_logits(config)
        loss_sum, correct = 0.0, 0
        with tf.device(_device(tf)):
            model = _model(keras, config, tuple(int(d) for d in x.shape[1:]), seed=0)
            _load(model, arrays)
            labels = checked_labels(y, _classes(model), len(x))
            features = np.asarray(x, dtype=model.inputs[0].dtype)
            for start in range(0, len(features), _EVALUATION_BATCH):
                chunk = slice(start, start + _EVALUATION_BATCH)
                outputs = model(features[chunk], training=False)
                per_example = keras.losses.sparse_categorical_crossentropy(
                    labels[chunk], outputs, from_logits=from_logits
                )
                loss_sum += float(tf.reduce_sum(per_example))
                correct += int((np.argmax(outputs, axis=-1) == labels[chunk]).sum())
        return evaluation(loss_sum, correct, len(features))


BACKEND = KerasBackend()
