"""The JSON metadata of an .apr v2 file: serde-compatible encoding, its key tables, and what we read.

aprender serializes `AprV2Metadata` with serde_json: compact, UTF-8 with non-ASCII unescaped, the typed
keys in struct field order (`TYPED_KEYS`), unset optional keys omitted except those in `ALWAYS`, nested
structs with all their fields, then the flattened `custom` map. That map is a Rust HashMap (random
order), so we sort it bytewise, as serde_json sorts nested objects: one metadata dict has exactly one
encoding. Floats print as Rust's ryu does (`1e-6` as f32 → `0.000001`, `1e16` → `1e16`);
`rope_theta` and `rms_norm_eps` are f32 fields, every other float is f64.

realizar reads some keys under aliases (`ALIASES`). A file that spells one field twice (`hidden_size`
and `hidden_dim`) makes realizar's serde fail with "duplicate field", and realizar then silently runs
with empty metadata. So the writer refuses alias spellings; the reader accepts them (canonical key
first, then aliases in table order) and reports the collision in `warnings`.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

import numpy as np

from apr.errors import FormatError
from apr.formats.aprcodec import MAX_METADATA_SIZE
from apr.formats.base import TokenizerSpec
from apr.formats.jsonio import parse_json

# AprV2Metadata fields in declaration (= serialization) order -> value kind.
TYPED_KEYS: Final[dict[str, str]] = {
    **dict.fromkeys(("model_type", "name", "description", "author"), "str"),
    **dict.fromkeys(("license", "data_source", "data_license"), "str"),
    **dict.fromkeys(("version", "source", "original_format", "created_at"), "str"),
    **dict.fromkeys(("total_size", "param_count"), "uint"),
    **dict.fromkeys(("quantization", "sharding"), "struct"),
    **dict.fromkeys(("chat_template", "chat_format"), "str"),
    "special_tokens": "struct",
    **dict.fromkeys(("architecture", "hf_architecture", "hf_model_type"), "str"),
    **dict.fromkeys(("hidden_size", "num_layers", "num_heads", "num_kv_heads"), "uint"),
    **dict.fromkeys(("vocab_size", "intermediate_size", "max_position_embeddings"), "uint"),
    "rope_theta": "f32",
    "rope_type": "uint",
    "rms_norm_eps": "f32",
    **dict.fromkeys(("head_dim", "num_experts", "num_experts_per_tok"), "uint"),
    "moe_intermediate_size": "uint",
}
# Serialized even when unset (serde `default` without `skip_serializing_if`), with this value.
ALWAYS: Final[dict[str, object]] = {
    "model_type": "",
    **dict.fromkeys(("license", "data_source", "data_license")),
    "total_size": 0,
    "param_count": 0,
}
STRUCT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "quantization": ("quant_type", "bits", "block_size", "symmetric"),
    "sharding": ("shard_count", "shard_index", "total_size", "pattern"),
    "special_tokens": (
        *("bos_token", "eos_token", "unk_token"),
        *("pad_token", "im_start_token", "im_end_token"),
    ),
}
# realizar AprMetadata serde aliases (+ AprTransformer's num_key_value_heads), spec §7.7.
ALIASES: Final[dict[str, tuple[str, ...]]] = {
    "hidden_size": ("hidden_dim", "d_model", "n_embd"),
    "num_layers": ("n_layers", "num_hidden_layers", "n_layer"),
    "num_heads": ("n_heads", "num_attention_heads", "n_head"),
    "num_kv_heads": ("n_kv_heads", "num_key_value_heads"),
    "vocab_size": ("n_vocab",),
    "intermediate_size": ("ffn_dim", "intermediate_dim", "n_inner"),
    "max_position_embeddings": ("max_seq_len", "context_length", "n_ctx"),
    "rms_norm_eps": ("layer_norm_eps", "norm_eps"),
}
ALIAS_OF: Final[dict[str, str]] = {a: key for key, aliases in ALIASES.items() for a in aliases}

IMPORT_DESCRIPTION: Final = "GGUF Q4_K model imported with native quantization"  # aprender's, verbatim


# --- encoding ----------------------------------------------------------------------------------


def serde_float(x: float, *, f32: bool = False) -> str:
    """`x` as serde_json prints an f64 (or, with `f32`, an f32): ryu's shortest digits and layout."""
    if not math.isfinite(x):
        raise FormatError(f"metadata value {x} is not finite (JSON has no NaN or infinity)")
    v = np.float32(x) if f32 else np.float64(x)
    if v == 0:
        return "-0.0" if math.copysign(1.0, float(v)) < 0 else "0.0"
    sci = np.format_float_scientific(v, unique=True, trim="-", exp_digits=1)
    sign, sci = ("-", sci[1:]) if sci.startswith("-") else ("", sci)
    mantissa, exp = sci.split("e")
    digits = mantissa.replace(".", "")
    kk = int(exp) + 1  # 10^(kk-1) <= |v| < 10^kk
    k = kk - len(digits)
    limit, low = (13, -6) if f32 else (16, -5)
    if k >= 0 and kk <= limit:
        body = digits + "0" * k + ".0"
    elif 0 < kk <= limit:
        body = f"{digits[:kk]}.{digits[kk:]}"
    elif low < kk <= 0:
        body = "0." + "0" * -kk + digits
    else:
        body = f"{digits[0]}{'.' if len(digits) > 1 else ''}{digits[1:]}e{kk - 1}"
    return sign + body


def _dump(value: object, *, f32: bool = False) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        if not -(2**63) <= int(value) < 2**64:
            raise FormatError(f"metadata integer {value} does not fit in 64 bits")
        return str(int(value))
    if isinstance(value, float | np.floating):
        return serde_float(float(value), f32=f32)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda k: str(k).encode())
        return "{" + ",".join(f"{_dump(str(k))}:{_dump(value[k])}" for k in keys) + "}"
    if isinstance(value, list | tuple | np.ndarray):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    raise FormatError(f"metadata value of type {type(value).__name__} has no JSON form")


_KIND_OK: Final[dict[str, Callable[[object], bool]]] = {
    "str": lambda v: isinstance(v, str),
    "uint": lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool) and int(v) >= 0,
    "f32": lambda v: isinstance(v, int | float | np.number) and not isinstance(v, bool),
    "struct": lambda v: isinstance(v, Mapping),
}


def _typed(key: str, value: object) -> str:
    kind = TYPED_KEYS[key]
    if value is None:
        return "null"
    if not _KIND_OK[kind](value):
        raise FormatError(f"metadata '{key}' must be {kind}, found {_short(value)}")
    if isinstance(value, Mapping):
        if unknown := set(value) - set(STRUCT_FIELDS[key]):
            raise FormatError(f"metadata '{key}' has unknown fields {sorted(unknown)}")
        return "{" + ",".join(f'"{f}":{_dump(value.get(f))}' for f in STRUCT_FIELDS[key]) + "}"
    return _dump(value, f32=kind == "f32")


def ordered(meta: Mapping[str, object]) -> dict[str, object]:
    """`meta` in serialization order: typed keys in field order, then custom keys bytewise."""
    custom = sorted((k for k in meta if k not in TYPED_KEYS), key=str.encode)
    return {k: meta[k] for k in (*(k for k in TYPED_KEYS if k in meta), *custom)}


def encode_metadata(meta: Mapping[str, object]) -> bytes:
    """The compact JSON aprender's serde would write for `meta`; refuses alias spellings."""
    if aliases := sorted(k for k in meta if k in ALIAS_OF):
        k = aliases[0]
        raise FormatError(
            f"metadata key '{k}' is realizar's alias of '{ALIAS_OF[k]}': write '{ALIAS_OF[k]}' "
            "only (realizar drops all metadata of a file that spells a field twice)"
        )
    members = []
    for key in TYPED_KEYS:
        value = meta.get(key)
        if value is not None or key in ALWAYS:
            members.append(f'"{key}":{_typed(key, ALWAYS.get(key) if value is None else value)}')
    custom = sorted((k for k in meta if k not in TYPED_KEYS), key=str.encode)
    members += [f"{_dump(k)}:{_dump(meta[k])}" for k in custom]
    try:
        out = ("{" + ",".join(members) + "}").encode()
    except UnicodeEncodeError as e:
        raise FormatError(f"metadata holds a string that is not valid Unicode: {e.reason}") from None
    if len(out) > MAX_METADATA_SIZE:
        raise FormatError(f"metadata is {len(out)} bytes, over the 16 MiB limit of the format")
    return out


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- decoding ----------------------------------------------------------------------------------

_JSON_TYPE: Final[dict[type, str]] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def decode_metadata(raw: bytes, where: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The metadata object and warnings about it (duplicate keys, alias collisions)."""
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                duplicates.append(k)
            out[k] = v
        return out

    meta = parse_json(raw, f"{where}: metadata", pairs=pairs)
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: metadata must be a JSON object, found {_json_type(meta)}")
    warnings = [f"metadata repeats key '{k}' (the last value wins)" for k in duplicates]
    for key, aliases in ALIASES.items():
        if len(spelled := [k for k in (key, *aliases) if k in meta]) > 1:
            warnings.append(
                f"metadata spells '{key}' {len(spelled)} ways ({', '.join(spelled)}): realizar "
                "fails on the duplicate field and runs this file with empty metadata"
            )
    return meta, tuple(warnings)


def _json_type(value: object) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


class _Reader:
    """Typed look-ups in decoded metadata; a canonical key also answers to its aliases."""

    def __init__(self, meta: Mapping[str, Any], where: str) -> None:
        self.meta, self.where = meta, where

    def get(self, key: str) -> tuple[str, Any]:
        for k in (key, *ALIASES.get(key, ())):
            if self.meta.get(k) is not None:
                return k, self.meta[k]
        return key, None

    def _fail(self, key: str, want: str, value: object) -> FormatError:
        found = f"{_json_type(value)} {_short(value)}"
        return FormatError(f"{self.where}: metadata '{key}' must be {want}, found {found}")

    def uint(self, key: str) -> int | None:
        k, v = self.get(key)
        if v is not None and (type(v) is not int or v < 0):
            raise self._fail(k, "a non-negative integer", v)
        return v

    def real(self, key: str) -> float | None:
        k, v = self.get(key)
        if v is not None and type(v) not in (int, float):
            raise self._fail(k, "a number", v)
        if v is None:
            return None
        return float(np.float32(v)) if TYPED_KEYS.get(key) == "f32" else float(v)  # as realizar

    def text(self, key: str) -> str | None:
        k, v = self.get(key)
        if v is not None and not isinstance(v, str):
            raise self._fail(k, "a string", v)
        return v

    def flag(self, key: str) -> bool | None:
        k, v = self.get(key)
        if v is not None and not isinstance(v, bool):
            raise self._fail(k, "true or false", v)
        return v

    def items(self, key: str, item: type, want: str) -> tuple[Any, ...]:
        k, v = self.get(key)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(type(x) is item for x in v):
            raise self._fail(k, want, v)
        return tuple(v)

    def require(self, key: str, fallback: int | None) -> int:
        if (value := self.uint(key)) is not None or (value := fallback) is not None:
            return value
        spellings = ", ".join(f"'{k}'" for k in (key, *ALIASES.get(key, ())))
        raise FormatError(f"{self.where}: metadata has no {spellings} and no tensor implies it")


class AprSource:
    """.apr metadata as a ConfigSource: `get(key)` finds the canonical key, else its realizar aliases (in
    table order); values as stored in the JSON."""

    def __init__(self, meta: Mapping[str, Any], where: str) -> None:
        self.kind = "apr"
        self.meta = meta
        self.where = where
        arch = _Reader(meta, where).text("architecture") or _Reader(meta, where).text("model_type") or ""
        self.architecture = arch.lower()

    def get(self, key: str) -> Any:
        """A key (or a realizar alias of it), or a dotted path into nested objects."""
        head, *rest = key.split(".") if key not in self.meta else (key,)
        value = _Reader(self.meta, self.where).get(head)[1]
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else None
        if TYPED_KEYS.get(key) == "f32" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(np.float32(value))  # what aprender's f32 field holds
        return value

    def keys(self) -> Collection[str]:
        return self.meta.keys()


# .apr keys apr adds for SentencePiece vocabs (aprender has tokenizer.scores; the rest are custom keys)
CHARSMAP_KEY: Final = "tokenizer.precompiled_charsmap_base64"  # UGM's normalization rules
APR_FIM_KEYS: Final = {m: f"tokenizer.fim_{m}_token_id" for m in ("pre", "suf", "mid", "pad", "rep", "sep")}
# llama.cpp's defaults for a SentencePiece vocab that leaves a key out: bos, eos, add_bos, add_space_prefix
_SPM_DEFAULTS: Final = (1, 2, True, True)


def tokenizer_from_metadata(meta: Mapping[str, Any], where: str) -> TokenizerSpec | None:
    """The embedded tokenizer (`tokenizer.*` keys), or None when the file has no vocabulary.

    A SentencePiece vocab ("llama") without add_bos / add_space_prefix / BOS / EOS keys gets llama.cpp's
    defaults, as its GGUF would.
    """
    r = _Reader(meta, where)
    tokens = r.items("tokenizer.vocabulary", str, "an array of strings")
    if not tokens:
        return None
    merges = r.items("tokenizer.merges", str, 'an array of "a b" strings')
    model = r.text("tokenizer.model") or r.text("tokenizer.model_type") or ("gpt2" if merges else "llama")
    bos, eos, add_bos, add_prefix = _SPM_DEFAULTS if model == "llama" else (None, None, False, False)
    k, scores = r.get("tokenizer.scores")
    if scores is not None and (
        not isinstance(scores, list) or not all(type(x) in (int, float) for x in scores)
    ):
        raise r._fail(k, "an array of numbers", scores)
    fim = {m: v for m, key in APR_FIM_KEYS.items() if (v := r.uint(key)) is not None}
    return TokenizerSpec(
        model=model,
        pre=r.text("tokenizer.pre_type") or "default",
        tokens=tokens,
        merges=merges,
        token_types=r.items("tokenizer.token_type", int, "an array of integers"),
        bos_id=_first(r.uint("tokenizer.bos_token_id"), bos),
        eos_id=_first(r.uint("tokenizer.eos_token_id"), eos),
        add_bos=bool(_first(r.flag("tokenizer.add_bos_token"), add_bos)),
        chat_template=r.text("tokenizer.chat_template") or r.text("chat_template"),
        add_eos=bool(r.flag("tokenizer.add_eos_token")),
        scores=tuple(np.asarray(scores, dtype=np.float32).tolist()) if scores else (),
        add_space_prefix=bool(_first(r.flag("tokenizer.add_space_prefix"), add_prefix)),
        fim_ids=fim,
        model_name=r.text("tokenizer.model_name"),
        unk_id=r.uint("tokenizer.unknown_token_id"),
        sep_id=r.uint("tokenizer.separator_token_id"),
        lowercase=r.flag("tokenizer.normalizer_lowercase"),
        strip_accents=r.flag("tokenizer.normalizer_strip_accents"),
        remove_extra_whitespaces=bool(r.flag("tokenizer.remove_extra_whitespaces")),
        precompiled_charsmap=_charsmap(r),
    )


def _charsmap(r: _Reader) -> bytes:
    text = r.text(CHARSMAP_KEY)
    if text is None:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise r._fail(CHARSMAP_KEY, "base64 text", text[:32]) from None


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def summary(meta: Mapping[str, Any], limit: int = 16) -> dict[str, Any]:
    """`meta` with big values (vocabularies, merges, shape tables, templates) replaced by a note."""

    def small(v: Any) -> Any:
        if isinstance(v, list | dict) and len(v) > limit:
            return f"<{len(v)} {'items' if isinstance(v, list) else 'keys'}>"
        if isinstance(v, str) and len(v) > 256:
            return f"<{len(v)} characters>"
        return v

    return {k: small(v) for k, v in meta.items()}
