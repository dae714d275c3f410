"""Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json), tokenized as transformers 5 does.

transformers' TokenizersBackend loads tokenizer.json into a `tokenizers.Tokenizer`, then:
- A class that rebuilds its pipeline from the file's vocab and merges (`REBUILT`; today LlamaTokenizer,
  the class of Llama-2 / Mistral / TinyLlama folders) gets that class's pieces instead of the file's: no
  normalizer, Metaspace("▁", split=False) prepending "first" ("always" with `legacy: true`, "never" with
  `add_prefix_space: false`), BPE with byte fallback and fused unknowns. The file's added tokens stay.
  Other classes that rebuild (Qwen2Tokenizer, GemmaTokenizer, ...) are taken as tokenizer.json says.
- The file's post-processor adds BOS / EOS (Llama-2's adds BOS); a file without one adds nothing.
  tokenizer_config.json's `add_bos_token` / `add_eos_token` do not count: transformers 5 drops them
  whenever there is a tokenizer.json (`_from_pretrained` pops both), then rebuilds a missing
  post-processor with both false. (transformers 4 honoured them for LlamaTokenizerFast.)
`hf_spec` reads the same files for `apr inspect`: vocab, merges, special tokens, BOS/EOS and whether they
are added; `hf_backend` builds the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import tokenizers
from tokenizers import pre_tokenizers, processors

from apr.errors import AprIOError, FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer_bpe import load

TOKENIZER_JSON: Final = "tokenizer.json"
TOKENIZER_CONFIG: Final = "tokenizer_config.json"
MODEL: Final = "tokenizer.json"  # TokenizerSpec.model of an HF tokenizer
CONTROL, USER_DEFINED = 3, 4  # GGUF token types given to added tokens (special or not), for the summary


@dataclass(frozen=True, slots=True)
class Rebuild:
    bos: str  # the class's default bos_token / eos_token
    eos: str


REBUILT: Final[dict[str, Rebuild]] = {
    "LlamaTokenizer": Rebuild("<s>", "</s>"),
    "LlamaTokenizerFast": Rebuild("<s>", "</s>"),
}


@dataclass(frozen=True, slots=True)
class HfConfig:
    """What transformers takes from tokenizer_config.json."""

    tokenizer_class: str | None = None
    bos: str | None = None
    eos: str | None = None
    legacy: bool = False
    add_prefix_space: bool | None = None

    @property
    def rebuild(self) -> Rebuild | None:
        return REBUILT.get(self.tokenizer_class or "")

    @property
    def bos_token(self) -> str | None:
        return self.bos or (self.rebuild.bos if self.rebuild else None)

    @property
    def eos_token(self) -> str | None:
        return self.eos or (self.rebuild.eos if self.rebuild else None)


def read_config(folder: Path) -> HfConfig:
    path = folder / TOKENIZER_CONFIG
    if not path.is_file():
        return HfConfig()
    raw = _json(path)
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: not a JSON object")
    flags = {k: raw.get(k) for k in ("legacy", "add_prefix_space")}
    for k, v in flags.items():
        if v is not None and not isinstance(v, bool):
            raise FormatError(f"{path}: '{k}' must be true or false, got {v!r}")
    return HfConfig(
        tokenizer_class=raw.get("tokenizer_class") if isinstance(raw.get("tokenizer_class"), str) else None,
        bos=_token_text(raw.get("bos_token")),
        eos=_token_text(raw.get("eos_token")),
        legacy=bool(flags["legacy"]),
        add_prefix_space=flags["add_prefix_space"],
    )


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or a serialized AddedToken."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def hf_backend(path: Path) -> Any:
    """The `tokenizers.Tokenizer` transformers encodes with, for tokenizer.json at `path`."""
    if not path.is_file():
        raise AprIOError(f"tokenizer file not found: {path}")
    backend = load(lambda: tokenizers.Tokenizer.from_file(str(path)), f"{path}: ")
    cfg = read_config(path.parent)
    if cfg.rebuild is not None:
        _rebuild(backend, cfg)
    if backend.post_processor is None:  # transformers' update_post_processor with both flags false
        backend.post_processor = processors.TemplateProcessing(single="$A:0", special_tokens=[])
    return backend


def _rebuild(backend: Any, cfg: HfConfig) -> None:
    if not isinstance(backend.model, tokenizers.models.BPE):
        raise FormatError(
            f"{cfg.tokenizer_class} expects a BPE tokenizer.json, got {type(backend.model).__name__}"
        )
    prefix = cfg.add_prefix_space is not False
    scheme = ("always" if cfg.legacy else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    backend.model.byte_fallback = True
    backend.model.fuse_unk = True


def hf_spec(folder: Path) -> TokenizerSpec | None:
    """The spec of the HF tokenizer in `folder` (None without tokenizer.json), filled for `apr inspect`."""
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        return None
    doc = _json(path)
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict):
        raise FormatError(f"{path}: no 'model' object")
    tokens, types = _vocab(model, doc.get("added_tokens") or [], path)
    cfg = read_config(folder)
    ids = {t: i for i, t in enumerate(tokens)}
    bos, eos = _ends(doc.get("post_processor"))
    merges = model.get("merges") or []
    return TokenizerSpec(
        model=MODEL,
        pre=str((doc.get("pre_tokenizer") or {}).get("type", "none")),
        tokens=tokens,
        merges=[m if isinstance(m, str) else " ".join(m) for m in merges],
        token_types=types,
        bos_id=ids.get(bos or cfg.bos_token or ""),
        eos_id=ids.get(eos or cfg.eos_token or ""),
        add_bos=bos is not None and bos in ids,
        add_eos=eos is not None and eos in ids,
        json_path=path,
    )


def _vocab(model: dict[str, Any], added: list[Any], path: Path) -> tuple[list[str], list[int]]:
    vocab = model.get("vocab") or {}
    pairs = list(vocab.items()) if isinstance(vocab, dict) else [(v[0], i) for i, v in enumerate(vocab)]
    extra = [(a["content"], a["id"], a.get("special", False)) for a in added if isinstance(a, dict)]
    if not all(isinstance(i, int) and i >= 0 for _, i in pairs) or not all(
        isinstance(i, int) and i >= 0 for _, i, _ in extra
    ):
        raise FormatError(f"{path}: token ids must be non-negative integers")
    n = max([i + 1 for _, i in pairs] + [i + 1 for _, i, _ in extra], default=0)
    tokens, types = [""] * n, [1] * n
    for t, i in pairs:
        tokens[i] = t
    for t, i, special in extra:
        tokens[i], types[i] = t, CONTROL if special else USER_DEFINED
    return tokens, types


def _ends(post: Any) -> tuple[str | None, str | None]:
    """The special tokens the file's TemplateProcessing puts before and after the text."""
    if post is None:
        return None, None
    single = _single_template(post)
    special = [(p.get("SpecialToken") or {}).get("id") for p in single[:1] + single[-1:]]
    return (special[0], special[-1]) if len(special) == 2 else (None, None)


def _single_template(post: dict[str, Any]) -> list[dict[str, Any]]:
    if post.get("type") == "Sequence":
        found = [_single_template(p) for p in post.get("processors", [])]
        return next((s for s in found if s), [])
    return list(post.get("single", [])) if post.get("type") == "TemplateProcessing" else []
