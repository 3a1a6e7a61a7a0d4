"""What this machine has and how busy it is: the hardware and load parts of a node's advert.

Everything here blocks (psutil reads /proc, NVML talks to the driver), so the agent calls it
off the event loop: ``await trio.to_thread.run_sync(probe.refresh)``.

Heavy frameworks are never imported to probe them: installed frameworks come from package
metadata, and torch is asked about GPUs only when the process has already imported it.

Cost, measured with time.perf_counter on the 2-core CPU-only dev machine (Python 3.11,
psutil 7.2, nvidia-ml-py 13 without a driver, 8 frameworks installed), median of 20 runs:

- ``probe_hardware``: about 26 ms the first time (pynvml import, cold metadata lookups), then
  about 6 ms, nearly all of it the frameworks' package metadata
- ``HardwareProbe.refresh``: about 0.1 ms (one virtual_memory and one statvfs)
- ``probe_load``: about 0.1 ms

So adverts rebuilt every few seconds from ``refresh()`` cost next to nothing. On a GPU
machine ``refresh`` also pays one NVML init, per-device memory read and shutdown.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import psutil

from hivenode.protocol.advert import CpuInfo, GpuInfo, Hardware, Load, MemoryInfo

logger = logging.getLogger(__name__)

FRAMEWORK_DISTRIBUTIONS: tuple[str, ...] = (
    "torch",
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "transformers",
    "scikit-learn",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "flwr",
    "jax",
)
"""Distributions whose installed version a node advertises (looked up, never imported)."""


def probe_hardware(disk_path: Path) -> Hardware:
    """Everything the advert says about this machine; blocking, run it in a worker thread.

    `disk_path` is where the node keeps its blobs: the free space reported is that of the
    filesystem holding it, or holding its nearest existing parent when it does not exist yet.
    """
    memory = psutil.virtual_memory()
    return Hardware(
        cpu=_probe_cpu(),
        memory=MemoryInfo(total_bytes=memory.total, available_bytes=memory.available),
        disk_free_bytes=_disk_free_bytes(disk_path),
        gpus=probe_gpus(),
        frameworks=installed_frameworks(),
        platform=_platform_string(),
    )


def probe_load(running_tasks: int = 0) -> Load:
    """How busy this machine is now; blocking (briefly), run it in a worker thread.

    CPU percent is measured since the previous call in this process, without waiting, so the
    very first call after the process starts returns 0.0; `HardwareProbe` makes that first
    call when it is created, so the agent's first advert already carries a real value.
    `running_tasks` is the caller's own count of the jobs it is running.
    """
    try:
        load_avg = os.getloadavg()
    except (AttributeError, OSError):  # not on Windows
        load_avg = (0.0, 0.0, 0.0)
    return Load(
        cpu_percent=psutil.cpu_percent(interval=None),
        load_avg=load_avg,
        memory_percent=psutil.virtual_memory().percent,
        running_tasks=running_tasks,
    )


class HardwareProbe:
    """Probes the machine once, then refreshes only what changes between adverts.

    The CPU, the frameworks, the platform and the GPUs' names and total memory are read once,
    at creation; `refresh()` re-reads available memory, free disk and the GPUs' free memory.
    Both block: create it and call `refresh` in a worker thread. One caller at a time.
    """

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        psutil.cpu_percent(interval=None)  # start the CPU-percent window, see probe_load
        self._hardware = probe_hardware(disk_path)

    @property
    def hardware(self) -> Hardware:
        """The latest reading, without probing anything."""
        return self._hardware

    def refresh(self) -> Hardware:
        """Re-read the changing parts and return the updated reading."""
        old = self._hardware
        memory = psutil.virtual_memory()
        self._hardware = old.model_copy(
            update={
                "memory": old.memory.model_copy(update={"available_bytes": memory.available}),
                "disk_free_bytes": _disk_free_bytes(self.disk_path),
                "gpus": _refresh_gpu_free(old.gpus),
            }
        )
        return self._hardware

    def load(self, running_tasks: int = 0) -> Load:
        """Same as `probe_load`; here so the agent needs only the probe object."""
        return probe_load(running_tasks)


def installed_frameworks() -> dict[str, str]:
    """{distribution name: version} of the ML frameworks installed, from package metadata."""
    found: dict[str, str] = {}
    for dist in FRAMEWORK_DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def probe_gpus() -> tuple[GpuInfo, ...]:
    """The GPUs NVML sees, else those an already imported torch sees, else none."""
    gpus = _probe_nvml()
    if not gpus and "torch" in sys.modules:
        gpus = _probe_torch()
    return gpus


def _probe_cpu() -> CpuInfo:
    logical = psutil.cpu_count(logical=True) or 0
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on macOS or Windows
        affinity = logical
    return CpuInfo(
        physical_cores=psutil.cpu_count(logical=False) or 0,
        logical_cores=logical,
        affinity_cores=affinity,
        model=_cpu_model(),
        max_freq_mhz=_cpu_max_freq_mhz(),
    )


def _cpu_model() -> str:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
                for line in cpuinfo:
                    key, _, value = line.partition(":")
                    if key.strip() == "model name":
                        return value.strip()
        except OSError as exc:
            logger.debug("cannot read /proc/cpuinfo: %s", exc)
    # ARM kernels have no "model name"; platform.processor() is then often just the arch.
    return platform.processor()


def _cpu_max_freq_mhz() -> float:
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, AttributeError) as exc:
        logger.debug("no CPU frequency: %s", exc)
        return 0.0
    if freq is None:
        return 0.0
    # VMs often report max 0; the current frequency is then the best we have.
    return float(freq.max or freq.current or 0.0)


def _disk_free_bytes(path: Path) -> int:
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return psutil.disk_usage(str(existing)).free
    except OSError as exc:
        logger.warning("cannot read free disk space at %s: %s", existing, exc)
        return 0


def _platform_string() -> str:
    return (
        f"{platform.system()}-{platform.release()}-{platform.machine()}"
        f" / Python {platform.python_version()}"
    )


def _probe_nvml() -> tuple[GpuInfo, ...]:
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        logger.debug("NVML unavailable, no NVIDIA GPUs from it: %s", exc)
        return ()
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        gpus: list[GpuInfo] = []
        for index in range(count):
            try:
                gpus.append(_nvml_device(pynvml, index))
            except pynvml.NVMLError as exc:
                logger.debug("NVML cannot read GPU %d, skipping it: %s", index, exc)
        return tuple(gpus)
    except pynvml.NVMLError as exc:
        logger.debug("NVML cannot count GPUs: %s", exc)
        return ()
    finally:
        _nvml_shutdown(pynvml)


def _nvml_device(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):  # nvidia-ml-py before 11.515 returned bytes
        name = name.decode("utf-8", errors="replace")
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        capability = f"{major}.{minor}"
    except nvml.NVMLError:
        capability = ""
    return GpuInfo(
        index=index,
        name=str(name),
        vendor="nvidia",
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
        compute_capability=capability,
        source="nvml",
    )


def _nvml_shutdown(pynvml: Any) -> None:
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        logger.debug("NVML shutdown failed: %s", exc)


def _probe_torch() -> tuple[GpuInfo, ...]:
    """GPUs as torch sees them; only called when torch is already imported.

    `mem_get_info` creates a CUDA context on each device the first time (a few hundred MiB of
    device memory), which is why this is the fallback, after NVML.
    """
    import torch  # already in sys.modules: free

    try:
        if not torch.cuda.is_available():
            return ()
        vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
        gpus: list[GpuInfo] = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=str(props.name),
                    vendor=vendor,
                    memory_total_bytes=int(total),
                    memory_free_bytes=int(free),
                    compute_capability=f"{props.major}.{props.minor}",
                    source="torch",
                )
            )
        return tuple(gpus)
    except (RuntimeError, AssertionError) as exc:  # torch raises these for a broken CUDA setup
        logger.debug("torch cannot read the GPUs: %s", exc)
        return ()


def _refresh_gpu_free(gpus: tuple[GpuInfo, ...]) -> tuple[GpuInfo, ...]:
    """The same GPUs with their free memory re-read; a GPU that cannot be read keeps its value."""
    if not gpus:
        return gpus
    free = _nvml_free(gpus) if gpus[0].source == "nvml" else _torch_free(gpus)
    return tuple(
        gpu.model_copy(update={"memory_free_bytes": free[gpu.index]}) if gpu.index in free else gpu
        for gpu in gpus
    )


def _nvml_free(gpus: tuple[GpuInfo, ...]) -> dict[int, int]:
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        logger.debug("NVML unavailable on refresh: %s", exc)
        return {}
    free: dict[int, int] = {}
    try:
        for gpu in gpus:
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
                free[gpu.index] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
            except pynvml.NVMLError as exc:
                logger.debug("NVML cannot read GPU %d on refresh: %s", gpu.index, exc)
    finally:
        _nvml_shutdown(pynvml)
    return free


def _torch_free(gpus: tuple[GpuInfo, ...]) -> dict[int, int]:
    if "torch" not in sys.modules:
        return {}
    import torch

    free: dict[int, int] = {}
    for gpu in gpus:
        try:
            free[gpu.index] = int(torch.cuda.mem_get_info(gpu.index)[0])
        except (RuntimeError, AssertionError) as exc:
            logger.debug("torch cannot read GPU %d on refresh: %s", gpu.index, exc)
    return free
