"""Which globals a model pickle may import: anything else makes the file unsafe to load.

The rule is deliberately narrower than "torch.*" or "sklearn.*": a global named in a pickle
can be *called* by the REDUCE opcode with arguments from the file, so a whole package is only
as safe as its most dangerous function (`torch.hub.load`, `torch.fx` graph modules that exec
source, `sklearn.utils._testing` helpers that run scripts). Functions are therefore allowed by
exact name; classes (CapitalisedNames) by package, with a few subpackages denied outright.
"""

from __future__ import annotations

import re

# Python 2 names that protocol-2 pickles still write; pickle maps them on load.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_EXACT = frozenset(
    {
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "builtins.bytearray",
        "builtins.bytes",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.list",
        "builtins.dict",
        "builtins.tuple",
        "builtins.bool",
        "builtins.range",
        "builtins.object",
        "collections.OrderedDict",
        "collections.defaultdict",
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "copyreg.__newobj_ex__",
        "_codecs.encode",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.matrix",
        "numpy.memmap",
        "numpy.ma.core._mareconstruct",
        "numpy.ma.core.MaskedArray",
        "joblib.numpy_pickle.NumpyArrayWrapper",
        "torch.Size",
        "torch.device",
        "torch.Tensor",
        "torch.serialization._get_layout",
        "torch._tensor._rebuild_from_type_v2",
        "torch.nn.parameter.Parameter",
        "torch.nn.parameter.Buffer",
        "torch.nn.parameter.UninitializedParameter",
        "torch.nn.parameter.UninitializedBuffer",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
    }
)

_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        r"numpy\.(_core|core)\.multiarray\.(_reconstruct|scalar)",
        r"numpy\.(_core|core)\.numeric\._frombuffer",
        r"numpy\.dtypes\.\w+DType",
        r"numpy\.(float|int|uint|complex)(8|16|32|64|128|256)?|numpy\.(bool_?|str_|bytes_|void)",
        r"numpy\.random\._pickle\.__(randomstate|bit_generator|generator)_ctor",
        r"numpy\.random\.(_mt19937\.MT19937|_pcg64\.PCG64(DXSM)?|_philox\.Philox|_sfc64\.SFC64)",
        r"numpy\.random\.(mtrand\.RandomState|bit_generator\.SeedSequence|_generator\.Generator)",
        r"numpy\.random\.bit_generator\.__pyx_unpickle_SeedSequence",
        # Element-wise maths that FunctionTransformer and friends hold by reference.
        r"numpy\.((_core|core)\._multiarray_umath\.)?(log(1p|2|10)?|exp(m1|2)?|sqrt|cbrt|square"
        r"|abs(olute)?|negative|sign|(arc)?(sin|cos|tan)h?|floor|ceil|rint|trunc|reciprocal"
        r"|clip|maximum|minimum|add|subtract|multiply|divide|true_divide|power)",
        r"scipy\.sparse\.(_\w+\.)?\w+_(matrix|array)",
        r"torch\._utils\._rebuild_(tensor(_v2|_v3)?|parameter(_with_state)?|qtensor"
        r"|sparse_tensor|nested_tensor|meta_tensor_no_storage|wrapper_subclass"
        r"|device_tensor_from_numpy|device_tensor_from_cpu_tensor)",
        r"torch\.\w*Storage",
        r"torch\.(u?int\d+|float\d*(_\w+)?|bfloat16|complex\d+|bool|half|double|long|short"
        r"|cfloat|cdouble|chalf|q(u)?int\d+(x\d+)?|bits\w+)",
        r"torch\.(strided|sparse_\w+|_mkldnn|jagged|contiguous_format|channels_last(_3d)?"
        r"|preserve_format|per_\w+_affine|per_\w+_symmetric)",
        # Classes of torch.nn (modules, containers, quantised modules); functions excluded.
        r"torch\.(ao\.)?nn\.(modules|quantized|intrinsic|qat|utils\.parametrize)(\.\w+)*\.[A-Z]\w*",
        # Classes of scikit-learn; its functions are not needed to rebuild an estimator.
        r"sklearn(\.\w+)*\._?[A-Z]\w*",
        r"sklearn\.tree\._tree\.Tree|sklearn\._loss\.\w+\.\w+",
    )
)

_DENIED_PREFIXES = (
    "sklearn.utils._testing",
    "sklearn.datasets",
    "sklearn.externals",
    "sklearn.utils._show_versions",
)

# TorchScript archives name their compiled classes `__torch__.…`; the loader resolves them
# from the archive's TorchScript code, not by importing Python modules.
_TORCHSCRIPT = re.compile(r"__torch__(\.\w+)*|torch\.jit\._pickle\.\w+")


def normalise(module: str, name: str) -> str:
    """The dotted name Python 3's unpickler would import for a GLOBAL `module name`."""
    return f"{_PY2_MODULES.get(module, module)}.{name}"


def is_allowed(dotted: str, *, torchscript: bool = False) -> bool:
    """True when importing (and possibly calling) `dotted` from a model file is harmless."""
    if dotted.startswith(_DENIED_PREFIXES):
        return False
    if dotted in _EXACT:
        return True
    if torchscript and _TORCHSCRIPT.fullmatch(dotted):
        return True
    return any(pattern.fullmatch(dotted) for pattern in _PATTERNS)
