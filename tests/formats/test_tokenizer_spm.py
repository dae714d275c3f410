"""SentencePiece GGUF vocabs: apr's ids equal llama.cpp's (`Llama(vocab_only=True).tokenize(text,
add_bos=True, special=True)`) on generated text, and SentencePiece's own where the two agree by design.

The vocabs are trained here with `sentencepiece` (BPE, byte fallback, identity normalization: Llama's
settings) on a generated multi-script corpus and written as GGUF the way llama.cpp's converter does
(`_create_vocab_sentencepiece`: scores, control / unknown / byte / user-defined types). Hand-made vocabs
cover what training does not produce: score ties, many overlapping special tokens, phi3's stripping.
"""

from __future__ import annotations

import ctypes
import io
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf as gguf
import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import Tokenizer, build_tokenizer
from apr.formats.tokenizer_special import stdsort
from tests.formats.vocab_oracle import finish

USER_SYMBOLS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool>", "▁<PRE>"]
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "naïve",
    "café", "résumé", "Straße", "ünïcödé", "日本語", "テキスト", "こんにちは", "中文", "分词",
    "한국어", "텍스트",
    "مرحبا", "بالعالم", "שלום", "עולם", "Привет", "мир", "γειά", "σου", "def", "return", "class",
    "import", "print", "lambda", "self", "None", "True", "0", "1", "2", "42", "123", "4567",
    "3.14159", "1,000", "🤖", "👍🏽", "👩\u200d👩\u200d👧", "🏳️\u200d🌈", "🇫🇷", "e\u0301", "a\u0308",
    "n\u0303", "𝔘𝔫𝔦", "𐍈", "\u200b",
]  # fmt: skip
PUNCT = ["", ".", ",", "!", "?", ":", ";", "(", ")", "{", "}", "->", "==", "  ", "\t", "\n", "\n\n", "    "]


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choice(WORDS) + rng.choice([" ", " ", " ", *PUNCT]) for _ in range(rng.randint(1, 14)))
        for _ in range(n)
    ]


def train(**options: Any) -> Any:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, model_type="bpe", vocab_size=800,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=USER_SYMBOLS,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, **options,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]


def vocab_of(sp: Any) -> Vocab:
    """What llama.cpp's converter writes for a tokenizer.model (user-defined pieces as added tokens)."""
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_unused, 5), (sp.is_byte, 6)]
        t = next((k for test, k in kind if test(i)), 1)
        if sp.id_to_piece(i) in USER_SYMBOLS:
            t = 4
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(t)
    return Vocab(tokens, scores, types)


def write_vocab(path: Path, v: Vocab, name: str = "tiny", **kv: Any) -> Path:
    """A vocab-only llama GGUF (llama.cpp loads it with vocab_only=True)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    for key, value in {"context_length": 64, "embedding_length": 8, "block_count": 1,
                       "feed_forward_length": 16, "attention.head_count": 2}.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(v.tokens)
    w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    for key, value in kv.items():
        (w.add_bool if isinstance(value, bool) else w.add_uint32)(f"tokenizer.ggml.{key}", value)
    finish(w)
    return path


@dataclass(frozen=True)
class Pair:
    """apr's tokenizer and llama.cpp's for one GGUF."""

    path: Path
    tok: Tokenizer
    llm: Any

    def ours(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def theirs(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=True, special=True))

    def detokenize(self, ids: list[int]) -> str:
        """llama_detokenize(remove_special=false, unparse_special=true)."""
        import llama_cpp

        buf = ctypes.create_string_buffer(64 * len(ids) + 64)
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        n = llama_cpp.llama_detokenize(self.llm._model.vocab, arr, len(ids), buf, len(buf), False, True)
        return buf.raw[:n].decode("utf-8", errors="replace")


def pair(path: Path) -> Pair:
    import llama_cpp as llama_cpp

    spec = open_gguf(path).tokenizer_spec()
    assert spec is not None
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return Pair(path, build_tokenizer(spec), llm)


@pytest.fixture(scope="module")
def sp() -> Any:
    return train()


# defaults (add_bos, add_space_prefix from llama.cpp), the flags flipped, and phi3's special-token stripping
VARIANTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "flags": {"add_bos_token": False, "add_eos_token": True, "add_space_prefix": False},
    "phi3": {"name": "Phi3 mini (tiny)"},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request: pytest.FixtureRequest, sp: Any, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    kv = dict(VARIANTS[request.param])
    name = kv.pop("name", "tiny")
    path = tmp_path_factory.mktemp("spm") / f"{request.param}.gguf"
    return pair(write_vocab(path, vocab_of(sp), name, bos_token_id=1, eos_token_id=2, **kv))


HARD = [
    "", " ", "  ", "\n", "hello world", " hello", "hello ", "  two  spaces  ", "\t\ttabs\tand\nnewlines\n\n",
    "\r\n\r\nwindows\r\nlines", "中文分词测试：你好，世界！", "こんにちは、世界。カタカナ", "한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 👍🏽 🤖", "e\u0301 a\u0308 n\u0303 — combining marks",
    "שלום مرحبا RTL \u200f mixed",
    "12345678901234567890 3.14159 1,000,000 ١٢٣", "def f(x):\n    return x ** 2  # comment\n",
    "https://example.com/path?q=1&r=two#frag", "\x00\x01\x7f control chars", "a\u00a0b\u2009c\u3000d",
    "zero\u200bwidth\ufeffbom", "▁already▁escaped ▁", "<0x41> <0x0A>", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 \U0010fffd \U000e0001",
    "<s>", "</s>", "<unk>", "<s>hello</s>", "text<s>glued</s>x", " <s> spaced </s> ", "<s><s></s></s>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|<|im_end|>>", "<tool> x <tool>",
    "<|endoftext|>   after", "before   <|endoftext|>", "<|im_end|>\n\n  next", "x▁<PRE>y ▁<PRE>",
]  # fmt: skip


@pytest.mark.oracle
@pytest.mark.parametrize("text", HARD)
def test_equals_llama_cpp(trained: Pair, text: str) -> None:
    ids = trained.ours(text)
    assert ids == trained.theirs(text)
    assert trained.tok.decode(ids) == trained.detokenize(ids)


_PIECES = st.sampled_from(
    ["<s>", "</s>", "<unk>", *USER_SYMBOLS, " ", "  ", "\n", "\n\n", "\t", "\r", "\u00a0", "▁", "0", "42",
     "a", "the", " quick", "naïve", "e\u0301", "日本", "語", "🤖", "\u200d", "👩", "!", "...", "<", ">", "|",
     "<0x41>", "x"]
)  # fmt: skip
# Several planes: Latin, Greek/Cyrillic, CJK, Hangul, Arabic/Hebrew, emoji, supplementary and private use.
_CHARS = st.characters(exclude_categories=["Cs"], max_codepoint=0x10FFFF)
TEXT = st.one_of(
    st.text(_CHARS, max_size=30),
    st.lists(st.one_of(_PIECES, st.sampled_from(WORDS)), max_size=14).map("".join),
    st.lists(st.one_of(_PIECES, st.text(_CHARS, max_size=3)), max_size=10).map("".join),
)


@pytest.mark.oracle
@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_random_text_equals_llama_cpp(trained: Pair, text: str) -> None:
    ids = trained.ours(text)
    assert ids == trained.theirs(text)
    assert trained.tok.decode(ids) == trained.detokenize(ids)


@pytest.mark.oracle
def test_corpus_equals_llama_cpp(trained: Pair) -> None:
    texts = [*corpus(400, seed=1), "".join(corpus(50, seed=2))]
    assert [trained.ours(t) for t in texts] == [trained.theirs(t) for t in texts]


def special_free(text: str, sp: Any) -> bool:
    return not any(s in text for s in [*USER_SYMBOLS, "<s>", "</s>", "<unk>"])


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_equals_sentencepiece(sp: Any, text: str) -> None:
    """Without special tokens in the text, llama.cpp's SPM and SentencePiece's BPE agree by design (one
    bigram merge by score, byte fallback); apr must give SentencePiece's ids too."""
    tok = build_tokenizer(spec_of(vocab_of(sp)))
    if special_free(text, sp):
        assert tok.encode_text(text) == sp.encode(text)


def test_corpus_equals_sentencepiece(sp: Any) -> None:
    tok = build_tokenizer(spec_of(vocab_of(sp)))
    texts = [t for t in corpus(400, seed=3) + HARD if special_free(t, sp)]
    assert [tok.encode_text(t) for t in texts] == sp.encode(texts)


def spec_of(v: Vocab, **kw: Any) -> TokenizerSpec:
    return TokenizerSpec(
        model="llama", tokens=v.tokens, scores=v.scores, token_types=v.types, add_space_prefix=True, **kw
    )


# ---- hand-made vocabs: score ties, overlapping special tokens --------------------------------------------


def random_vocab(rng: random.Random, alphabet: str, n: int, specials: list[str]) -> Vocab:
    """Byte tokens, `specials` (user-defined), and `n` random strings with scores from a small set (ties)."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *specials]
    types = [2, 3, 3, *[6] * 256, *[4] * len(specials)]
    seen = set(tokens)
    while len(tokens) < 259 + len(specials) + 3 + n:
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        if t not in seen:
            seen.add(t)
            tokens.append(t)
            types.append(1)
    scores = [0.0] * (259 + len(specials)) + [float(rng.choice([-1, -2, -3, -4])) for _ in range(n + 3)]
    return Vocab(tokens, scores[: len(tokens)], types)


@pytest.fixture(scope="module", params=range(4))
def handmade(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    rng = random.Random(request.param)
    # > 16 special tokens, many of one byte length and overlapping: libstdc++ introsort order decides
    specials = sorted(
        {"".join(rng.choice("xyz<>") for _ in range(rng.choice([2, 3, 3, 3]))) for _ in range(40)}
    )
    v = random_vocab(rng, "ab▁cé日", 120, specials)
    yield pair(write_vocab(tmp_path_factory.mktemp("hand") / "v.gguf", v))


@pytest.mark.oracle
def test_handmade_vocab_equals_llama_cpp(handmade: Pair) -> None:
    rng = random.Random(7)
    texts = ["".join(rng.choice("ab▁cé日 xyz<>\n") for _ in range(rng.randint(0, 40))) for _ in range(300)]
    assert [handmade.ours(t) for t in texts] == [handmade.theirs(t) for t in texts]


STD_SORT_CPP = r"""
#include <algorithm>
#include <iostream>
#include <vector>
int main() {  // ids 0..n-1 sorted by key, longest first, as llama.cpp sorts its special tokens
    int n; std::cin >> n; std::vector<int> key(n), ids(n);
    for (int i = 0; i < n; ++i) { std::cin >> key[i]; ids[i] = i; }
    std::sort(ids.begin(), ids.end(), [&](int a, int b) { return key[a] > key[b]; });
    for (int i : ids) std::cout << i << ' ';
}
"""


@pytest.fixture(scope="module")
def std_sort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil
    import subprocess

    cxx = shutil.which("g++")
    assert cxx is not None, (
        "g++ is needed to run libstdc++'s std::sort (the oracle of the special-token order)"
    )
    src = tmp_path_factory.mktemp("stdsort") / "sort.cpp"
    src.write_text(STD_SORT_CPP)
    subprocess.run([cxx, "-O1", "-o", str(src.with_suffix("")), str(src)], check=True)
    return src.with_suffix("")


@pytest.mark.oracle
@pytest.mark.parametrize("seed", range(6))
def test_stdsort_equals_libstdcxx(std_sort: Path, seed: int) -> None:
    import subprocess

    rng = random.Random(seed)
    n = [5, 17, 40, 100, 700, 3000][seed]
    keys = [rng.choice([1, 2, 3, 3, 4, 12]) for _ in range(n)]
    out = subprocess.run([str(std_sort)], input=f"{n} {' '.join(map(str, keys))}", capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    ids = list(range(n))
    stdsort(ids, lambda a, b: keys[a] > keys[b])
    assert ids == [int(x) for x in out.split()]


# ---- spec, flags, errors, speed ----------------------------------------------------------------------------


def test_gguf_defaults_are_llama_cpps(sp: Any, tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "v.gguf", vocab_of(sp))
    spec = open_gguf(path).tokenizer_spec()
    assert spec is not None
    assert (spec.bos_id, spec.eos_id, spec.add_bos, spec.add_eos, spec.add_space_prefix) == (
        1,
        2,
        True,
        False,
        True,
    )
    assert spec.scores[:6] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0] and len(spec.scores) == sp.vocab_size()
    assert spec.model_name == "tiny"


def test_missing_byte_token_is_a_format_error() -> None:
    v = Vocab(["<unk>", "▁", "a"], [0, 0, 0], [2, 1, 1])
    with pytest.raises(FormatError) as e:
        build_tokenizer(spec_of(v)).encode("ab")
    assert str(e.value) == "the vocab has no token for 'b', nor the byte token <0x62>"


def test_phi3_vocab_needs_its_tokens() -> None:
    v = Vocab(["<unk>", "<s>", "▁"], [0, 0, 0], [2, 3, 1])
    with pytest.raises(FormatError) as e:
        build_tokenizer(spec_of(v, model_name="phi3"))
    assert str(e.value) == "a phi3 vocab must have the token '</s>'"


def test_build_is_fast() -> None:
    """A 150k-token SentencePiece vocab builds in ≤ 0.3 s."""
    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += ["▁", "w", *"0123456789", "▁w"]
    tokens += [f"▁w{i}" for i in range(150_000 - len(tokens))]
    types = [2, 3, 3, *[6] * 256] + [1] * (len(tokens) - 259)
    scores = (-rng.random(150_000)).astype(np.float32).tolist()
    spec = TokenizerSpec(model="llama", tokens=tokens, token_types=types, scores=scores,
                         add_space_prefix=True, add_bos=True, bos_id=1)  # fmt: skip
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        tok = build_tokenizer(spec)
        best = min(best, time.perf_counter() - t)
    print(f"SPM build, 150k tokens: {best * 1000:.0f} ms")
    assert tok.encode("w7") == [1, tokens.index("▁w7")]
    assert best <= 0.3


# ---- .apr: `apr import` carries what SentencePiece needs ------------------------------------------


@pytest.mark.oracle
def test_apr_import_keeps_the_tokenizer(sp: Any, tmp_path: Path) -> None:
    """GGUF → .apr → tokenizer: scores, token types and flags survive; the ids stay llama.cpp's."""
    from gguf import GGMLQuantizationType as GT
    from gguf import GGUFValueType as VT

    from apr.convert.importer import import_gguf
    from apr.formats import open_checkpoint
    from tests.formats.test_gguf import tiny_kv, write_gguf

    v = vocab_of(sp)
    kv = {k: x for k, x in tiny_kv().items() if not k.startswith("tokenizer.")}
    kv |= {
        "tokenizer.ggml.model": ("llama", VT.STRING, None),
        "tokenizer.ggml.tokens": (v.tokens, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.scores": (v.scores, VT.ARRAY, VT.FLOAT32),
        "tokenizer.ggml.token_type": (v.types, VT.ARRAY, VT.INT32),
        "tokenizer.ggml.add_eos_token": (True, VT.BOOL, None),
        "tokenizer.ggml.add_space_prefix": (False, VT.BOOL, None),
    }
    shapes = {"token_embd.weight": (len(v.tokens), 64), "output_norm.weight": (64,),
              "blk.0.attn_norm.weight": (64,), "blk.0.attn_q.weight": (64, 64),
              "blk.0.attn_k.weight": (32, 64), "blk.0.attn_v.weight": (32, 64),
              "blk.0.attn_output.weight": (64, 64), "blk.0.ffn_norm.weight": (64,),
              "blk.0.ffn_gate.weight": (128, 64), "blk.0.ffn_up.weight": (128, 64),
              "blk.0.ffn_down.weight": (64, 128)}  # fmt: skip
    tensors = {name: (np.full(shape, 0.01, np.float32), GT.F32) for name, shape in shapes.items()}
    src = write_gguf(tmp_path / "spm.gguf", kv=kv, tensors=tensors)
    import_gguf(src, tmp_path / "spm.apr")
    from_gguf, from_apr = (
        open_checkpoint(src).tokenizer_spec(),
        open_checkpoint(tmp_path / "spm.apr").tokenizer_spec(),
    )
    assert from_gguf is not None and from_apr is not None
    for field in (
        "model",
        "bos_id",
        "eos_id",
        "add_bos",
        "add_eos",
        "add_space_prefix",
        "fim_ids",
        "model_name",
    ):
        assert getattr(from_apr, field) == getattr(from_gguf, field), field
    assert list(from_apr.tokens) == list(from_gguf.tokens) and list(from_apr.scores) == list(from_gguf.scores)
    assert list(from_apr.token_types) == list(from_gguf.token_types)
    ours, oracle = build_tokenizer(from_apr), pair(src)
    texts = [*HARD, *corpus(100, seed=5)]
    assert [ours.encode(t) for t in texts] == [oracle.theirs(t) for t in texts]
