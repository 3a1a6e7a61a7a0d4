"""torch files: zip archives (`torch.save` since 1.6, TorchScript) and the legacy stream format,
read through their pickle's opcodes: tensors are `_rebuild_tensor_v2` calls on persistent
storage ids, a whole module is a tree of `_parameters` / `_buffers` / `_modules` dicts.
torch itself is never imported."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hivenode.models.classify import classify
from hivenode.models.errors import ModelError
from hivenode.models.info import Framework, ModelInfo
from hivenode.models.pickle_scan import Call, GlobalRef, Persistent, PickleScan, scan_bytes
from hivenode.models.pickle_scan import scan_stream as scan_pickle_stream
from hivenode.models.weights import Tensor, count, dtype_name, dtypes
from hivenode.models.weights import layer_summary as summarise

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
"""The first pickle of a pre-1.6 `torch.save` file holds this number."""
MAX_DATA_PKL_BYTES = 512 * 1024 * 1024

_RECONSTRUCTORS = {"copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__"}
_OPTIMIZER_KEY = re.compile(r"optim|scheduler|scaler|sched", re.I)


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
        key, dtype = _storage(storage)
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


def _storage(value: Any) -> tuple[Any, str]:
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


# --- files ---------------------------------------------------------------------------------


def torch_zip_prefix(archive: zipfile.ZipFile) -> str | None:
    """The archive folder of a torch zip (`model/` for `model/data.pkl`), or None."""
    for name in archive.namelist():
        if name.endswith("/data.pkl") and name.count("/") == 1:
            return name[: -len("data.pkl")]
    return None


def identify_torch_zip(path: Path, archive: zipfile.ZipFile) -> ModelInfo:
    prefix = torch_zip_prefix(archive)
    if prefix is None:
        raise ModelError("zip archive has no data.pkl: not a torch file")
    names = set(archive.namelist())
    torchscript = f"{prefix}constants.pkl" in names or any(
        name.startswith(f"{prefix}code/") for name in names
    )
    info = archive.getinfo(f"{prefix}data.pkl")
    if info.file_size > MAX_DATA_PKL_BYTES:
        raise ModelError(f"data.pkl of {info.file_size} bytes is over the limit")
    scan = scan_bytes(archive.read(info), torchscript=torchscript)
    missing = sorted(
        {str(key) for key in _storage_keys(scan.root) if f"{prefix}data/{key}" not in names}
    )
    if missing:
        raise ModelError(f"torch archive lacks storages {', '.join(missing[:3])} (corrupt file)")
    if torchscript:
        code = _torchscript_classes(archive, prefix)
        return _torchscript_info(scan, code)
    return _pickle_info(scan, legacy=False)


def identify_torch_legacy(stream: IO[bytes]) -> ModelInfo:
    """The pre-1.6 format: magic, protocol version and sys-info pickles, then the object."""
    for what in ("magic number", "protocol version", "system info"):
        part = scan_pickle_stream(stream)
        if what == "magic number" and part.root != LEGACY_MAGIC:
            raise ModelError("pickle stream is not a legacy torch file")
    return _pickle_info(scan_pickle_stream(stream), legacy=True)


def is_torch_pickle(scan: PickleScan) -> bool:
    return any(name.startswith("torch.") for name in scan.globals)


def pickle_info(scan: PickleScan) -> ModelInfo:
    """A plain pickle that holds torch objects (pickle.dump of a model or state dict)."""
    return _pickle_info(scan, legacy=False)


def _storage_keys(root: Any) -> Iterator[Any]:
    from hivenode.models.pickle_scan import walk

    for value in walk(root):
        if isinstance(value, Persistent) and isinstance(value.pid, tuple) and len(value.pid) > 2:
            yield value.pid[2]


# --- what the pickle holds -----------------------------------------------------------------


def _pickle_info(scan: PickleScan, *, legacy: bool) -> ModelInfo:
    details: dict[str, Any] = {"legacy_format": legacy} if legacy else {}
    fmt, tensors, kinds = _contents(scan, details)
    return _info(fmt, tensors, kinds, scan, details)


def zip_state_dict(path: Path) -> tuple[list[Tensor], tuple[str, ...]]:
    """The weights of a torch zip file (a Hugging Face pytorch_model.bin) and its unsafe
    globals; tensor identities carry the file name so shards do not collide."""
    with zipfile.ZipFile(path) as archive:
        prefix = torch_zip_prefix(archive)
        if prefix is None:
            raise ModelError(f"{path.name} is not a torch zip file (no data.pkl)")
        scan = scan_bytes(archive.read(f"{prefix}data.pkl"))
    _, tensors, _ = _contents(scan, {})
    named = [
        Tensor(t.name, t.shape, t.dtype, None if t.storage is None else (path.name, t.storage))
        for t in tensors
    ]
    return named, scan.unsafe_globals


def _contents(
    scan: PickleScan, details: dict[str, Any]
) -> tuple[str, list[Tensor], dict[str, str]]:
    """What the pickle holds: (format, named tensors, module kinds by name)."""
    root = scan.root
    module: Call | None = None
    state_dict: dict[Any, Any] | None = None
    if isinstance(root, dict):
        details["checkpoint_keys"] = [str(key) for key in list(root)[:50]]
        found = _find_weights(root)
        if found is not None:
            key, value = found
            if key is not None:
                details["weights_key"] = key
            if is_module(value):
                module = value
            else:
                state_dict = value
        if state_dict is root:
            del details["checkpoint_keys"]
    elif is_module(root):
        module = root

    kinds: dict[str, str] = {}
    if module is not None:
        tensors = _module_tensors(module, kinds)
        fmt = "torch_pickled_module"
        cls = class_of(module)
        details["class"] = cls.dotted if cls else None
    elif state_dict is not None:
        tensors = [
            Tensor(str(name), ref.shape, ref.dtype, ref.storage)
            for name, ref in ((k, as_tensor(v)) for k, v in state_dict.items())
            if ref is not None
        ]
        fmt = "torch_state_dict"
    else:
        tensors = []
        fmt = "torch_pickle"
    return fmt, tensors, kinds


def _find_weights(root: dict[Any, Any]) -> tuple[str | None, Any] | None:
    """The state dict (or module) inside a checkpoint: the root itself when it is one,
    else the value with the most tensors (optimizer state excluded)."""
    if _tensor_count(root) * 2 >= len(root) > 0:
        return None, root
    best: tuple[int, str, Any] | None = None
    for key, value in root.items():
        if _OPTIMIZER_KEY.search(str(key)):
            continue
        score = len(value.state["_parameters"]) + 1 if is_module(value) else 0
        if isinstance(value, dict):
            score = _tensor_count(value)
        if score and (best is None or score > best[0]):
            best = (score, str(key), value)
    return (best[1], best[2]) if best else None


def _tensor_count(mapping: dict[Any, Any]) -> int:
    return sum(1 for value in mapping.values() if as_tensor(value) is not None)


def _module_tensors(root: Call, kinds: dict[str, str]) -> list[Tensor]:
    tensors: list[Tensor] = []
    pending: list[tuple[str, Call]] = [("", root)]
    seen: set[int] = set()
    while pending:
        prefix, module = pending.pop()  # depth first, in file order: as named_parameters()
        if id(module) in seen:
            continue
        seen.add(id(module))
        cls = class_of(module)
        kinds[prefix.rstrip(".")] = cls.name if cls else "Module"
        state = module.state
        for table, buffer in (("_parameters", False), ("_buffers", True)):
            entries = state.get(table)
            for name, value in entries.items() if isinstance(entries, dict) else ():
                ref = as_tensor(value)
                if ref is not None:
                    tensors.append(
                        Tensor(prefix + str(name), ref.shape, ref.dtype, ref.storage, buffer)
                    )
        children = state.get("_modules")
        for name, child in children.items() if isinstance(children, dict) else ():
            if is_module(child):
                pending.append((f"{prefix}{name}.", child))
    return tensors


_CLASS_LINE = re.compile(r"^class (\w+)\(")
_MEMBER_LINE = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]")


def _torchscript_classes(
    archive: zipfile.ZipFile, prefix: str
) -> dict[str, tuple[set[str], set[str]]]:
    """Class → (parameter names, buffer names), from the archive's TorchScript source, read
    as text: `__parameters__ = ["weight", "bias", ]`."""
    classes: dict[str, tuple[set[str], set[str]]] = {}
    for name in archive.namelist():
        if not (name.startswith(f"{prefix}code/") and name.endswith(".py")):
            continue
        module = name[len(f"{prefix}code/") : -len(".py")].replace("/", ".")
        current: str | None = None
        for line in archive.read(name).decode("utf-8", errors="replace").splitlines():
            if match := _CLASS_LINE.match(line):
                current = f"{module}.{match.group(1)}"
                classes[current] = (set(), set())
            elif current and (match := _MEMBER_LINE.match(line)):
                members = set(re.findall(r'"([^"]*)"', match.group(2)))
                classes[current][0 if match.group(1) == "parameters" else 1].update(members)
    return classes


def _torchscript_info(scan: PickleScan, code: dict[str, tuple[set[str], set[str]]]) -> ModelInfo:
    tensors: list[Tensor] = []
    kinds: dict[str, str] = {}
    pending: list[tuple[str, Any]] = [("", scan.root)]
    seen: set[int] = set()
    while pending:
        prefix, obj = pending.pop()
        if not isinstance(obj, Call) or id(obj) in seen or not isinstance(obj.state, dict):
            continue
        seen.add(id(obj))
        cls = class_of(obj)
        kinds[prefix.rstrip(".")] = cls.name if cls else "Module"
        members = code.get(cls.dotted) if cls else None
        submodules: list[tuple[str, Any]] = []
        for attr, value in obj.state.items():
            ref = as_tensor(value)
            if ref is not None:
                if members is not None:
                    buffer = str(attr) not in members[0]
                else:
                    buffer = ref.requires_grad is False
                tensors.append(
                    Tensor(prefix + str(attr), ref.shape, ref.dtype, ref.storage, buffer)
                )
            elif isinstance(value, Call):
                submodules.append((f"{prefix}{attr}.", value))
        pending.extend(reversed(submodules))
    return _info("torchscript", tensors, kinds, scan, {"executable_code": True})


def _info(
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
