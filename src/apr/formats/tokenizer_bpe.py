"""Byte-level BPE GGUF vocabs (tokenizer.ggml.model "gpt2"): encoding, and the `tokenizers.Tokenizer`.

Encoding (`ByteLevelMerges`) is a `tokenizers` pre-tokenizer (the splits below, then the byte-level
mapping) and llama.cpp's own merge loop on each word (formats/tokenizer_merge.py), which needs only a
dict of merge ranks: a 150k-token vocab builds in ~0.1 s, where the `tokenizers` BPE model takes
0.2-0.4 s. That model (`byte_level_bpe`) is still built, on first use only, for export's tokenizer.json
(`LazyBackend`); it is what the rest of this docstring is about.

The model is `models.BPE(vocab, merges)` built from Python objects (~2x faster than `Tokenizer.from_str`
of the same JSON document, which also costs a json.dumps). `tokenizer.ggml.pre` picks the pre-tokenizer
from `PRE_TOKENIZERS` (formats/tokenizer_pre.py): the regexes llama.cpp's llama-vocab.cpp applies for that
name, each as an isolating `Split`, then the byte-level mapping. No normalizer: llama.cpp applies none to
BPE vocabs, even where the HF tokenizer.json has NFC. Special tokens are cut out of the text before this
model sees it (formats/tokenizer_special.py); they are added tokens only so that decode renders them.

Where llama.cpp and `tokenizers` part ways, the document is bent to llama.cpp:
- A merge whose operand or result is not a token: `tokenizers` refuses the vocab, llama.cpp merges anyway
  and finally emits such a symbol as the tokens of its single ASCII bytes (others dropped). Each such
  string gets an id past the vocab (`Bpe.expand` maps it back), so the merges run as in llama.cpp.
- A repeated merge: llama.cpp keeps its first rank, `tokenizers` its last; repeats are dropped.
- Bytes the vocab has no token for: see `missing_lead_bytes`.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from apr.errors import FormatError
from apr.formats.tokenizer_merge import MergeBpe
from apr.formats.tokenizer_pre import PRE_TOKENIZERS, PreTokenizer, onig_regexes
from apr.panics import HeldStderr, is_panic


@dataclass(frozen=True, slots=True)
class Bpe:
    backend: Any  # the tokenizers.Tokenizer
    vocab_size: int
    extra: dict[int, list[int]]  # id past the vocab → the vocab ids llama.cpp emits for that symbol

    def encode(self, text: str) -> list[int]:
        ids: list[int] = load(lambda: self.backend.encode(text, add_special_tokens=False).ids, "", ENCODE)
        if not self.extra or max(ids, default=0) < self.vocab_size:
            return ids
        return [j for i in ids for j in self.extra.get(i, (i,))]


class ByteLevelMerges:
    """Byte-level BPE as llama.cpp runs it: `pre_name`'s splits and GPT-2's byte mapping by a `tokenizers`
    pre-tokenizer, then llama.cpp's merge loop (formats/tokenizer_merge.py) on each word. A final symbol
    that is not a token becomes the tokens of its ASCII characters (llama.cpp looks up each byte of it
    alone; no other byte is a token's whole text). Building is a dict of merge ranks, not a BPE model."""

    def __init__(self, pre_name: str, vocab: dict[str, int], merges: Sequence[str]) -> None:
        pre = _pre(pre_name)
        self.split = _pre_tokenizer(pre, None)
        single = {c: vocab[c] for c in map(chr, range(128)) if c in vocab}

        def fallback(symbol: str) -> list[int]:
            return [single[c] for c in symbol if c in single]

        self.model = MergeBpe(vocab, merges, fallback, ignore_merges=pre.ignore_merges)

    def encode(self, text: str) -> list[int]:
        words = load(lambda: self.split.pre_tokenize_str(text), "", ENCODE)
        return self.model.encode_words([w for w, _ in words])


class LazyBackend:
    """The `tokenizers.Tokenizer` of a vocab, built on first use (export writes it out; encoding does not
    need it)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make, self._backend = make, None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._backend is None:
            self._backend = self._make()
        return getattr(self._backend, name)


def _pre(pre_name: str) -> PreTokenizer:
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        supported = ", ".join(PRE_TOKENIZERS)
        raise FormatError(f"tokenizer.ggml.pre '{pre_name}' is not supported (supported: {supported})")
    return pre


def byte_level_bpe(
    pre_name: str,
    tokens: Sequence[str],
    merges: Sequence[str],
    special_ids: Sequence[int],
    vocab: dict[str, int] | None = None,
) -> Bpe:
    """The byte-level BPE model of a GGUF vocab (`special_ids` become added tokens, for decode; `vocab`:
    token → id, if the caller has it)."""
    pre = _pre(pre_name)
    if vocab is None:
        vocab = dict(zip(tokens, range(len(tokens)), strict=True))  # a repeated token keeps its last id
    pairs = _merge_pairs(list(dict.fromkeys(merges)))
    extra: dict[str, int] = {}
    try:  # the builder checks that every operand and result is a token: usually so, and fast
        model = load(lambda: BPE(vocab, pairs, ignore_merges=pre.ignore_merges))
    except FormatError:  # it is not (or something else is wrong, which the second build reports)
        extra = _extra_symbols(vocab, pairs, len(tokens))
        model = load(lambda: BPE(vocab | extra, pairs, ignore_merges=pre.ignore_merges))
    known = {c for c in BYTE_CHARS if c in vocab or c in extra}
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = _pre_tokenizer(pre, missing_lead_bytes(known))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_ids])
    single = {c: vocab[c] for c in map(chr, range(128)) if c in vocab}
    expand = {i: [single[c] for c in s if c in single] for s, i in extra.items()}
    return Bpe(backend, len(tokens), expand)


def _extra_symbols(vocab: dict[str, int], pairs: list[tuple[str, str]], n: int) -> dict[str, int]:
    """Merge operands and results that are not tokens → ids from `n` up."""
    lefts, rights = [a for a, _ in pairs], [b for _, b in pairs]
    strings = set(map(operator.add, lefts, rights)).difference(vocab)
    strings |= set(lefts).difference(vocab) | set(rights).difference(vocab)
    return {s: n + k for k, s in enumerate(sorted(strings))}


def _pre_tokenizer(pre: PreTokenizer, missing: str | None) -> Any:
    """`pre`'s splits, each isolating its matches, then GPT-2's byte-level mapping."""
    splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in onig_regexes(pre)]
    if missing is not None:
        splits.append(pre_tokenizers.Split(Regex(missing), "merged_with_next"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return load(lambda: pre_tokenizers.Sequence([*splits, byte_level]))


ENCODE: Final = "cannot tokenize the prompt"


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
    """ "Ġ t" → ("Ġ", "t"), split at the first space after position 0 as llama.cpp does."""
    joined, n = "\n".join(merges), len(merges)
    one_space_each = joined.count(" ") == n and all(map(operator.contains, merges, itertools.repeat(" ")))
    if one_space_each and joined.count("\n") == n - 1:
        flat = joined.replace(" ", "\n").split("\n")  # each merge has one space, so: a, b, a, b, ...
        if "" not in flat[0::2]:
            return list(zip(flat[0::2], flat[1::2], strict=True))
    pairs = []
    for i, m in enumerate(merges):  # some merge has a leading space, a newline, or not one space
        cut = m.find(" ", 1)
        if cut < 0:
            raise FormatError(f"tokenizer.ggml.merges[{i}] {m!r} is not two tokens separated by a space")
        pairs.append((m[:cut], m[cut + 1 :]))
    return pairs


def load(make: Any, where: str = "", doing: str = "cannot build the tokenizer") -> Any:
    """`make()` behind the `tokenizers` boundary: its errors, and its Rust panics (pyo3's PanicException
    derives from BaseException, so `except Exception` misses it), become one-line FormatErrors. The text
    Rust's panic hook writes to fd 2 is held back (it is a note on the PanicException, which --debug's
    traceback shows); anything else written to fd 2 meanwhile is passed on."""
    with HeldStderr() as held:
        try:
            return make()
        except Exception as e:  # tokenizers raises plain Exception subclasses with a message
            raise FormatError(f"{where}{doing}: {_first_line(e)}") from None
        except BaseException as e:
            if not is_panic(e):
                raise
            if hook_text := held.take():
                e.add_note(hook_text)
            raise FormatError(f"{where}{doing}: the tokenizers library panicked: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# ---- bytes the vocab has no token for -----------------------------------------------------------
# Some vocabs lack a few byte tokens (SmolLM2: 0x04, 0x06, ..., 0xF1, 0xF2). llama.cpp keeps such
# a byte as a symbol that never merges and then drops it, so merges cannot cross it; `tokenizers`
# drops it first and would merge its neighbours. Cutting each piece just before a character that
# starts with such a byte (a `MergedWithNext` split) restores llama.cpp's result. A missing
# continuation byte (0x80-0xBF) would need a cut inside a character; no vocab seen lacks one.


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the character standing for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), 256)
    rest = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}
    return [chars[b] for b in range(256)]


BYTE_CHARS: Final = _byte_chars()
# UTF-8 lead bytes: (first, last, payload mask, continuation bytes, lowest code point so encoded)
_UTF8_LEADS: Final = (
    (0x00, 0x7F, 0x7F, 0, 0),
    (0xC2, 0xDF, 0x1F, 1, 0x80),
    (0xE0, 0xEF, 0x0F, 2, 0x800),
    (0xF0, 0xF4, 0x07, 3, 0x10000),
)


def _lead_byte_range(b: int) -> tuple[int, int] | None:
    """Code points whose UTF-8 encoding starts with byte `b` (None if `b` never starts one)."""
    for first, last, mask, n_cont, lowest in _UTF8_LEADS:
        if first <= b <= last:
            start = (b & mask) << (6 * n_cont)
            lo, hi = max(start, lowest), min(start + (1 << (6 * n_cont)) - 1, 0x10FFFF)
            return lo, 0xD7FF if lo <= 0xD800 <= hi else hi  # no surrogates in a regex class
    return None


def missing_lead_bytes(known: Any) -> str | None:
    """A regex class of the characters whose first byte has no symbol in `known`, or None."""
    ranges = [_lead_byte_range(b) for b, c in enumerate(BYTE_CHARS) if c not in known]
    parts = [rf"\x{{{lo:X}}}-\x{{{hi:X}}}" for lo, hi in filter(None, ranges)]
    return f"[{''.join(parts)}]" if parts else None
