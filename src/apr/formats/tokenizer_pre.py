r"""llama.cpp's BPE pre-tokenizers (`tokenizer.ggml.pre`) as the regexes `tokenizers` splits with.

Mirrors llama-vocab.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors: `llm_tokenizer_bpe`'s
`regex_exprs` per LLAMA_VOCAB_PRE_TYPE_* (below, verbatim; a CR / LF character is written `\r` / `\n`),
and the name → type mapping of `llama_vocab::impl::load` with the flags each name sets there
(`ignore_merges`, the `add_bos` default). llama.cpp applies the regexes in turn (unicode.cpp
`unicode_regex_split`), each to the pieces the previous ones left; `tokenizers` does the same with one
isolating `Split` each. How llama.cpp runs a regex decides what `tokenizers` is given (`onig_regexes`):

- A few regexes are matched by hand-written splitters (`unicode_regex_split_custom`). Those for llama3,
  qwen2, qwen35 and `[^\n]+|[\n]+` do what the regex says; gpt2's also has onig's trailing `|\s+`;
  kimi-k2's `\p{Han}+` stands for K2's whole pattern (`KIMI_K2`, Han as `unicode_cpt_is_han`), and
  afmoe's `\p{AFMoE_digits}` and tiny_aya's digit regex for digit runs cut into groups of three
  after a 1-2 digit head (`DIGIT_GROUPS`).
- Every other regex runs in std::regex (ECMAScript). With a Unicode category in it, on the text with
  each non-ASCII character replaced by its category's byte: \p{Lu}, \p{Ll}, \p{Lt}, \p{Lm}, \p{Lo}
  all become "any letter", so they are given to onig as \p{L}. \d matches only 0-9 in std::regex
  (the text's other digits are category bytes, or iswdigit of the C locale), so it becomes [0-9].
  \s matches White_Space in both (llama.cpp maps non-ASCII spaces to \v first). Without a category
  (std::wregex on the code points), those spaces, being \v, match none of the regex's non-ASCII
  characters: its classes leave them out (`_WIDE_SPACES`).
- The names whose BPE runs on raw UTF-8 rather than GPT-2's byte alphabet (gemma4,
  granite-embed-multi-311m, sarvam-moe, whitespace) are not here: formats/tokenizer_raw.py has them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

# ---- llama-vocab.cpp's regex_exprs, per LLAMA_VOCAB_PRE_TYPE_* ----------------------------------
_LLAMA3: Final = (
    (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
        r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_JAIS2: Final = (
    (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
        r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|"
        r"\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|"
        r"\s{1,2}(?!\S)|\s{1}"
    ),
)
_DEEPSEEK_LLM: Final = (
    r"[\r\n]",
    (
        r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕ"
        r"ἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛ"
        r"Ꜣ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
    ),
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
_DEEPSEEK3_LLM: Final = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    (
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
        r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
)
_SPARK2_5: Final = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    (
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
        r""" ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"""
    ),
    r"\p{N}",
)
_YOUTU: Final = (
    r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|"
        r"'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|"
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|"
        r"'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_DEEPSEEK_CODER: Final = (
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}",
)
_FALCON: Final = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"[0-9][0-9][0-9]",
)
_STARCODER: Final = (
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
)
_GPT2: Final = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",)
_STABLELM2: Final = (
    (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
        r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_QWEN35: Final = (
    (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|"
        r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|"
        r"\s+(?!\S)|\s+"
    ),
)
_PORO: Final = (r" ?[^(\s|.,!?…。，、।۔،)]+",)
_VIKING: Final = (
    r" ?[^(\s|.,!?…。，、।۔،)]+",
    r"\p{N}",
)
_TEKKEN: Final = (
    (
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|"
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_CHAMELEON: Final = (
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
)
_GPT4O: Final = (
    (
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|"
        r"'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|"
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|"
        r"'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
        r"\s+(?!\S)|\s+"
    ),
)
_GRANITE_EMB_MULTI: Final = (
    (
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|"
        r"'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|"
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|"
        r"'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_TINY_AYA: Final = (
    r"\d{1,3}(?=(?:\d{3})*\b)",
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|"
        r"'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|"
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|"
        r"'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_KIMI_K2: Final = (r"\p{Han}+",)
_SUPERBPE: Final = (
    r"\p{N}+",
    r"(?=(\d{3})+(?!\d))",
)
_BAILINGMOE: Final = (
    (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
    ),
)
_SEED_CODER: Final = (
    (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
        r"\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_UFAKZEKA: Final = (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_AFMOE: Final = (
    r"\p{AFMoE_digits}",
    r"[一-鿿㐀-䶿豈-﫿぀-ゟ゠-ヿ･-ﾟ⼀-⿟เ-๿຀-໿ក-៿က-႟ꩠ-ꩿꧠ-꧿가-힯ᄀ-ᇿ]+",
    (
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
        r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
)
_LAGUNA: Final = (
    r"[^\n]+|[\n]+",
    (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
        r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_EXAONE_MOE: Final = (
    (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|"
        r"[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|"
        r"\s*[\r\n]|\s+(?!\S)|\s+"
    ),
)
_GEMMA4: Final = (r"[^\n]+|[\n]+",)
_MINICPM5: Final = (
    r"\p{N}{1,3}",
    (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
        r"\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_WHITESPACE: Final = (r"\S+",)
_DEFAULT: Final = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)
REGEXES: Final[dict[str, tuple[str, ...]]] = {
    "LLAMA3": _LLAMA3,
    "JAIS2": _JAIS2,
    "DBRX": _LLAMA3,
    "SMAUG": _LLAMA3,
    "DEEPSEEK_LLM": _DEEPSEEK_LLM,
    "DEEPSEEK3_LLM": _DEEPSEEK3_LLM,
    "HUNYUAN_DENSE": _DEEPSEEK3_LLM,
    "JOYAI_LLM": _DEEPSEEK3_LLM,
    "HY_V4": _DEEPSEEK3_LLM,
    "SPARK2_5": _SPARK2_5,
    "YOUTU": _YOUTU,
    "DEEPSEEK_CODER": _DEEPSEEK_CODER,
    "FALCON": _FALCON,
    "STARCODER": _STARCODER,
    "REFACT": _STARCODER,
    "COMMAND_R": _STARCODER,
    "SMOLLM": _STARCODER,
    "CODESHELL": _STARCODER,
    "EXAONE": _STARCODER,
    "MINERVA": _STARCODER,
    "MELLUM2": _STARCODER,
    "GPT2": _GPT2,
    "MPT": _GPT2,
    "OLMO": _GPT2,
    "JAIS": _GPT2,
    "TRILLION": _GPT2,
    "GRANITE_DOCLING": _GPT2,
    "STABLELM2": _STABLELM2,
    "QWEN2": _STABLELM2,
    "HUNYUAN": _STABLELM2,
    "SOLAR_OPEN": _STABLELM2,
    "QWEN35": _QWEN35,
    "PORO": _PORO,
    "BLOOM": _PORO,
    "GPT3_FINNISH": _PORO,
    "CHATGLM4": _LLAMA3,
    "VIKING": _VIKING,
    "TEKKEN": _TEKKEN,
    "CHAMELEON": _CHAMELEON,
    "GPT4O": _GPT4O,
    "MINIMAX_M2": _GPT4O,
    "GRANITE_EMB_MULTI": _GRANITE_EMB_MULTI,
    "TINY_AYA": _TINY_AYA,
    "KIMI_K2": _KIMI_K2,
    "SUPERBPE": _SUPERBPE,
    "BAILINGMOE": _BAILINGMOE,
    "SEED_CODER": _SEED_CODER,
    "UFAKZEKA": _UFAKZEKA,
    "GROK_2": _STABLELM2,
    "AFMOE": _AFMOE,
    "LAGUNA": _LAGUNA,
    "EXAONE_MOE": _EXAONE_MOE,
    "GEMMA4": _GEMMA4,
    "SARVAM_MOE": _GEMMA4,
    "MINICPM5": _MINICPM5,
    "WHITESPACE": _WHITESPACE,
    "DEFAULT": _DEFAULT,
}


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    kind: str  # LLAMA_VOCAB_PRE_TYPE_<kind>
    regexes: tuple[str, ...]  # as llama.cpp has them
    ignore_merges: bool = False  # a whole piece found in the vocab is one token
    add_bos: bool = False  # llama.cpp's add_bos when the GGUF has no tokenizer.ggml.add_bos_token


def _named(
    kind: str, names: tuple[str, ...], ignore_merges: bool = False, add_bos: bool = False
) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names, PreTokenizer(kind, REGEXES[kind], ignore_merges, add_bos))


# llama_vocab::impl::load: LLAMA_VOCAB_PRE_TYPE_* ← tokenizer.ggml.pre names, and the flags those set
PRE_TOKENIZERS: Final[dict[str, PreTokenizer]] = {
    **_named("DEFAULT", ("default",)),
    **_named("MINICPM5", ("minicpm5",), ignore_merges=True),
    **_named(
        "LLAMA3",
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ),
        ignore_merges=True,
        add_bos=True,
    ),
    **_named("DEEPSEEK_LLM", ("deepseek-llm",)),
    **_named("DEEPSEEK_CODER", ("deepseek-coder",)),
    **_named("DEEPSEEK3_LLM", ("deepseek-v3",)),
    **_named("SPARK2_5", ("spark2_5",)),
    **_named("YOUTU", ("youtu",), ignore_merges=True),
    **_named("FALCON", ("falcon",)),
    **_named("MPT", ("mpt",)),
    **_named("STARCODER", ("starcoder",)),
    **_named(
        "GPT2",
        (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
        ),
    ),
    **_named("JAIS2", ("jais-2",)),
    **_named("GPT2", ("jina-v1-en", "jina-v2-code", "roberta-bpe")),
    **_named("REFACT", ("refact",)),
    **_named("COMMAND_R", ("command-r",)),
    **_named("QWEN2", ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2")),
    **_named("QWEN35", ("qwen35",)),
    **_named("STABLELM2", ("stablelm2",)),
    **_named("OLMO", ("olmo",)),
    **_named("DBRX", ("dbrx",)),
    **_named("SMAUG", ("smaug-bpe",)),
    **_named("PORO", ("poro-chat",)),
    **_named("CHATGLM4", ("chatglm-bpe",)),
    **_named("CHATGLM4", ("glm4", "glm5"), ignore_merges=True),
    **_named("VIKING", ("viking",)),
    **_named("JAIS", ("jais",)),
    **_named("TEKKEN", ("tekken",), ignore_merges=True, add_bos=True),
    **_named("SMOLLM", ("smollm",)),
    **_named("CODESHELL", ("codeshell",)),
    **_named("BLOOM", ("bloom",)),
    **_named("GPT3_FINNISH", ("gpt3-finnish",)),
    **_named("EXAONE", ("exaone",)),
    **_named("GPT2", ("exaone4",)),
    **_named("EXAONE_MOE", ("exaone-moe",)),
    **_named("CHAMELEON", ("chameleon",), add_bos=True),
    **_named("MINERVA", ("minerva-7b",)),
    **_named("QWEN2", ("megrez",)),
    **_named("GPT4O", ("gpt-4o", "llama4", "kanana2", "talkie")),
    **_named("GRANITE_EMB_MULTI", ("granite-embed-multi-97m",), ignore_merges=True),
    **_named("TINY_AYA", ("tiny_aya", "cohere2moe")),
    **_named("SUPERBPE", ("superbpe",)),
    **_named("TRILLION", ("trillion",)),
    **_named("GRANITE_DOCLING", ("granite-docling",)),
    **_named("BAILINGMOE", ("bailingmoe", "bailingmoe2", "llada-moe")),
    **_named("SEED_CODER", ("seed-coder",)),
    **_named("HUNYUAN", ("hunyuan",)),
    **_named("HUNYUAN_DENSE", ("hunyuan-dense",)),
    **_named("HY_V4", ("hy_v4",)),
    **_named("JOYAI_LLM", ("joyai-llm",)),
    **_named("KIMI_K2", ("kimi-k2",)),
    **_named("UFAKZEKA", ("ufakzeka",)),
    **_named("GROK_2", ("grok-2",)),
    **_named("AFMOE", ("afmoe",)),
    **_named("LAGUNA", ("laguna",)),
    **_named("MINIMAX_M2", ("minimax-m2",)),
    **_named("SOLAR_OPEN", ("solar-open",)),
    **_named("MELLUM2", ("mellum2",)),
}
ADD_BOS_BY_DEFAULT: Final = frozenset(n for n, p in PRE_TOKENIZERS.items() if p.add_bos)

# ---- the regexes as onig must see them to split as llama.cpp does -------------------------------

_GPT2_REGEX: Final = _GPT2[0]
# unicode_cpt_is_han
_HAN: Final = (
    r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}"
)
# unicode_regex_split_custom_kimi_k2: Han runs, then K2's letters (no marks) without Han, numbers, ...
KIMI_K2: Final = (
    rf"[{_HAN}]+|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_HAN}]]+(?:'[sStTmMdD]|'[rR][eE]|'[vV][eE]|'[lL][lL])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# unicode_regex_split_custom_afmoe: each run of \p{N} cut into its first (length % 3 or 3) digits, with
# the text since the previous run in front of them, then threes; the text after the last run on its own
DIGIT_GROUPS: Final = r"\P{N}*\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"
_REPLACED: Final = {
    _GPT2_REGEX: _GPT2_REGEX + r"|\s+",
    _KIMI_K2[0]: KIMI_K2,
    _AFMOE[0]: DIGIT_GROUPS,
    _TINY_AYA[0]: DIGIT_GROUPS,
}
_BY_HAND: Final = frozenset((_LLAMA3[0], _STABLELM2[0], _QWEN35[0], _LAGUNA[0]))
_LETTER_CLASSES: Final = re.compile(r"\\p\{L[ultmo]\}")


# llama.cpp's whitespace above ASCII (unicode_set_whitespace), which it turns into \v before a std::wregex
_WIDE_SPACES: Final = r"\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}"
_CLASS: Final = re.compile(r"\[(?!\^)((?:\\.|[^\]\\])*)\]")


def onig_regexes(pre: PreTokenizer) -> tuple[str, ...]:
    """`pre`'s regexes as `tokenizers` (onig) must run them to split as llama.cpp does."""
    return tuple(_onig(r) for r in pre.regexes)


def _onig(regex: str) -> str:
    if regex in _REPLACED:
        return _REPLACED[regex]
    if regex in _BY_HAND:
        return regex
    if r"\p{" not in regex and not regex.isascii():  # std::wregex on the text with its wide spaces as \v
        regex = _CLASS.sub(lambda m: f"[{m[1]}&&[^{_WIDE_SPACES}]]", regex)
    return _LETTER_CLASSES.sub(r"\\p{L}", regex).replace(r"\d", "[0-9]")
