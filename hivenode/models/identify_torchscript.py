"""TorchScript archives: the module tree in data.pkl (objects of `__torch__.…` classes whose
state holds tensors and submodules), and which attributes are parameters, read as text from
the archive's TorchScript source (`__parameters__ = ["weight", "bias", ]`)."""

from __future__ import annotations

import re
import zipfile
from typing import Any

from hivenode.models.info import ModelInfo
from hivenode.models.pickle_scan import Call, PickleScan
from hivenode.models.torch_pickle import as_tensor, class_of, torch_info
from hivenode.models.weights import Tensor

_CLASS_LINE = re.compile(r"^class (\w+)\(")
_MEMBER_LINE = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]")


def torchscript_classes(
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


def torchscript_info(scan: PickleScan, code: dict[str, tuple[set[str], set[str]]]) -> ModelInfo:
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
    return torch_info("torchscript", tensors, kinds, scan, {"executable_code": True})
