"""The hardware and load probe, checked against independent readings of this machine."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import psutil
import pytest

from hivenode.agent.hardware import (
    FRAMEWORK_DISTRIBUTIONS,
    HardwareProbe,
    probe_gpus,
    probe_hardware,
    probe_load,
)
from hivenode.protocol.advert import Advert, Hardware, Load

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter and return the JSON it prints last."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def nvml_works() -> bool:
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_cpu_and_memory_agree_with_psutil_and_os(tmp_path: Path) -> None:
    hardware = probe_hardware(tmp_path)

    assert hardware.cpu.physical_cores == (psutil.cpu_count(logical=False) or 0)
    assert hardware.cpu.logical_cores == psutil.cpu_count(logical=True)
    assert hardware.cpu.affinity_cores == len(os.sched_getaffinity(0))
    assert hardware.memory.total_bytes == psutil.virtual_memory().total
    assert 0 < hardware.memory.available_bytes <= hardware.memory.total_bytes
    assert hardware.cpu.model
    assert hardware.platform.endswith(f"Python {sys.version.split()[0]}")


def test_disk_free_agrees_with_shutil(tmp_path: Path) -> None:
    hardware = probe_hardware(tmp_path)

    assert hardware.disk_free_bytes == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.05)


def test_disk_free_of_a_missing_path_is_that_of_its_nearest_parent(tmp_path: Path) -> None:
    hardware = probe_hardware(tmp_path / "not" / "made" / "yet")

    assert hardware.disk_free_bytes == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.05)
    assert not (tmp_path / "not").exists()


def test_frameworks_are_the_installed_versions(tmp_path: Path) -> None:
    frameworks = probe_hardware(tmp_path).frameworks

    assert "torch" in frameworks
    assert frameworks["torch"] == importlib.metadata.version("torch")
    for dist in FRAMEWORK_DISTRIBUTIONS:
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            assert dist not in frameworks
        else:
            assert frameworks[dist] == installed


def test_probing_imports_no_framework(tmp_path: Path) -> None:
    result = run_python(
        "import json, sys; from pathlib import Path\n"
        "from hivenode.agent.hardware import HardwareProbe, probe_load\n"
        f"probe = HardwareProbe(Path({str(tmp_path)!r})); probe.refresh(); probe_load()\n"
        "print(json.dumps({m: m in sys.modules for m in "
        "('torch', 'tensorflow', 'keras', 'transformers', 'sklearn', 'onnx', 'onnxruntime')}))"
    )

    assert result == dict.fromkeys(result, False)
    assert "torch" in result
    assert "tensorflow" in result


@pytest.mark.skipif(nvml_works(), reason="this machine has an NVIDIA driver")
def test_a_machine_without_gpus_reports_none(tmp_path: Path) -> None:
    assert probe_gpus() == ()
    assert probe_hardware(tmp_path).gpus == ()


@pytest.mark.skipif(nvml_works(), reason="this machine has an NVIDIA driver")
def test_with_torch_imported_a_cpu_machine_still_reports_no_gpus(tmp_path: Path) -> None:
    result = run_python(
        "import json, sys; from pathlib import Path\n"
        "import torch\n"
        "from hivenode.agent.hardware import HardwareProbe\n"
        f"probe = HardwareProbe(Path({str(tmp_path)!r}))\n"
        "print(json.dumps({'cuda': torch.cuda.is_available(), "
        "'gpus': len(probe.hardware.gpus), 'refreshed': len(probe.refresh().gpus)}))"
    )

    if result["cuda"]:
        pytest.skip("torch sees a GPU here")
    assert result == {"cuda": False, "gpus": 0, "refreshed": 0}


def test_hardware_and_load_round_trip_through_the_wire(tmp_path: Path) -> None:
    hardware = probe_hardware(tmp_path)
    load = probe_load(running_tasks=3)

    assert Hardware.model_validate(hardware.model_dump(mode="json")) == hardware
    assert Load.model_validate(load.model_dump(mode="json")) == load
    advert = Advert(origin="peer", seq=1, timestamp=1.0, ttl=30.0, hardware=hardware, load=load)
    assert Advert.from_wire(advert.to_wire()) == advert


def test_load_reads_this_machine() -> None:
    load = probe_load(running_tasks=2)

    assert load.running_tasks == 2
    assert 0.0 <= load.cpu_percent <= 100.0 * (psutil.cpu_count() or 1)
    assert 0.0 < load.memory_percent < 100.0
    assert all(value >= 0.0 for value in load.load_avg)
    assert load.load_avg[2] == pytest.approx(os.getloadavg()[2], abs=0.5)


def test_refresh_rereads_memory_and_disk_and_keeps_the_static_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = HardwareProbe(tmp_path)
    before = probe.hardware
    real_memory = psutil.virtual_memory()
    real_disk = psutil.disk_usage(str(tmp_path))
    # Values no real reading would give, so a cached answer cannot pass.
    monkeypatch.setattr(
        psutil, "virtual_memory", lambda: real_memory._replace(available=12_345_678)
    )
    monkeypatch.setattr(psutil, "disk_usage", lambda path: real_disk._replace(free=87_654_321))

    after = probe.refresh()

    assert after.memory.available_bytes == 12_345_678
    assert after.disk_free_bytes == 87_654_321
    assert probe.hardware == after
    assert after.memory.total_bytes == before.memory.total_bytes
    assert after.cpu == before.cpu
    assert after.gpus == before.gpus
    assert after.frameworks == before.frameworks
    assert after.platform == before.platform


# The GPU branches cannot run for real on a CPU machine; these stand-ins for pynvml and torch
# provide just the calls the probe makes, so the conversion and fallback logic is still checked.


class FakeNvmlError(Exception):
    pass


def fake_pynvml(free_bytes: list[int], *, init_fails: bool = False) -> types.ModuleType:
    """Two A100s; the second cannot report a compute capability. Records its calls."""
    module = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_fails:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def memory_info(handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=80 * 2**30, free=free_bytes[handle])

    def capability(handle: int) -> tuple[int, int]:
        if handle == 1:
            raise FakeNvmlError("Not Supported")
        return (8, 0)

    module.__dict__.update(
        calls=calls,
        NVMLError=FakeNvmlError,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda handle: b"NVIDIA A100-SXM4-80GB",
        nvmlDeviceGetMemoryInfo=memory_info,
        nvmlDeviceGetCudaComputeCapability=capability,
    )
    return module


def fake_torch(free_bytes: int) -> types.ModuleType:
    module = types.ModuleType("torch")
    props = types.SimpleNamespace(name="AMD Instinct MI250X", major=9, minor=0)
    module.__dict__.update(
        version=types.SimpleNamespace(hip="6.0"),
        cuda=types.SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: 1,
            get_device_properties=lambda index: props,
            mem_get_info=lambda index: (free_bytes, 64 * 2**30),
        ),
    )
    return module


def test_nvml_gpus_are_read_and_nvml_is_shut_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = [10 * 2**30, 20 * 2**30]
    nvml = fake_pynvml(free)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(1))  # must not be consulted

    probe = HardwareProbe(tmp_path)
    gpus = probe.hardware.gpus

    assert [(g.index, g.name, g.source, g.vendor) for g in gpus] == [
        (0, "NVIDIA A100-SXM4-80GB", "nvml", "nvidia"),
        (1, "NVIDIA A100-SXM4-80GB", "nvml", "nvidia"),
    ]
    assert [g.memory_free_bytes for g in gpus] == free
    assert [g.memory_total_bytes for g in gpus] == [80 * 2**30] * 2
    assert [g.compute_capability for g in gpus] == ["8.0", ""]
    assert nvml.calls == ["init", "shutdown"]

    free[1] = 5 * 2**30
    refreshed = probe.refresh().gpus

    assert [g.memory_free_bytes for g in refreshed] == [10 * 2**30, 5 * 2**30]
    assert [g.model_dump(exclude={"memory_free_bytes"}) for g in refreshed] == [
        g.model_dump(exclude={"memory_free_bytes"}) for g in gpus
    ]
    assert nvml.calls == ["init", "shutdown"] * 2


def test_nvml_without_a_driver_falls_back_to_an_imported_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = fake_pynvml([], init_fails=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(3 * 2**30))

    (gpu,) = probe_gpus()

    assert nvml.calls == ["init"]  # never shut down what did not start
    assert gpu.source == "torch"
    assert gpu.vendor == "amd"
    assert gpu.name == "AMD Instinct MI250X"
    assert gpu.compute_capability == "9.0"
    assert (gpu.memory_free_bytes, gpu.memory_total_bytes) == (3 * 2**30, 64 * 2**30)


def test_nvml_without_a_driver_and_no_torch_imported_reports_no_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_fails=True))
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    # A torch that would be found if the probe imported it: it must not.
    monkeypatch.setattr(sys, "meta_path", [_RefuseTorch(), *sys.meta_path])

    assert probe_gpus() == ()
    assert "torch" not in sys.modules


class _RefuseTorch:
    """An import hook that fails the test if anything imports torch."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "torch":
            pytest.fail("the probe imported torch")
