"""llama.cpp's special tokens: which tokens it matches whole in the text, in which order, and the split.

Mirrors llama-vocab.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors (`llama_vocab::impl::load`
and `tokenizer_st_partition`); the tokenizers in formats/tokenizer*.py only add the per-piece algorithm.

1. Each GGUF token type becomes an attribute (`TYPE_ATTR`; no token_type array: all NORMAL).
2. Tokens named like an end of generation (`EOG_NAMES`) become CONTROL, and so does the first token named
   like each FIM marker (`FIM_NAMES`) whose id the GGUF does not give; gpt-oss's channel tokens become
   USER_DEFINED; "</s>" is NORMAL in a vocab that has "<|tool_response>" (Gemma 4).
3. The special tokens are those CONTROL, USER_DEFINED or UNKNOWN, sorted longest (in bytes) first by
   libstdc++'s `std::sort`, which is not stable: tokens of equal length keep the order its introsort
   leaves them in, reproduced by `stdsort` (it only matters for equal-length specials that overlap).
4. In a vocab whose tokenizer.ggml.pre contains "jina-v2-de", "jina-v2-es" or "jina-v2-code", <mask>
   strips the whitespace before it (LSTRIP); else, a model whose general.name contains "phi-3" or "phi3"
   strips the whitespace after each special token except <unk>, <s> and <|endoftext|> (RSTRIP); else,
   with "modern-bert" in general.name, [MASK] has LSTRIP. (llama.cpp also gives <mask> LSTRIP for the
   architectures nomic-bert-moe and jina-bert-v3, which a TokenizerSpec does not name: not mirrored.)
5. `partition` splits the text at every occurrence of each special token in that order, as llama.cpp
   does with parse_special=true. Matching on `str` equals llama.cpp's byte matching: UTF-8 is
   self-synchronizing, so a byte match of valid UTF-8 always starts and ends on character boundaries.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import IntFlag
from itertools import repeat
from typing import Final

from apr.errors import FormatError


class Attr(IntFlag):  # llama_token_attr
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8


# Attributes are held as plain ints: IntFlag arithmetic costs ~2 µs a token on a 150k vocab.
NORMAL, CONTROL, USER_DEFINED = int(Attr.NORMAL), int(Attr.CONTROL), int(Attr.USER_DEFINED)
BYTE: Final = int(Attr.BYTE)
SPECIAL: Final = int(Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN)
# GGUF tokenizer.ggml.token_type (llama_token_type) → attribute; any other value is UNDEFINED
TYPE_ATTR: Final[dict[int, int]] = {
    t: int(a)
    for t, a in enumerate(
        (Attr.UNDEFINED, Attr.NORMAL, Attr.UNKNOWN, Attr.CONTROL, Attr.USER_DEFINED, Attr.UNUSED, Attr.BYTE)
    )
}
EOG_NAMES: Final = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
     "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
     "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
     "<｜end▁of▁sentence｜>", "[e~["}
)  # fmt: skip
# FIM marker → the names llama.cpp looks for when the GGUF has no tokenizer.ggml.fim_<marker>_token_id
FIM_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}  # fmt: skip
USER_DEFINED_NAMES: Final = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss
PHI3_NAMES: Final = ("phi-3", "phi3")
MASK_LSTRIP_PRE: Final = ("jina-v2-de", "jina-v2-es", "jina-v2-code")  # <mask> strips the spaces before it
MODERN_BERT: Final = "modern-bert"  # a general.name with it: [MASK] strips the spaces before it
PHI3_NO_RSTRIP: Final = ("<unk>", "<s>", "<|endoftext|>")
C_SPACE: Final = " \t\n\v\f\r"  # C isspace()


@dataclass(frozen=True, slots=True)
class SpecialToken:
    id: int
    text: str
    lstrip: bool = False
    rstrip: bool = False


def token_attrs(
    tokens: Sequence[str],
    token_types: Sequence[int],
    fim_given: Collection[str] = (),
    ids: Mapping[str, int] | None = None,
) -> list[int]:
    """Each token's llama.cpp attributes after its name-based fix-ups (steps 1 and 2).

    `fim_given`: the FIM markers ("pre", "suf", ...) whose token id the GGUF states; `ids`: token → its
    last id, if the caller has it.
    """
    if token_types and len(token_types) != len(tokens):
        raise FormatError(
            f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    attrs: list[int] = list(map(TYPE_ATTR.get, token_types, repeat(0))) or [NORMAL] * len(tokens)
    if ids is None:
        ids = dict(zip(tokens, range(len(tokens)), strict=True))
    for name in EOG_NAMES & ids.keys():
        attrs[ids[name]] |= CONTROL
    for marker, names in FIM_NAMES.items():
        # llama.cpp takes the first name it meets in a hash map; with several present, we take the lowest id
        found = sorted(ids[n] for n in names if n in ids)
        if marker not in fim_given and found:
            attrs[found[0]] |= CONTROL
    for name in USER_DEFINED_NAMES:
        if name in ids:
            attrs[ids[name]] = USER_DEFINED
    if "</s>" in ids and "<|tool_response>" in ids:
        attrs[ids["</s>"]] = NORMAL
    return attrs


def name_keyed(model_name: str | None) -> bool:
    """Does llama.cpp key a special-token rule on this general.name (phi3's rstrip, modern-bert's [MASK])?
    Then the name is part of the tokenizer and must travel with it (an .apr keeps it)."""
    name = (model_name or "").lower()
    return any(n in name for n in PHI3_NAMES) or MODERN_BERT in name


def special_tokens(
    tokens: Sequence[str],
    attrs: Sequence[int],
    model_name: str | None,
    pre: str = "",
    index: Mapping[str, int] | None = None,
) -> list[SpecialToken]:
    """The special tokens in llama.cpp's matching order (steps 3 and 4); `pre` is tokenizer.ggml.pre,
    `index` token → its last id, if the caller has it."""
    ids = [i for i, a in enumerate(attrs) if a & SPECIAL]
    size = {i: len(tokens[i].encode()) for i in ids}
    stdsort(ids, lambda a, b: size[a] > size[b])
    lstrip, rstrip = set[int](), set[int]()
    name = (model_name or "").lower()
    if index is None:
        index = dict(zip(tokens, range(len(tokens)), strict=True)) if ids else {}
    if any(n in pre for n in MASK_LSTRIP_PRE):
        lstrip = {index["<mask>"]} if "<mask>" in index else set()
    elif any(n in name for n in PHI3_NAMES):
        missing = [n for n in ("</s>", *PHI3_NO_RSTRIP) if n not in index]
        if missing:  # llama.cpp looks them up with .at() and fails to load the vocab
            raise FormatError(f"a phi3 vocab must have the token {missing[0]!r}")
        rstrip = {*ids, index["</s>"]} - {index[n] for n in PHI3_NO_RSTRIP}
    elif MODERN_BERT in name:
        lstrip = {index["[MASK]"]} if "[MASK]" in index else set()
    return [SpecialToken(i, tokens[i], lstrip=i in lstrip, rstrip=i in rstrip) for i in ids]


Piece = str | int  # text still to tokenize, or a special token's id


def encode_parts(
    text: str, specials: Sequence[SpecialToken], fragment: Callable[[str], list[int]]
) -> list[int]:
    """The ids of `text`: each special token in it as its id, each stretch between them through `fragment`."""
    out: list[int] = []
    for p in partition(text, specials):
        if isinstance(p, int):
            out.append(p)
        else:
            out += fragment(p)
    return out


def partition(text: str, specials: Sequence[SpecialToken]) -> list[Piece]:
    """`text` cut at the special tokens, as llama.cpp's tokenizer_st_partition (parse_special=true)."""
    pieces: list[Piece] = [text] if text else []
    for sp in specials:
        if not any(isinstance(p, str) and sp.text in p for p in pieces):
            continue
        out: list[Piece] = []
        for p in pieces:
            if isinstance(p, int) or sp.text not in p:
                out.append(p)
                continue
            start = 0
            while (at := p.find(sp.text, start)) >= 0:
                left = p[start:at].rstrip(C_SPACE) if sp.lstrip else p[start:at]
                out += [left, sp.id] if left else [sp.id]
                start = at + len(sp.text)
                if sp.rstrip:
                    start = len(p) - len(p[start:].lstrip(C_SPACE))
            if start < len(p):
                out.append(p[start:])
        pieces = out
    return pieces


# ---- libstdc++'s std::sort (gcc 12 bits/stl_algo.h), to reproduce its order of equal keys --------------

Less = Callable[[int, int], bool]
_THRESHOLD: Final = 16


def stdsort(a: list[int], less: Less) -> None:
    """Sort `a` in place exactly as `std::sort(a.begin(), a.end(), less)` does in libstdc++."""
    if len(a) > 1:
        _introsort_loop(a, 0, len(a), 2 * (len(a).bit_length() - 1), less)
        _final_insertion_sort(a, 0, len(a), less)


def _introsort_loop(a: list[int], first: int, last: int, depth: int, less: Less) -> None:
    while last - first > _THRESHOLD:
        if depth == 0:
            _heap_sort(a, first, last, less)
            return
        depth -= 1
        mid = first + (last - first) // 2
        _move_median_to_first(a, first, first + 1, mid, last - 1, less)
        cut = _unguarded_partition(a, first + 1, last, first, less)
        _introsort_loop(a, cut, last, depth, less)
        last = cut


def _move_median_to_first(a: list[int], result: int, x: int, y: int, z: int, less: Less) -> None:
    if less(a[x], a[y]):
        m = y if less(a[y], a[z]) else z if less(a[x], a[z]) else x
    else:
        m = x if less(a[x], a[z]) else z if less(a[y], a[z]) else y
    a[result], a[m] = a[m], a[result]


def _unguarded_partition(a: list[int], first: int, last: int, pivot: int, less: Less) -> int:
    while True:
        while less(a[first], a[pivot]):
            first += 1
        last -= 1
        while less(a[pivot], a[last]):
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _final_insertion_sort(a: list[int], first: int, last: int, less: Less) -> None:
    head = min(last, first + _THRESHOLD)
    for i in range(first + 1, head):  # __insertion_sort
        val = a[i]
        if less(val, a[first]):
            a[first + 1 : i + 1] = a[first:i]
            a[first] = val
        else:
            _linear_insert(a, i, less)
    for i in range(head, last):  # __unguarded_insertion_sort
        _linear_insert(a, i, less)


def _linear_insert(a: list[int], last: int, less: Less) -> None:
    val = a[last]
    while less(val, a[last - 1]):
        a[last] = a[last - 1]
        last -= 1
    a[last] = val


def _heap_sort(a: list[int], first: int, last: int, less: Less) -> None:
    """std::__partial_sort(first, last, last): make_heap, then sort_heap."""
    n = last - first
    for parent in range((n - 2) // 2, -1, -1):
        _adjust_heap(a, first, parent, n, a[first + parent], less)
    for end in range(n - 1, 0, -1):
        val = a[first + end]
        a[first + end] = a[first]
        _adjust_heap(a, first, 0, end, val, less)


def _adjust_heap(a: list[int], base: int, hole: int, n: int, val: int, less: Less) -> None:
    top = hole
    child = hole
    while child < (n - 1) // 2:
        child = 2 * (child + 1)
        if less(a[base + child], a[base + child - 1]):
            child -= 1
        a[base + hole] = a[base + child]
        hole = child
    if n % 2 == 0 and child == (n - 2) // 2:
        child = 2 * (child + 1)
        a[base + hole] = a[base + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2  # std::__push_heap
    while hole > top and less(a[base + parent], val):
        a[base + hole] = a[base + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[base + hole] = val
