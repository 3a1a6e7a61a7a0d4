"""torch files: zip archives (`torch.save` since 1.6, TorchScript) and the legacy stream format,
read through their pickle's opcodes: tensors are `_rebuild_tensor_v2` calls on persistent
storage ids, a whole module is a tree of `_parameters` / `_buffers` / `_modules` dicts.
torch itself is never imported."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import IO, Any

from hivenode.models.errors import ModelError
from hivenode.models.identify_torchscript import torchscript_classes, torchscript_info
from hivenode.models.info import ModelInfo
from hivenode.models.pickle_scan import Call, Persistent, PickleScan, scan_bytes
from hivenode.models.pickle_scan import scan_stream as scan_pickle_stream
from hivenode.models.torch_pickle import (
    ITEMSIZES,
    as_tensor,
    class_of,
    is_module,
    storage_ids,
    storage_keys,
    storage_of,
    torch_info,
)
from hivenode.models.weights import Tensor

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
"""The first pickle of a pre-1.6 `torch.save` file holds this number."""
MAX_DATA_PKL_BYTES = 512 * 1024 * 1024

_OPTIMIZER_KEY = re.compile(r"optim|scheduler|scaler|sched", re.I)


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
        {str(key) for key in storage_keys(scan.root) if f"{prefix}data/{key}" not in names}
    )
    if missing:
        raise ModelError(f"torch archive lacks storages {', '.join(missing[:3])} (corrupt file)")
    if torchscript:
        code = torchscript_classes(archive, prefix)
        return torchscript_info(scan, code)
    return _pickle_info(scan, legacy=False)


def identify_torch_legacy(stream: IO[bytes]) -> ModelInfo:
    """The pre-1.6 format: magic, protocol version and sys-info pickles, the object, the
    list of storage keys, then each storage as an 8-byte element count and its bytes."""
    for what in ("magic number", "protocol version", "system info"):
        part = scan_pickle_stream(stream)
        if what == "magic number" and part.root != LEGACY_MAGIC:
            raise ModelError("pickle stream is not a legacy torch file")
    scan = scan_pickle_stream(stream)
    scan_pickle_stream(stream)  # the storage keys
    expected = 0
    for storage in {pid[2]: pid for pid in storage_ids(scan.root)}.values():
        itemsize = ITEMSIZES.get(storage_of(Persistent(storage))[1])
        if itemsize is not None and len(storage) > 4 and isinstance(storage[4], int):
            expected += 8 + storage[4] * itemsize
    have = _remaining(stream)
    if have < expected:
        raise ModelError(
            f"truncated legacy torch file: its storages need {expected} bytes, {have} remain"
        )
    return _pickle_info(scan, legacy=True)


def _remaining(stream: IO[bytes]) -> int:
    here = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(here)
    return end - here


def is_torch_pickle(scan: PickleScan) -> bool:
    return any(name.startswith("torch.") for name in scan.globals)


def pickle_info(scan: PickleScan) -> ModelInfo:
    """A plain pickle that holds torch objects (pickle.dump of a model or state dict)."""
    return _pickle_info(scan, legacy=False)


# --- what the pickle holds -----------------------------------------------------------------


def _pickle_info(scan: PickleScan, *, legacy: bool) -> ModelInfo:
    details: dict[str, Any] = {"legacy_format": legacy} if legacy else {}
    fmt, tensors, kinds = _contents(scan, details)
    return torch_info(fmt, tensors, kinds, scan, details)


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
        named = list(children.items()) if isinstance(children, dict) else []
        for name, child in reversed(named):  # popped from the end: first child first
            if is_module(child):
                pending.append((f"{prefix}{name}.", child))
    return tensors
