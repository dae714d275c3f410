"""Tokenizer build time for a 150k-token vocab (Qwen2.5 / Llama-3 size), byte-level BPE and SentencePiece.

    .venv/bin/python bench/tokenizer.py [--vocab 150000] [--runs 5]

The vocabs are synthetic (a seed, no download) and shaped like real ones: BPE has GPT-2's 256 byte
symbols, then one merge per further token (two existing tokens joined; the "qwen2" pre-tokenizer, three
control tokens); SPM has <unk> <s> </s>, the 256 <0xXX> byte tokens, then "▁"-words and word pieces with
falling scores. Each figure is the median of `runs` calls of `build_tokenizer(spec)` and its first
`encode` of a sentence: everything from the parsed GGUF arrays to the first ids (the spec is made once,
outside the timing). After the table, the time to encode a 5000-word prompt with new words (BPE's merge
loop is Python: formats/tokenizer_merge.py). Not included: decoding a GGUF's string arrays, which
formats/gguf_parse.py does on first use (about 0.1 s for each 150k-string array, tokens and merges, on
the shared 2-core machine). Printed as rows of bench/run.py's table (which includes them); `measure`
returns them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer import BYTE_CHARS, build_tokenizer

VOCAB: Final = 150_000
TARGET_S: Final = 0.3
SPACE: Final = "▁"
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # GGUF token types
SENTENCE: Final = "The quick brown fox jumps over the lazy dog; 12 + 30 = 42."


@dataclass(frozen=True, slots=True)
class Timing:
    kind: str  # "BPE" | "SPM"
    vocab: int
    seconds: float  # median build time

    @property
    def met(self) -> bool:
        return self.seconds <= TARGET_S


def bpe_spec(n_vocab: int, seed: int = 0) -> TokenizerSpec:
    """A byte-level BPE vocab of `n_vocab` tokens: 256 byte symbols, merges, 3 control tokens at the end."""
    rng = random.Random(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens, merges = list(BYTE_CHARS), []
    seen = set(tokens)
    letters = [BYTE_CHARS[b] for b in b"etaoinshrdlucmfwypvbgkjqxz ETAOINSHRD.,0123456789"]
    while len(tokens) < n_vocab - len(specials):
        a = tokens[rng.randrange(len(tokens))] if rng.random() < 0.7 else rng.choice(letters)
        short = rng.random() < 0.6 or len(tokens) == 256
        b = rng.choice(letters) if short else tokens[rng.randrange(256, len(tokens))]
        if a + b not in seen and len(a + b) <= 16:
            seen.add(a + b)
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    tokens += specials
    types = [NORMAL] * (len(tokens) - len(specials)) + [CONTROL] * len(specials)
    return TokenizerSpec(
        "gpt2", "qwen2", tokens, merges, types, eos_id=len(tokens) - 3, model_name="synthetic"
    )


def spm_spec(n_vocab: int, seed: int = 0) -> TokenizerSpec:
    """A SentencePiece vocab of `n_vocab` tokens: <unk> <s> </s>, 256 byte tokens, pieces by falling score."""
    rng = random.Random(seed)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    seen = set(tokens)
    alphabet = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;-'"
    while len(tokens) < n_vocab:
        piece = "".join(rng.choices(alphabet, k=rng.randint(1, 9)))
        piece = SPACE + piece if rng.random() < 0.5 else piece
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return TokenizerSpec(
        "llama", "default", tokens, (), types, bos_id=1, eos_id=2, add_bos=True, scores=scores,
        add_space_prefix=True, model_name="synthetic",
    )  # fmt: skip


def _median_build(spec: TokenizerSpec, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        tok = build_tokenizer(spec)
        ids = tok.encode(SENTENCE)  # the first encode is timed too: nothing is left to do on first use
        times.append(time.perf_counter() - start)
        assert ids and max(ids) < len(spec.tokens), "the synthetic tokenizer does not encode"
    return statistics.median(times)


def encode_seconds(spec: TokenizerSpec, n_words: int = 5000, seed: int = 0) -> float:
    """Seconds to encode a fresh `n_words`-word prompt (words of 1-12 letters, digits, punctuation, a
    newline now and then) with a built tokenizer: BPE merges each new word once (then from its cache)."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + ".,;:'!?-()"
    text = " ".join(
        "".join(rng.choices(alphabet, k=rng.randint(1, 12))) + ("\n" if rng.random() < 0.05 else "")
        for _ in range(n_words)
    )
    tok = build_tokenizer(spec)
    start = time.perf_counter()
    tok.encode(text)
    return time.perf_counter() - start


def measure(n_vocab: int = VOCAB, runs: int = 5) -> list[Timing]:
    """Median build seconds of a synthetic BPE and SPM vocab of `n_vocab` tokens."""
    return [
        Timing("BPE", n_vocab, _median_build(bpe_spec(n_vocab), runs)),
        Timing("SPM", n_vocab, _median_build(spm_spec(n_vocab), runs)),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"tokens in each vocab (default {VOCAB})")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run  # bench/run.py: its Row and table; imported here, as run.py imports this module

    print(run.render(run.tokenizer_rows(measure(args.vocab, args.runs))))
    for kind, spec in (("BPE", bpe_spec(args.vocab)), ("SPM", spm_spec(args.vocab))):
        print(f"encode a 5000-word prompt, {kind}: {encode_seconds(spec):.3f} s")


if __name__ == "__main__":
    main()
