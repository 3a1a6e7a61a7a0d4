"""TensorFlow SavedModel directories, from saved_model.pb read as protobuf wire data: the
object graph's variables (name, dtype, shape) and the serving signature's inputs. No graph
function is loaded or run, and TensorFlow is not imported."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hivenode.models.classify import classify
from hivenode.models.errors import ModelError
from hivenode.models.info import Framework, ModelInfo
from hivenode.models.protowire import (
    Field,
    as_bytes,
    as_int,
    as_str,
    iter_fields,
    mapped,
    signed64,
)
from hivenode.models.weights import Tensor, count, dtypes
from hivenode.models.weights import layer_summary as summarise

# tensorflow/core/framework/types.proto
TF_DTYPES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
    8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128",
    19: "float16", 20: "resource", 21: "variant", 22: "uint32", 23: "uint64",
}  # fmt: skip
_VARIABLE_OPS = {"VariableV2", "VarHandleOp", "Variable"}
_CODE_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
"""Ops that call back into Python functions: the graph cannot run without code it names."""
_OP_KINDS = {
    "Conv2D": "Conv2D", "Conv3D": "Conv3D", "Conv1D": "Conv1D",
    "DepthwiseConv2dNative": "Conv2D", "MatMul": "Dense", "BatchMatMulV2": "Attention",
    "CudnnRNNV3": "LSTM", "LSTMBlockCell": "LSTM", "GRUBlockCell": "GRU", "Softmax": "Softmax",
}  # fmt: skip


def is_savedmodel(path: Path) -> bool:
    return (path / "saved_model.pb").is_file()


def identify_savedmodel(path: Path) -> ModelInfo:
    pb = path / "saved_model.pb"
    if pb.stat().st_size == 0:
        raise ModelError("saved_model.pb is empty")
    with mapped(pb) as view:
        return _identify(view)


def _identify(view: memoryview) -> ModelInfo:
    meta_graphs = [as_bytes(f.value) for f in iter_fields(view) if f.number == 2]
    if not meta_graphs:
        raise ModelError("saved_model.pb has no meta graph (not a SavedModel)")
    meta = meta_graphs[0]
    tensors: list[Tensor] = []
    ops: Counter[str] = Counter()
    input_shape: tuple[int | None, ...] | None = None
    tags: list[str] = []
    tf_version = None
    for field in iter_fields(meta):
        if field.number == 1:
            for info in iter_fields(as_bytes(field.value)):
                if info.number == 4:
                    tags.append(as_str(info.value))
                elif info.number == 5:
                    tf_version = as_str(info.value)
        elif field.number == 2:
            _graph_ops(as_bytes(field.value), ops, tensors)
        elif field.number == 5 and input_shape is None:
            input_shape = _signature_input(field)
        elif field.number == 7:
            object_variables = _object_graph_variables(as_bytes(field.value))
            if object_variables:
                tensors = object_variables
    weights = [t for t in tensors if t.dtype not in ("resource", "variant", "string")]
    counts = count(weights)
    layers = summarise(weights)
    kind = classify(layers, [t.name for t in weights] + [f"op/{op}" for op in ops])
    unsafe = sorted(f"tf.raw_ops.{op}" for op in ops if op in _CODE_OPS)
    return ModelInfo(
        format="tf_savedmodel",
        framework=Framework.TENSORFLOW,
        family=kind.family,
        subtype=kind.subtype or ("classification" if "Softmax" in ops else None),
        architecture=kind.architecture if weights else _architecture_from_ops(ops),
        parameters=counts.parameters if weights else None,
        input_shape=input_shape,
        dtypes=dtypes(weights),
        safe=not unsafe,
        unsafe_globals=tuple(unsafe),
        layers=layers,
        details={
            "tags": tags,
            "tensorflow_version": tf_version,
            "variables": len(weights),
            "ops": dict(ops.most_common(20)),
        },
    )


def _architecture_from_ops(ops: Counter[str]) -> str:
    if any(op.startswith("Conv") for op in ops):
        return "cnn"
    if "MatMul" in ops:
        return "mlp"
    return "unknown"


def _graph_ops(graph: memoryview, ops: Counter[str], tensors: list[Tensor]) -> None:
    """Op types of the graph and its function library; TF1 variables from their nodes."""
    for field in iter_fields(graph):
        if field.number == 1:
            _node(as_bytes(field.value), ops, tensors)
        elif field.number == 2:
            for function in iter_fields(as_bytes(field.value)):
                if function.number != 1:
                    continue
                for part in iter_fields(as_bytes(function.value)):
                    if part.number == 3:
                        _node(as_bytes(part.value), ops, None)


def _node(node: memoryview, ops: Counter[str], tensors: list[Tensor] | None) -> None:
    name = op = ""
    shape: tuple[int, ...] | None = None
    dtype = "unknown"
    for field in iter_fields(node):
        if field.number == 1:
            name = as_str(field.value)
        elif field.number == 2:
            op = as_str(field.value)
        elif field.number == 5 and tensors is not None:
            key, value = _map_entry(field)
            if key == "shape" and value is not None:
                for attr in iter_fields(value):
                    if attr.number == 7:  # AttrValue.shape
                        shape = _shape(as_bytes(attr.value))
            elif key == "dtype" and value is not None:
                for attr in iter_fields(value):
                    if attr.number == 6:  # AttrValue.type
                        dtype = TF_DTYPES.get(as_int(attr.value), "unknown")
    if op:
        ops[op] += 1
    if tensors is not None and op in _VARIABLE_OPS and shape is not None:
        tensors.append(Tensor(name, shape, dtype, buffer=False))


def _map_entry(field: Field) -> tuple[str, memoryview | None]:
    key = ""
    value: memoryview | None = None
    for part in iter_fields(as_bytes(field.value)):
        if part.number == 1:
            key = as_str(part.value)
        elif part.number == 2:
            value = as_bytes(part.value)
    return key, value


def _shape(proto: memoryview) -> tuple[int, ...] | None:
    """TensorShapeProto → dims; None for unknown rank; -1 dims (unknown) become 0."""
    dims: list[int] = []
    for field in iter_fields(proto):
        if field.number == 3 and as_int(field.value):
            return None
        if field.number == 2:
            size = 0
            for dim in iter_fields(as_bytes(field.value)):
                if dim.number == 1:
                    size = signed64(as_int(dim.value))
            dims.append(size)
    return tuple(dims)


def _signature_input(field: Field) -> tuple[int | None, ...] | None:
    """The first input's shape of the `serving_default` signature (or of the first one)."""
    name, signature = _map_entry(field)
    if signature is None or name not in ("serving_default", ""):
        return None
    for part in iter_fields(signature):
        if part.number != 1:  # inputs
            continue
        _, tensor_info = _map_entry(part)
        for info in iter_fields(tensor_info or memoryview(b"")):
            if info.number == 3:
                shape = _shape(as_bytes(info.value))
                return None if shape is None else tuple(d if d >= 0 else None for d in shape)
    return None


def _object_graph_variables(graph: memoryview) -> list[Tensor]:
    """The model's variables from the object graph.

    Each SavedVariable node is one variable object, but Keras 3's `export()` saves a second
    set of copies under `_all_variables`; when the root object has a `variables` list (Keras
    exports and Keras 2 SavedModels do), that list is the model's weights. Otherwise every
    variable node counts.
    """
    children: list[dict[str, int]] = []
    variables: dict[int, Tensor] = {}
    for index, node in enumerate(f for f in iter_fields(graph) if f.number == 1):
        named: dict[str, int] = {}
        for part in iter_fields(as_bytes(node.value)):
            if part.number == 1:  # ObjectReference: node_id, local_name
                ref = {f.number: f.value for f in iter_fields(as_bytes(part.value))}
                named[as_str(ref.get(2, memoryview(b"")))] = as_int(ref.get(1, 0))
            elif part.number == 7:
                variables[index] = _variable(as_bytes(part.value), index)
        children.append(named)
    listed = children[0].get("variables") if children else None
    if listed is not None and listed < len(children):
        chosen = [variables[i] for i in children[listed].values() if i in variables]
        if chosen:
            return chosen
    return list(variables.values())


def _variable(proto: memoryview, index: int) -> Tensor:
    dtype = "unknown"
    shape: tuple[int, ...] = ()
    name = f"variable_{index}"
    for field in iter_fields(proto):
        if field.number == 1:
            dtype = TF_DTYPES.get(as_int(field.value), "unknown")
        elif field.number == 2:
            shape = _shape(as_bytes(field.value)) or ()
        elif field.number == 6:
            name = as_str(field.value) or name
    # Keras counts non-trainable weights (BatchNorm statistics) as parameters too.
    return Tensor(name, tuple(max(d, 0) for d in shape), dtype, buffer=False)
