"""The local model registry: versioned names over content-addressed blobs, in SQLite.

`state_dir/registry.sqlite` (WAL, synchronous=FULL, schema version in `PRAGMA user_version`)
holds one row per (name, version); the bytes live once per hash in `state_dir/blobs/`
(`BlobStore`). Versions count 1, 2, ... per name and are never reused, even after removal,
so that a `parent` written as `name@version` always means the same bytes.

A blob is made visible and its row inserted inside one write transaction, and a removed
version's blob is deleted inside the transaction that drops its last row, so an `add` and
an `rm` racing in two processes cannot leave a row without its blob. A crash can at worst
leave a blob no row uses.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Self

from pydantic import Field

from hivenode.models.blobs import SHA256_PATTERN, BlobKind, BlobStore, StagedBlob
from hivenode.models.errors import ModelError
from hivenode.models.info import ModelInfo
from hivenode.protocol.records import WireModel

SCHEMA_VERSION = 1
DATABASE_NAME = "registry.sqlite"
BLOBS_DIR = "blobs"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_PATTERN = re.compile(r"[0-9]{1,9}")
_BUSY_TIMEOUT = 30.0

_SCHEMA = (
    """CREATE TABLE names (
        name TEXT PRIMARY KEY,
        last_version INTEGER NOT NULL
    )""",
    """CREATE TABLE versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('file', 'directory')),
        size_bytes INTEGER NOT NULL,
        framework TEXT NOT NULL,
        info TEXT NOT NULL,
        parent TEXT,
        metrics TEXT NOT NULL,
        created TEXT NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    "CREATE INDEX versions_by_sha256 ON versions (sha256)",
)
_COLUMNS = "name, version, sha256, kind, size_bytes, framework, info, parent, metrics, created"


class ModelVersion(WireModel):
    """One registered version of a named model."""

    name: str
    version: int
    sha256: str
    """Hash of the blob: the file's bytes, or the deterministic tar of a directory."""
    kind: BlobKind
    size_bytes: int
    """Size of the blob."""
    framework: str
    info: ModelInfo
    parent: str | None = None
    """Where it came from: `name@version` in this registry, or a sha256."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: str
    """UTC, ISO 8601."""

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


Versions = list[ModelVersion]
"""(`Registry.list` shadows the builtin inside the class.)"""


def check_name(name: str) -> str:
    """`name` when it is a valid model name, else ModelError saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name) or SHA256_PATTERN.fullmatch(name):
        raise ModelError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (and not a sha256)"
        )
    return name


def parse_spec(spec: str) -> tuple[str, int | None]:
    """`NAME` → (NAME, None); `NAME@VERSION` → (NAME, VERSION); else ModelError."""
    name, at, version = spec.partition("@")
    valid_version = not at or (_VERSION_PATTERN.fullmatch(version) and int(version) >= 1)
    if not valid_version or not NAME_PATTERN.fullmatch(name):
        raise ModelError(
            f"bad model spec {spec!r}: expected NAME or NAME@VERSION, VERSION a number from 1"
        )
    return check_name(name), int(version) if at else None


class Registry:
    """The registry of one state directory; one SQLite connection, usable from one thread
    at a time (the daemon calls it from worker threads)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.database_path = state_dir / DATABASE_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.blobs = BlobStore(state_dir / BLOBS_DIR)
            self._db = sqlite3.connect(
                self.database_path,
                isolation_level=None,
                timeout=_BUSY_TIMEOUT,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise ModelError(f"cannot open the registry in {state_dir}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise ModelError(f"cannot open {self.database_path}: {exc}") from exc
        except ModelError:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- versions ----------------------------------------------------------------------------

    def add(
        self,
        path: Path,
        name: str,
        info: ModelInfo,
        parent: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Store the file or directory at `path` as the next version of `name`.

        Bytes already registered under `name` return that version unchanged (its parent and
        metrics stay as they were). `info.sha256`, when set for a file, must match the
        bytes; the stored info carries the blob's hash (for a directory, that of its tar).
        `parent`: `name[@version]` (resolved now, latest when no version) or a sha256."""
        check_name(name)
        metrics_json = _metrics_json(metrics)
        parent_ref = self._resolve_parent(parent) if parent is not None else None
        known = self._find(name, info.sha256) if info.sha256 and path.is_file() else None
        if known is not None and self.blobs.has(known.sha256):
            return known  # the bytes identified are registered: no need to copy them again
        try:
            with self.blobs.staged(path) as staged:
                if staged.kind == "file" and info.sha256 and info.sha256 != staged.sha256:
                    raise ModelError(
                        f"{path} changed since it was identified (sha256 {staged.sha256}, "
                        f"identified as {info.sha256}); identify it again"
                    )
                return self._insert(name, staged, info, parent_ref, metrics_json)
        except OSError as exc:
            raise ModelError(f"cannot store {path} in {self.blobs.root}: {exc}") from exc

    def list(self) -> Versions:
        """The latest version of every name, by name."""
        return self._select(
            f"SELECT {_COLUMNS} FROM versions v WHERE version = "
            "(SELECT MAX(version) FROM versions WHERE name = v.name) ORDER BY name"
        )

    def show(self, name: str, version: int | None = None) -> ModelVersion:
        """`name@version`, or the latest version of `name`."""
        check_name(name)
        if version is None:
            rows = self._select(
                f"SELECT {_COLUMNS} FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1",
                (name,),
            )
        else:
            rows = self._select(
                f"SELECT {_COLUMNS} FROM versions WHERE name = ? AND version = ?", (name, version)
            )
        if rows:
            return rows[0]
        known = self.versions(name)  # raises for an unknown name
        listed = ", ".join(str(v.version) for v in known)
        raise ModelError(f"{name} has no version {version}; its versions are {listed}")

    def resolve(self, spec: str) -> ModelVersion:
        """`show` for a `NAME[@VERSION]` string."""
        return self.show(*parse_spec(spec))

    def versions(self, name: str) -> Versions:
        """Every version of `name`, oldest first."""
        check_name(name)
        rows = self._select(
            f"SELECT {_COLUMNS} FROM versions WHERE name = ? ORDER BY version", (name,)
        )
        if not rows:
            raise ModelError(
                f"no model named {name!r} in the registry at {self.state_dir}; "
                "`hivenode models list` shows the names there"
            )
        return rows

    def export(self, name: str, version: int | None, dest: Path) -> Path:
        """Write `name@version` (latest when None) to `dest`, which must not exist: a file
        byte for byte, a directory unpacked. Returns `dest`."""
        model = self.show(name, version)
        if dest.exists() or dest.is_symlink():
            raise ModelError(f"{dest} already exists; export to a new path")
        try:
            self.blobs.export(model.sha256, model.kind, dest)
        except OSError as exc:
            raise ModelError(f"cannot export {model.spec} to {dest}: {exc}") from exc
        return dest

    def remove(self, name: str, version: int | None = None) -> Versions:
        """Drop `name@version`, or every version of `name`; a blob goes with the last
        version that references it. Returns what was removed."""
        doomed = [self.show(name, version)] if version is not None else self.versions(name)
        try:
            self._delete(doomed)
        except OSError as exc:
            raise ModelError(f"cannot remove {name} from {self.blobs.root}: {exc}") from exc
        return doomed

    # --- blobs (for transfers between nodes) -------------------------------------------------

    def blob_path(self, sha: str) -> Path:
        return self.blobs.path(sha)

    def has_blob(self, sha: str) -> bool:
        return self.blobs.has(sha)

    def open_blob(self, sha: str) -> BinaryIO:
        return self.blobs.open(sha)

    def partial_path(self, sha: str) -> Path:
        """Where a fetch of blob `sha` accumulates bytes, so that a retry can resume."""
        return self.blobs.partial_path(sha)

    def put_blob_from_file(self, tmp_path: Path, expected_sha: str) -> Path:
        """Move a fully received file in as blob `expected_sha`, after checking its hash."""
        return self.blobs.put_verified(tmp_path, expected_sha)

    # --- internals ---------------------------------------------------------------------------

    def _insert(
        self,
        name: str,
        staged: StagedBlob,
        info: ModelInfo,
        parent: str | None,
        metrics_json: str,
    ) -> ModelVersion:
        if staged.kind == "directory" or not info.sha256:
            info = info.model_copy(update={"sha256": staged.sha256})
        with self._write() as db:
            # the blob becomes visible under the write lock, so a concurrent `rm` of the
            # same bytes cannot delete it between this rename and the insert below
            self.blobs.commit(staged)
            existing = self._find(name, staged.sha256)
            if existing is not None:
                return existing
            row = db.execute("SELECT last_version FROM names WHERE name = ?", (name,))
            last = row.fetchone()
            version = 1 if last is None else int(last[0]) + 1
            db.execute(
                "INSERT INTO names (name, last_version) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET last_version = excluded.last_version",
                (name, version),
            )
            db.execute(
                f"INSERT INTO versions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    staged.sha256,
                    staged.kind,
                    staged.size_bytes,
                    info.framework.value,
                    info.model_dump_json(),
                    parent,
                    metrics_json,
                    datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            )
        return self.show(name, version)

    def _delete(self, doomed: Versions) -> None:
        with self._write() as db:
            for model in doomed:
                db.execute(
                    "DELETE FROM versions WHERE name = ? AND version = ?",
                    (model.name, model.version),
                )
            for sha in sorted({model.sha256 for model in doomed}):
                used = db.execute("SELECT 1 FROM versions WHERE sha256 = ? LIMIT 1", (sha,))
                if used.fetchone() is None:
                    self.blobs.delete(sha)

    def _find(self, name: str, sha: str) -> ModelVersion | None:
        rows = self._select(
            f"SELECT {_COLUMNS} FROM versions WHERE name = ? AND sha256 = ? "
            "ORDER BY version DESC LIMIT 1",
            (name, sha),
        )
        return rows[0] if rows else None

    def _resolve_parent(self, parent: str) -> str:
        if SHA256_PATTERN.fullmatch(parent):
            return parent  # lineage may point at bytes that live on another node
        try:
            return self.resolve(parent).spec
        except ModelError as exc:
            raise ModelError(f"parent {parent}: {exc}") from exc

    def _select(self, sql: str, parameters: tuple[Any, ...] = ()) -> Versions:
        try:
            rows = self._db.execute(sql, parameters).fetchall()
        except sqlite3.Error as exc:
            raise ModelError(f"cannot read {self.database_path}: {exc}") from exc
        return [_row_to_version(row) for row in rows]

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so that readers of the
        next version number and writers of it are serialised across processes."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise ModelError(f"cannot write {self.database_path}: {exc}") from exc
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:  # a failed COMMIT may have rolled back already
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise ModelError(f"cannot write {self.database_path}: {exc}") from exc
            raise

    def _migrate(self) -> None:
        found = self._user_version()
        if found > SCHEMA_VERSION:
            raise ModelError(
                f"{self.database_path} has schema {found}, newer than this hivenode's "
                f"{SCHEMA_VERSION}: upgrade hivenode"
            )
        if found == SCHEMA_VERSION:
            return
        with self._write() as db:
            if self._user_version() == 0:  # another process may have created it meanwhile
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _user_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])


def _row_to_version(row: tuple[Any, ...]) -> ModelVersion:
    name, version, sha, kind, size, framework, info, parent, metrics, created = row
    return ModelVersion(
        name=name,
        version=version,
        sha256=sha,
        kind=kind,
        size_bytes=size,
        framework=framework,
        info=ModelInfo.model_validate_json(info),
        parent=parent,
        metrics=json.loads(metrics),
        created=created,
    )


def _metrics_json(metrics: Mapping[str, Any] | None) -> str:
    try:
        return json.dumps(dict(metrics or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"metrics must be a JSON object of plain values: {exc}") from exc
