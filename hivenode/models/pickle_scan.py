"""Read a pickle without running it: the globals it would import, and a symbolic tree of the
objects it would build, from `pickletools.genops` alone.

Nothing is imported and nothing is called: a GLOBAL becomes a `GlobalRef`, a REDUCE or NEWOBJ a
`Call` that records the callable and its arguments, a BUILD stores the state on that `Call`.
Interpreters (torch tensors, numpy arrays, scikit-learn estimators) then read the tree.

joblib files interleave raw numpy array bytes with the opcodes (each `NumpyArrayWrapper` is
followed by its array's bytes); with `joblib_arrays=True` the scanner steps over them, keeping
small arrays' bytes so their values can be read.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass
from typing import IO, Any, cast

from hivenode.models.errors import ModelError
from hivenode.models.pickle_allowlist import is_allowed, normalise
from hivenode.models.pickle_values import Call, GlobalRef, OutOfBandBuffer, Persistent, walk

__all__ = [
    "Call",
    "GlobalRef",
    "Persistent",
    "PickleScan",
    "scan_bytes",
    "scan_stream",
    "walk",
]

JOBLIB_WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"
MAX_OPCODES = 20_000_000
"""About half a minute of scanning; model pickles hold a few hundred thousand at most (array
bytes and torch storages are single opcodes or live outside the pickle)."""
KEEP_PAYLOAD_BYTES = 64 * 1024
"""joblib arrays up to this size keep their bytes (class labels and the like); larger ones are
skipped, only their size is recorded."""


@dataclass(frozen=True)
class PickleScan:
    root: Any
    globals: tuple[str, ...]
    """Every global the pickle names, in first-use order."""
    unsafe_globals: tuple[str, ...]
    """The globals outside the allow-list: loading the file would import (and maybe call) them."""
    opcodes: int


class _BoundedReader(io.RawIOBase):
    """Caps reads at the bytes that remain, so a forged length cannot make `read(n)` allocate
    `n` bytes before finding that the file is shorter."""

    def __init__(self, inner: IO[bytes], size: int) -> None:
        super().__init__()
        self._inner = inner
        self._end = size

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._inner.tell()

    def read(self, n: int | None = -1) -> bytes:
        remaining = max(self._end - self._inner.tell(), 0)
        if n is None or n < 0 or n > remaining:
            n = remaining
        return self._inner.read(n)

    def readline(self, limit: int | None = -1) -> bytes:
        return self._inner.readline(-1 if limit is None else limit)


def _stream_size(stream: IO[bytes]) -> int:
    here = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(here)
    return end


def scan_bytes(data: bytes, *, torchscript: bool = False) -> PickleScan:
    """Scan one pickle held in memory (torch's data.pkl, a small file)."""
    return scan_stream(io.BytesIO(data), torchscript=torchscript)


def scan_stream(
    stream: IO[bytes],
    *,
    torchscript: bool = False,
    joblib_arrays: bool = False,
    size: int | None = None,
) -> PickleScan:
    """Scan the pickle that starts at the stream's position; it is left just after its STOP.

    `size` bounds reads on streams that cannot seek (decompressors); ModelError on a truncated
    or malformed pickle.
    """
    if size is None:
        size = _stream_size(stream)
    machine = _Machine(_BoundedReader(stream, size), torchscript, joblib_arrays)
    root = machine.run()
    return PickleScan(
        root=root,
        globals=tuple(machine.globals),
        unsafe_globals=tuple(machine.unsafe),
        opcodes=machine.opcodes,
    )


class _Mark:
    pass


_CONTAINERS = {"collections.OrderedDict", "builtins.dict"}
_SETS = {"builtins.set", "builtins.frozenset"}


class _Machine:
    def __init__(self, reader: _BoundedReader, torchscript: bool, joblib_arrays: bool) -> None:
        self.reader = reader
        self.torchscript = torchscript
        self.joblib_arrays = joblib_arrays
        self.globals: dict[str, None] = {}
        self.unsafe: dict[str, None] = {}
        self.opcodes = 0

    def note_global(self, dotted: str) -> None:
        if dotted not in self.globals:
            self.globals[dotted] = None
            if not is_allowed(dotted, torchscript=self.torchscript):
                self.unsafe[dotted] = None

    def run(self) -> Any:
        try:
            return self._run()
        except ModelError:
            raise
        except (ValueError, IndexError, KeyError, TypeError, EOFError) as exc:
            raise ModelError(f"malformed pickle: {exc}") from exc

    def _run(self) -> Any:
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[int, Any] = {}

        def pop_mark() -> list[Any]:
            nonlocal stack
            items = stack
            stack = metastack.pop()
            return items

        for opcode, arg, _pos in pickletools.genops(cast(IO[bytes], self.reader)):
            self.opcodes += 1
            if self.opcodes > MAX_OPCODES:
                raise ModelError(f"pickle has more than {MAX_OPCODES} opcodes (refusing to scan)")
            name = opcode.name
            if name in ("PROTO", "FRAME", "READONLY_BUFFER"):
                continue
            if name == "STOP":
                if len(stack) != 1 or metastack:
                    raise ModelError("malformed pickle: STOP with an unbalanced stack")
                return stack[0]
            if name == "MARK":
                metastack.append(stack)
                stack = []
            elif name == "POP_MARK":
                pop_mark()
            elif name == "POP":
                stack.pop()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[cast(int, arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[cast(int, arg)])
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name == "NEXT_BUFFER":
                stack.append(OutOfBandBuffer())
            elif name == "BYTEARRAY8":
                stack.append(bytes(arg or b""))
            elif opcode.arg is not None and name not in _ARG_STRUCTURAL:
                stack.append(arg)  # ints, floats, strings, bytes
            elif name in ("EMPTY_LIST", "EMPTY_SET"):
                stack.append([])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = stack[-count:]
                del stack[-count:]
                stack.append(tuple(items))
            elif name in ("TUPLE", "FROZENSET"):
                items = pop_mark()  # before naming `stack`: pop_mark rebinds it
                stack.append(tuple(items))
            elif name == "LIST":
                items = pop_mark()
                stack.append(items)
            elif name == "DICT":
                items = pop_mark()
                stack.append(_pairs_to_dict(items))
            elif name == "APPEND":
                value = stack.pop()
                _append(stack[-1], [value])
            elif name in ("APPENDS", "ADDITEMS"):
                items = pop_mark()
                _append(stack[-1], items)
            elif name == "SETITEM":
                value = stack.pop()
                key = stack.pop()
                _setitems(stack[-1], [key, value])
            elif name == "SETITEMS":
                items = pop_mark()
                _setitems(stack[-1], items)
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                ref = self._global(module, attr)
                if name == "GLOBAL":
                    stack.append(ref)
                else:
                    items = pop_mark()
                    stack.append(Call(ref, tuple(items)))
            elif name == "STACK_GLOBAL":
                attr_value = stack.pop()
                module_value = stack.pop()
                if isinstance(module_value, str) and isinstance(attr_value, str):
                    stack.append(self._global(module_value, attr_value))
                else:
                    self.note_global("<computed global>")
                    stack.append(GlobalRef("<computed>", "global"))
            elif name in ("EXT1", "EXT2", "EXT4"):
                self.note_global(f"<copyreg extension {arg}>")
                stack.append(GlobalRef("<extension>", str(arg)))
            elif name == "REDUCE":
                args = stack.pop()
                func = stack.pop()
                stack.append(_reduce(func, args))
            elif name == "NEWOBJ":
                args = stack.pop()
                cls = stack.pop()
                stack.append(Call(cls, tuple(args) if isinstance(args, tuple | list) else ()))
            elif name == "NEWOBJ_EX":
                kwargs = stack.pop()
                args = stack.pop()
                cls = stack.pop()
                call_args = tuple(args) if isinstance(args, tuple | list) else ()
                stack.append(Call(cls, call_args, kwargs if isinstance(kwargs, dict) else None))
            elif name == "OBJ":
                items = pop_mark()
                stack.append(Call(items[0], tuple(items[1:])))
            elif name == "BUILD":
                state = stack.pop()
                target = stack[-1]
                if isinstance(target, Call):
                    target.state = state
                    if self.joblib_arrays and target.func_name == JOBLIB_WRAPPER:
                        self._skip_joblib_array(target)
            elif name == "PERSID":
                stack.append(Persistent(arg))
            elif name == "BINPERSID":
                stack.append(Persistent(stack.pop()))
            else:
                raise ModelError(f"malformed pickle: unsupported opcode {name}")
        raise ModelError("truncated pickle: the stream ended before its STOP opcode")

    def _global(self, module: str, attr: str) -> GlobalRef:
        dotted = normalise(module, attr)
        self.note_global(dotted)
        module_name, _, attr_name = dotted.rpartition(".")
        return GlobalRef(module_name, attr_name)

    def _skip_joblib_array(self, wrapper: Call) -> None:
        """Step over the array bytes joblib writes right after a wrapper's BUILD."""
        from hivenode.models.pickled_numpy import dtype_of  # numpy: only for joblib files

        state = wrapper.state if isinstance(wrapper.state, dict) else {}
        shape = state.get("shape")
        dtype = dtype_of(state.get("dtype"))
        if not isinstance(shape, tuple) or dtype is None:
            raise ModelError("joblib array wrapper without a readable shape and dtype")
        if dtype.hasobject:
            nested = _Machine(self.reader, self.torchscript, self.joblib_arrays)
            wrapper.nested = nested.run()
            for dotted in nested.globals:
                self.note_global(dotted)
            return
        if state.get("numpy_array_alignment_bytes") is not None:
            padding = self.reader.read(1)
            if len(padding) != 1:
                raise ModelError("truncated joblib file: ends inside an array's padding")
            self.reader.read(padding[0])
        count = 1
        for dim in shape:
            count *= int(dim)
        nbytes = count * dtype.itemsize
        wrapper.payload_size = nbytes
        if nbytes <= KEEP_PAYLOAD_BYTES:
            wrapper.payload = self.reader.read(nbytes)
            got = len(wrapper.payload)
        else:
            got = self._skip(nbytes)
        if got != nbytes:
            raise ModelError(
                f"truncated joblib file: an array of {nbytes} bytes has only {got} in the file"
            )

    def _skip(self, nbytes: int) -> int:
        """Skip `nbytes` by reading in chunks (decompressing streams cannot seek cheaply)."""
        left = nbytes
        while left:
            chunk = self.reader.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        return nbytes - left


# Opcodes that carry an argument but are not plain values pushed on the stack.
_ARG_STRUCTURAL = frozenset(
    {
        "GLOBAL",
        "INST",
        "PUT",
        "BINPUT",
        "LONG_BINPUT",
        "GET",
        "BINGET",
        "LONG_BINGET",
        "EXT1",
        "EXT2",
        "EXT4",
        "PERSID",
        "PROTO",
        "FRAME",
        "BYTEARRAY8",
    }
)


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        return f"<unhashable {type(key).__name__}>"
    return key


def _pairs_to_dict(items: list[Any]) -> dict[Any, Any]:
    return {_hashable(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _append(target: Any, items: list[Any]) -> None:
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, Call):
        target.items.extend(items)


def _setitems(target: Any, items: list[Any]) -> None:
    if isinstance(target, dict):
        target.update(_pairs_to_dict(items))
    elif isinstance(target, Call):
        target.entries.update(_pairs_to_dict(items))


def _reduce(func: Any, args: Any) -> Any:
    """A Call, except for the few callables whose result is plain data we can stand for."""
    if not isinstance(args, tuple):
        args = ()
    if isinstance(func, GlobalRef):
        dotted = func.dotted
        if dotted in _CONTAINERS and not args:
            return {}
        if dotted in _SETS:
            return list(args[0]) if args and isinstance(args[0], list | tuple) else []
        # Protocol-2 pickles spell bytes as _codecs.encode(text, "latin1").
        if (
            dotted == "_codecs.encode"
            and len(args) == 2
            and isinstance(args[0], str)
            and args[1] in ("latin1", "latin-1")
            and all(ord(c) < 256 for c in args[0])
        ):
            return args[0].encode("latin-1")
        if dotted == "builtins.bytes" and not args:
            return b""
    return Call(func, args)
