"""The pickle scanner: it rebuilds plain data exactly, names every global a pickle would
import, flags those outside the allow-list, reads numpy and joblib arrays, and runs nothing."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenode.models.errors import ModelError
from hivenode.models.pickle_allowlist import is_allowed
from hivenode.models.pickle_scan import Call, scan_bytes, scan_stream, walk
from hivenode.models.pickled_numpy import as_array

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


def leave_mark(path: str) -> None:
    Path(path).write_text("ran")


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


class Marking:
    """Unpickling this would call `leave_mark(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (leave_mark, (self.path,))


plain_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children)
        | st.tuples(children, children)
        | st.dictionaries(st.text() | st.integers(), children)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(value=plain_data, protocol=st.sampled_from(list(PROTOCOLS)))
def test_plain_data_is_rebuilt_exactly(value: Any, protocol: int) -> None:
    scan = scan_bytes(pickle.dumps(value, protocol=protocol))
    assert scan.root == value
    assert scan.unsafe_globals == ()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_instances_name_their_class_and_keep_their_state(protocol: int) -> None:
    scan = scan_bytes(pickle.dumps(Point(1, 2), protocol=protocol))
    dotted = f"{Point.__module__}.Point"
    assert dotted in scan.globals and scan.unsafe_globals == (dotted,)
    assert isinstance(scan.root, Call) and scan.root.state == {"x": 1, "y": 2}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reduce_is_recorded_not_called(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "MARKER"
    scan = scan_bytes(pickle.dumps([Marking(marker)], protocol=protocol))
    assert not marker.exists()
    assert scan.unsafe_globals == (f"{__name__}.leave_mark",)
    (call,) = scan.root
    assert isinstance(call, Call) and call.args == (str(marker),)


@pytest.mark.parametrize(
    "dotted",
    [
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch.FloatStorage",
        "torch.nn.modules.conv.Conv2d",
        "collections.OrderedDict",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy.dtype",
        "sklearn.ensemble._forest.RandomForestClassifier",
        "sklearn.tree._tree.Tree",
        "joblib.numpy_pickle.NumpyArrayWrapper",
        "builtins.set",
        "_codecs.encode",
        "copyreg._reconstructor",
    ],
)
def test_model_globals_are_allowed(dotted: str) -> None:
    assert is_allowed(dotted)


@pytest.mark.parametrize(
    "dotted",
    [
        "os.system",
        "posix.system",
        "nt.system",
        "subprocess.Popen",
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "builtins.__import__",
        "builtins.open",
        "torch.load",
        "torch.hub.load",
        "torch.storage._load_from_bytes",
        "torch.fx.graph_module.reduce_graph_module",
        "torch.utils.cpp_extension.load_inline",
        "torch.nn.functional.relu",
        "numpy.load",
        "sklearn.utils._testing.TempMemmap",
        "sklearn.datasets.fetch_openml",
        "sklearn.utils.validation.check_array",
        "__torch__.Model",
        "__main__.Net",
    ],
)
def test_code_running_globals_are_not(dotted: str) -> None:
    assert not is_allowed(dotted)


def test_torchscript_classes_are_allowed_only_in_torchscript() -> None:
    assert is_allowed("__torch__.torch.nn.modules.conv.Conv2d", torchscript=True)
    assert not is_allowed("__torch__.torch.nn.modules.conv.Conv2d")
    assert not is_allowed("os.system", torchscript=True)


def test_computed_and_extension_globals_are_unsafe() -> None:
    computed = scan_bytes(b"\x80\x04K\x01K\x02\x93.")  # STACK_GLOBAL on two ints
    assert computed.unsafe_globals == ("<computed global>",)
    extension = scan_bytes(b"\x80\x02\x82\x07.")  # EXT1 7: whatever copyreg registered
    assert extension.unsafe_globals == ("<copyreg extension 7>",)


def test_forged_length_fails_without_allocating_it() -> None:
    forged = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"abc."  # BINBYTES8 of 1 EiB
    with pytest.raises(ModelError, match="malformed pickle"):
        scan_bytes(forged)


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_truncated_pickle_is_a_model_error(cut: int) -> None:
    data = pickle.dumps({"weights": list(range(50)), "name": "x" * 30}, protocol=4)
    with pytest.raises(ModelError):
        scan_bytes(data[:-cut])


def test_cycles_and_shared_values_are_walked_once() -> None:
    shared = ["leaf"]
    cyclic: list[Any] = [shared, shared]
    cyclic.append(cyclic)
    scan = scan_bytes(pickle.dumps(cyclic, protocol=2))
    seen = list(walk(scan.root))
    assert sum(1 for value in seen if isinstance(value, list)) == 2


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array([True, False, True]),
    np.arange(5, dtype=">f8"),
    np.array([1 + 2j, 3 - 1j], dtype=np.complex64),
    np.array(["ab", "c", "def"]),
    np.zeros((2, 0, 3), dtype=np.int16),
]


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_numpy_arrays_read_without_unpickling(protocol: int, array: np.ndarray) -> None:
    scan = scan_bytes(pickle.dumps(array, protocol=protocol))
    info = as_array(scan.root)
    assert info is not None
    assert info.shape == array.shape and info.dtype == array.dtype.name
    assert info.values() == array.ravel().tolist()
    assert scan.unsafe_globals == ()


def test_joblib_arrays_are_stepped_over(tmp_path: Path) -> None:
    values = {
        "small": np.arange(6, dtype=np.int64).reshape(2, 3),
        "large": np.ones((300, 400)),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "objects": np.array([1, "a", None], dtype=object),
        "after": "still read",
    }
    path = tmp_path / "arrays.joblib"
    joblib.dump(values, path)
    with path.open("rb") as handle:
        scan = scan_stream(handle, joblib_arrays=True)
        assert handle.tell() == path.stat().st_size  # every array's bytes were stepped over
    root = scan.root
    assert root["after"] == "still read"
    small, large, objects = (as_array(root[key]) for key in ("small", "large", "objects"))
    assert small is not None and small.values() == [0, 1, 2, 3, 4, 5]
    assert large is not None and large.raw is None  # too big to keep
    assert (large.shape, large.dtype) == ((300, 400), "float64")
    assert objects is not None and objects.objects == [1, "a", None]
    assert scan.unsafe_globals == ()


def test_joblib_stream_truncated_inside_an_array(tmp_path: Path) -> None:
    path = tmp_path / "arrays.joblib"
    joblib.dump({"large": np.ones(100_000)}, path)
    data = path.read_bytes()
    with pytest.raises(ModelError, match="truncated"):
        scan_stream(io.BytesIO(data[: len(data) // 2]), joblib_arrays=True)
