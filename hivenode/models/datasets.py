"""A node's own data catalog: the named datasets it may train on, kept in `datasets.json`.

A dataset is registered once: the catalog loads it to check it and records what it found
(sample counts, feature shape, classes), so adverts and planning read those facts without
touching the data. Trainers get it back as `LocalData` from `load`, split and preprocessed the
same way every time: the split is a seeded permutation and preprocessing a fixed,
data-independent transform, so every trainer of a job applies the very same one.
"""

from __future__ import annotations

import csv
import fcntl
import importlib
import json
import math
import os
import re
import threading
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from hivenode.fsutil import atomic_write
from hivenode.models.training.backend import LocalData, NDArray
from hivenode.protocol.advert import DatasetInfo

CATALOG_NAME = "datasets.json"
_LOCK_NAME = ".datasets.lock"
_CATALOG_VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SOURCE_KINDS = ("npz", "csv", "sklearn")
BUILTINS = ("digits", "iris", "breast_cancer", "wine")
"""Datasets scikit-learn bundles with itself: loading them downloads nothing."""
DEFAULT_TEST_FRACTION = 0.2
_BUILTIN_PREPROCESSING = {"digits": "scale:0.0625"}  # its pixels are 0..16: map them to 0..1
_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DatasetError(Exception):
    """A dataset that cannot be registered, found or loaded; the message says which and why."""


# --- preprocessing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """x' = (x − offset)·factor. "none", "scale:F" and "minmax:LO,HI" are all this affine map;
    its constants come from the spec, never from the data, so every trainer agrees on it."""

    text: str = "none"
    offset: float = 0.0
    factor: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Preprocessing:
        kind, _, args = text.strip().partition(":")
        try:
            numbers = [float(a) for a in args.split(",")] if args else []
        except ValueError:
            numbers = [math.nan]
        if kind == "none" and not args:
            return cls()
        if kind == "scale" and len(numbers) == 1 and _finite(*numbers) and numbers[0] != 0:
            return cls(f"scale:{numbers[0]!r}", 0.0, numbers[0])
        if kind == "minmax" and len(numbers) == 2 and _finite(*numbers):
            low, high = numbers
            if high > low:
                return cls(f"minmax:{low!r},{high!r}", low, 1.0 / (high - low))
        raise DatasetError(
            f"bad preprocessing {text!r}: use none, scale:F (F a non-zero number) "
            "or minmax:LO,HI (LO < HI)"
        )

    def apply(self, x: NDArray) -> NDArray:
        """The transformed features as float32 (the dtype every adapter trains on)."""
        features = x.astype(np.float32)
        if self.offset:
            features -= np.float32(self.offset)
        if self.factor != 1.0:
            features *= np.float32(self.factor)
        return features


def _finite(*numbers: float) -> bool:
    return all(math.isfinite(n) for n in numbers)


def default_preprocessing(source: str) -> str:
    """The preprocessing a source gets when none is asked for."""
    kind, _, value = source.partition(":")
    return _BUILTIN_PREPROCESSING.get(value, "none") if kind == "sklearn" else "none"


# --- what a dataset is -----------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the catalog: how to read it, and what reading it found.

    `source` is `npz:/abs/path`, `csv:/abs/path` or `sklearn:NAME`; `samples` counts train and
    test; `size_bytes` is what its arrays take in memory once loaded, what a trainer must hold.
    """

    name: str
    source: str
    label_column: str | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    split_seed: int = 0
    preprocessing: str = "none"
    samples: int = 0
    train_samples: int = 0
    test_samples: int = 0
    feature_shape: tuple[int, ...] = ()
    num_classes: int = 0
    label_names: tuple[str, ...] = ()
    size_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DatasetEntry:
        """Unknown fields are ignored and missing ones default, so older and newer agents
        read each other's catalogs."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in raw.items() if key in known}
        values["feature_shape"] = tuple(int(d) for d in values.get("feature_shape", ()))
        values["label_names"] = tuple(str(n) for n in values.get("label_names", ()))
        return cls(**values)

    def info(self) -> DatasetInfo:
        """What the node advertises about it: facts, never the data."""
        return DatasetInfo(
            name=self.name,
            samples=self.samples,
            feature_shape=self.feature_shape,
            size_bytes=self.size_bytes,
            num_classes=self.num_classes,
        )


def check_request(
    name: str,
    source: str,
    *,
    label_column: str | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = 0,
    preprocessing: str | None = None,
) -> DatasetEntry:
    """The entry an add request asks for, canonical (absolute path, preprocessing spelled one
    way) but not yet loaded; DatasetError for input that is wrong before any data is read."""
    if not NAME_PATTERN.fullmatch(name):
        raise DatasetError(
            f"invalid dataset name {name!r}: use 1-64 letters, digits, '.', '_', '-'"
        )
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must lie strictly between 0 and 1, not {test_fraction}")
    if split_seed < 0:
        raise DatasetError(f"the split seed must be 0 or more, not {split_seed}")
    canonical = _canonical_source(source, label_column)
    chosen = default_preprocessing(canonical) if preprocessing is None else preprocessing
    return DatasetEntry(
        name=name,
        source=canonical,
        label_column=label_column,
        test_fraction=test_fraction,
        split_seed=split_seed,
        preprocessing=Preprocessing.parse(chosen).text,
    )


def _canonical_source(source: str, label_column: str | None) -> str:
    kind, colon, value = source.partition(":")
    if not colon or kind not in SOURCE_KINDS:
        raise DatasetError(
            f"unknown source {source!r}: use npz:PATH, csv:PATH or sklearn:NAME "
            f"(NAME one of {', '.join(BUILTINS)})"
        )
    if label_column is not None and kind != "csv":
        raise DatasetError("a label column applies to csv sources only")
    if kind == "sklearn":
        if value not in BUILTINS:
            raise DatasetError(
                f"unknown builtin dataset {value!r}: scikit-learn bundles {', '.join(BUILTINS)}"
            )
        return source
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise DatasetError(f"no such file: {path}")
    if kind == "csv" and not label_column:
        raise DatasetError("a csv source needs a label column: the header name of the labels")
    return f"{kind}:{path}"


# --- reading and shaping the data ------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """Rows as a source holds them: labels not yet encoded, features not yet preprocessed.
    `n_train` set means rows [0, n_train) are the source's own training split."""

    x: NDArray
    labels: NDArray
    n_train: int | None = None
    label_names: tuple[str, ...] = ()
    num_classes: int | None = None


def read_builtin(name: str) -> tuple[NDArray, NDArray, tuple[str, ...]]:
    """scikit-learn's bundled copy of `name`: raw features, integer labels, label names."""
    if name not in BUILTINS:
        raise DatasetError(f"unknown builtin dataset {name!r}: use one of {', '.join(BUILTINS)}")
    try:  # imported by name: sklearn is optional and ships no type information
        loaders = importlib.import_module("sklearn.datasets")
    except ImportError as exc:
        raise DatasetError(
            "scikit-learn is not installed: pip install 'hivenode[sklearn]'"
        ) from exc
    bunch = getattr(loaders, f"load_{name}")()
    names = tuple(str(n) for n in bunch.target_names)
    return np.asarray(bunch.data), np.asarray(bunch.target, dtype=np.int64), names


def _read(entry: DatasetEntry) -> _Table:
    kind, _, value = entry.source.partition(":")
    if kind == "sklearn":
        x, y, names = read_builtin(value)
        return _Table(x, y, label_names=names, num_classes=len(names))
    path = Path(value)
    try:
        if kind == "npz":
            return _read_npz(path)
        return _read_csv(path, entry.label_column or "")
    except (OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def _read_npz(path: Path) -> _Table:
    """`x`, `y` for the catalog to split, or the four arrays of a split made elsewhere; an
    optional scalar `num_classes` keeps K when a partition lacks the highest classes."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path} holds one array, not named arrays such as x and y")
        with loaded as archive:
            found = set(archive.files)
            num_classes = int(archive["num_classes"]) if "num_classes" in found else None
            if {"x", "y"} <= found:
                return _Table(archive["x"], archive["y"], num_classes=num_classes)
            if set(_SPLIT_KEYS) <= found:
                x_train, y_train, x_test, y_test = (archive[key] for key in _SPLIT_KEYS)
                return _presplit(path, x_train, y_train, x_test, y_test, num_classes)
    except (ValueError, TypeError) as exc:  # pickled objects, a non-scalar num_classes, not numpy
        raise DatasetError(
            f"{path} is not an npz archive of plain arrays (pickled objects are refused)"
        ) from exc
    raise DatasetError(
        f"{path} holds neither x, y nor x_train, y_train, x_test, y_test "
        f"(it has: {', '.join(sorted(found)) or 'nothing'})"
    )


def _presplit(
    path: Path,
    x_train: NDArray,
    y_train: NDArray,
    x_test: NDArray,
    y_test: NDArray,
    num_classes: int | None,
) -> _Table:
    """One table of both splits, so labels are encoded alike; `n_train` remembers the cut."""
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"{path}: x_train has features of shape {x_train.shape[1:]}, x_test {x_test.shape[1:]}"
        )
    x = np.concatenate([x_train, x_test])
    labels = np.concatenate([y_train, y_test])
    return _Table(x, labels, n_train=len(y_train), num_classes=num_classes)


def _read_csv(path: Path, label_column: str) -> _Table:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [column.strip() for column in next(reader, [])]
        if label_column not in header:
            raise DatasetError(
                f"{path} has no column {label_column!r} (its header: {', '.join(header) or '-'})"
            )
        label_at = header.index(label_column)
        if len(header) < 2:
            raise DatasetError(f"{path} has no feature columns beside {label_column!r}")
        labels: list[str] = []
        rows: list[list[float]] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank lines, often one at the end
            if len(row) != len(header):
                raise DatasetError(
                    f"{path} line {reader.line_num} has {len(row)} fields, the header {len(header)}"
                )
            labels.append(row[label_at].strip())
            rows.append(
                [
                    _number(cell, header[i], path, reader.line_num)
                    for i, cell in enumerate(row)
                    if i != label_at
                ]
            )
    x = np.array(rows, dtype=np.float64).reshape(len(rows), len(header) - 1)
    return _Table(x, np.array(labels, dtype=str))


def _number(cell: str, column: str, path: Path, line: int) -> float:
    try:
        return float(cell)
    except ValueError:
        raise DatasetError(
            f"{path} line {line}: non-numeric feature {cell!r} in column {column!r}"
        ) from None


def _encode_labels(table: _Table) -> tuple[NDArray, tuple[str, ...], int]:
    """Integer classes, their names and the class count. Labels that are already
    non-negative integers keep their values; any others (strings, -1/+1, 0.5) become the
    indices of their sorted unique values, whose names are kept."""
    labels = table.labels
    if labels.ndim != 1 or len(labels) != len(table.x):
        raise DatasetError(
            f"labels must be one per sample: {len(table.x)} samples but labels of shape "
            f"{labels.shape}"
        )
    ids = _class_ids(labels)
    if ids is None:
        values, ids = np.unique(
            labels if labels.dtype.kind in "iuf" else labels.astype(str), return_inverse=True
        )
        return ids.astype(np.int64), tuple(str(v) for v in values), len(values)
    count = int(ids.max()) + 1 if len(ids) else 0
    if table.num_classes is not None:
        if count > table.num_classes:
            raise DatasetError(f"label {count - 1} is out of range for {table.num_classes} classes")
        count = table.num_classes
    return ids, table.label_names, count


def _class_ids(labels: NDArray) -> NDArray | None:
    """`labels` as int64 when every one is a non-negative whole number, else None."""
    if labels.dtype.kind in "biu":
        values = labels.astype(np.int64)
        return values if not len(values) or values.min() >= 0 else None
    try:
        numbers = labels.astype(np.float64)
    except ValueError:
        return None  # names such as "cat"
    whole = np.isfinite(numbers).all() and (numbers == np.round(numbers)).all()
    return numbers.astype(np.int64) if whole and (numbers >= 0).all() else None


def _features(table: _Table, preprocessing: Preprocessing) -> NDArray:
    x = table.x
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"features must be numbers, not {x.dtype} values")
    if x.ndim < 2:
        raise DatasetError(f"features must have one row per sample, not the shape {x.shape}")
    features = preprocessing.apply(x)
    if not np.isfinite(features).all():
        raise DatasetError(
            f"features hold NaN or infinite values (after preprocessing {preprocessing.text})"
        )
    return features


def train_count(samples: int, test_fraction: float) -> int:
    """How many of `samples` go to training: ⌊(1 − test_fraction)·samples⌋, the rest test.
    Both sides need a sample; the tiny epsilon keeps 0.29·100 from flooring to 28."""
    n_train = math.floor((1.0 - test_fraction) * samples + 1e-9)
    if not 0 < n_train < samples:
        raise DatasetError(
            f"too few samples: {samples} split with test fraction {test_fraction} leave "
            f"{n_train} to train and {samples - n_train} to test; each needs at least one"
        )
    return n_train


def split_local_data(
    x: NDArray, y: NDArray, num_classes: int, test_fraction: float, rng: np.random.Generator
) -> LocalData:
    """A random train/test split of (x, y) by a permutation drawn from `rng`."""
    order = rng.permutation(len(y))
    n_train = train_count(len(y), test_fraction)
    train, test = order[:n_train], order[n_train:]
    return LocalData(x[train], y[train], x[test], y[test], num_classes)


def read_dataset(entry: DatasetEntry) -> tuple[LocalData, tuple[str, ...]]:
    """The entry's data as trainers get it, and the names of its classes."""
    table = _read(entry)
    labels, names, num_classes = _encode_labels(table)
    x = _features(table, Preprocessing.parse(entry.preprocessing))
    if table.n_train is None:
        rng = np.random.default_rng(entry.split_seed)
        data = split_local_data(x, labels, num_classes, entry.test_fraction, rng)
    else:
        n = table.n_train
        if not 0 < n < len(labels):
            raise DatasetError(
                f"too few samples: {n} to train and {len(labels) - n} to test; "
                "each needs at least one"
            )
        data = LocalData(x[:n], labels[:n], x[n:], labels[n:], num_classes)
    return data, names


def _with_findings(entry: DatasetEntry, data: LocalData, names: tuple[str, ...]) -> DatasetEntry:
    arrays = (data.x_train, data.y_train, data.x_test, data.y_test)
    return replace(
        entry,
        samples=len(data.y_train) + len(data.y_test),
        train_samples=len(data.y_train),
        test_samples=len(data.y_test),
        feature_shape=data.feature_shape,
        num_classes=data.num_classes,
        label_names=names,
        size_bytes=sum(int(a.nbytes) for a in arrays),
    )


def _source_version(entry: DatasetEntry) -> tuple[int, int]:
    """(mtime in ns, size) of the source file: a changed file is loaded afresh."""
    kind, _, value = entry.source.partition(":")
    if kind == "sklearn":
        return (0, 0)
    try:
        stat = os.stat(value)
    except OSError as exc:
        raise DatasetError(
            f"dataset {entry.name!r}: cannot read {value}: {exc.strerror or exc}"
        ) from exc
    return (stat.st_mtime_ns, stat.st_size)


def _read_only(data: LocalData) -> LocalData:
    """Loaded data is shared by every caller of `load`: one that changed it in place would
    change it for all, so it cannot."""
    for array in (data.x_train, data.y_train, data.x_test, data.y_test):
        array.flags.writeable = False
    return data


# --- the catalog -----------------------------------------------------------------------------


class DatasetCatalog:
    """The datasets of the node whose state directory is `state_dir`.

    Every call reads `datasets.json` afresh (the CLI changes it while the daemon runs); writes
    are atomic and serialised by an advisory lock, so two `hivenode data add` never lose one.
    `load` is safe from worker threads and loads each dataset once per version of its file.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / CATALOG_NAME
        self._cache: dict[str, tuple[tuple[DatasetEntry, tuple[int, int]], LocalData]] = {}
        self._cache_lock = threading.Lock()

    def entries(self) -> list[DatasetEntry]:
        """Every dataset, by name."""
        return sorted(self._read().values(), key=lambda e: e.name)

    def get(self, name: str) -> DatasetEntry:
        entry = self._read().get(name)
        if entry is None:
            raise DatasetError(f"no dataset named {name!r} in {self.path}")
        return entry

    def add(
        self,
        name: str,
        source: str,
        *,
        label_column: str | None = None,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        split_seed: int = 0,
        preprocessing: str | None = None,
        replace: bool = False,
    ) -> DatasetEntry:
        """Register `source` as `name` after loading it once to check it; the catalog is
        unchanged when anything fails. A name already taken needs `replace`."""
        entry = check_request(
            name,
            source,
            label_column=label_column,
            test_fraction=test_fraction,
            split_seed=split_seed,
            preprocessing=preprocessing,
        )
        if not replace:
            _refuse_taken(self._read(), name)  # before the possibly long load
        entry = _with_findings(entry, *read_dataset(entry))
        with self._locked():
            entries = self._read()
            if not replace:
                _refuse_taken(entries, name)
            entries[name] = entry
            self._write(entries)
        return entry

    def remove(self, name: str) -> DatasetEntry:
        """Forget `name` (its source file stays where it is)."""
        with self._locked():
            entries = self._read()
            if name not in entries:
                raise DatasetError(f"no dataset named {name!r} in {self.path}")
            removed = entries.pop(name)
            self._write(entries)
        with self._cache_lock:
            self._cache.pop(name, None)
        return removed

    def load(self, name: str) -> LocalData:
        """The dataset as trainers use it (arrays read-only, shared between callers)."""
        entry = self.get(name)
        key = (entry, _source_version(entry))  # taken before reading: a later change reloads
        with self._cache_lock:  # held while loading, so concurrent trainers load it once
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
            data = _read_only(read_dataset(entry)[0])
            self._cache[name] = (key, data)
            return data

    def advert_datasets(self) -> tuple[DatasetInfo, ...]:
        return tuple(entry.info() for entry in self.entries())

    def _read(self) -> dict[str, DatasetEntry]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise DatasetError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            items = json.loads(text)["datasets"]
            return {e.name: e for e in (DatasetEntry.from_json(item) for item in items)}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{self.path} is damaged ({exc}): repair or remove it") from exc

    def _write(self, entries: Mapping[str, DatasetEntry]) -> None:
        document = {
            "version": _CATALOG_VERSION,
            "datasets": [entries[name].to_json() for name in sorted(entries)],
        }
        try:
            atomic_write(self.path, json.dumps(document, indent=2).encode(), mode=0o600)
        except OSError as exc:
            raise DatasetError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Excludes other writers, in this process or another, for a read-modify-write."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.state_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DatasetError(f"cannot write in {self.state_dir}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _refuse_taken(entries: Mapping[str, DatasetEntry], name: str) -> None:
    if name in entries:
        raise DatasetError(
            f"a dataset named {name!r} exists already: pick another name or replace it"
        )
