"""Bounded, typed JSON: the one way apr parses a JSON document it did not write in this process.

`load_json` reads at most `max_bytes`, refuses nesting deeper than `MAX_DEPTH` before the decoder recurses,
integers longer than `MAX_INT_DIGITS` digits, non-finite numbers (`NaN`, `Infinity`, `1e400`) and invalid
UTF-8, each as one FormatError naming the document. The `want_*` helpers give typed access to one key and
name it when the value has the wrong type (`"dtype": ["F32"]`, a config that is a bare string).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import numpy as np

from apr.errors import FormatError
from apr.formats.files import read_regular

MAX_DEPTH: Final = 64  # HF configs nest 3 deep, tokenizer.json 5; the stdlib decoder recurses per level
MAX_INT_DIGITS: Final = 40  # > any u128; Python's own limit (4300) raises a bare ValueError
MAX_JSON_BYTES: Final = 256 << 20  # a 256k-vocab tokenizer.json is ~20 MB
T = TypeVar("T")
_TYPE_NAMES: Final[dict[type, str]] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _depth(data: bytes) -> int:
    """Deepest [/{ nesting outside strings, in C-speed passes, so the decoder never meets a deep document."""
    b = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    steps = (b == ord("[")).astype(np.int32) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
    return int(np.cumsum(steps).max(initial=0))


_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_strings(doc: Any, where: str) -> None:
    """Refuse a string holding an unpaired UTF-16 surrogate (`"\\ud800"`): it cannot be encoded again."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise FormatError(f"{where} holds a string with an unpaired surrogate escape") from None


def _parse_int(where: str) -> Any:
    def parse(s: str) -> int:
        if len(s.lstrip("-")) > MAX_INT_DIGITS:
            raise FormatError(
                f"{where} holds an integer of {len(s.lstrip('-'))} digits (at most {MAX_INT_DIGITS})"
            )
        return int(s)

    return parse


def _parse_float(where: str) -> Any:
    def parse(s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            raise FormatError(f"{where} holds a number out of range for a 64-bit float: {s[:40]}")
        return v

    return parse


def _constant(where: str) -> Any:
    def parse(name: str) -> Any:
        raise FormatError(f"{where} is not valid JSON: non-standard constant {name}")

    return parse


def parse_json(raw: bytes | str, where: str, max_depth: int = MAX_DEPTH, pairs: Any = None) -> Any:
    """Decode one JSON document from `raw` under apr's bounds; `where` names it in every error."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where} is not valid UTF-8 (byte {e.start})") from None
    if (depth := _depth(data)) > max_depth:
        raise FormatError(f"{where} nests {depth} levels deep (at most {max_depth})")
    try:
        doc = json.loads(
            text,
            parse_int=_parse_int(where),
            parse_float=_parse_float(where),
            parse_constant=_constant(where),
            object_pairs_hook=pairs,
        )
    except json.JSONDecodeError as e:
        raise FormatError(f"{where} is not valid JSON: {e.msg} (char {e.pos})") from None
    except RecursionError:  # unreachable after the depth scan; kept so no decoder path escapes
        raise FormatError(f"{where} nests too deeply") from None
    if _SURROGATE_ESCAPE.search(data):
        _check_strings(doc, where)
    return doc


def load_json(path: Path, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Read and decode the JSON file at `path` (a regular file of at most `max_bytes`)."""
    return parse_json(read_regular(path, max_bytes), str(path), max_depth)


def load_object(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """`load_json` of a document that must be a JSON object."""
    doc = load_json(path, max_bytes)
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: must be a JSON object, found {type_name(doc)}")
    return doc


def want(d: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str) -> T:
    """`d[key]`, which must be present and of `kind` (bool is not an int here)."""
    if key not in d:
        raise FormatError(f"{where}: missing key '{key}'")
    return check(d[key], kind, f"{where}: '{key}'")


def maybe(d: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str, default: T) -> T:
    """`d[key]` of `kind`, or `default` when absent or null."""
    value = d.get(key)
    return default if value is None else check(value, kind, f"{where}: '{key}'")


def check(value: Any, kind: type[T] | tuple[type, ...], what: str) -> T:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise FormatError(f"{what} must be {names}, found {type_name(value)}")
    return cast(T, value)


def int_list(value: Any, what: str) -> list[int]:
    """A JSON array of integers (shapes, offsets, token ids)."""
    items = check(value, list, what)
    for i, v in enumerate(items):
        check(v, int, f"{what}[{i}]")
    return items
