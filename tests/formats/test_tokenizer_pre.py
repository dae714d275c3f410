"""Every `tokenizer.ggml.pre` of the pinned llama.cpp: apr's ids equal llama.cpp's
(`Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)`), exactly, on generated text.

One byte-level BPE is trained here with `tokenizers` on a generated multi-script corpus and written as a
vocab-only GGUF (tokenizer.ggml.model "gpt2", tokens / merges / token types, control special tokens) once
per pre-tokenizer name; the texts cover every Unicode plane, whitespace and newline runs, digits, code,
emoji ZWJ sequences, CJK, RTL, combining marks and special tokens inside text.
"""

from __future__ import annotations

import json
import random
import unicodedata
from dataclasses import replace
from pathlib import Path

import gguf as gguf
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import build_tokenizer
from apr.formats.tokenizer_pre import PRE_TOKENIZERS
from tests.formats.test_tokenizer import HARD
from tests.formats.test_tokenizer_spm import PUNCT, WORDS, corpus
from tests.formats.vocab_oracle import (
    assert_apr_round_trip,
    assert_ids,
    compare_with_llama,
    finish,
    llama_ids,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<mask>", "[MASK]", "<sentinel:0>"]
BOS = 0  # <|endoftext|>


@pytest.fixture(scope="module")
def bpe() -> tuple[list[str], list[str]]:
    """The tokens (in id order) and merges of a byte-level BPE trained on the generated corpus."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(2000, seed=1), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_bpe_vocab(
    path: Path,
    tokens: list[str],
    merges: list[str],
    pre: str,
    name: str = "tiny",
    add_bos: bool | None = True,
) -> Path:
    """A vocab-only GGUF as llama.cpp's converter writes a byte-level BPE (`_set_vocab_gpt2`);
    `add_bos` None: no tokenizer.ggml.add_bos_token."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    for key, value in {"context_length": 64, "embedding_length": 8, "block_count": 1,
                       "feed_forward_length": 16, "attention.head_count": 2}.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(BOS)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    finish(w)
    return path


def _plane_chars(rng: random.Random, n: int) -> str:
    """`n` assigned characters (Unicode 'Cn' left out: llama.cpp's and onig's tables are of other
    Unicode versions) from any of the 17 planes, the low ones more often."""
    out: list[str] = []
    while len(out) < n:
        plane = rng.choice([0, 0, 0, 0, 1, 1, 2, 3, 14, 15, 16, *range(4, 14)])
        c = chr(plane << 16 | rng.randrange(0x10000))
        if unicodedata.category(c) not in ("Cn", "Cs"):
            out.append(c)
    return "".join(out)


PIECES = [*SPECIALS, " ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "\u00a0", "\u3000", "\u2028",
          "'s", "'T", "'ll", "'RE", "0", "7", "42", "123", "4567", "1234567", "١٢٣", "٣4", "Ⅻ", "½",
          "def f(x):\n    return x ** 2", "{}", "->", "$x", "`", "IMGIMGABZ", "<sentinel:12>", "…", "。",
          "Hello", "WORLD", "camelCase", "ǅungla", "e\u0301", "\u0301\u0302", "👩\u200d👩\u200d👧",
          "🏳️\u200d🌈", "中文", "日本語テキスト", "ㄅㄆ", "한국어", "שלום", "مرحبا", "\u200f", "ß",
          "İ"]  # fmt: skip


# differences found on the way: afmoe's digit runs keep the text before them; a wide space is \v to the
# std::wregex of deepseek-llm, outside its class [...　-。]
REGRESSIONS = ["  7\u200b4567\u200b", "      123", "}    \u3000\t日本語)嫴(", "x\u3000\u3000。y"]


def texts(n: int = 160, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = [*HARD, *PIECES, *REGRESSIONS]
    for _ in range(n):
        parts = [rng.choice([*PIECES, *WORDS, *PUNCT]) for _ in range(rng.randint(1, 10))]
        if rng.random() < 0.5:
            parts.insert(rng.randrange(len(parts) + 1), _plane_chars(rng, rng.randint(1, 6)))
        out.append("".join(parts))
    return out


TEXTS = texts()


def assert_equals_llama_cpp(path: Path, pre: str, texts: list[str]) -> None:
    assert compare_with_llama(path, texts).spec.pre == pre


@pytest.mark.oracle
@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_equals_llama_cpp(
    pre: str, bpe: tuple[list[str], list[str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Exact ids (tolerance: none) for every pre-tokenizer name, BOS included."""
    assert_equals_llama_cpp(
        write_bpe_vocab(tmp_path_factory.mktemp("pre") / f"{pre}.gguf", *bpe, pre), pre, TEXTS
    )


@pytest.mark.oracle
@pytest.mark.parametrize("pre", ["llama-bpe", "tekken", "chameleon", "gpt-2", "qwen2"])
def test_add_bos_default(
    pre: str, bpe: tuple[list[str], list[str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Without tokenizer.ggml.add_bos_token, llama.cpp adds BOS for llama3, tekken and chameleon only."""
    path = write_bpe_vocab(tmp_path_factory.mktemp("bos") / f"{pre}.gguf", *bpe, pre, add_bos=None)
    assert (open_gguf(path).tokenizer_spec() or TINY).add_bos == (pre in ("llama-bpe", "tekken", "chameleon"))
    assert_equals_llama_cpp(path, pre, TEXTS[:40])


@pytest.mark.oracle
@pytest.mark.parametrize(("pre", "name"), [("gpt-2", "Tiny Modern-BERT"), ("jina-v2-code", "Phi3 tiny")])
def test_mask_lstrip(
    pre: str, name: str, bpe: tuple[list[str], list[str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """[MASK] (modern-bert in the name) and <mask> (jina-v2 pre-tokenizers, before phi3's rule) strip the
    spaces before them."""
    path = write_bpe_vocab(tmp_path_factory.mktemp("mask") / f"{pre}.gguf", *bpe, pre, name=name)
    texts = [f"{a}{m}{b}" for m in ("<mask>", "[MASK]", "<|im_end|>") for a in ("x  ", " \n", "", "\t")
             for b in ("", "  y", "\n z")]  # fmt: skip
    assert_equals_llama_cpp(path, pre, texts)


@pytest.mark.oracle
def test_phi3_named_bpe_vocab_and_its_apr_copy(bpe: tuple[list[str], list[str]], tmp_path: Path) -> None:
    """A byte-level vocab whose general.name says phi3 (Phi-4's GGUFs are gpt2 vocabs of the phi3
    architecture): llama.cpp rstrips its special tokens (but <unk>, <s>, <|endoftext|>) and </s>; the name is
    part of the tokenizer, so an .apr's tokenizer keys keep it and give the same ids."""
    import llama_cpp as llama_cpp

    tokens, merges = bpe
    extra = ["</s>", "<unk>", "<s>"]
    path = write_bpe_vocab(tmp_path / "phi.gguf", [*tokens, *extra], merges, "gpt-2", name="Phi3 mini tiny")
    spec = open_gguf(path).tokenizer_spec()
    assert spec is not None and spec.model_name == "Phi3 mini tiny"
    texts = [f"{a}{m}{b}" for m in ("<|im_end|>", "<|endoftext|>", "</s>", "<s>") for a in ("x  ", "", " \n")
             for b in ("", "  y", "\n z")]  # fmt: skip
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    want = llama_ids(llm, texts)
    assert_ids(build_tokenizer(spec), want)
    plain = write_bpe_vocab(tmp_path / "plain.gguf", [*tokens, *extra], merges, "gpt-2", name="tiny")
    unnamed = llama_ids(llama_cpp.Llama(model_path=str(plain), vocab_only=True, verbose=False), texts)
    assert unnamed != want  # the name changes llama.cpp's ids: an .apr without it would be silently off
    assert_apr_round_trip(spec, want)


TINY = TokenizerSpec(model="gpt2", tokens=("a", "b", "ab"), merges=("a b",), token_types=(1, 1, 1))


def test_unknown_name_is_an_error() -> None:
    with pytest.raises(
        FormatError, match=r"^tokenizer.ggml.pre 'no-such-pre' is not supported \(supported: "
    ):
        build_tokenizer(replace(TINY, pre="no-such-pre"))
