"""Federated datasets: FedProx's synthetic data, partitions of scikit-learn's, npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hivenode.models.datasets import DatasetCatalog
from hivenode.models.training.backend import LocalData
from hivenode.sim.fl_datasets import (
    DatasetSpecError,
    federated_dataset,
    save_federated_npz,
    save_partition,
)


def labels_of(device: LocalData) -> np.ndarray:
    return np.concatenate([device.y_train, device.y_test])


def label_skew(devices: list[LocalData]) -> float:
    """Mean total-variation distance between each device's label distribution and the
    pooled one: 0 when every device sees classes in the same proportions."""
    k = devices[0].num_classes
    pooled = np.bincount(np.concatenate([labels_of(d) for d in devices]), minlength=k)
    pooled = pooled / pooled.sum()
    distances = [
        0.5 * np.abs(np.bincount(labels_of(d), minlength=k) / len(labels_of(d)) - pooled).sum()
        for d in devices
    ]
    return float(np.mean(distances))


def assert_same(a: list[LocalData], b: list[LocalData]) -> None:
    assert len(a) == len(b)
    for left, right in zip(a, b, strict=True):
        assert left.num_classes == right.num_classes
        for name in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(left, name), getattr(right, name))


# --- synthetic -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["synthetic:1,1", "synthetic:0.5,0.5", "synthetic:iid"])
def test_synthetic_has_the_papers_shape(spec: str) -> None:
    devices = federated_dataset(spec, 30, seed=1)

    assert len(devices) == 30
    for device in devices:
        samples = len(device.y_train) + len(device.y_test)
        assert samples >= 50
        assert len(device.y_train) == int(0.8 * samples)  # 80/20 on each device
        assert device.feature_shape == (60,) and device.num_classes == 10
        assert device.x_train.dtype == np.float32 and device.y_train.dtype == np.int64
        assert labels_of(device).min() >= 0 and labels_of(device).max() < 10


def test_synthetic_is_deterministic_for_a_seed() -> None:
    assert_same(
        federated_dataset("synthetic:1,1", 5, seed=7), federated_dataset("synthetic:1,1", 5, seed=7)
    )
    other = federated_dataset("synthetic:1,1", 5, seed=8)
    assert not np.array_equal(
        other[0].x_train[:5], federated_dataset("synthetic:1,1", 5, seed=7)[0].x_train[:5]
    )


def test_synthetic_labels_differ_across_devices_unlike_iid() -> None:
    skews = {
        spec: np.mean([label_skew(federated_dataset(spec, 30, seed=s)) for s in range(3)])
        for spec in ("synthetic:iid", "synthetic:0,0", "synthetic:1,1")
    }

    assert skews["synthetic:iid"] < 0.2
    assert skews["synthetic:0,0"] > 2 * skews["synthetic:iid"]
    assert skews["synthetic:1,1"] > 2 * skews["synthetic:iid"]


def test_beta_spreads_the_devices_feature_means() -> None:
    def spread(spec: str) -> float:
        devices = federated_dataset(spec, 30, seed=0)
        return float(np.std([d.x_train.mean() for d in devices]))

    assert spread("synthetic:iid") < spread("synthetic:0,0") < spread("synthetic:0,2")


def test_alpha_shifts_every_logit_alike_so_labels_stay_as_published() -> None:
    # In FedProx's generator u_k adds the same amount to every class's logit (W_k and b_k
    # share the mean u_k), so with the same draws α changes no sample and no label.
    assert_same(
        federated_dataset("synthetic:0.5,1", 4, seed=3),
        federated_dataset("synthetic:2,1", 4, seed=3),
    )


# --- scikit-learn datasets -------------------------------------------------------------------


def test_iid_partition_gives_every_device_every_label() -> None:
    devices = federated_dataset("digits", 10, partition="iid", seed=0)

    assert all(len(np.unique(d.y_train)) == 10 for d in devices)
    assert sum(len(labels_of(d)) for d in devices) == 1797
    assert label_skew(devices) < 0.15
    assert max(d.x_train.max() for d in devices) == 1.0  # the catalog's default scale:0.0625


def test_dirichlet_partition_with_small_alpha_gives_few_labels_per_device() -> None:
    devices = federated_dataset("digits", 10, partition="dirichlet:0.05", seed=0)

    distinct = [len(np.unique(labels_of(d))) for d in devices]
    assert np.mean(distinct) < 6
    assert label_skew(devices) > 0.5
    assert sum(len(labels_of(d)) for d in devices) == 1797
    assert all(d.num_classes == 10 for d in devices)


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer"])
def test_every_device_gets_two_train_samples_even_at_extreme_skew(name: str) -> None:
    devices = federated_dataset(name, 40, partition="dirichlet:0.01", seed=2)

    assert all(len(d.y_train) >= 2 and len(d.y_test) >= 1 for d in devices)


def test_partition_is_deterministic_for_a_seed() -> None:
    assert_same(
        federated_dataset("wine", 5, partition="dirichlet:0.3", seed=4),
        federated_dataset("wine", 5, partition="dirichlet:0.3", seed=4),
    )


@pytest.mark.parametrize(
    ("spec", "devices", "partition", "fragment"),
    [
        ("mnist", 3, "iid", "unknown dataset spec"),
        ("synthetic:1", 3, "iid", "bad synthetic spec"),
        ("synthetic:-1,1", 3, "iid", "bad synthetic spec"),
        ("synthetic:1,1", 3, "dirichlet:0.5", "scikit-learn datasets only"),
        ("iris", 3, "dirichlet:0", "bad partition"),
        ("iris", 3, "shards", "bad partition"),
        ("iris", 51, "iid", "too few for 51 devices"),
        ("iris", 0, "iid", "1 or more"),
    ],
)
def test_bad_specs_say_why(spec: str, devices: int, partition: str, fragment: str) -> None:
    with pytest.raises(DatasetSpecError, match=fragment):
        federated_dataset(spec, devices, partition=partition)


# --- files -----------------------------------------------------------------------------------


def test_federated_npz_round_trip(tmp_path: Path) -> None:
    devices = federated_dataset("wine", 6, partition="dirichlet:0.1", seed=0)
    path = tmp_path / "wine.npz"
    save_federated_npz(devices, path)

    assert_same(federated_dataset(f"file:{path}", 6), devices)
    assert_same(federated_dataset(f"file:{path}", 4), devices[:4])
    with pytest.raises(DatasetSpecError, match="holds 6 devices"):
        federated_dataset(f"file:{path}", 7)


def test_file_spec_reports_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "not.npz"
    path.write_text("plain text")

    with pytest.raises(DatasetSpecError, match="cannot read"):
        federated_dataset(f"file:{path}", 1)


def test_a_saved_partition_registers_through_the_catalog(tmp_path: Path) -> None:
    devices = federated_dataset("digits", 20, partition="dirichlet:0.05", seed=0)
    device = next(d for d in devices if labels_of(d).max() < 9)  # lacks the highest class
    path = tmp_path / "part.npz"
    save_partition(device, path)

    catalog = DatasetCatalog(tmp_path / "state")
    entry = catalog.add("part", f"npz:{path}")
    loaded = catalog.load("part")

    assert entry.num_classes == 10
    assert_same([loaded], [device])
