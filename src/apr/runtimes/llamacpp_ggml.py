"""ctypes glue to llama-cpp-python's bundled ggml: the `ggml_tensor` struct, tensor reads, a quiet log.

llama-cpp-python binds the llama.h API but not ggml's structs, so `struct ggml_tensor` is declared here from
ggml.h of the vendored ggml (0.25.3, commit 0c1e570). That layout is why llama-cpp-python is pinned to
exactly `PINNED_VERSION`; `bind()` refuses any other version and checks the struct size against
`ggml_tensor_overhead()`. Element data is read with `ggml_backend_tensor_get`, which copies from any backend.
llama.cpp's log goes to `LogSink` while apr calls into it, never to stderr.

Nothing here knows about stages; `runtimes/llamacpp.py` maps node names to them.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import FeatureDisabledError, InferenceError

PINNED_VERSION: Final = "0.3.36"

# ggml.h constants of the pinned build.
GGML_MAX_DIMS: Final = 4
GGML_MAX_SRC: Final = 10
GGML_MAX_OP_PARAMS: Final = 64  # bytes
GGML_MAX_NAME: Final = 64
GGML_OBJECT_SIZE: Final = 32  # sizeof(struct ggml_object); ggml_tensor_overhead() = this + sizeof(tensor)
GGML_LOG_LEVEL_ERROR: Final = 4
GGML_LOG_LEVEL_CONT: Final = 5  # continues the previous message
GGML_TYPE_F32: Final = 0
GGML_TYPE_F16: Final = 1
GGML_TYPE_I32: Final = 26

# ggml_type id → numpy dtype of the node types a forward graph's activations use (I32: the MoE top-k ids,
# a view of an ARGSORT).
NODE_DTYPES: Final[dict[int, type[np.generic]]] = {
    GGML_TYPE_F32: np.float32,
    GGML_TYPE_F16: np.float16,
    GGML_TYPE_I32: np.int32,
}


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml.h, ggml 0.25.3): sizeof 336."""

    _fields_ = (
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),  # elements per dim, innermost first
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),  # strides in bytes
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    )


@dataclass(frozen=True, slots=True)
class Node:
    """A graph node as the eval callback sees it (before its data is read)."""

    address: int
    name: str
    op: str  # ggml_op_desc: "MUL_MAT", "ROPE", "SOFT_MAX", …
    srcs: tuple[int, ...]  # addresses of the input nodes

    def op_param_f32(self, index: int) -> float:
        """op_params[index] reinterpreted as float32 (SOFT_MAX keeps scale, max_bias there)."""
        raw = self.op_param_i32(index)
        return float(np.array([raw], dtype=np.int32).view(np.float32)[0])

    def op_param_i32(self, index: int) -> int:
        """op_params[index] as int32 (a GLU keeps its `swapped` flag at 1)."""
        return int(GgmlTensor.from_address(self.address).op_params[index])

    def src_at(self, index: int) -> int | None:
        """The address of input `index` (src[index]; `srcs` skips empty slots, this does not)."""
        return GgmlTensor.from_address(self.address).src[index] or None


class Ggml:
    """The bound library: llama_cpp's module plus the few ggml functions apr calls."""

    def __init__(self, llama_cpp: Any, libggml: ctypes.CDLL) -> None:
        self.llama_cpp = llama_cpp
        self._lib = libggml
        _signature(libggml.ggml_op_desc, [ctypes.c_void_p], ctypes.c_char_p)
        _signature(libggml.ggml_is_contiguous, [ctypes.c_void_p], ctypes.c_bool)
        _signature(libggml.ggml_nbytes, [ctypes.c_void_p], ctypes.c_size_t)
        _signature(libggml.ggml_tensor_overhead, [], ctypes.c_size_t)
        _signature(libggml.ggml_version, [], ctypes.c_char_p)
        _signature(libggml.ggml_commit, [], ctypes.c_char_p)
        args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        _signature(libggml.ggml_backend_tensor_get, args, None)

    @property
    def version(self) -> str:
        ggml = f"{self._lib.ggml_version().decode()} {self._lib.ggml_commit().decode()}"
        return f"llama-cpp-python {self.llama_cpp.__version__} (ggml {ggml})"

    def node(self, address: int) -> Node:
        t = GgmlTensor.from_address(address)
        name = t.name.decode(errors="replace")
        return Node(address, name, self._lib.ggml_op_desc(address).decode(), tuple(filter(None, t.src)))

    def is_leaf(self, address: int) -> bool:
        """A tensor no op computes (op NONE): a weight, or an input such as the row ids or the mask."""
        return bool(self._lib.ggml_op_desc(address) == b"NONE")

    def read(self, node: Node) -> npt.NDArray[np.float32]:
        """Copy an F32/F16/I32 node out of its backend buffer, as float32; numpy shape = ne reversed.

        A node that is not contiguous must be a view of one that is (ffn_moe_topk: the first k columns of
        the ARGSORT): the viewed tensor is copied whole and the view taken from it by its offset and strides.
        """
        t = GgmlTensor.from_address(node.address)
        dtype = NODE_DTYPES.get(t.type)
        if dtype is None:
            raise InferenceError(f"llama.cpp node {node.name} ({node.op}) is not F32/F16/I32")
        shape = tuple(reversed(t.ne))
        if self._lib.ggml_is_contiguous(node.address):
            out = np.empty(shape, dtype=dtype)
            self._lib.ggml_backend_tensor_get(node.address, out.ctypes.data, 0, out.nbytes)
            return out.astype(np.float32, copy=False)
        if not t.view_src or not self._lib.ggml_is_contiguous(t.view_src):
            raise InferenceError(f"llama.cpp node {node.name} ({node.op}) is not contiguous nor a view")
        whole = np.empty(self._lib.ggml_nbytes(t.view_src), dtype=np.uint8)
        self._lib.ggml_backend_tensor_get(t.view_src, whole.ctypes.data, 0, whole.nbytes)
        strides = tuple(reversed(t.nb))
        view = np.ndarray(shape, dtype=dtype, buffer=whole, offset=t.view_offs, strides=strides)
        return view.astype(np.float32)


def _signature(fn: Any, argtypes: list[Any], restype: Any) -> None:
    fn.argtypes = argtypes
    fn.restype = restype


class LogSink:
    """Receives llama.cpp's and ggml's log instead of stderr while apr runs; keeps the error lines.

    llama.cpp's logger is process-global: `capture()` installs this sink and puts the previous callback
    (llama-cpp-python's own, or none) back afterwards. The ctypes callback must outlive every call into
    llama.cpp — a collected one segfaults (oracles §4) — so there is one sink per process (see `bind`).
    """

    def __init__(self, llama_cpp: Any) -> None:
        self.errors: deque[str] = deque(maxlen=16)
        self._level = 0
        self._llama_cpp = llama_cpp
        self.callback = llama_cpp.llama_log_callback(self._log)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        llama_cpp = self._llama_cpp
        previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
        llama_cpp.llama_log_set(self.callback, None)
        try:
            yield
        finally:
            llama_cpp.llama_log_set(previous, user_data)

    def _log(self, level: int, text: bytes | None, _user_data: Any) -> None:
        if level != GGML_LOG_LEVEL_CONT:
            self._level = level
        if self._level == GGML_LOG_LEVEL_ERROR and text:
            line = text.decode(errors="replace").strip()
            if line:
                self.errors.append(line)

    def clear(self) -> None:
        self.errors.clear()

    def first_error(self) -> str:
        """The root cause among the errors since `clear()`, without its C function prefix."""
        if not self.errors:
            return "no error message from llama.cpp"
        return re.sub(r"^\w+: ", "", self.errors[0])


@cache  # once per process: the log sink's callback must stay alive (see LogSink)
def bind() -> tuple[Ggml, LogSink]:
    """Import llama_cpp, check the pin and the struct layout, silence its log."""
    try:
        llama_cpp = importlib.import_module("llama_cpp")
        libggml = importlib.import_module("llama_cpp._ggml").libggml
    except ImportError:
        raise FeatureDisabledError("--engine llama.cpp", "llamacpp") from None
    if llama_cpp.__version__ != PINNED_VERSION:
        what = (
            f"--engine llama.cpp (apr reads ggml structs of llama-cpp-python {PINNED_VERSION} "
            f"exactly; {llama_cpp.__version__} is installed)"
        )
        raise FeatureDisabledError(what, "llamacpp")
    ggml = Ggml(llama_cpp, libggml)
    overhead = libggml.ggml_tensor_overhead()
    if ctypes.sizeof(GgmlTensor) + GGML_OBJECT_SIZE != overhead:
        raise FeatureDisabledError(
            f"--engine llama.cpp (ggml_tensor_overhead() is {overhead}, apr's struct says "
            f"{ctypes.sizeof(GgmlTensor) + GGML_OBJECT_SIZE})",
            "llamacpp",
        )
    sink = LogSink(llama_cpp)
    with sink.capture():
        llama_cpp.llama_backend_init()
    return ggml, sink
