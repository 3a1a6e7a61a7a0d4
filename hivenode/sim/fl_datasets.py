"""Federated datasets for the simulator: one `LocalData` per simulated device.

Specs (`federated_dataset`):

- `synthetic:ALPHA,BETA`: FedProx's Synthetic(α, β) (Li et al., MLSys 2020); `synthetic:iid`
  its Synthetic IID. Each device's samples are split 80/20 into train and test.
- `digits`, `iris`, `breast_cancer`, `wine`: scikit-learn's bundled copies (no download),
  shared out by `partition`: `iid` (equal random shares) or `dirichlet:ALPHA` (label skew:
  each class is divided among devices by proportions drawn from Dir(α); small α gives each
  device few labels). Every device gets at least 3 samples, so ≥ 2 to train and ≥ 1 to test.
- `file:PATH.npz`: partitions made elsewhere, `x_train_K`, `y_train_K`, `x_test_K`,
  `y_test_K` for devices K = 0, 1, ... (and optionally a scalar `num_classes`), as
  `save_federated_npz` writes them.

Every device of one dataset reports the same `num_classes`, even one that lacks some classes:
all trainers of a job must build the same model.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hivenode.fsutil import atomic_write
from hivenode.models.datasets import (
    BUILTINS,
    DatasetError,
    Preprocessing,
    default_preprocessing,
    read_builtin,
    split_local_data,
)
from hivenode.models.training.backend import LocalData, NDArray

SYNTHETIC_FEATURES = 60
SYNTHETIC_CLASSES = 10
TEST_FRACTION = 0.2
"""Each device's share held out for testing, as the FedProx paper reports (80/20)."""
MIN_DEVICE_SAMPLES = 3
"""With a 20 % test share, 3 samples are the fewest that leave 2 to train and 1 to test."""
SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DatasetSpecError(Exception):
    """A dataset spec or partition the simulator cannot build; the message says why."""


def federated_dataset(
    spec: str, num_devices: int, *, partition: str = "iid", seed: int = 0
) -> list[LocalData]:
    """One `LocalData` per device for `spec` (see the module's docstring), deterministic for
    `seed`. `partition` applies to the scikit-learn datasets; the others bring their own."""
    if num_devices < 1:
        raise DatasetSpecError(f"num_devices must be 1 or more, not {num_devices}")
    alpha = _dirichlet_alpha(partition)
    kind, colon, value = spec.partition(":")
    if spec in BUILTINS:
        return _builtin_devices(spec, num_devices, alpha, np.random.default_rng(seed))
    if colon and kind in ("synthetic", "file"):
        if alpha is not None:
            raise DatasetSpecError(
                f"partition {partition!r} applies to the scikit-learn datasets only: "
                f"{spec!r} brings its own heterogeneity"
            )
        if kind == "file":
            return load_federated_npz(Path(value), num_devices)
        heterogeneity = _synthetic_parameters(value)
        return synthetic_devices(num_devices, heterogeneity, np.random.default_rng(seed))
    raise DatasetSpecError(
        f"unknown dataset spec {spec!r}: use synthetic:ALPHA,BETA, synthetic:iid, "
        f"{', '.join(BUILTINS)} or file:PATH.npz"
    )


def _dirichlet_alpha(partition: str) -> float | None:
    """None for `iid`, α for `dirichlet:ALPHA`."""
    if partition == "iid":
        return None
    kind, _, value = partition.partition(":")
    alpha = _number(value) if kind == "dirichlet" else math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise DatasetSpecError(f"bad partition {partition!r}: use iid or dirichlet:ALPHA (α > 0)")
    return alpha


def _synthetic_parameters(value: str) -> tuple[float, float] | None:
    """(α, β) of `synthetic:ALPHA,BETA`, None for `synthetic:iid`."""
    if value == "iid":
        return None
    numbers = [_number(part) for part in value.split(",")]
    if len(numbers) != 2 or not all(math.isfinite(n) and n >= 0 for n in numbers):
        raise DatasetSpecError(
            f"bad synthetic spec 'synthetic:{value}': use synthetic:ALPHA,BETA "
            "(two numbers ≥ 0, e.g. synthetic:1,1) or synthetic:iid"
        )
    return numbers[0], numbers[1]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


# --- FedProx's synthetic data ----------------------------------------------------------------


def synthetic_devices(
    num_devices: int, heterogeneity: tuple[float, float] | None, rng: np.random.Generator
) -> list[LocalData]:
    """Synthetic(α, β) for `heterogeneity` = (α, β), Synthetic IID for None.

    Follows data/synthetic_*/generate_synthetic.py and data/synthetic_iid/generate_iid.py of
    github.com/litian96/FedProx, drawing in the same order. Device k has ⌊lognormal(4, 2)⌋ + 50
    samples. Non-IID: u_k ~ N(0, α), B_k ~ N(0, β), v_k ~ N(B_k, 1) per feature, W_k ~ N(u_k, 1)
    (60×10), b_k ~ N(u_k, 1). IID: one W ~ N(0, 1) and b ~ N(0, 1) for all, v_k = 0. Then
    x ~ N(v_k, Σ) with Σ = diag(j^−1.2), y = argmax softmax(x·W_k + b_k). As in the repo, α and
    β are standard deviations (`np.random.normal(0, alpha)`).

    Where we differ, the distributions stay the same but the numbers do not: we draw from
    numpy's `Generator` where the repo uses the legacy global `np.random`; x is v_k + Σ^½·z
    (Σ is diagonal) instead of `multivariate_normal`; y is the argmax of the logits, which the
    softmax does not change. The repo's scripts hold out 10 % of each device for testing, the
    paper says 20 %: we hold out `TEST_FRACTION`, after a random permutation as they do.
    """
    sizes = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
    feature_std = np.arange(1, SYNTHETIC_FEATURES + 1, dtype=np.float64) ** -0.6  # √(j^−1.2)
    shape = (SYNTHETIC_FEATURES, SYNTHETIC_CLASSES)
    if heterogeneity is None:
        means = np.zeros((num_devices, SYNTHETIC_FEATURES))
        shared = (rng.normal(0, 1, shape), rng.normal(0, 1, SYNTHETIC_CLASSES))
    else:
        alpha, beta = heterogeneity
        model_means = rng.normal(0, alpha, num_devices)  # u_k
        feature_means = rng.normal(0, beta, num_devices)  # B_k
        means = rng.normal(feature_means[:, None], 1, (num_devices, SYNTHETIC_FEATURES))
    samples: list[tuple[NDArray, NDArray]] = []
    for k in range(num_devices):
        if heterogeneity is None:
            weights, bias = shared
        else:
            weights = rng.normal(model_means[k], 1, shape)
            bias = rng.normal(model_means[k], 1, SYNTHETIC_CLASSES)
        x = means[k] + feature_std * rng.standard_normal((int(sizes[k]), SYNTHETIC_FEATURES))
        samples.append((x, np.argmax(x @ weights + bias, axis=1)))
    return [_split(x, y, SYNTHETIC_CLASSES, rng) for x, y in samples]


def _split(x: NDArray, y: NDArray, num_classes: int, rng: np.random.Generator) -> LocalData:
    return split_local_data(
        x.astype(np.float32), y.astype(np.int64), num_classes, TEST_FRACTION, rng
    )


# --- scikit-learn's datasets, partitioned -----------------------------------------------------


def _builtin_devices(
    name: str, num_devices: int, alpha: float | None, rng: np.random.Generator
) -> list[LocalData]:
    """scikit-learn's `name`, preprocessed as the catalog does by default, so a simulated
    node and a real one that registered `sklearn:NAME` see the same features."""
    try:
        x, y, names = read_builtin(name)
    except DatasetError as exc:
        raise DatasetSpecError(str(exc)) from exc
    x = Preprocessing.parse(default_preprocessing(f"sklearn:{name}")).apply(x)
    if len(y) < MIN_DEVICE_SAMPLES * num_devices:
        raise DatasetSpecError(
            f"{name} has {len(y)} samples: too few for {num_devices} devices of at least "
            f"{MIN_DEVICE_SAMPLES} each (at most {len(y) // MIN_DEVICE_SAMPLES} devices)"
        )
    if alpha is None:
        parts = np.array_split(rng.permutation(len(y)), num_devices)
    else:
        parts = dirichlet_parts(y, num_devices, alpha, rng)
    return [_split(x[part], y[part], len(names), rng) for part in parts]


def dirichlet_parts(
    labels: NDArray, num_devices: int, alpha: float, rng: np.random.Generator
) -> list[NDArray]:
    """Sample indices per device with label skew (Hsu et al., 2019): each class is shared out
    by proportions p ~ Dir(α·1). Devices left under `MIN_DEVICE_SAMPLES` then take samples
    from the largest device, instead of redrawing until none is (which may never happen)."""
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for device, chunk in enumerate(np.split(members, cuts)):
            parts[device].extend(int(i) for i in chunk)
    for needy in parts:
        while len(needy) < MIN_DEVICE_SAMPLES:
            needy.append(max(parts, key=len).pop())
    return [np.array(part, dtype=np.int64) for part in parts]


# --- npz files -------------------------------------------------------------------------------


def save_partition(data: LocalData, path: Path) -> None:
    """One device's data as the catalog's `npz:` source reads it (x_train, y_train, x_test,
    y_test, num_classes), so a simulated node can register its partition as a dataset."""
    arrays = dict(zip(SPLIT_KEYS, _arrays(data), strict=True))
    _write_npz(path, {**arrays, "num_classes": np.int64(data.num_classes)})


def save_federated_npz(devices: Sequence[LocalData], path: Path) -> None:
    """Every device's data in one file that the `file:PATH` spec reads back."""
    if not devices:
        raise DatasetSpecError("no devices to save")
    arrays = {
        f"{key}_{k}": array
        for k, data in enumerate(devices)
        for key, array in zip(SPLIT_KEYS, _arrays(data), strict=True)
    }
    num_classes = max(data.num_classes for data in devices)
    _write_npz(path, {**arrays, "num_classes": np.int64(num_classes)})


def load_federated_npz(path: Path, num_devices: int) -> list[LocalData]:
    """The first `num_devices` devices of a file `save_federated_npz` wrote."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            available = _device_count(archive.files)
            if not 0 < num_devices <= available:
                raise DatasetSpecError(
                    f"{path} holds {available} devices (x_train_0 ... onwards); "
                    f"{num_devices} asked for"
                )
            devices = [tuple(archive[f"{key}_{k}"] for key in SPLIT_KEYS) for k in range(available)]
            stored = int(archive["num_classes"]) if "num_classes" in archive.files else 0
    except OSError as exc:
        raise DatasetSpecError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (EOFError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise DatasetSpecError(
            f"cannot read {path}: not an npz archive of plain arrays (pickled objects are refused)"
        ) from exc
    # K over every device of the file, not just those asked for: it must not change with them
    num_classes = max([stored] + [int(y.max()) + 1 for d in devices for y in d[1::2] if y.size])
    return [_local_data(path, k, d, num_classes) for k, d in enumerate(devices[:num_devices])]


def _device_count(names: Sequence[str]) -> int:
    present = set(names)
    count = 0
    while all(f"{key}_{count}" in present for key in SPLIT_KEYS):
        count += 1
    return count


def _local_data(path: Path, device: int, arrays: Sequence[NDArray], num_classes: int) -> LocalData:
    x_train, y_train, x_test, y_test = arrays
    for y in (y_train, y_test):
        if y.dtype.kind not in "iu" or (y.size and y.min() < 0):
            raise DatasetSpecError(
                f"{path}: device {device}'s labels must be non-negative integers"
            )
    if x_train.dtype.kind not in "biuf" or x_test.dtype.kind not in "biuf":
        raise DatasetSpecError(f"{path}: device {device}'s features must be numbers")
    return LocalData(
        x_train.astype(np.float32),
        y_train.astype(np.int64),
        x_test.astype(np.float32),
        y_test.astype(np.int64),
        num_classes,
    )


def _arrays(data: LocalData) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    return data.x_train, data.y_train, data.x_test, data.y_test


def _write_npz(path: Path, arrays: Mapping[str, NDArray | np.generic]) -> None:
    buffer = io.BytesIO()  # savez into memory, so the file itself is written atomically
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, buffer.getvalue())
