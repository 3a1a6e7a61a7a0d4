"""Flower apps as `flwr new` lays them out, read from a local directory the operator installed.

An app is a directory with a `pyproject.toml` naming its ServerApp and ClientApp
(`[tool.flwr.app.components]`) and its run config (`[tool.flwr.app.config]`), beside its
Python package. Its identity is its name plus `content_hash` of its files: a trainer runs an
app only under the key `app_key(app, digest)` of a copy its operator allowed, so the
aggregator's request names exactly the code the trainer already has. Nothing of an app ever
travels over the network; `load_component` imports local files only, and only the version
the caller hashed.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import re
import sys
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from hivenode.models.errors import ModelError

ConfigValue = bool | int | float | str
"""A run-config value: Flower's `UserConfigValue`."""
KEY_PREFIX = "flower:"
"""Trainer app keys `flower:<name>@<sha256>` (the built-in app is "builtin")."""
PYPROJECT = "pyproject.toml"
SKIPPED_DIRS = frozenset({"__pycache__", ".git"})
SKIPPED_SUFFIXES = (".pyc",)

# a ref is "package.module:attribute[.attribute]", as Flower's own object refs
_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# flwr's own key=value pattern (flwr.common.config.parse_config_args): a value is quoted or
# runs to the next space, and is then read as TOML
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
_CHUNK = 1 << 20
# imports change the process-global sys.path and sys.modules: one app at a time
_import_lock = threading.Lock()
_loaded_digests: dict[Path, str] = {}
"""App root → the content hash its modules had when this process imported them."""


class FlowerAppError(ModelError):
    """A Flower app directory cannot be read, verified or loaded; the message says why."""


@dataclass(frozen=True)
class FlowerApp:
    """What an app's `pyproject.toml` says, with the directory it lies in."""

    name: str
    version: str
    root: Path
    serverapp_ref: str
    clientapp_ref: str
    config_defaults: Mapping[str, ConfigValue]


def read_flower_app(root: Path) -> FlowerApp:
    """The app in `root`; FlowerAppError when it is not laid out as `flwr new` lays it out."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise FlowerAppError(f"{root} is not a directory")
    project = _read_pyproject(root)
    meta = _table(project, "project")
    name, version = meta.get("name"), meta.get("version")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FlowerAppError(f"{root / PYPROJECT}: [project] needs a name like 'my-app'")
    if not isinstance(version, str) or not version:
        raise FlowerAppError(f"{root / PYPROJECT}: [project] needs a version")
    app = _table(project, "tool", "flwr", "app")
    components = app.get("components")
    if not isinstance(components, dict):
        raise FlowerAppError(f"{root / PYPROJECT}: no [tool.flwr.app.components] section")
    return FlowerApp(
        name=name,
        version=version,
        root=root,
        serverapp_ref=_component_ref(root, components, "serverapp"),
        clientapp_ref=_component_ref(root, components, "clientapp"),
        config_defaults=_flatten(
            app.get("config", {}), f"{root / PYPROJECT} [tool.flwr.app.config]"
        ),
    )


def _read_pyproject(root: Path) -> dict[str, Any]:
    path = root / PYPROJECT
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlowerAppError(
            f"{root} has no {PYPROJECT}: a Flower app is a directory as `flwr new` makes it"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FlowerAppError(f"{path}: cannot read it: {exc}") from exc


def _table(document: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The TOML table at `keys`, or an empty one where it is missing or not a table."""
    table: Any = document
    for key in keys:
        table = table.get(key) if isinstance(table, dict) else None
    return table if isinstance(table, dict) else {}


def _component_ref(root: Path, components: dict[str, Any], name: str) -> str:
    ref = components.get(name)
    if ref is None:
        raise FlowerAppError(f"{root / PYPROJECT}: [tool.flwr.app.components] has no {name}")
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        raise FlowerAppError(
            f"{root / PYPROJECT}: {name} = {ref!r} is not a reference like 'package.module:app'"
        )
    return ref


def app_key(app: FlowerApp, digest: str) -> str:
    """The trainer app key that names this app at exactly this content."""
    return f"{KEY_PREFIX}{app.name}@{digest}"


def content_hash(root: Path) -> str:
    """SHA-256 over the app's files: each relative path and its bytes, in sorted order.

    Python caches (`__pycache__`, `*.pyc`) and `.git` are left out: importing the app or
    committing it does not change what it is. A symlinked directory is refused, because its
    files would run without being covered by the hash.
    """
    root = root.resolve()
    digest = hashlib.sha256()
    for path in _app_files(root):
        relative = path.relative_to(root).as_posix().encode()
        digest.update(len(relative).to_bytes(8, "big") + relative)
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _app_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        here = Path(directory)
        for sub in subdirs:
            if (here / sub).is_symlink() and sub not in SKIPPED_DIRS:
                raise FlowerAppError(f"{here / sub} is a symlinked directory inside the app")
        subdirs[:] = [sub for sub in subdirs if sub not in SKIPPED_DIRS]
        files.extend(here / name for name in names if not name.endswith(SKIPPED_SUFFIXES))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def load_server_app(app: FlowerApp, digest: str) -> ServerApp:
    component = load_component(app, app.serverapp_ref, digest)
    if not isinstance(component, ServerApp):
        raise FlowerAppError(f"{app.name}: {app.serverapp_ref} is not a flwr ServerApp")
    return component


def load_client_app(app: FlowerApp, digest: str) -> ClientApp:
    component = load_component(app, app.clientapp_ref, digest)
    if not isinstance(component, ClientApp):
        raise FlowerAppError(f"{app.name}: {app.clientapp_ref} is not a flwr ClientApp")
    return component


def load_component(app: FlowerApp, ref: str, digest: str) -> Any:
    """Import `module:attr` from the app's own directory (local code, never received), whose
    files hash to `digest` (`content_hash`, computed by the caller just before).

    The app root goes to the end of sys.path, and stays there because the app may import
    its own modules later: so it can never shadow the standard library or installed
    packages. Python imports a module once per process, so a module of that name already
    imported from elsewhere (another copy, an installed package), or from this root when
    its files hashed differently, is refused: it is not the code `digest` names.
    """
    module_name, _, attributes = ref.partition(":")
    with _import_lock:
        loaded_at = _loaded_digests.get(app.root, digest)
        if loaded_at != digest:
            raise FlowerAppError(
                f"{app.name} in {app.root} changed since this process loaded it (then "
                f"{loaded_at[:12]}…, now {digest[:12]}…): restart to run the new version"
            )
        if str(app.root) not in sys.path:
            sys.path.append(str(app.root))
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an app's import can fail any way; the operator must see how
            raise FlowerAppError(
                f"{app.name}: importing {module_name} from {app.root} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        _check_origin(app, module)
        _loaded_digests[app.root] = digest
    component: Any = module
    for attribute in attributes.split("."):
        if not hasattr(component, attribute):
            raise FlowerAppError(f"{app.name}: {module_name} has no attribute {attributes}")
        component = getattr(component, attribute)
    return component


def _check_origin(app: FlowerApp, module: ModuleType) -> None:
    origin = getattr(module, "__file__", None)
    if origin is None or not Path(origin).resolve().is_relative_to(app.root):
        raise FlowerAppError(
            f"{app.name}: module {module.__name__} is already loaded from "
            f"{origin or 'a namespace package'}, not from {app.root}; a process runs one "
            "copy of an app"
        )


def parse_run_config(text: str, defaults: Mapping[str, ConfigValue]) -> dict[str, ConfigValue]:
    """`defaults` with the overrides in `text`, e.g. `num-server-rounds=3 lr=0.1 name="x"`.

    As `flwr run --run-config` does: every value is read as TOML, so its type is TOML's
    (3 is an int, 0.1 a float, true a bool, "x" a string), nested keys are dotted, and only
    keys the app declares may be overridden.
    """
    pairs = _PAIR.findall(text)
    rest = _PAIR.sub(" ", text).strip()
    if rest:
        raise FlowerAppError(
            f"cannot read {rest!r} in the run config: write space-separated key=value pairs, "
            "e.g. 'num-server-rounds=3 lr=0.1 name=\"x\"'"
        )
    try:
        parsed = tomllib.loads("\n".join(f"{key} = {value}" for key, value in pairs))
    except tomllib.TOMLDecodeError as exc:
        raise FlowerAppError(
            f"run config {text!r} is not key=value pairs of TOML values ({exc}); strings need "
            'quotes, e.g. name="x"'
        ) from exc
    overrides = _flatten(parsed, "run config")
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise FlowerAppError(
            f"the app has no run-config key {', '.join(unknown)}; it has: "
            f"{', '.join(sorted(defaults)) or 'none'}"
        )
    return {**defaults, **overrides}


def _flatten(table: Any, where: str, prefix: str = "") -> dict[str, ConfigValue]:
    """Nested TOML tables as dotted keys, as Flower's `flatten_dict`; scalars only."""
    if not isinstance(table, dict):
        raise FlowerAppError(f"{where}: {prefix or 'the config'} must be a table")
    flat: dict[str, ConfigValue] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, where, name))
        elif not isinstance(value, bool | int | float | str):
            raise FlowerAppError(f"{where}: {name} must be a bool, int, float or string")
        elif isinstance(value, float) and not math.isfinite(value):
            raise FlowerAppError(f"{where}: {name} must be finite")
        else:
            flat[name] = value
    return flat
