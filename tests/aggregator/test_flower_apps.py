"""Unmodified Flower apps on the swarm: two quickstart-style apps run through real nodes, and
their per-round accuracies equal those of Flower's own simulation engine.

The reference is Flower's simulation engine itself (its LinkState, InMemoryGrid, node and
context registration, message routing and worker loop) with one change: the ClientApp runs
in the engine's worker thread instead of a Ray actor. With Ray, the same comparison gives
the same numbers, but each run costs 25-45 s to start Ray on 2 cores.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.utils import LoadClientAppError
from flwr.common.config import get_fused_config_from_dir, get_project_config
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.run_serverapp import run as run_serverapp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig
from flwr.server.superlink.fleet.vce.metrics import VceMetrics
from flwr.server.superlink.fleet.vce.vce_api import (
    _register_node_info_stores,
    _register_nodes,
    run_api,
)
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_ref import load_app
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid
from swarm_helpers import local_swarm, wait_until

from hivenode.agent.flower_apps import allowed_client_apps
from hivenode.agent.flower_wire import node_id_of
from hivenode.agent.node import Node
from hivenode.agent.trainer import ClientAppLike, Trainer
from hivenode.aggregator.flower_app_runner import run_flower_app
from hivenode.aggregator.runner import JobError
from hivenode.models.flower_app import (
    FlowerAppError,
    content_hash,
    load_client_app,
    load_server_app,
    parse_run_config,
    read_flower_app,
)
from hivenode.protocol.advert import Role
from hivenode.sim.flower_app import run_flower_app_sim

APPS = Path(__file__).parent / "flower_apps"
APP_NAMES = ["quickstart_torch", "quickstart_sklearn"]
NODES = 3
ROUNDS = 3
# in-process trainers are threads, and `warnings.catch_warnings` in the sklearn app is not
# thread-safe (under Flower each ClientApp has a process of its own)
pytestmark = pytest.mark.filterwarnings("ignore:lbfgs failed to converge")


# --- the runs compared ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hivenode_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each app once through `hivenode sim flower-app`: the sim's result and the app's own."""
    runs = {}
    for name in APP_NAMES:
        saved = tmp_path_factory.mktemp(name) / "result.json"
        overrides = f'results-path="{saved}"'
        with loggers_kept("hivenode", "libp2p", "flwr"):  # the sim quiets them, as a CLI does
            sim = trio.run(run_flower_app_sim, APPS / name, NODES, overrides, 0)
        runs[name] = {"sim": sim, "app": json.loads(saved.read_text())["evaluate"]}
    return runs


@contextmanager
def loggers_kept(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    try:
        yield
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.propagate = propagate


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each app once through Flower's simulation engine: the app's own per-round metrics."""
    runs = {}
    for name in APP_NAMES:
        saved = tmp_path_factory.mktemp(f"flower-{name}") / "result.json"
        flower_simulation(APPS / name, NODES, {"results-path": str(saved)})
        runs[name] = json.loads(saved.read_text())["evaluate"]
    return runs


class InThreadBackend(Backend):
    """Flower's simulation backend without Ray: what its `ClientAppActor.run` does, in the
    engine's worker thread."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        assert self.app_fn is not None
        return self.app_fn()(message=message, context=context), context


def flower_simulation(app_dir: Path, supernodes: int, overrides: dict[str, Any]) -> None:
    """As `flwr run` on a local simulation federation (flwr.simulation.run_simulation's
    `_main_loop` with `is_app=True`), the backend aside."""
    run_id, task_id = 4242, 7
    state_factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    run = Run.create_empty(run_id)
    run.primary_task_id, run.federation_id = task_id, NOOP_FEDERATION_ID
    run.override_config = overrides
    state = cast(InMemoryLinkState, state_factory.state())
    state.run_ids[run_id] = RunRecord(run=run)
    state.task_store[task_id] = Task(task_id=task_id, run_id=run_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
        run_id,
        SUPERLINK_NODE_ID,
        task_id,
    )
    grid = InMemoryGrid(state_factory=state_factory)
    grid.set_run(run)
    components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
    client_app = load_app(components["clientapp"], LoadClientAppError, app_dir)
    nodes = _register_nodes(supernodes, state_factory)
    stores = _register_node_info_stores(nodes, run, app_dir=str(app_dir))
    stop = threading.Event()
    engine = threading.Thread(
        target=run_api,
        args=(
            lambda: client_app,
            lambda: InThreadBackend({}),
            nodes,
            state_factory,
            stores,
            stop,
            VceMetrics(),
        ),
    )
    engine.start()
    context = Context(
        run_id=run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(app_dir, overrides),
    )
    try:
        run_serverapp(grid, context, str(app_dir), components["serverapp"])
    finally:
        stop.set()
        engine.join()


# --- (a) and (b) ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", APP_NAMES)
def test_a_flower_app_trains_on_the_swarm(name: str, hivenode_runs: dict[str, Any]) -> None:
    sim = hivenode_runs[name]["sim"]
    rounds = sim["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["participants"] == NODES and r["failures"] == 0 for r in rounds)
    accuracy = [r["evaluate_metrics"]["eval_acc"] for r in rounds]
    assert accuracy[-1] > accuracy[0]
    assert all(r["bytes_out"] > 0 and r["bytes_in"] > 0 for r in rounds)
    assert sim["app"].startswith(f"flower:{sim['name']}@")
    assert type(sim["run_config"]["num-server-rounds"]) is int  # TOML types kept


@pytest.mark.parametrize("name", APP_NAMES)
def test_our_round_record_is_what_the_apps_strategy_aggregated(
    name: str, hivenode_runs: dict[str, Any]
) -> None:
    ours = {str(r["round"]): r["evaluate_metrics"] for r in hivenode_runs[name]["sim"]["rounds"]}
    theirs = hivenode_runs[name]["app"]
    assert ours.keys() == theirs.keys()
    for number, metrics in theirs.items():
        assert ours[number] == pytest.approx(metrics, abs=1e-12)


@pytest.mark.parametrize("name", APP_NAMES)
def test_per_round_accuracy_equals_flowers_simulation(
    name: str, hivenode_runs: dict[str, Any], flower_runs: dict[str, Any]
) -> None:
    ours, theirs = hivenode_runs[name]["app"], flower_runs[name]
    assert sorted(theirs) == [str(n) for n in range(1, ROUNDS + 1)]
    for number in theirs:
        assert ours[number]["eval_acc"] == pytest.approx(theirs[number]["eval_acc"], abs=1e-3)
        assert ours[number]["eval_loss"] == pytest.approx(theirs[number]["eval_loss"], abs=1e-3)


# --- (c) a trainer with another copy of the app ---------------------------------------------


def recording(app: ClientAppLike, seen: list[tuple[Any, ...]]) -> ClientAppLike:
    def run(message: Message, context: Context) -> Message:
        seen.append((message.metadata, dict(context.node_config), dict(context.run_config)))
        return app(message, context)

    return run


async def test_a_trainer_whose_copy_differs_refuses_the_app(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = read_flower_app(APPS / "quickstart_sklearn")
    digest = content_hash(app.root)
    changed = tmp_path / "changed-copy"
    shutil.copytree(app.root, changed, ignore=shutil.ignore_patterns("__pycache__"))
    with (changed / "quickstart_sklearn" / "task.py").open("a") as handle:
        handle.write("# a local edit\n")
    with caplog.at_level(logging.ERROR, logger="hivenode.agent.flower_apps"):
        refused = allowed_client_apps([(changed, digest)])
    assert refused == {}
    assert any("not serving" in r.message and digest in r.message for r in caplog.records)

    seen: list[tuple[Any, ...]] = []
    good = {k: recording(v, seen) for k, v in allowed_client_apps([(app.root, digest)]).items()}
    config = parse_run_config("num-server-rounds=2", app.config_defaults)
    async with flower_swarm(tmp_path, [good, good, refused, {}]) as (aggregator, peers):
        result = await run_flower_app(aggregator, app, "mixed", peers, config, tmp_path / "job")
        with pytest.raises(JobError, match=r"no trainer ran .*unknown_app"):
            await run_flower_app(aggregator, app, "refused", peers[2:], config, tmp_path / "j2")

    for record in result.rounds:
        assert record.participants == 2 and record.failures == 4  # 2 in train, 2 in evaluate
        assert "unknown_app" in record.errors[peers[2]]
    _check_what_flower_apps_were_given(seen, aggregator.peer_id, peers)


async def test_an_app_waiting_for_more_trainers_than_the_job_has_fails(tmp_path: Path) -> None:
    app = read_flower_app(APPS / "quickstart_sklearn")
    apps = allowed_client_apps([(app.root, content_hash(app.root))])
    config = parse_run_config("", app.config_defaults)
    async with flower_swarm(tmp_path, [apps]) as (aggregator, peers):
        # the app's FedAvg samples at least 2 nodes: under Flower it would wait for ever
        with pytest.raises(JobError, match=r"waited .* for more trainers than the 1"):
            await run_flower_app(
                aggregator, app, "alone", peers, config, tmp_path / "job", short_wait_s=2
            )


@asynccontextmanager
async def flower_swarm(
    tmp_path: Path, trainer_apps: list[dict[str, ClientAppLike]]
) -> AsyncIterator[tuple[Node, list[str]]]:
    """An aggregator and one trainer per entry, serving those apps; yields the trainers' ids."""
    async with local_swarm(tmp_path) as start:
        aggregator = await start("aggregator", roles=[Role.AGGREGATOR])
        peers = []
        for index, apps in enumerate(trainer_apps):
            node = await start(
                f"trainer{index}",
                bootstrap=[aggregator],
                roles=[Role.TRAINER],
                make_trainer=lambda state, peer, apps=apps: Trainer(state, peer, apps),
            )
            peers.append(node.peer_id)
        await wait_until(lambda: all(p in aggregator.peer_table for p in peers), 20, "joined")
        yield aggregator, peers


def _check_what_flower_apps_were_given(
    seen: list[tuple[Any, ...]], aggregator: str, peers: list[str]
) -> None:
    """Unique message ids, metadata as Flower's SuperLink sets it, Flower's node config."""
    metas = [meta for meta, _, _ in seen]
    assert len(metas) == 2 * 2 * 2  # 2 rounds of train and evaluate, on the 2 good trainers
    assert len({meta.message_id for meta in metas}) == len(metas)
    assert all(meta.message_id and meta.src_node_id == node_id_of(aggregator) for meta in metas)
    assert {meta.dst_node_id for meta in metas} == {node_id_of(p) for p in peers[:2]}
    assert len({meta.run_id for meta in metas}) == 1
    node_configs = {(c["partition-id"], c["num-partitions"]) for _, c, _ in seen}
    assert node_configs == {(0, len(peers)), (1, len(peers))}
    run_config = seen[0][2]
    assert run_config["num-server-rounds"] == 2 and run_config["penalty"] == "l2"


# --- (d) what is refused before anything runs ----------------------------------------------


def write_app(root: Path, pyproject: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(pyproject)
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


GOOD_HEAD = '[project]\nname = "app"\nversion = "1.0"\n'
COMPONENTS = '[tool.flwr.app.components]\nserverapp = "{pkg}.s:app"\nclientapp = "{pkg}.c:app"\n'


@pytest.mark.parametrize(
    ("pyproject", "message"),
    [
        (None, "has no pyproject.toml"),
        ("[project\n", "cannot read it"),
        ('[project]\nversion = "1"\n' + COMPONENTS, r"\[project\] needs a name"),
        (GOOD_HEAD, r"no \[tool.flwr.app.components\]"),
        (GOOD_HEAD + '[tool.flwr.app.components]\nserverapp = "p.s:app"\n', "has no clientapp"),
        (GOOD_HEAD + COMPONENTS.replace("{pkg}.s:app", "no-colon"), "not a reference"),
        (GOOD_HEAD + COMPONENTS + "[tool.flwr.app.config]\nx = [1]\n", "x must be a bool"),
    ],
)
def test_a_malformed_app_dir_is_refused_with_the_reason(
    tmp_path: Path, pyproject: str | None, message: str
) -> None:
    if pyproject is not None:
        write_app(tmp_path, pyproject.replace("{pkg}", "pkg"))
    with pytest.raises(FlowerAppError, match=message):
        read_flower_app(tmp_path)


@pytest.mark.parametrize(
    ("package", "client_module", "message"),
    [
        ("raising", "raise RuntimeError('no GPU here')", r"importing raising\.c .* no GPU here"),
        ("not_an_app", "app = None", "is not a flwr ClientApp"),
        ("no_app", "", "no_app.c has no attribute app"),
    ],
)
def test_an_app_that_does_not_load_is_refused_with_the_reason(
    tmp_path: Path, package: str, client_module: str, message: str
) -> None:
    files = {f"{package}/__init__.py": "", f"{package}/c.py": client_module}
    app = read_flower_app(write_app(tmp_path, GOOD_HEAD + COMPONENTS.format(pkg=package), files))
    with pytest.raises(FlowerAppError, match=message):
        load_client_app(app, content_hash(app.root))


def test_a_second_copy_of_a_loaded_app_is_refused(tmp_path: Path) -> None:
    original = read_flower_app(APPS / "quickstart_sklearn")
    load_server_app(original, content_hash(original.root))
    shutil.copytree(original.root, tmp_path / "copy", ignore=shutil.ignore_patterns("__pycache__"))
    copy = read_flower_app(tmp_path / "copy")
    with pytest.raises(FlowerAppError, match="already loaded from"):
        load_server_app(copy, content_hash(copy.root))


def test_an_app_changed_since_it_was_loaded_is_refused(tmp_path: Path) -> None:
    files = {"edited/__init__.py": "", "edited/c.py": "from flwr.clientapp import ClientApp\n"}
    files["edited/c.py"] += "app = ClientApp()\n"
    app = read_flower_app(write_app(tmp_path, GOOD_HEAD + COMPONENTS.format(pkg="edited"), files))
    load_client_app(app, content_hash(app.root))
    (tmp_path / "edited" / "c.py").write_text(files["edited/c.py"] + "# edited\n")
    with pytest.raises(FlowerAppError, match="changed since this process loaded it"):
        load_client_app(app, content_hash(app.root))


def test_the_content_hash_covers_the_files_not_the_caches(tmp_path: Path) -> None:
    root = write_app(tmp_path / "app", GOOD_HEAD, {"pkg/m.py": "x = 1\n"})
    first = content_hash(root)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    assert content_hash(root) == first
    (root / "pkg" / "m.py").write_text("x = 2\n")
    assert content_hash(root) != first
    (root / "pkg" / "m.py").write_text("x = 1\n")
    (root / "pkg" / "m.py").rename(root / "pkg" / "n.py")
    assert content_hash(root) != first  # a path is part of what is hashed


def test_run_config_overrides_keep_their_toml_types() -> None:
    defaults = {"num-server-rounds": 3, "lr": 0.1, "name": "a", "on": False, "fit.epochs": 1}
    merged = parse_run_config('num-server-rounds=5 lr=1 name="x y" on=true fit.epochs=2', defaults)
    assert merged == {"num-server-rounds": 5, "lr": 1, "name": "x y", "on": True, "fit.epochs": 2}
    assert type(merged["lr"]) is int  # as flwr: the value's TOML type, not the default's
    assert parse_run_config("", defaults) == defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds=3", "has no run-config key rounds"),
        ("name=x", "strings need quotes"),
        ("lr=nan", "must be finite"),
        ("lr 0.1", "cannot read 'lr 0.1'"),
    ],
)
def test_a_bad_run_config_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(FlowerAppError, match=message):
        parse_run_config(text, {"lr": 0.1, "name": "a"})
