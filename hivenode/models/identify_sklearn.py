"""scikit-learn estimators in pickles, joblib files and skops archives, read without loading.

Pickles and joblib files come through the opcode scanner; a skops archive's `schema.json` is
turned into the same symbolic tree (`Call` for objects, `ArrayInfo` for arrays, read from the
`.npy` headers in the zip). One reader then finds the estimator and what it learned.

`parameters` for scikit-learn: for tree models the total number of tree nodes (there are no
weights; nodes are what grows with the model), otherwise the number of learned coefficients
(coef_, intercept_, coefs_, intercepts_, components_, ...).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from hivenode.models.errors import ModelError
from hivenode.models.info import Family, Framework, ModelInfo
from hivenode.models.pickle_allowlist import is_allowed
from hivenode.models.pickle_scan import KEEP_PAYLOAD_BYTES as KEEP_ARRAY_BYTES
from hivenode.models.pickle_scan import Call, GlobalRef, PickleScan, walk
from hivenode.models.pickled_numpy import ArrayInfo, as_array, scalar_value

TREE = "sklearn.tree._tree.Tree"
HIST_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
COEFFICIENTS = (
    "coef_", "intercept_", "coefs_", "intercepts_", "components_", "cluster_centers_",
    "means_", "covariances_", "precisions_", "weights_", "support_vectors_", "dual_coef_",
    "theta_", "var_", "feature_log_prob_", "class_log_prior_", "mean_", "scale_",
)  # fmt: skip
_WRAPPERS = {"Pipeline": "steps", "GridSearchCV": "best_estimator_"}
_WRAPPERS["RandomizedSearchCV"] = "best_estimator_"
_ARCHITECTURES = (
    ("tree_based", ("Tree", "Forest", "Boosting", "IsolationForest")),
    ("mlp", ("MLP",)),
    ("linear", ("Linear",)),  # LinearSVC is a linear model before it is an SVM
    ("svm", ("SVC", "SVR", "OneClassSVM")),
    ("naive_bayes", ("NB",)),
    ("neighbors", ("Neighbors", "NearestCentroid")),
    ("clustering", ("KMeans", "DBSCAN", "Agglomerative", "Birch", "MeanShift", "Spectral")),
    ("mixture", ("Mixture",)),
    ("linear", ("Regression", "Ridge", "Lasso", "ElasticNet", "SGD", "Perceptron", "Lars",
                "PassiveAggressive", "Huber", "TheilSen", "Logistic", "ARD")),
)  # fmt: skip


def is_sklearn(globals_: tuple[str, ...]) -> bool:
    return any(name.startswith("sklearn.") for name in globals_)


def pickle_info(scan: PickleScan, fmt: str) -> ModelInfo:
    return _info(scan.root, fmt, scan.globals, scan.unsafe_globals)


# --- skops ---------------------------------------------------------------------------------


def skops_info(archive: zipfile.ZipFile) -> ModelInfo:
    try:
        schema = json.loads(archive.read("schema.json"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"skops archive without a readable schema.json: {exc}") from exc
    reader = _SkopsReader(archive)
    root = reader.convert(schema)
    globals_ = tuple(reader.globals)
    unsafe = tuple(name for name in globals_ if not is_allowed(name))
    info = _info(root, "skops", globals_, unsafe)
    protocol = schema.get("protocol") if isinstance(schema, dict) else None
    return info.model_copy(update={"details": {**info.details, "skops_protocol": protocol}})


class _SkopsReader:
    """schema.json nodes → the scanner's symbolic values; arrays from their .npy headers."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive
        self.globals: dict[str, None] = {}
        self.by_id: dict[Any, Any] = {}

    def convert(self, node: Any) -> Any:
        if not isinstance(node, dict) or "__loader__" not in node:
            return node
        loader = node["__loader__"]
        if loader == "CachedNode":
            return self.by_id.get(node.get("__id__"))
        value = self._convert(loader, node)
        if "__id__" in node:
            self.by_id[node["__id__"]] = value
        return value

    def _convert(self, loader: str, node: dict[str, Any]) -> Any:
        content = node.get("content")
        ref = GlobalRef(str(node.get("__module__")), str(node.get("__class__")))
        if loader == "JsonNode":
            return json.loads(content) if isinstance(content, str) else content
        if loader in ("DictNode", "DefaultDictNode"):
            items = content.items() if isinstance(content, dict) else ()
            return {key: self.convert(value) for key, value in items}
        if loader in ("ListNode", "SetNode", "TupleNode"):
            values = [self.convert(value) for value in content or ()]
            return tuple(values) if loader == "TupleNode" else values
        if loader == "NdArrayNode":
            return self._array(node)
        if loader in ("ObjectNode", "ReduceNode", "TreeNode", "LossNode", "QuantileForestNode"):
            self.globals[ref.dotted] = None
            args = self.convert(node.get("__reduce__", {}).get("args"))
            return Call(
                ref,
                tuple(args) if isinstance(args, tuple | list) else (),
                state=self.convert(content),
            )
        if loader in ("TypeNode", "FunctionNode", "MethodNode", "OperatorFuncNode"):
            if isinstance(content, dict) and "__module__" in content:
                ref = GlobalRef(str(content["__module__"]), str(content.get("__class__")))
            if ref.dotted != "builtins.str":
                self.globals[ref.dotted] = None
            return ref
        self.globals[ref.dotted] = None
        return Call(ref, state=content)

    def _array(self, node: dict[str, Any]) -> ArrayInfo:
        if node.get("type") == "json":
            shape = self.convert(node.get("shape"))
            objects = list(_flatten(self.convert({**node, "__loader__": "ListNode"})))
            dims = tuple(shape) if isinstance(shape, tuple | list) else (len(objects),)
            return ArrayInfo(tuple(int(dim) for dim in dims), "object", 8, objects=objects)
        name = str(node.get("file"))
        try:
            with self.archive.open(name) as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
                kind = "structured" if dtype.names or dtype.kind == "V" else dtype.name
                info = ArrayInfo(tuple(shape), kind, dtype.itemsize, spec=dtype.str)
                if fortran or dtype.hasobject or info.nbytes > KEEP_ARRAY_BYTES:
                    return info  # only small arrays' values are worth reading
                raw = handle.read(info.nbytes)
        except (KeyError, ValueError, OSError) as exc:
            raise ModelError(f"skops archive: array {name} is missing or unreadable") from exc
        if len(raw) != info.nbytes:
            raise ModelError(f"skops archive: array {name} is truncated")
        return ArrayInfo(info.shape, info.dtype, info.itemsize, raw=raw, spec=info.spec)


def _flatten(values: Any) -> Iterator[Any]:
    for value in values if isinstance(values, list | tuple) else (values,):
        if isinstance(value, list | tuple):
            yield from _flatten(value)
        else:
            yield value


# --- the estimator -------------------------------------------------------------------------


def _state(value: Any) -> dict[Any, Any]:
    return value.state if isinstance(value, Call) and isinstance(value.state, dict) else {}


def _class_name(value: Any) -> str:
    return value.func.name if isinstance(value, Call) and isinstance(value.func, GlobalRef) else ""


def _is_estimator(value: Any) -> bool:
    return (
        isinstance(value, Call)
        and isinstance(value.func, GlobalRef)
        and value.func.module.startswith("sklearn.")
    )


def _final_estimator(root: Any) -> tuple[Any, list[Any]]:
    """The estimator that makes the predictions (through pipelines and searches), and the
    objects wrapped around or before it."""
    others: list[Any] = []
    current = root
    for _ in range(10):
        attribute = _WRAPPERS.get(_class_name(current))
        if attribute is None:
            break
        others.append(current)
        inner = _state(current).get(attribute)
        if attribute == "steps" and isinstance(inner, list) and inner:
            steps = [step[1] for step in inner if isinstance(step, tuple) and len(step) > 1]
            others.extend(step for step in steps[:-1] if _is_estimator(step))
            inner = steps[-1] if steps else None
        if not _is_estimator(inner):
            break
        current = inner
    return current, others


def _learned_size(estimator: Any) -> int | None:
    """Tree nodes, or else coefficients, of one estimator; None when it has neither."""
    trees, nodes = _tree_nodes(estimator)
    if trees:
        return nodes
    coefficients = _coefficients(_state(estimator))
    return sum(_size(shape) for shape in coefficients.values()) if coefficients else None


def _tree_nodes(root: Any) -> tuple[int, int]:
    """(number of trees, their total node count) anywhere under `root`."""
    trees = nodes = 0
    for value in walk(root):
        if not isinstance(value, Call):
            continue
        if value.func_name == TREE:
            count = scalar_value(_state(value).get("node_count"))
            if isinstance(count, int):
                trees += 1
                nodes += count
        elif value.func_name == HIST_PREDICTOR:
            array = as_array(_state(value).get("nodes"))
            if array is not None:
                trees += 1
                nodes += array.shape[0] if array.shape else 0
    return trees, nodes


def _coefficients(state: dict[Any, Any]) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for name in COEFFICIENTS:
        value = state.get(name)
        if isinstance(value, list):
            arrays = [as_array(item) for item in value]
            if arrays and all(array is not None for array in arrays):
                sizes[name] = [list(array.shape) for array in arrays if array is not None]
        elif (array := as_array(value)) is not None:
            sizes[name] = list(array.shape)
        elif isinstance(scalar_value(value), float):  # intercept_ of a single-output model
            sizes[name] = []
    return sizes


def _size(shape: Any) -> int:
    if shape and isinstance(shape[0], list):
        return sum(_size(inner) for inner in shape)
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def _architecture(name: str) -> str:
    for architecture, markers in _ARCHITECTURES:
        if any(marker in name for marker in markers):
            return architecture
    return "unknown"


def _subtype(name: str, state: dict[Any, Any]) -> str | None:
    if "Classifier" in name or "classes_" in state or name in ("LogisticRegression", "SVC"):
        return "classification"
    if "Regress" in name or name in ("Ridge", "Lasso", "ElasticNet", "SVR", "Lars"):
        return "regression"
    if _architecture(name) == "clustering":
        return "clustering"
    if "IsolationForest" in name or "OneClass" in name or "Outlier" in name:
        return "anomaly_detection"
    return "transformation" if state else None


def _info(root: Any, fmt: str, globals_: tuple[str, ...], unsafe: tuple[str, ...]) -> ModelInfo:
    estimator, others = _final_estimator(root)
    if not _is_estimator(estimator):
        raise ModelError("the file holds no scikit-learn estimator")
    state = _state(estimator)
    name = _class_name(estimator)
    details: dict[str, Any] = {"estimator": estimator.func.dotted}
    if others:
        details["pipeline"] = [_class_name(other) for other in others]
    n_features = scalar_value(state.get("n_features_in_"))
    if isinstance(n_features, int):
        details["n_features_in"] = n_features
    classes = as_array(state.get("classes_"))
    if classes is not None and classes.shape:
        details["n_classes"] = classes.shape[0]
        values = classes.values(limit=100)
        if values is not None and all(isinstance(v, int | float | str | bool) for v in values):
            details["classes"] = values
    for key in ("n_outputs_", "n_estimators", "n_iter_", "n_layers_", "n_clusters"):
        value = scalar_value(state.get(key))
        if isinstance(value, int) and not isinstance(value, bool):
            details[key.rstrip("_")] = value
    estimators = state.get("estimators_")
    estimators_array = as_array(estimators)
    if isinstance(estimators, list):
        details["n_estimators"] = len(estimators)
    elif estimators_array is not None and estimators_array.shape:
        details["n_estimators"] = estimators_array.shape[0]
    trees, nodes = _tree_nodes(estimator)
    if trees:
        details["n_trees"] = trees
        details["node_count"] = nodes
    coefficients = _coefficients(state)
    if coefficients:
        details["coefficients"] = coefficients
    version = state.get("_sklearn_version")
    if isinstance(version, str):
        details["sklearn_version"] = version
    parts = [other for other in others if _class_name(other) not in _WRAPPERS] + [estimator]
    sizes = [size for part in parts if (size := _learned_size(part)) is not None]
    parameters = sum(sizes) if sizes else None
    dtypes = sorted(
        {array.dtype for value in walk(estimator) if (array := as_array(value)) is not None}
        - {"object", "structured"}
    )
    return ModelInfo(
        format=fmt,
        framework=Framework.SKLEARN,
        # A text vectoriser in the pipeline means the features are words, not columns.
        family=Family.NLP
        if any("Vectorizer" in _class_name(other) for other in others)
        else Family.TABULAR,
        subtype=_subtype(name, state),
        architecture=_architecture(name),
        parameters=parameters,
        input_shape=(None, n_features) if isinstance(n_features, int) else None,
        dtypes=tuple(dtypes),
        safe=not unsafe,
        unsafe_globals=unsafe,
        details=details,
    )
