"""Identifying a 1 GB safetensors file: time and extra memory, with and without the sha256.

    python benchmarks/bench_identify.py [--json] [--size-mb 1024] [--repeats 3]

Writes a safetensors file of --size-mb (64 float32 tensors, real bytes, not a sparse file)
in a temp dir, then times `identify(path, hash=False)` (header only) and `identify(path)`
(header plus a streamed sha256 of every byte) in a fresh interpreter; the memory figure is
the peak of its current RSS (sampled every millisecond) over its RSS before the timed calls.
The page cache is warm after the write; when the OS allows, the sha256 is also timed cold
(the file's pages dropped first with posix_fadvise), which is what a fresh file costs.

Targets (issue 5): identification ≤ 1 s and ≤ 50 MB extra RSS. The sha256 must read the
whole file, so it dominates `identify_s`: the benchmark reports both.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import emit, machine, make_parser, median, progress, rounded

TARGET_S = 1.0
TARGET_RSS_MB = 50.0
TENSORS = 64

# Runs in a child so that its RSS holds only what identify needs, not the file writer's.
CHILD = r"""
import json, os, resource, sys, threading, time
from pathlib import Path
from hivenode.models.identify import identify

path, repeats, cold = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
page = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * page

def drop_cache():
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

def timed(**kwargs):
    started = time.perf_counter()
    info = identify(path, **kwargs)
    return time.perf_counter() - started, info

identify(path, hash=False)  # imports and .pyc loading are not what we measure
peak, running = [rss()], True
base_rss, base_maxrss_kb = peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def sample():  # the current RSS every millisecond: transient buffers show up too
    while running:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
no_hash, hashed, hashed_cold = [], [], []
for _ in range(repeats):
    seconds, info = timed(hash=False)
    no_hash.append(seconds)
    seconds, info = timed()
    hashed.append(seconds)
    if cold:
        drop_cache()
        seconds, _ = timed()
        hashed_cold.append(seconds)
running = False
sampler.join()
print(json.dumps({
    "no_hash": no_hash, "hashed": hashed, "hashed_cold": hashed_cold,
    "rss_growth_mb": (peak[0] - base_rss) / 2**20,
    "maxrss_growth_mb": (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss_kb
    ) / 1024,
    "parameters": info.parameters, "size_bytes": info.size_bytes, "sha256": info.sha256,
}))
"""


def write_safetensors(path: Path, size_bytes: int) -> int:
    """A safetensors file of about `size_bytes`: TENSORS float32 matrices of 1024 columns."""
    rows = max(size_bytes // (TENSORS * 4 * 1024), 1)
    tensor_bytes = rows * 1024 * 4
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for index in range(TENSORS):
        begin = index * tensor_bytes
        header[f"model.layers.{index}.mlp.weight"] = {
            "dtype": "F32",
            "shape": [rows, 1024],
            "data_offsets": [begin, begin + tensor_bytes],
        }
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    chunk = os.urandom(16 * 1024 * 1024)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        left = TENSORS * tensor_bytes
        while left:
            handle.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        handle.flush()
        os.fsync(handle.fileno())
    return TENSORS * rows * 1024


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cold = hasattr(os, "posix_fadvise")

    with tempfile.TemporaryDirectory(prefix="hivenode-bench-identify-") as tmp:
        path = Path(tmp) / "model.safetensors"
        progress(f"writing {args.size_mb} MB of safetensors to {path}")
        parameters = write_safetensors(path, args.size_mb * 1024 * 1024)
        progress(f"identifying it {args.repeats} times in a fresh interpreter")
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(args.repeats), "1" if cold else "0"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"identify failed:\n{done.stderr}")
        child = json.loads(done.stdout)
        size_bytes = path.stat().st_size

    identify_s = median(child["hashed"])
    no_hash_s = median(child["no_hash"])
    cold_s = median(child["hashed_cold"])
    result: dict[str, Any] = {
        "identify_s": rounded(identify_s, 3),
        "identify_no_hash_s": rounded(no_hash_s, 4),
        "identify_cold_s": rounded(cold_s, 3),
        "rss_growth_mb": round(child["rss_growth_mb"], 1),
        "maxrss_growth_mb": round(child["maxrss_growth_mb"], 1),
        "sha256_mb_per_s": round(size_bytes / 1e6 / identify_s, 1) if identify_s else None,
        "size_bytes": size_bytes,
        "parameters_ok": child["parameters"] == parameters,
        "repeats": args.repeats,
        "samples_s": {
            k: [round(v, 4) for v in child[k]] for k in ("no_hash", "hashed", "hashed_cold")
        },
        "target_s": TARGET_S,
        "target_rss_mb": TARGET_RSS_MB,
        "machine": machine(),
    }
    result["pass"] = bool(
        result["parameters_ok"]
        and no_hash_s is not None
        and no_hash_s <= TARGET_S
        and result["rss_growth_mb"] <= TARGET_RSS_MB
    )
    rows: list[tuple[str, Any]] = [
        ("file", f"{size_bytes / 1e9:.2f} GB, {TENSORS} tensors, {parameters:,} parameters"),
        ("identify, hash=False (s)", result["identify_no_hash_s"]),
        ("identify with sha256, warm cache (s)", result["identify_s"]),
        ("identify with sha256, cold cache (s)", result["identify_cold_s"]),
        ("sha256 throughput, warm (MB/s)", result["sha256_mb_per_s"]),
        ("peak RSS growth (MB)", result["rss_growth_mb"]),
        ("target", f"identify <= {TARGET_S:g} s, RSS growth <= {TARGET_RSS_MB:g} MB"),
        ("pass", result["pass"]),
    ]
    emit(result, args.json, rows, f"bench_identify ({args.repeats} runs each)")
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
