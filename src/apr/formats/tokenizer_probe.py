"""Whether two models' tokenizers turn the same text into the same ids: a fixed probe, run through both.

Equal vocabularies and merges do not make equal tokenizers: pre-tokenization (how digits, space runs and
contractions are split), normalization, the space prefix and the parsing of special-token text live
outside them (a GGUF's tokenizer.ggml.pre "gpt-2" keeps " 1" whole where transformers' Qwen2Tokenizer
splits digits). So each side's own tokenizer is built (apr.formats.tokenizer.build_tokenizer) and encodes
every text of `PROBES` — plus the text of each side's BOS / EOS tokens, as special-token parsing — with
BOS / EOS added as its runtime adds them: the path `apr trace` takes for a text prompt
(apr.trace.prompt), without the context limit. A chat prompt (a rendered template, nothing added) is not
probed.

A side whose tokenizer cannot be built, or that cannot encode a probe, is a problem reported by name:
never a crash, never "identical".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from apr.errors import AprError
from apr.formats.base import TokenizerSpec

# (name, text): each probe exercises one way tokenizers part ways
PROBES: Final[tuple[tuple[str, str], ...]] = (
    ("start", "Hello"),
    ("leading space", " Hello world"),
    ("digits", "Hello world, 12 cats and 3456 dogs: 7.5% of 1000000"),
    ("space runs", "two  spaces,   three,\ttab,    four and trailing  "),
    ("newlines", "line one\nline two\n\n\nend\r\n"),
    ("punctuation", 'Hi! (yes?) [no]; {a: "b"} -- a/b_c=d+e*f #1 @x ~^`|\\ ...'),
    ("contractions", "I'm sure you're right: it's what we'll do, they'd've said DON'T"),
    ("accents", "café naïve Ünïcödé façade"),
    ("CJK", "你好，世界。日本語のテキスト 한국어"),
    ("emoji", "🙂🚀👍🏽 ok"),
)
SPECIAL_PROBE: Final = "special tokens"  # BOS / EOS text inside the text: "<s>Hi <s> end"


@dataclass(frozen=True, slots=True)
class ProbeDiff:
    name: str  # a PROBES name, or SPECIAL_PROBE
    text: str
    position: int  # first index where the ids differ (or where the shorter list ends)
    a_ids: tuple[int, ...]
    b_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ProbeCheck:
    compared: int  # probes both sides encoded
    differ: list[ProbeDiff] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # a side whose tokenizer failed, and how


Encode = Callable[[str], list[int]]


def probe_texts(a: TokenizerSpec, b: TokenizerSpec) -> list[tuple[str, str]]:
    specials = dict.fromkeys(t for s in (a, b) for t in _end_texts(s))
    extra = [(SPECIAL_PROBE, "".join(f"{t}Hi {t} end " for t in specials))] if specials else []
    return [*PROBES, *extra]


def _end_texts(spec: TokenizerSpec) -> list[str]:
    ids = (i for i in (spec.bos_id, spec.eos_id) if i is not None and 0 <= i < len(spec.tokens))
    return [spec.tokens[i] for i in ids]


def probe_tokenizers(a: TokenizerSpec, b: TokenizerSpec) -> ProbeCheck:
    """Encode every probe text with both sides' tokenizers; the probes whose ids differ."""
    encoders = [_build(spec, side) for spec, side in ((a, "A"), (b, "B"))]
    problems = [e for e in encoders if isinstance(e, str)]
    if problems:
        return ProbeCheck(0, problems=problems)
    ea, eb = (e for e in encoders if not isinstance(e, str))
    check = probe_encoders(ea, eb, probe_texts(a, b))
    return ProbeCheck(check.compared, check.differ, problems + check.problems)


def probe_encoders(ea: Encode, eb: Encode, texts: Sequence[tuple[str, str]]) -> ProbeCheck:
    """Encode every (name, text) with both encoders; the texts whose ids differ, and any that failed."""
    compared, differ, problems = 0, [], []
    for name, text in texts:
        ids = [_encode(enc, text, name, side) for enc, side in ((ea, "A"), (eb, "B"))]
        failed = [x for x in ids if isinstance(x, str)]
        if failed:
            problems += failed
            continue
        ia, ib = (tuple(x) for x in ids if not isinstance(x, str))
        compared += 1
        if ia != ib:
            differ.append(ProbeDiff(name, text, _first_difference(ia, ib), ia, ib))
    return ProbeCheck(compared, differ, problems)


def _build(spec: TokenizerSpec, side: str) -> Encode | str:
    from apr.formats.tokenizer import build_tokenizer  # loads `tokenizers`; only when a diff needs it

    try:
        return build_tokenizer(spec).encode
    except Exception as e:  # any failure (a FormatError, or a bug of a builder) is reported, not raised
        return f"{side}: its tokenizer cannot be built: {_message(e)}"


def _encode(enc: Encode, text: str, name: str, side: str) -> list[int] | str:
    try:
        return enc(text)
    except Exception as e:  # as in _build
        return f"{side}: cannot encode the {name!r} probe: {_message(e)}"


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, AprError) else f"{type(e).__name__}: {e}"


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
