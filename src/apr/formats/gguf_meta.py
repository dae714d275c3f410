"""GGUF metadata as a ConfigSource and a TokenizerSpec: the tokenizer keys apr reads, as named constants.

`Metadata` gives typed, checked access to the parsed fields (a wrong value type is a FormatError naming
the key). Which `{arch}.*` keys a model has and what they mean is each family's business (apr.models):
this module only hands them over (`GGUFSource`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.gguf_parse import FLOAT_TYPES, INT_TYPES, Field, ValueType
from apr.formats.gguf_strings import StringArray

# ---- metadata keys ------------------------------------------------------------------------------
ARCH: Final = "general.architecture"
TOKENIZER_MODEL: Final = "tokenizer.ggml.model"
TOKENIZER_PRE: Final = "tokenizer.ggml.pre"
TOKENS: Final = "tokenizer.ggml.tokens"
MERGES: Final = "tokenizer.ggml.merges"
TOKEN_TYPE: Final = "tokenizer.ggml.token_type"
BOS_ID: Final = "tokenizer.ggml.bos_token_id"
EOS_ID: Final = "tokenizer.ggml.eos_token_id"
ADD_BOS: Final = "tokenizer.ggml.add_bos_token"
CHAT_TEMPLATE: Final = "tokenizer.chat_template"
ADD_EOS: Final = "tokenizer.ggml.add_eos_token"
ADD_SPACE_PREFIX: Final = "tokenizer.ggml.add_space_prefix"
SCORES: Final = "tokenizer.ggml.scores"
MODEL_NAME: Final = "general.name"
UNK_ID: Final = "tokenizer.ggml.unknown_token_id"
SEP_ID: Final = "tokenizer.ggml.seperator_token_id"  # sic
LOWERCASE: Final = "tokenizer.ggml.normalizer.lowercase"
STRIP_ACCENTS: Final = "tokenizer.ggml.normalizer.strip_accents"
REMOVE_EXTRA_WS: Final = "tokenizer.ggml.remove_extra_whitespaces"
CHARSMAP: Final = "tokenizer.ggml.precompiled_charsmap"
UGM: Final = "t5"  # tokenizer.ggml.model of a Unigram vocab: llama.cpp adds EOS unless told not to
# FIM marker → its id keys, the deprecated spelling last (llama.cpp reads both, the last one found wins)
FIM_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "pre": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "suf": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "mid": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
    "pad": ("tokenizer.ggml.fim_pad_token_id",),
    "rep": ("tokenizer.ggml.fim_rep_token_id",),
    "sep": ("tokenizer.ggml.fim_sep_token_id",),
}
SPM: Final = "llama"  # tokenizer.ggml.model of a SentencePiece vocab
# llama.cpp's values for the keys a SentencePiece GGUF may leave out (llama_vocab::impl::load)
SPM_DEFAULTS: Final[dict[str, int | bool]] = {
    BOS_ID: 1,
    EOS_ID: 2,
    ADD_BOS: True,
    ADD_EOS: False,
    ADD_SPACE_PREFIX: True,
}

INLINE_ARRAY_MAX: Final = 64  # longer metadata arrays are summarized as {"type", "len"}


# ---- typed metadata access ----------------------------------------------------------------------


def type_name(f: Field) -> str:
    if f.elem_type is None:
        return f.type.name.lower()
    return f"array<{f.elem_type.name.lower()}>"


class Metadata:
    """Typed, checked access to parsed GGUF fields: wrong types raise FormatError naming the key."""

    def __init__(self, fields: dict[str, Field]) -> None:
        self.fields = fields

    def _get(self, key: str, types: frozenset[ValueType], kind: str, array: bool = False) -> Any:
        f = self.fields.get(key)
        if f is None:
            return None
        if (f.elem_type if array else f.type) not in types or (f.elem_type is not None) != array:
            raise FormatError(f"metadata key '{key}' must be {kind}, got {type_name(f)}")
        return f.value

    def integer(self, key: str) -> int | None:
        v = self._get(key, INT_TYPES, "an integer")
        return None if v is None else int(v)

    def number(self, key: str) -> float | None:
        v = self._get(key, FLOAT_TYPES | INT_TYPES, "a number")
        return None if v is None else float(v)

    def flag(self, key: str) -> bool | None:
        v = self._get(key, frozenset({ValueType.BOOL}), "a bool")
        return None if v is None else bool(v)

    def text(self, key: str) -> str | None:
        v = self._get(key, frozenset({ValueType.STRING}), "a string")
        return None if v is None else str(v)

    def strings(self, key: str) -> StringArray | None:
        v = self._get(key, frozenset({ValueType.STRING}), "an array of strings", array=True)
        return None if v is None else v

    def integers(self, key: str) -> tuple[int, ...] | None:
        v = self._get(key, INT_TYPES, "an array of integers", array=True)
        return None if v is None else tuple(v.tolist())

    def summary(self) -> dict[str, Any]:
        return {k: _summary(f) for k, f in self.fields.items()}


def _summary(f: Field) -> Any:
    if f.elem_type is None:
        return f.value
    assert isinstance(f.value, np.ndarray | StringArray)
    if len(f.value) <= INLINE_ARRAY_MAX:
        return sequence_of(f.value)
    return {"type": type_name(f), "len": len(f.value)}


# ---- the config source ---------------------------------------------------------------------------


class GGUFSource:
    """GGUF metadata as a ConfigSource: `get(key)` is the stored value (arrays as lists), typed by the
    reader of the family's parameter table."""

    def __init__(self, meta: Metadata) -> None:
        self.kind = "gguf"
        self.meta = meta
        arch = meta.text(ARCH)
        if arch is None:
            raise FormatError(f"metadata key '{ARCH}' is missing")
        self.architecture = arch

    def get(self, key: str) -> Any:
        f = self.meta.fields.get(key)
        if f is None:
            return None
        if f.elem_type is None:
            v = f.value
            return v.item() if isinstance(v, np.generic) else v
        assert isinstance(f.value, np.ndarray | StringArray)
        return sequence_of(f.value)

    def keys(self) -> Collection[str]:
        return self.meta.fields.keys()


def tokenizer_spec(m: Metadata) -> TokenizerSpec | None:
    """What formats/tokenizer.py needs to rebuild the GGUF's tokenizer; None if it has none.

    A SentencePiece vocab gets llama.cpp's defaults for the keys it leaves out (`SPM_DEFAULTS`); as in
    llama.cpp, a BOS / EOS / FIM id outside the vocab counts as not given.
    """
    from apr.formats.tokenizer_raw import ALWAYS_BOS, GEMMA4_MODEL  # imports `tokenizers`: only when asked

    model = m.text(TOKENIZER_MODEL)
    if model is None:
        return None
    tokens = m.strings(TOKENS)
    if tokens is None:
        raise FormatError(f"{TOKENIZER_MODEL} is set but {TOKENS} is missing")
    n = len(tokens)
    spm = model == SPM

    def token_id(key: str) -> int | None:
        v = m.integer(key)
        if spm and (v is None or not 0 <= v < n):
            default = SPM_DEFAULTS[key]
            return default if default < n else None
        return v

    def flag(key: str) -> bool:
        v = m.flag(key)
        bpe = model in ("gpt2", "whitespace")
        gemma4 = model == GEMMA4_MODEL or (bpe and m.text(TOKENIZER_PRE) in ALWAYS_BOS)
        if key == ADD_BOS and gemma4:
            return True  # llama.cpp's Gemma 4 workaround: BOS whatever the GGUF says
        if v is None and key == ADD_BOS and bpe:  # llama.cpp's default for a few pre-tokenizers
            from apr.formats.tokenizer_pre import ADD_BOS_BY_DEFAULT  # the regex table, only when needed

            return (m.text(TOKENIZER_PRE) or "default") in ADD_BOS_BY_DEFAULT
        if v is None and key == ADD_EOS and model == UGM:
            return True
        return bool(SPM_DEFAULTS[key]) if v is None and spm else bool(v)

    fim = {}
    for marker, keys in FIM_KEYS.items():
        for key in keys:
            if (v := m.integer(key)) is not None and 0 <= v < n:
                fim[marker] = v
    scores = m._get(SCORES, FLOAT_TYPES | INT_TYPES, "an array of numbers", array=True)
    scores = None if scores is None else np.asarray(scores, dtype=np.float32).tolist()  # as llama.cpp
    charsmap = m._get(CHARSMAP, INT_TYPES, "an array of bytes", array=True)
    return TokenizerSpec(
        model=model,
        pre=m.text(TOKENIZER_PRE) or "default",
        tokens=tokens,
        merges=m.strings(MERGES) or (),
        token_types=m.integers(TOKEN_TYPE) or (),
        bos_id=token_id(BOS_ID),
        eos_id=token_id(EOS_ID),
        add_bos=flag(ADD_BOS),
        chat_template=m.text(CHAT_TEMPLATE),
        add_eos=flag(ADD_EOS),
        scores=scores or (),
        add_space_prefix=flag(ADD_SPACE_PREFIX),
        fim_ids=fim,
        model_name=m.text(MODEL_NAME),
        unk_id=m.integer(UNK_ID),
        sep_id=m.integer(SEP_ID),
        lowercase=m.flag(LOWERCASE),
        strip_accents=m.flag(STRIP_ACCENTS),
        remove_extra_whitespaces=bool(m.flag(REMOVE_EXTRA_WS)),
        precompiled_charsmap=b"" if charsmap is None else np.asarray(charsmap).astype(np.uint8).tobytes(),
    )


def sequence_of(values: Sequence[Any] | npt.NDArray[Any]) -> list[Any]:
    """Plain Python values of a parsed array (for JSON-able metadata)."""
    return values.tolist() if isinstance(values, np.ndarray) else list(values)
