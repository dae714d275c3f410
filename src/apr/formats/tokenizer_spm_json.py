"""A tokenizer.json for a SentencePiece GGUF vocab (tokenizer.ggml.model "llama"), for `apr export`.

llama.cpp's SPM tokenizer (formats/tokenizer_spm.py) merges, among neighbouring symbols whose concatenation
is a token, the one making the highest-scored token (ties: the leftmost). A `tokenizers` BPE can say nearly
the same, as transformers' LlamaConverter writes it: byte fallback, and as merges every split (l, r) of a
token t into two tokens, ranked by t's score, best first. What BPE cannot say is the tie rule: its merges
have one rank each, so where two merges of equal score can compete for the same symbol — (l1, r1), (l2, r2)
with r1 == l2 — llama.cpp takes the leftmost and BPE the better-ranked (for "aaa": a|aa against aa|a).
`ambiguous` counts those merges (ranked here by the ids of their parts, as transformers does) and
`tie_texts` spells each such meeting (x + y + z), for the export to check; `build` refuses a vocab it
cannot express at all.

Around the model, what llama.cpp does outside the merge loop: " " → "▁" (and a "▁" before the text and
after each special token with `add_space_prefix`: Prepend, which tokenizers applies per piece between
added tokens); the special tokens (CONTROL, USER_DEFINED, UNKNOWN) as added tokens matched before
normalization, with llama.cpp's lstrip / rstrip; BOS / EOS by the post-processor; a decoder turning "▁"
back into spaces and byte tokens into bytes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer import vocab_tokens
from apr.formats.tokenizer_special import USER_DEFINED, Attr, SpecialToken, special_tokens, token_attrs
from apr.formats.tokenizer_spm import SPACE

Merge = tuple[str, str]
MAX_TIE_TEXTS: Final = 4096  # texts `SpmJson.tie_texts` gives at most


@dataclass(frozen=True, slots=True)
class SpmJson:
    backend: Any  # a `tokenizers.Tokenizer`
    merges: int
    ambiguous: int  # merges that tie with an overlapping one (module docstring)
    tie_texts: tuple[str, ...]  # x + y + z for tied merges (x, y), (y, z): where the two rules can differ


def build(spec: TokenizerSpec) -> SpmJson:
    """The tokenizer.json model of `spec`'s vocab (its tokens as llama.cpp holds them). FormatError names
    what a tokenizer.json cannot hold: a repeated token, or a byte token missing (llama.cpp would fall back
    to the token spelled as that byte, tokenizers to the unknown token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    tokens = vocab_tokens(spec)
    ids = {t: i for i, t in enumerate(tokens)}
    if len(ids) != len(tokens):
        twice = next(t for i, t in enumerate(tokens) if ids[t] != i)
        raise FormatError(f"the token {twice!r} appears twice: a tokenizer.json vocab holds it once")
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in ids]
    if missing:
        raise FormatError(f"no byte token <0x{missing[0]:02X}> for the byte fallback")
    attrs = token_attrs(tokens, spec.token_types, spec.fim_ids.keys())
    specials = special_tokens(tokens, attrs, spec.model_name, spec.pre)
    unk = next((tokens[i] for i, a in enumerate(attrs) if a & Attr.UNKNOWN), None)  # never used: bytes
    scores = list(spec.scores) or [0.0] * len(tokens)
    merges, ambiguous, tie_texts = _merges(tokens, ids, scores)
    tok = Tokenizer(BPE(vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend(SPACE)] if spec.add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    ends = [decoders.Strip(" ", 1, 0)] if spec.add_space_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *ends]
    )
    added = [_added(s, attrs[s.id], AddedToken) for s in sorted(specials, key=lambda s: s.id)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])  # add_special_tokens would make them special
    tok.post_processor = _post_processor(spec, tokens, processors)
    return SpmJson(tok, len(merges), ambiguous, tie_texts)


def _added(s: SpecialToken, attr: int, added_token: Any) -> Any:
    """A special token as tokenizers adds it: whole, before normalization; a user-defined one is decoded
    like text (not skipped as special)."""
    special = not attr & USER_DEFINED
    return added_token(s.text, special=special, normalized=False, lstrip=s.lstrip, rstrip=s.rstrip)


def _post_processor(spec: TokenizerSpec, tokens: Sequence[str], processors: Any) -> Any:
    """BOS / EOS around the text as llama.cpp's flags ask (the ids checked by `build_tokenizer` first)."""
    parts, named = ["$A"], []
    if spec.add_bos and spec.bos_id is not None:
        parts.insert(0, tokens[spec.bos_id])
        named.append((tokens[spec.bos_id], spec.bos_id))
    if spec.add_eos and spec.eos_id is not None:
        parts.append(tokens[spec.eos_id])
        named.append((tokens[spec.eos_id], spec.eos_id))
    if not named:
        return None
    pair = " ".join(parts + [p.replace("$A", "$B") for p in parts])
    return processors.TemplateProcessing(single=" ".join(parts), pair=pair, special_tokens=named)


def _merges(
    tokens: Sequence[str], ids: dict[str, int], scores: Sequence[float]
) -> tuple[list[Merge], int, tuple[str, ...]]:
    """Every split of every token into two tokens, best-scored result first (then by the ids of the two
    parts, as transformers' converter orders them); how many tie with an overlapping one, and texts that
    spell such meetings (`_ties`)."""
    found: list[tuple[float, int, int, str, str]] = []
    for t, tid in ids.items():
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            li, ri = ids.get(left), ids.get(right)
            if li is not None and ri is not None:
                found.append((-scores[tid], li, ri, left, right))
    found.sort()
    by_score: dict[float, list[Merge]] = defaultdict(list)
    for score, _, _, left, right in found:
        by_score[score].append((left, right))
    ambiguous, texts = 0, dict[str, None]()
    for group in by_score.values():
        if len(group) > 1:
            ambiguous += _ties(group, texts)
    return [(left, right) for _, _, _, left, right in found], ambiguous, tuple(texts)


def _ties(group: list[Merge], texts: dict[str, None]) -> int:
    """How many merges of `group` (one score) meet another over a symbol: (x, y) and (y, z), distinct;
    adds x + y + z of each meeting to `texts` (spaces as " "), up to MAX_TIE_TEXTS in all. Linear in the
    group, however many meetings there are (a vocab without scores is one group)."""
    by_left: dict[str, list[Merge]] = defaultdict(list)
    for m in group:
        by_left[m[0]].append(m)
    tied: set[Merge] = set()
    for m in group:
        meets = [n for n in by_left.get(m[1], ())[:2] if n != m]
        if not meets:
            continue
        tied.add(m)
        tied.update(by_left[m[1]])  # every merge starting with y meets m (one of them may be m itself)
        for n in meets[: max(0, MAX_TIE_TEXTS - len(texts))]:
            texts[(m[0] + m[1] + n[1]).replace(SPACE, " ")] = None
    return len(tied)
