"""torch objects in a scanned pickle: tensors (`_rebuild_tensor_v2` on persistent storage
ids), parameters, modules, and the ModelInfo of a set of named tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hivenode.models.classify import classify
from hivenode.models.info import Framework, ModelInfo
from hivenode.models.pickle_scan import Call, GlobalRef, Persistent, PickleScan, walk
from hivenode.models.weights import Tensor, count, dtype_name, dtypes
from hivenode.models.weights import layer_summary as summarise

ITEMSIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16,
}  # fmt: skip
_RECONSTRUCTORS = {"copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__"}


@dataclass(frozen=True)
class TensorRef:
    shape: tuple[int, ...]
    dtype: str
    storage: tuple[Any, ...] | None
    requires_grad: bool | None
    parameter: bool = False


def as_tensor(value: Any) -> TensorRef | None:
    """The tensor a scanned value rebuilds, or None when it is not one."""
    if not isinstance(value, Call):
        return None
    name = value.func_name
    args = value.args
    if name in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
        inner = as_tensor(args[0]) if args else None
        if inner is None:
            return None
        requires_grad = args[1] if len(args) > 1 and isinstance(args[1], bool) else None
        return TensorRef(inner.shape, inner.dtype, inner.storage, requires_grad, parameter=True)
    if name == "torch._tensor._rebuild_from_type_v2" and len(args) >= 3:
        return as_tensor(Call(args[0], tuple(args[2]) if isinstance(args[2], tuple) else ()))
    if name in (
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_qtensor",
    ):
        if len(args) < 4 or not isinstance(args[2], tuple):
            return None
        storage, offset, size, stride = args[:4]
        key, dtype = storage_of(storage)
        if name == "torch._utils._rebuild_tensor_v3" and len(args) > 6:
            dtype = _torch_dtype(args[6]) or dtype
        requires_grad = args[4] if len(args) > 4 and isinstance(args[4], bool) else None
        shape = tuple(int(dim) for dim in size)
        identity = (key, offset, shape, stride) if key is not None else None
        return TensorRef(shape, dtype, identity, requires_grad)
    if name == "torch._utils._rebuild_meta_tensor_no_storage" and len(args) >= 2:
        shape = tuple(int(dim) for dim in args[1]) if isinstance(args[1], tuple) else ()
        return TensorRef(shape, _torch_dtype(args[0]) or "unknown", None, None)
    return None


def storage_of(value: Any) -> tuple[Any, str]:
    """(key, dtype) of a persistent storage id `('storage', type, key, location, numel)`."""
    if isinstance(value, Persistent) and isinstance(value.pid, tuple) and len(value.pid) >= 3:
        storage_type = value.pid[1]
        dtype = dtype_name(storage_type.name) if isinstance(storage_type, GlobalRef) else "unknown"
        return value.pid[2], dtype
    return None, "unknown"


def _torch_dtype(value: Any) -> str | None:
    if isinstance(value, GlobalRef) and value.module == "torch":
        return dtype_name(value.name)
    return None


def class_of(call: Call) -> GlobalRef | None:
    """The class an object is an instance of, through copyreg's reconstructors."""
    if call.func_name in _RECONSTRUCTORS and call.args and isinstance(call.args[0], GlobalRef):
        return call.args[0]
    return call.func if isinstance(call.func, GlobalRef) else None


def is_module(value: Any) -> bool:
    return (
        isinstance(value, Call)
        and isinstance(value.state, dict)
        and "_modules" in value.state
        and "_parameters" in value.state
    )


def storage_ids(root: Any) -> Iterator[tuple[Any, ...]]:
    """Every persistent storage id `('storage', type, key, location, numel, ...)`."""
    for value in walk(root):
        if isinstance(value, Persistent) and isinstance(value.pid, tuple) and len(value.pid) > 2:
            yield value.pid


def storage_keys(root: Any) -> Iterator[Any]:
    for pid in storage_ids(root):
        yield pid[2]


def torch_info(
    fmt: str,
    tensors: list[Tensor],
    kinds: dict[str, str],
    scan: PickleScan,
    details: dict[str, Any],
) -> ModelInfo:
    counts = count(tensors)
    layers = summarise(tensors, kinds)
    kind = classify(layers, [t.name for t in tensors])
    details.update(
        tensors=len(tensors),
        buffers=counts.buffers,
        buffer_elements=counts.buffer_elements,
        globals=list(scan.globals),
    )
    return ModelInfo(
        format=fmt,
        framework=Framework.TORCH,
        family=kind.family,
        subtype=kind.subtype,
        architecture=kind.architecture,
        parameters=counts.parameters if tensors else None,
        dtypes=dtypes(tensors),
        safe=not scan.unsafe_globals,
        unsafe_globals=scan.unsafe_globals,
        layers=layers,
        details=details,
    )
