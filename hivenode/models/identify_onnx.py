"""ONNX models, read as protobuf wire data over a memory map: initializers' names, dtypes and
dims (their bytes are skipped, external data is never opened), the nodes' op types and the
graph inputs. Parameters are the learned initializers: floating point ones, plus int8/uint8
and int4 ones (quantised weights); int32/int64/bool initializers are shapes and indices."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hivenode.models.classify import classify
from hivenode.models.errors import ModelError
from hivenode.models.info import Framework, LayerSummary, ModelInfo
from hivenode.models.protowire import (
    as_bytes,
    as_int,
    as_str,
    iter_fields,
    mapped,
    packed_varints,
)

# onnx.TensorProto.DataType
ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    8: "string", 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
    14: "complex64", 15: "complex128", 16: "bfloat16", 17: "float8_e4m3fn",
    18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz", 21: "uint4", 22: "int4",
    23: "float4_e2m1",
}  # fmt: skip
_WEIGHT_DTYPES = {1, 2, 3, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23}
_MODEL_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 14, 20, 25, 26}
_KIND_FOR_CLASSIFY = {"Gather": "Embedding", "Gemm": "Linear", "MatMul": "Linear"}


@dataclass
class _Initializer:
    name: str
    dims: tuple[int, ...]
    dtype: int

    @property
    def numel(self) -> int:
        return math.prod(self.dims)


@dataclass
class _Graph:
    initializers: dict[str, _Initializer] = field(default_factory=dict)
    nodes: list[tuple[str, str, list[str]]] = field(default_factory=list)
    """(name, op_type, inputs)"""
    inputs: list[tuple[str, tuple[int | None, ...] | None]] = field(default_factory=list)
    outputs: list[tuple[str, tuple[int | None, ...] | None]] = field(default_factory=list)


def looks_like_onnx(head: bytes) -> bool:
    """ModelProto starts with ir_version (field 1, varint): byte 0x08."""
    return head[:1] == b"\x08"


def identify_onnx(path: Path) -> ModelInfo:
    with mapped(path) as view:
        return _identify(view)


def _identify(view: memoryview) -> ModelInfo:
    ir_version = None
    graph: _Graph | None = None
    opsets: dict[str, int] = {}
    producer = ""
    for model_field in iter_fields(view):
        if model_field.number not in _MODEL_FIELDS:
            raise ModelError(f"field {model_field.number} is not part of an ONNX model")
        if model_field.number == 1:
            ir_version = as_int(model_field.value)
        elif model_field.number == 2:
            producer = as_str(model_field.value)
        elif model_field.number == 7:
            graph = _graph(as_bytes(model_field.value))
        elif model_field.number == 8:
            opset = {f.number: f.value for f in iter_fields(as_bytes(model_field.value))}
            domain = as_str(opset.get(1, memoryview(b""))) or "ai.onnx"
            opsets[domain] = as_int(opset.get(2, 0))
    if ir_version is None or graph is None:
        raise ModelError("not an ONNX model: no ir_version or no graph")

    weights = [i for i in graph.initializers.values() if i.dtype in _WEIGHT_DTYPES]
    layers, classify_layers = _layers(graph)
    ops = Counter(op for _, op, _ in graph.nodes)
    names = [i.name for i in weights] + [name for name, _, _ in graph.nodes]
    kind = classify(classify_layers, names)
    input_shape = next((shape for _, shape in graph.inputs), None)
    subtype = kind.subtype
    output_shape = next((shape for _, shape in graph.outputs), None)
    if subtype is None and output_shape is not None and len(output_shape) == 2:
        last = graph.nodes[-1][1] if graph.nodes else ""
        if last in ("Gemm", "MatMul", "Softmax", "Add", "LogSoftmax"):
            subtype = "classification"
    return ModelInfo(
        format="onnx",
        framework=Framework.ONNX,
        family=kind.family,
        subtype=subtype,
        architecture=kind.architecture,
        parameters=sum(i.numel for i in weights),
        input_shape=input_shape,
        dtypes=tuple(sorted({ONNX_DTYPES.get(i.dtype, str(i.dtype)) for i in weights})),
        layers=tuple(layers),
        details={
            "ir_version": ir_version,
            "opsets": opsets,
            "producer": producer,
            "initializers": len(graph.initializers),
            "ops": dict(ops.most_common(20)),
            "output_shape": list(output_shape) if output_shape is not None else None,
        },
    )


def _layers(graph: _Graph) -> tuple[list[LayerSummary], list[LayerSummary]]:
    """One layer per node that consumes weight initializers (each initializer counted once);
    the second list carries kinds folded for classification (Gather of a matrix: Embedding)."""
    used: set[str] = set()
    layers: list[LayerSummary] = []
    for_classify: list[LayerSummary] = []
    for index, (name, op, inputs) in enumerate(graph.nodes):
        owned = [
            graph.initializers[i]
            for i in inputs
            if i in graph.initializers
            and i not in used
            and graph.initializers[i].dtype in _WEIGHT_DTYPES
        ]
        if not owned:
            continue
        used.update(i.name for i in owned)
        main = max(owned, key=lambda i: (len(i.dims), i.numel))
        layer = LayerSummary(
            name=name or f"{op}_{index}",
            kind=op,
            parameters=sum(i.numel for i in owned),
            shape=main.dims,
        )
        layers.append(layer)
        kind = _KIND_FOR_CLASSIFY.get(op, op)
        if op == "MatMul" and any("attn" in i.name or "attention" in i.name for i in owned):
            kind = "Attention"
        for_classify.append(layer.model_copy(update={"kind": kind}))
    return layers, for_classify


def _graph(proto: memoryview) -> _Graph:
    graph = _Graph()
    for graph_field in iter_fields(proto):
        number = graph_field.number
        if number == 5:
            initializer = _initializer(as_bytes(graph_field.value))
            graph.initializers[initializer.name] = initializer
        elif number == 1:
            graph.nodes.append(_node(as_bytes(graph_field.value)))
        elif number in (11, 12):
            value = _value_info(as_bytes(graph_field.value))
            (graph.inputs if number == 11 else graph.outputs).append(value)
    graph.inputs = [item for item in graph.inputs if item[0] not in graph.initializers]
    return graph


def _initializer(proto: memoryview) -> _Initializer:
    dims: list[int] = []
    dtype = 0
    name = ""
    for tensor_field in iter_fields(proto):
        if tensor_field.number == 1:
            dims.extend(packed_varints(tensor_field.value))
        elif tensor_field.number == 2:
            dtype = as_int(tensor_field.value)
        elif tensor_field.number == 8:
            name = as_str(tensor_field.value)
    return _Initializer(name, tuple(dims), dtype)


def _node(proto: memoryview) -> tuple[str, str, list[str]]:
    name = op = ""
    inputs: list[str] = []
    for node_field in iter_fields(proto):
        if node_field.number == 1:
            inputs.append(as_str(node_field.value))
        elif node_field.number == 3:
            name = as_str(node_field.value)
        elif node_field.number == 4:
            op = as_str(node_field.value)
    return name, op, inputs


def _value_info(proto: memoryview) -> tuple[str, tuple[int | None, ...] | None]:
    name = ""
    shape: tuple[int | None, ...] | None = None
    for info_field in iter_fields(proto):
        if info_field.number == 1:
            name = as_str(info_field.value)
        elif info_field.number == 2:
            for type_field in iter_fields(as_bytes(info_field.value)):
                if type_field.number == 1:  # tensor_type
                    for tensor_field in iter_fields(as_bytes(type_field.value)):
                        if tensor_field.number == 2:
                            shape = _dims(as_bytes(tensor_field.value))
    return name, shape


def _dims(proto: memoryview) -> tuple[int | None, ...]:
    dims: list[int | None] = []
    for dim_field in iter_fields(proto):
        if dim_field.number != 1:
            continue
        value: int | None = None
        for part in iter_fields(as_bytes(dim_field.value)):
            if part.number == 1:
                value = as_int(part.value)
        dims.append(value)
    return tuple(dims)
