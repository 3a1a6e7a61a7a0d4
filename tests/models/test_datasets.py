"""The node's data catalog: each source kind, labels, preprocessing, the split, the file."""

from __future__ import annotations

import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_iris

from hivenode.models import datasets
from hivenode.models.datasets import (
    CATALOG_NAME,
    DatasetCatalog,
    DatasetEntry,
    DatasetError,
    Preprocessing,
)
from hivenode.protocol.advert import DatasetInfo


@pytest.fixture
def catalog(tmp_path: Path) -> DatasetCatalog:
    return DatasetCatalog(tmp_path / "state")


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def features_and_labels(samples: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((samples, 3)), rng.integers(0, 4, samples)


# --- sources ---------------------------------------------------------------------------------


def test_sklearn_source_matches_scikit_learn_and_survives_a_new_catalog(
    catalog: DatasetCatalog,
) -> None:
    entry = catalog.add("iris", "sklearn:iris")

    reopened = DatasetCatalog(catalog.state_dir)
    assert reopened.get("iris") == entry
    assert entry.samples == 150 and (entry.train_samples, entry.test_samples) == (120, 30)
    assert entry.feature_shape == (4,) and entry.num_classes == 3
    assert entry.label_names == ("setosa", "versicolor", "virginica")
    data = reopened.load("iris")
    reference = load_iris()
    rows = np.concatenate([data.x_train, data.x_test])
    labels = np.concatenate([data.y_train, data.y_test])
    order = np.lexsort(rows.T)
    expected_order = np.lexsort(reference.data.astype(np.float32).T)
    np.testing.assert_array_equal(rows[order], reference.data.astype(np.float32)[expected_order])
    np.testing.assert_array_equal(labels[order], reference.target[expected_order])
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert entry.size_bytes == sum(
        a.nbytes for a in (data.x_train, data.y_train, data.x_test, data.y_test)
    )


def test_catalog_file_is_private_json(catalog: DatasetCatalog) -> None:
    catalog.add("wine", "sklearn:wine")

    path = catalog.state_dir / CATALOG_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert [d["name"] for d in document["datasets"]] == ["wine"]


def test_npz_x_y_is_split_by_a_seeded_permutation(catalog: DatasetCatalog, tmp_path: Path) -> None:
    x, y = features_and_labels(samples=41)
    source = write_npz(tmp_path / "d.npz", x=x, y=y)

    catalog.add("a", f"npz:{source}", test_fraction=0.25, split_seed=3)
    catalog.add("b", f"npz:{source}", test_fraction=0.25, split_seed=3)
    catalog.add("c", f"npz:{source}", test_fraction=0.25, split_seed=4)
    a, b, c = catalog.load("a"), catalog.load("b"), catalog.load("c")

    order = np.random.default_rng(3).permutation(41)
    assert len(a.y_train) == 30 and len(a.y_test) == 11  # ⌊0.75·41⌋ to train
    np.testing.assert_array_equal(a.x_train, x[order[:30]].astype(np.float32))
    np.testing.assert_array_equal(a.y_test, y[order[30:]])
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


def test_npz_given_split_is_kept_with_its_class_count(
    catalog: DatasetCatalog, tmp_path: Path
) -> None:
    x, y = features_and_labels()
    source = write_npz(
        tmp_path / "split.npz",
        x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:],
        num_classes=np.int64(7),
    )  # fmt: skip

    entry = catalog.add("split", f"npz:{source}")
    data = catalog.load("split")

    assert (entry.train_samples, entry.test_samples, entry.num_classes) == (30, 10, 7)
    np.testing.assert_array_equal(data.x_test, x[30:].astype(np.float32))
    np.testing.assert_array_equal(data.y_train, y[:30])


def test_csv_string_labels_become_sorted_indices_with_names_kept(
    catalog: DatasetCatalog, tmp_path: Path
) -> None:
    rows = "".join(f"{i},{i * 0.5},{['cat', 'ant', 'bee'][i % 3]}\n" for i in range(10))
    source = write_csv(tmp_path / "d.csv", "a,b,kind\n" + rows + "\n")

    entry = catalog.add("animals", f"csv:{source}", label_column="kind")
    data = catalog.load("animals")

    assert entry.label_names == ("ant", "bee", "cat") and entry.num_classes == 3
    assert entry.feature_shape == (2,) and entry.samples == 10
    for features, label in zip(data.x_train, data.y_train, strict=True):
        assert label == {0: 2, 1: 0, 2: 1}[int(features[0]) % 3]  # cat=2, ant=0, bee=1


def test_csv_whole_number_labels_keep_their_values(catalog: DatasetCatalog, tmp_path: Path) -> None:
    source = write_csv(
        tmp_path / "d.csv", "y,x\n" + "".join(f"{i % 2 + 1},{i}\n" for i in range(8))
    )

    entry = catalog.add("numbers", f"csv:{source}", label_column="y")

    assert entry.num_classes == 3 and entry.label_names == ()
    assert set(catalog.load("numbers").y_train) <= {1, 2}


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("a,b\n1,2\n3,4\n", "label", "no column 'label'"),
        ("a,label\n1,x\nfoo,y\n", "label", "non-numeric feature 'foo' in column 'a'"),
        ("a,label\n1,x\n2\n", "label", "line 3 has 1 fields"),
        ("label\nx\ny\n", "label", "no feature columns"),
        ("a,label\nnan,x\n1,y\n", "label", "NaN or infinite"),
        ("a,label\n1,x\n", "label", "too few samples"),
    ],
)
def test_bad_csv_is_refused_with_the_reason(
    catalog: DatasetCatalog, tmp_path: Path, text: str, column: str, fragment: str
) -> None:
    source = write_csv(tmp_path / "d.csv", text)

    with pytest.raises(DatasetError, match=fragment):
        catalog.add("d", f"csv:{source}", label_column=column)


@pytest.mark.parametrize(
    ("source", "options", "fragment"),
    [
        ("parquet:/x", {}, "unknown source"),
        ("sklearn:mnist", {}, "unknown builtin dataset 'mnist'"),
        ("npz:/no/such/file.npz", {}, "no such file"),
        ("csv:{csv}", {}, "needs a label column"),
        ("sklearn:iris", {"label_column": "y"}, "csv sources only"),
        ("sklearn:iris", {"test_fraction": 1.0}, "between 0 and 1"),
        ("sklearn:iris", {"split_seed": -1}, "0 or more"),
        ("sklearn:iris", {"preprocessing": "scale:0"}, "bad preprocessing"),
        ("sklearn:iris", {"preprocessing": "minmax:1,1"}, "bad preprocessing"),
        ("sklearn:iris", {"preprocessing": "zscore"}, "bad preprocessing"),
    ],
)
def test_bad_requests_are_refused_before_loading(
    catalog: DatasetCatalog, tmp_path: Path, source: str, options: dict[str, object], fragment: str
) -> None:
    csv_path = write_csv(tmp_path / "d.csv", "a,y\n1,2\n")

    with pytest.raises(DatasetError, match=fragment):
        catalog.add("d", source.format(csv=csv_path), **options)  # type: ignore[arg-type]
    assert catalog.entries() == []


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "spaced name"])
def test_bad_names_are_refused(catalog: DatasetCatalog, name: str) -> None:
    with pytest.raises(DatasetError, match="invalid dataset name"):
        catalog.add(name, "sklearn:iris")


def test_pickled_npz_is_refused_without_unpickling(catalog: DatasetCatalog, tmp_path: Path) -> None:
    source = tmp_path / "obj.npz"
    np.savez(source, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))

    with pytest.raises(DatasetError, match="plain arrays"):
        catalog.add("obj", f"npz:{source}")


def test_npz_split_with_an_empty_side_is_refused(catalog: DatasetCatalog, tmp_path: Path) -> None:
    x, y = features_and_labels()
    source = write_npz(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])

    with pytest.raises(DatasetError, match="40 to train and 0 to test"):
        catalog.add("d", f"npz:{source}")


def test_npz_without_known_arrays_names_what_it_has(
    catalog: DatasetCatalog, tmp_path: Path
) -> None:
    source = write_npz(tmp_path / "d.npz", features=np.zeros((4, 2)))

    with pytest.raises(DatasetError, match="it has: features"):
        catalog.add("d", f"npz:{source}")


# --- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical", "expected"),
    [
        ("none", "none", lambda x: x),
        ("scale:0.5", "scale:0.5", lambda x: x * 0.5),
        ("minmax:-2,6", "minmax:-2.0,6.0", lambda x: (x + 2) / 8),
    ],
)
def test_preprocessing_is_the_fixed_transform_it_names(
    catalog: DatasetCatalog, tmp_path: Path, spec: str, canonical: str, expected: object
) -> None:
    x, y = features_and_labels()
    source = write_npz(
        tmp_path / "d.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:]
    )

    entry = catalog.add("d", f"npz:{source}", preprocessing=spec)

    assert entry.preprocessing == canonical
    reference = expected(x[:30])  # type: ignore[operator]
    np.testing.assert_allclose(catalog.load("d").x_train, reference, rtol=1e-6, atol=1e-6)


def test_digits_default_to_pixels_in_zero_one(catalog: DatasetCatalog) -> None:
    entry = catalog.add("digits", "sklearn:digits")
    data = catalog.load("digits")

    assert entry.preprocessing == "scale:0.0625"
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert catalog.add("raw", "sklearn:digits", preprocessing="none").preprocessing == "none"
    assert catalog.load("raw").x_train.max() == 16.0


def test_preprocessing_spellings_parse_to_one_canonical_text() -> None:
    assert Preprocessing.parse(" scale:1e-1 ").text == "scale:0.1"
    assert Preprocessing.parse("minmax:0,255").factor == pytest.approx(1 / 255)


# --- catalog changes -------------------------------------------------------------------------


def test_duplicate_name_needs_replace(catalog: DatasetCatalog) -> None:
    catalog.add("d", "sklearn:iris")

    with pytest.raises(DatasetError, match="exists already"):
        catalog.add("d", "sklearn:wine")
    assert catalog.get("d").source == "sklearn:iris"
    replaced = catalog.add("d", "sklearn:wine", replace=True)
    assert catalog.get("d") == replaced and catalog.load("d").num_classes == 3
    assert catalog.load("d").feature_shape == (13,)


def test_remove_forgets_the_entry_not_the_file(catalog: DatasetCatalog, tmp_path: Path) -> None:
    x, y = features_and_labels()
    source = write_npz(tmp_path / "d.npz", x=x, y=y)
    catalog.add("d", f"npz:{source}")
    catalog.add("iris", "sklearn:iris")

    removed = catalog.remove("d")

    assert removed.name == "d" and source.exists()
    assert [e.name for e in catalog.entries()] == ["iris"]
    with pytest.raises(DatasetError, match="no dataset named 'd'"):
        catalog.load("d")
    with pytest.raises(DatasetError, match="no dataset named 'd'"):
        catalog.remove("d")


def test_failed_add_leaves_the_catalog_file_as_it_was(
    catalog: DatasetCatalog, tmp_path: Path
) -> None:
    catalog.add("iris", "sklearn:iris")
    before = (catalog.state_dir / CATALOG_NAME).read_bytes()
    broken = write_csv(tmp_path / "broken.csv", "a,y\n1,x\noops,y\n")

    for attempt in (
        lambda: catalog.add("broken", f"csv:{broken}", label_column="y"),
        lambda: catalog.add("iris", f"csv:{broken}", label_column="y", replace=True),
        lambda: catalog.add("iris", "sklearn:wine"),
    ):
        with pytest.raises(DatasetError):
            attempt()
        assert (catalog.state_dir / CATALOG_NAME).read_bytes() == before
    assert sorted(os.listdir(catalog.state_dir)) == sorted([CATALOG_NAME, ".datasets.lock"])


def test_paths_are_stored_absolute(
    catalog: DatasetCatalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = features_and_labels()
    write_npz(tmp_path / "d.npz", x=x, y=y)
    monkeypatch.chdir(tmp_path)

    entry = catalog.add("d", "npz:d.npz")

    assert entry.source == f"npz:{tmp_path / 'd.npz'}"


def test_advert_datasets_say_facts_not_data(catalog: DatasetCatalog) -> None:
    iris = catalog.add("iris", "sklearn:iris")
    catalog.add("wine", "sklearn:wine")

    infos = catalog.advert_datasets()

    assert infos[0] == DatasetInfo(
        name="iris", samples=150, feature_shape=(4,), size_bytes=iris.size_bytes, num_classes=3
    )
    assert [i.name for i in infos] == ["iris", "wine"]


def test_entry_from_json_ignores_unknown_fields_and_defaults_missing_ones() -> None:
    entry = DatasetEntry.from_json({"name": "d", "source": "sklearn:iris", "colour": "blue"})

    assert entry == DatasetEntry(name="d", source="sklearn:iris")


def test_damaged_catalog_is_reported(catalog: DatasetCatalog) -> None:
    catalog.state_dir.mkdir(parents=True)
    (catalog.state_dir / CATALOG_NAME).write_text("{not json")

    with pytest.raises(DatasetError, match="damaged"):
        catalog.entries()


# --- loading ---------------------------------------------------------------------------------


def test_load_is_cached_until_the_file_changes(catalog: DatasetCatalog, tmp_path: Path) -> None:
    x, y = features_and_labels()
    source = write_npz(tmp_path / "d.npz", x=x, y=y)
    catalog.add("d", f"npz:{source}")
    first = catalog.load("d")

    assert catalog.load("d") is first
    write_npz(source, x=x * 2, y=y)
    os.utime(source, ns=(0, source.stat().st_mtime_ns + 1_000_000))
    second = catalog.load("d")
    assert second is not first
    np.testing.assert_allclose(second.x_train, first.x_train * 2)


def test_loaded_arrays_cannot_be_changed_in_place(catalog: DatasetCatalog) -> None:
    catalog.add("iris", "sklearn:iris")
    data = catalog.load("iris")

    with pytest.raises(ValueError, match="read-only"):
        data.x_train *= 2


def test_concurrent_loads_from_worker_threads_read_once(
    catalog: DatasetCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog.add("digits", "sklearn:digits")
    reads = 0
    count_lock = threading.Lock()
    real = datasets.read_dataset

    def counting(entry: DatasetEntry) -> tuple[object, tuple[str, ...]]:
        nonlocal reads
        with count_lock:
            reads += 1
        return real(entry)

    monkeypatch.setattr(datasets, "read_dataset", counting)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda _: catalog.load("digits"), range(16)))

    assert reads == 1
    assert all(data is loaded[0] for data in loaded)


def test_load_of_a_vanished_file_says_so(catalog: DatasetCatalog, tmp_path: Path) -> None:
    x, y = features_and_labels()
    source = write_npz(tmp_path / "d.npz", x=x, y=y)
    catalog.add("d", f"npz:{source}")
    source.unlink()

    with pytest.raises(DatasetError, match="cannot read"):
        catalog.load("d")
