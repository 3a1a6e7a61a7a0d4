"""The local registry: versions over content-addressed blobs, durable, byte-exact exports."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hivenode.models.blobs import STRAY_TEMP_AGE
from hivenode.models.errors import ModelError
from hivenode.models.info import Framework, ModelInfo
from hivenode.models.registry import SCHEMA_VERSION, Registry, parse_spec
from hivenode.models.tarball import extract_tree


def weights_file(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    save_file({"fc.weight": rng.standard_normal((8, 4)).astype(np.float32)}, str(path))
    return path


def hf_directory(path: Path, seed: int = 0) -> Path:
    """A Hugging Face-like model directory with a nested folder and an empty one."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    weights_file(path / "model.safetensors", seed)
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (path / "empty").mkdir()
    return path


def info_for(framework: Framework = Framework.SAFETENSORS, sha256: str = "") -> ModelInfo:
    return ModelInfo(format="safetensors", framework=framework, parameters=32, sha256=sha256)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path → bytes (None for a directory)."""
    return {
        p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    opened = Registry(tmp_path / "state")
    yield opened
    opened.close()


# --- add, list, show, versions -----------------------------------------------------------


def test_a_file_is_stored_once_under_its_sha256(registry: Registry, tmp_path: Path) -> None:
    source = weights_file(tmp_path / "m.safetensors")

    model = registry.add(source, "mlp", info_for())

    assert (model.name, model.version, model.kind) == ("mlp", 1, "file")
    assert model.sha256 == sha256_of(source) == model.info.sha256
    assert model.size_bytes == source.stat().st_size
    assert registry.blob_path(model.sha256) == registry.state_dir / "blobs" / model.sha256
    assert registry.blob_path(model.sha256).read_bytes() == source.read_bytes()
    assert model.created.endswith("+00:00")


def test_adding_the_same_bytes_twice_returns_the_existing_version(
    registry: Registry, tmp_path: Path
) -> None:
    source = weights_file(tmp_path / "m.safetensors")
    first = registry.add(source, "mlp", info_for())

    again = registry.add(source, "mlp", info_for(), metrics={"accuracy": 0.5})
    identified = registry.add(source, "mlp", info_for(sha256=first.sha256))

    assert again == first == identified
    assert [v.version for v in registry.versions("mlp")] == [1]


def test_new_bytes_make_the_next_version_and_list_shows_the_latest(
    registry: Registry, tmp_path: Path
) -> None:
    registry.add(weights_file(tmp_path / "a.safetensors", seed=1), "mlp", info_for())
    registry.add(weights_file(tmp_path / "b.safetensors", seed=2), "mlp", info_for())
    registry.add(weights_file(tmp_path / "c.safetensors", seed=3), "cnn", info_for())

    assert [v.spec for v in registry.versions("mlp")] == ["mlp@1", "mlp@2"]
    assert [v.spec for v in registry.list()] == ["cnn@1", "mlp@2"]
    assert registry.show("mlp").version == 2
    assert registry.show("mlp", 1).sha256 == sha256_of(tmp_path / "a.safetensors")
    assert registry.resolve("mlp@1") == registry.show("mlp", 1)


def test_versions_are_never_reused_after_removal(registry: Registry, tmp_path: Path) -> None:
    registry.add(weights_file(tmp_path / "a.safetensors", seed=1), "mlp", info_for())
    registry.add(weights_file(tmp_path / "b.safetensors", seed=2), "mlp", info_for())
    registry.remove("mlp", 2)

    again = registry.add(weights_file(tmp_path / "c.safetensors", seed=3), "mlp", info_for())

    assert again.version == 3


def test_parent_and_metrics_are_kept(registry: Registry, tmp_path: Path) -> None:
    registry.add(weights_file(tmp_path / "a.safetensors", seed=1), "base", info_for())
    base = registry.add(weights_file(tmp_path / "b.safetensors", seed=2), "base", info_for())

    tuned = registry.add(
        weights_file(tmp_path / "c.safetensors", seed=3),
        "tuned",
        info_for(),
        parent="base",
        metrics={"accuracy": 0.91, "rounds": 10},
    )
    from_elsewhere = registry.add(
        weights_file(tmp_path / "d.safetensors", seed=4), "tuned", info_for(), parent="a" * 64
    )

    assert tuned.parent == base.spec == "base@2"  # resolved to the version of the moment
    assert registry.show("tuned", 1).metrics == {"accuracy": 0.91, "rounds": 10}
    assert from_elsewhere.parent == "a" * 64


def test_a_directory_is_stored_as_a_deterministic_tar(registry: Registry, tmp_path: Path) -> None:
    first = hf_directory(tmp_path / "one")
    second = hf_directory(tmp_path / "two")
    os.utime(second / "config.json", (1, 1))
    os.chmod(second / "tokenizer" / "vocab.txt", 0o600)

    a = registry.add(first, "bert", info_for(Framework.TRANSFORMERS, sha256="f" * 64))
    b = registry.add(second, "bert", info_for(Framework.TRANSFORMERS))

    assert a == b  # same tree: same hash, whatever the mtimes and permissions
    assert a.kind == "directory" and a.info.sha256 == a.sha256
    with tarfile.open(registry.blob_path(a.sha256)) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == [
        "config.json",
        "empty",
        "model.safetensors",
        "tokenizer",
        "tokenizer/vocab.txt",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_symlinked_files_are_stored_as_their_contents_and_linked_dirs_refused(
    registry: Registry, tmp_path: Path
) -> None:
    """Hugging Face cache snapshots are directories of symlinks into a blobs folder."""
    blob = weights_file(tmp_path / "cache-blob")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").symlink_to(blob)

    model = registry.add(snapshot, "bert", info_for(Framework.TRANSFORMERS))
    out = registry.export("bert", model.version, tmp_path / "out")

    assert not (out / "model.safetensors").is_symlink()
    assert (out / "model.safetensors").read_bytes() == blob.read_bytes()
    (snapshot / "linked").symlink_to(tmp_path / "out", target_is_directory=True)
    with pytest.raises(ModelError, match="symlinked directories"):
        registry.add(snapshot, "bert", info_for(Framework.TRANSFORMERS))


# --- export ------------------------------------------------------------------------------


def test_an_exported_file_is_byte_identical(registry: Registry, tmp_path: Path) -> None:
    source = weights_file(tmp_path / "m.safetensors")
    registry.add(source, "mlp", info_for())

    out = registry.export("mlp", 1, tmp_path / "out" / "copy.safetensors")

    assert out.read_bytes() == source.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["copy.safetensors"]


def test_an_exported_directory_is_the_same_tree(registry: Registry, tmp_path: Path) -> None:
    source = hf_directory(tmp_path / "bert")
    registry.add(source, "bert", info_for(Framework.TRANSFORMERS))

    out = registry.export("bert", None, tmp_path / "exported")

    assert tree(out) == tree(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "exported", "state"]


def test_export_refuses_an_existing_target(registry: Registry, tmp_path: Path) -> None:
    registry.add(weights_file(tmp_path / "m.safetensors"), "mlp", info_for())
    target = tmp_path / "taken"
    target.mkdir()

    with pytest.raises(ModelError, match="already exists"):
        registry.export("mlp", 1, target)


def test_a_corrupted_blob_is_not_exported(registry: Registry, tmp_path: Path) -> None:
    model = registry.add(weights_file(tmp_path / "m.safetensors"), "mlp", info_for())
    blob = registry.blob_path(model.sha256)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")

    with pytest.raises(ModelError, match="corrupted"):
        registry.export("mlp", 1, tmp_path / "out.safetensors")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "state"]


# --- remove ------------------------------------------------------------------------------


def test_a_blob_goes_with_the_last_version_that_uses_it(registry: Registry, tmp_path: Path) -> None:
    source = weights_file(tmp_path / "m.safetensors")
    shared = registry.add(source, "mlp", info_for())
    registry.add(source, "copy", info_for())

    removed = registry.remove("mlp")
    assert [m.spec for m in removed] == ["mlp@1"]
    assert registry.has_blob(shared.sha256)

    registry.remove("copy", 1)
    assert not registry.has_blob(shared.sha256)
    assert registry.list() == []


def test_remove_without_a_version_drops_every_version(registry: Registry, tmp_path: Path) -> None:
    registry.add(weights_file(tmp_path / "a.safetensors", seed=1), "mlp", info_for())
    registry.add(weights_file(tmp_path / "b.safetensors", seed=2), "mlp", info_for())

    assert [m.spec for m in registry.remove("mlp")] == ["mlp@1", "mlp@2"]
    assert list((registry.state_dir / "blobs").glob("[0-9a-f]*")) == []


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("mlp", ("mlp", None)), ("mlp@3", ("mlp", 3)), ("bert-base.v2_1@12", ("bert-base.v2_1", 12))],
)
def test_specs_parse(spec: str, expected: tuple[str, int | None]) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "mlp@", "mlp@0", "mlp@x", "@1", "a b", "m@1@2", "../x"])
def test_bad_specs_are_refused_with_the_expected_form(spec: str) -> None:
    with pytest.raises(ModelError, match="NAME@VERSION"):
        parse_spec(spec)


def test_unknown_names_and_versions_say_what_exists(registry: Registry, tmp_path: Path) -> None:
    registry.add(weights_file(tmp_path / "a.safetensors", seed=1), "mlp", info_for())
    registry.add(weights_file(tmp_path / "b.safetensors", seed=2), "mlp", info_for())

    with pytest.raises(ModelError, match=r"no model named 'nope'.*hivenode models list"):
        registry.show("nope")
    with pytest.raises(ModelError, match="mlp has no version 7; its versions are 1, 2"):
        registry.show("mlp", 7)
    with pytest.raises(ModelError, match="no model named"):
        registry.remove("nope")
    with pytest.raises(ModelError, match="parent nope@1: no model named"):
        registry.add(tmp_path / "a.safetensors", "child", info_for(), parent="nope@1")


def test_bad_input_to_add_is_refused(registry: Registry, tmp_path: Path) -> None:
    source = weights_file(tmp_path / "m.safetensors")

    with pytest.raises(ModelError, match="invalid model name"):
        registry.add(source, "has space", info_for())
    with pytest.raises(ModelError, match="no such file"):
        registry.add(tmp_path / "missing.pt", "mlp", info_for())
    with pytest.raises(ModelError, match="changed since it was identified"):
        registry.add(source, "mlp", info_for(sha256="0" * 64))
    with pytest.raises(ModelError, match="metrics"):
        registry.add(source, "mlp", info_for(), metrics={"when": object()})
    assert registry.list() == []


# --- durability --------------------------------------------------------------------------


def test_after_add_every_file_is_complete_and_a_reopened_registry_sees_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Registry(state) as registry:
        registry.add(weights_file(tmp_path / "m.safetensors"), "mlp", info_for())
        registry.add(hf_directory(tmp_path / "bert"), "bert", info_for(Framework.TRANSFORMERS))
        before = registry.list()

    leftovers = [p for p in state.rglob("*") if p.name.endswith(".tmp") or ".incoming-" in p.name]
    assert leftovers == []
    for blob in (state / "blobs").iterdir():
        assert sha256_of(blob) == blob.name
    with Registry(state) as reopened:
        assert reopened.list() == before
    database = sqlite3.connect(state / "registry.sqlite")
    assert database.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert database.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    database.close()


def test_a_registry_from_a_newer_hivenode_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Registry(state).close()
    database = sqlite3.connect(state / "registry.sqlite")
    database.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    database.close()

    with pytest.raises(ModelError, match="upgrade hivenode"):
        Registry(state)


def test_old_temp_files_from_a_crash_are_removed_but_fresh_ones_kept(tmp_path: Path) -> None:
    blobs = tmp_path / "state" / "blobs"
    blobs.mkdir(parents=True)
    stale, live = blobs / ".incoming-old.tmp", blobs / ".incoming-live.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"being written")
    old = time.time() - STRAY_TEMP_AGE - 10
    os.utime(stale, (old, old))

    Registry(tmp_path / "state").close()

    assert not stale.exists() and live.exists()


def test_concurrent_adds_to_one_name_get_distinct_versions(tmp_path: Path) -> None:
    sources = [weights_file(tmp_path / f"{i}.safetensors", seed=i) for i in range(8)]
    registries = [Registry(tmp_path / "state") for _ in range(2)]
    errors: list[BaseException] = []

    def add_half(index: int) -> None:
        try:
            for source in sources[index::2]:
                registries[index].add(source, "mlp", info_for())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add_half, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    versions = registries[0].versions("mlp")
    assert [v.version for v in versions] == list(range(1, 9))
    assert {v.sha256 for v in versions} == {sha256_of(s) for s in sources}
    for registry in registries:
        registry.close()


# --- blobs for transfers -----------------------------------------------------------------


def test_a_received_file_is_moved_in_only_when_its_hash_matches(
    registry: Registry, tmp_path: Path
) -> None:
    received = weights_file(tmp_path / "received.part")
    sha = sha256_of(received)

    with pytest.raises(ModelError, match="does not match its expected hash"):
        registry.put_blob_from_file(received, "0" * 64)
    assert received.exists() and not registry.has_blob("0" * 64)

    path = registry.put_blob_from_file(received, sha)

    assert path == registry.blob_path(sha) and registry.has_blob(sha)
    assert not received.exists()
    with registry.open_blob(sha) as handle:
        assert handle.read() == path.read_bytes()


def test_blob_names_must_be_sha256(registry: Registry) -> None:
    for bad in ("../registry.sqlite", "A" * 64, "abc"):
        with pytest.raises(ModelError, match="not a sha256"):
            registry.blob_path(bad)
    with pytest.raises(ModelError, match="is not in"):
        registry.open_blob("e" * 64)
    assert registry.partial_path("e" * 64).name == "e" * 64 + ".part"


def test_an_archive_reaching_outside_its_directory_is_refused(tmp_path: Path) -> None:
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as archive:
        member = tarfile.TarInfo("../escaped.txt")
        member.size = 4
        archive.addfile(member, io.BytesIO(b"evil"))
    payload.seek(0)

    with pytest.raises(ModelError, match="outside its directory"):
        extract_tree(payload, tmp_path / "out")

    assert not (tmp_path / "escaped.txt").exists()
