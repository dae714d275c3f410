"""Structure-aware mutators: byte-level (for the binary formats) and JSON-value (for every JSON document).

Byte mutations favour the places parsers trust: little-endian length and count fields get boundary values
(0, -1, 2^31, 2^63, the file size), and runs of bytes are flipped, cut, duplicated or spliced. JSON
mutations pick one value anywhere in the document and replace it with something hostile: deep nesting, a
5,000-digit integer, 1e400, a wrong type, a negative or huge dimension, a path out of the directory.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any, Final

INTERESTING: Final = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 1 << 31, (1 << 32) - 1, 1 << 32,
                      1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)  # fmt: skip
HOSTILE_JSON: Final[tuple[Callable[[random.Random], Any], ...]] = (
    lambda r: None,
    lambda r: True,
    lambda r: "",
    lambda r: "F32",
    lambda r: ["F32"],
    lambda r: {},
    lambda r: [],
    lambda r: -1,
    lambda r: 0,
    lambda r: r.choice(INTERESTING),
    lambda r: -(1 << 63),
    lambda r: 2.5,
    lambda r: "../../etc/passwd",
    lambda r: "/dev/zero",
    lambda r: "\x00",
    lambda r: [1 << 63, 0],
    lambda r: [0] * r.randint(0, 9),
    lambda r: "x" * r.randint(0, 300),
    lambda r: {"type": "Sequence", "processors": [{}]},
)
RAW_JSON: Final = ("[" * 5000 + "]" * 5000, "9" * 5000, "1e400", "-1e400", "NaN", "Infinity", '"\\ud800"')
_RAW_MARK: Final = "\x00apr-fuzz-raw-{}\x00"


def mutate_bytes(data: bytes, r: random.Random, n: int | None = None) -> bytes:
    """1–4 byte-level mutations of `data`."""
    b = bytearray(data)
    for _ in range(n or r.randint(1, 4)):
        op = r.randrange(8)
        at = r.randrange(len(b) + 1) if b else 0
        if op == 0 and b:  # flip a bit
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8)
        elif op == 1 and len(b) >= 8:  # a boundary value into a (probably) length/count field
            i = r.randrange(len(b) - 7) & ~3 if r.random() < 0.7 else r.randrange(len(b) - 7)
            fmt = r.choice(("<Q", "<I", "<i", "<q", "<H"))
            size = struct.calcsize(fmt)
            v = r.choice(INTERESTING) if r.random() < 0.8 else len(b) + r.randint(-16, 16)
            bits = 8 * size
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if fmt[1].islower() else (0, (1 << bits) - 1)
            b[i : i + size] = struct.pack(fmt, max(lo, min(hi, v)))
        elif op == 2:  # truncate
            del b[r.randrange(len(b) + 1) :]
        elif op == 3 and b:  # delete a run
            del b[at : at + r.randint(1, 64)]
        elif op == 4:  # insert random bytes
            b[at:at] = r.randbytes(r.randint(1, 32))
        elif op == 5 and b:  # duplicate a run
            run = b[at : at + r.randint(1, 64)]
            b[at:at] = run
        elif op == 6 and b:  # a random byte
            b[r.randrange(len(b))] = r.randrange(256)
        elif op == 7 and b:  # overwrite a run with one byte value
            b[at : at + r.randint(1, 16)] = bytes([r.choice((0, 0xFF, 0x7F, 0x80))]) * r.randint(1, 16)
    return bytes(b)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):  # a vocab of 50,000 entries: sample its head
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return doc


def mutate_json(text: bytes, r: random.Random) -> bytes:
    """One JSON-value mutation (or, for a document that no longer parses, a byte-level one)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return mutate_bytes(text, r)
    path = r.choice(_paths(doc))
    roll = r.random()
    raw: list[str] = []
    if roll < 0.2:
        raw.append(r.choice(RAW_JSON))
        value: Any = _RAW_MARK.format(0)
    elif roll < 0.3 and path:
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict):
            del parent[path[-1]]  # a missing key
            return json.dumps(doc, ensure_ascii=False).encode()
        value = r.choice(HOSTILE_JSON)(r)
    else:
        value = r.choice(HOSTILE_JSON)(r)
    out = json.dumps(_set(doc, path, value), ensure_ascii=False)
    for i, s in enumerate(raw):
        out = out.replace(json.dumps(_RAW_MARK.format(i)), s)
    return out.encode("utf-8", "surrogatepass")
