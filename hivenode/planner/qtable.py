"""The node's Q-table: ε-greedy choice over the swarm-merged values, the Q-learning update of
this node's own estimates, JSON persistence, and the import of the old pickled table.

Update (the original design's Q-learning rule) of this node's own estimate v of (s, a) after a
job that earned reward r:

    target = r + γ · max_a' Q(s', a')     (Q: the merged table; s' only if the job led to a
                                           next decision, else the episode ends: target = r)
    v      ← v + α_n · (target − v),      α_n = max(α, 1/n), n = this node's visits incl. this one

α_n = 1/n while that is above α makes the first estimates the running mean of the targets
instead of starting from 0: in a visit-weighted mean across origins, an origin's first visit
counts fully and must not drag the cell towards 0. Later visits use the constant α, which
keeps tracking a swarm whose speed changes.

Untried actions: a cell no node has visited holds no estimate, and greedy takes its value to be
the prior `Hyper.untried_value` (default 0: the reward of a job that just meets its reference,
see `planner.rewards`). Greedy therefore keeps a tried action while its mean beats the prior
and otherwise moves on to the next untried allowed action (in TIE_ORDER): optimistic initial
values (Sutton & Barto, *Reinforcement Learning*, §2.6), a systematic exploration on top of
ε's random draws. A tried action equal to the prior beats an untried one (evidence before
assumption), so −1, the lowest reward, makes greedy prefer every tried action. A modest
prior is deliberate: a prior near +1 leaves greedy on untried actions wherever a state saw
fewer jobs than it allows actions.

One exception: the allowed action TIE_ORDER puts first (the least coordination, mostly
single node) is tried once before a state settles on any other. A state's cells are shared by
jobs whose masks differ: one on which single node was masked (the model fitted no node) can
leave pipeline parallel at a good value, and without the exception every later job of that
state that single node would serve best went to the pipeline untried. `hivenode sim learn`
measured the exception at +0.04 oracle agreement and a third of the regret (see `sim.learn`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from hivenode.fsutil import atomic_write
from hivenode.models.errors import ModelError
from hivenode.models.pickle_scan import Call, scan_bytes
from hivenode.models.pickled_numpy import as_array
from hivenode.planner.crdt import MAX_ABS_VALUE, Cell, SwarmTable, Verify
from hivenode.planner.state import ACTIONS, TABLE_SHAPE, Action, PlannerError, State

LOCAL_ORIGIN = "local"
"""Own origin of a table made before the node had a peer id (`hivenode qtable import` with no
daemon); the daemon adopts its cells as its own (`QTable.load(..., origin=peer_id)`)."""
QTABLE_FILE = "qtable.json"
FORMAT = "hivenode-qtable"
FORMAT_VERSION = 1
TIE_ORDER: tuple[Action, ...] = (
    Action.SINGLE_NODE,
    Action.DATA_PARALLEL,
    Action.FEDERATED,
    Action.PIPELINE_PARALLEL,
    Action.MODEL_PARALLEL,
)
"""Equal Q-values (an unvisited state) go to the action that needs the least coordination."""
MAX_GAMMA = 1 - 1 / MAX_ABS_VALUE
IMPORTED_VISITS = 1
"""Weight of one legacy cell: the old table kept no visit counts."""
LEGACY_GLOBALS = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.numeric._frombuffer",
        "numpy._core.numeric._frombuffer",
        "numpy.ndarray",
        "numpy.dtype",
        "_codecs.encode",  # protocol ≤ 2 spells the array's bytes as a latin-1 string
    }
)
"""All a pickled float ndarray names (numpy 1 and 2, protocols 0-5); anything else is refused."""


@dataclass(frozen=True)
class Hyper:
    """Learning settings: exploration ε decays by `epsilon_decay` per choice down to
    `epsilon_min`; α is the learning rate, γ the discount; `untried_value` is the value
    greedy gives an action never tried in a state (see the module docstring)."""

    epsilon: float = 0.1
    epsilon_decay: float = 0.995
    epsilon_min: float = 0.01
    alpha: float = 0.1
    gamma: float = 0.9
    untried_value: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.epsilon_min <= 1 and 0 <= self.epsilon <= 1):
            raise PlannerError("epsilon and epsilon_min must lie in [0, 1]")
        if not -1 <= self.untried_value <= 1:  # a reward's range (planner.rewards); NaN fails
            raise PlannerError("untried_value must lie in [-1, 1], the range of a reward")
        # γ ≤ MAX_GAMMA keeps |Q| ≤ 1/(1−γ) within what gossip accepts (crdt.MAX_ABS_VALUE)
        if not (
            0 < self.epsilon_decay <= 1 and 0 < self.alpha <= 1 and 0 <= self.gamma <= MAX_GAMMA
        ):
            raise PlannerError(
                f"need 0 < epsilon_decay ≤ 1, 0 < alpha ≤ 1 and 0 ≤ gamma ≤ {MAX_GAMMA}"
            )


class QTable:
    """Decisions read the swarm-merged values; updates change only this node's cells."""

    def __init__(
        self,
        origin: str = LOCAL_ORIGIN,
        *,
        hyper: Hyper | None = None,
        seed: int | None = None,
        swarm: SwarmTable | None = None,
        epsilon: float | None = None,
    ) -> None:
        self.hyper = hyper or Hyper()
        self.epsilon = self.hyper.epsilon if epsilon is None else epsilon
        self.rng = np.random.default_rng(seed)
        self.swarm = swarm or SwarmTable(origin)

    @property
    def origin(self) -> str:
        return self.swarm.own_origin

    @property
    def values(self) -> npt.NDArray[np.float64]:
        return self.swarm.merged()[0]

    @property
    def visits(self) -> npt.NDArray[np.int64]:
        return self.swarm.merged()[1]

    def q_values(self, state: State) -> dict[Action, float]:
        row = self.values[state.index]
        return {action: float(row[i]) for i, action in enumerate(ACTIONS)}

    def visit_counts(self, state: State) -> dict[Action, int]:
        row = self.visits[state.index]
        return {action: int(row[i]) for i, action in enumerate(ACTIONS)}

    def effective_value(self, state: State, action: Action) -> float:
        """What greedy ranks `action` by: its merged Q, or `untried_value` with no visits."""
        values, visits = self.swarm.merged()
        key = (*state.index, ACTIONS.index(action))
        return float(values[key]) if visits[key] > 0 else self.hyper.untried_value

    def greedy(self, state: State, allowed: Sequence[Action]) -> Action:
        """TIE_ORDER's first allowed action while untried, else the allowed action of highest
        Q, an untried one counting as `untried_value`; on a tie a tried action first, then
        TIE_ORDER."""
        if not allowed:
            raise PlannerError("every action is masked: nothing to choose")
        visits = self.visit_counts(state)
        ordered = [a for a in TIE_ORDER if a in allowed]
        best = max(
            ordered,
            key=lambda a: (self.effective_value(state, a), visits[a] > 0, -TIE_ORDER.index(a)),
        )
        first = ordered[0]
        return first if visits[first] == 0 else best  # see the module docstring

    def choose(self, state: State, allowed: Sequence[Action]) -> tuple[Action, bool]:
        """ε-greedy: a uniformly drawn allowed action with probability ε (True: explored),
        else the greedy one; ε then decays towards its floor."""
        explore = bool(self.rng.random() < self.epsilon)
        floor = min(self.hyper.epsilon_min, self.epsilon)  # an ε set below the floor stays
        self.epsilon = max(floor, self.epsilon * self.hyper.epsilon_decay)
        if explore and allowed:
            ordered = [a for a in ACTIONS if a in allowed]
            return ordered[int(self.rng.integers(len(ordered)))], True
        return self.greedy(state, allowed), False

    def update(
        self,
        state: State,
        action: Action,
        reward: float,
        next_state: State | None = None,
        *,
        now: float | None = None,
    ) -> Cell:
        """Apply the module docstring's update; the new own cell (gossip it as a delta)."""
        if not -1.0 <= reward <= 1.0:  # NaN fails too
            raise PlannerError(f"reward {reward} outside [-1, 1] (see planner.rewards)")
        key = (*state.index, ACTIONS.index(action))
        own = self.swarm.cell(self.origin, key)
        visits = (own.visits if own else 0) + 1
        value = own.mean if own else 0.0
        target = float(reward)
        if next_state is not None:
            target += self.hyper.gamma * float(np.max(self.values[next_state.index]))
        value += max(self.hyper.alpha, 1 / visits) * (target - value)
        return self.swarm.set_own(key, visits, value, time.time() if now is None else now)

    def import_values(self, values: npt.NDArray[Any], now: float | None = None) -> int:
        """Adopt a legacy table's non-zero cells where this node has no experience of its own
        (IMPORTED_VISITS each); the number of cells taken."""
        if values.shape != TABLE_SHAPE:
            raise PlannerError(f"a Q-table has shape {TABLE_SHAPE}, not {values.shape}")
        stamp = time.time() if now is None else now
        taken = 0
        for index in zip(*np.nonzero(values), strict=True):
            key = tuple(int(i) for i in index)
            if self.swarm.cell(self.origin, key) is None:  # type: ignore[arg-type]
                self.swarm.set_own(key, IMPORTED_VISITS, float(values[key]), stamp)  # type: ignore[arg-type]
                taken += 1
        return taken

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "shape": list(TABLE_SHAPE),
            "actions": [a.value for a in ACTIONS],
            "hyper": asdict(self.hyper),
            "epsilon": self.epsilon,
            "swarm": self.swarm.to_json(),
        }

    @classmethod
    def from_json(
        cls,
        doc: Any,
        *,
        seed: int | None = None,
        verify: Verify | None = None,
    ) -> QTable:
        """A table `to_json` wrote; `verify` re-checks its kept signed messages (see crdt)."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise PlannerError(f"not a {FORMAT} document")
        if doc.get("version") != FORMAT_VERSION or doc.get("shape") != list(TABLE_SHAPE):
            raise PlannerError(f"unsupported Q-table version {doc.get('version')!r} or shape")
        try:
            settings = doc.get("hyper", {})
            if not isinstance(settings, dict):
                raise TypeError("hyper is not an object")
            known = {f.name for f in fields(Hyper)}  # a newer writer's extra settings are ignored
            hyper = Hyper(**{k: v for k, v in settings.items() if k in known})
            epsilon = float(doc.get("epsilon", hyper.epsilon))
        except (TypeError, ValueError) as exc:
            raise PlannerError(f"bad Q-table settings: {exc}") from exc
        swarm = SwarmTable.from_json(doc.get("swarm"), verify)
        return cls(hyper=hyper, seed=seed, swarm=swarm, epsilon=epsilon)

    def save(self, state_dir: Path) -> Path:
        """Write `qtable.json` atomically (a crash leaves the old table or the new one)."""
        path = state_dir / QTABLE_FILE
        atomic_write(path, json.dumps(self.to_json(), sort_keys=True).encode())
        return path

    @classmethod
    def load(
        cls,
        state_dir: Path,
        *,
        origin: str | None = None,
        seed: int | None = None,
        verify: Verify | None = None,
    ) -> QTable:
        """`qtable.json` from `state_dir`, or an empty table; `origin` (the node's peer id)
        becomes the own origin, adopting a placeholder table's cells."""
        path = state_dir / QTABLE_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(origin or LOCAL_ORIGIN, seed=seed)
        except OSError as exc:
            raise PlannerError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            table = cls.from_json(json.loads(text), seed=seed, verify=verify)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlannerError(f"{path} is not JSON: {exc}") from exc
        if origin is not None:
            table.swarm.own_origin = origin
            if origin != LOCAL_ORIGIN and LOCAL_ORIGIN in table.swarm.origins():
                table.swarm.rename_origin(LOCAL_ORIGIN, origin)
        return table


def read_legacy_pickle(data: bytes) -> npt.NDArray[np.float64]:
    """The float array of an old `q_table.pkl`, read without unpickling.

    The pickle's opcodes are interpreted symbolically (`models.pickle_scan`): nothing is
    imported and nothing is called. A file naming any global outside LEGACY_GLOBALS (a
    malicious `os.system`, any other object) is refused; the array is rebuilt from its raw
    bytes with `np.frombuffer`.
    """
    try:
        scan = scan_bytes(data)
    except ModelError as exc:
        raise PlannerError(f"not a readable pickle: {exc}") from exc
    foreign = [name for name in scan.globals if name not in LEGACY_GLOBALS]
    if foreign:
        raise PlannerError(f"refused: the pickle imports {', '.join(foreign)}, not just an array")
    info = as_array(scan.root)
    if info is None or info.raw is None or info.spec is None:
        raise PlannerError("refused: the pickle does not hold one numpy array")
    dtype = np.dtype(info.spec)
    if dtype.kind not in "fiu" or len(info.raw) != info.nbytes:
        raise PlannerError(f"refused: a {info.dtype} array, expected floats")
    values = np.frombuffer(info.raw, dtype=dtype).reshape(info.shape, order=_order(scan.root))
    if values.shape != TABLE_SHAPE:
        raise PlannerError(f"a legacy Q-table has shape {TABLE_SHAPE}, this one {values.shape}")
    if not np.all(np.abs(values) <= MAX_ABS_VALUE):  # NaN fails too
        raise PlannerError(f"refused: values must be finite and within ±{MAX_ABS_VALUE:g}")
    result: npt.NDArray[np.float64] = values.astype(np.float64)
    return result


def _order(root: Any) -> Literal["C", "F"]:
    """'F' for a Fortran-ordered array: `_reconstruct`'s state flag or `_frombuffer`'s order."""
    if isinstance(root, Call):
        if isinstance(root.state, tuple) and len(root.state) > 3 and root.state[3] is True:
            return "F"
        if len(root.args) > 3 and root.args[3] == "F":
            return "F"
    return "C"
