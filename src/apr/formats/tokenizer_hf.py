"""Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json), tokenized as transformers 5 does.

transformers' AutoTokenizer picks a class, loads tokenizer.json into a `tokenizers.Tokenizer`, and:
- The class (`tokenizer_class`), reduced to what matters for the model types apr runs: the declared
  class, except that a model type whose Hub class transformers calls wrong (`WRONG_HUB_CLASS`) gets the
  registered one (`REGISTERED`; qwen2 → Qwen2Tokenizer), and a LlamaTokenizer whose tokenizer.json is
  byte-level (Llama 3) is read as the file says.
- A class that rebuilds its pipeline from the file's vocab and merges (`REBUILDS`) gets its own pieces
  instead of the file's. LlamaTokenizer: no normalizer, Metaspace("▁", split=False) prepending "first"
  ("always" with `legacy: true`, "never" with `add_prefix_space: false`), byte fallback, fused unknowns.
  Qwen2Tokenizer: NFC, Qwen2's regex, byte-level. The file's added tokens stay. Other classes that
  rebuild (GemmaTokenizer, ...) are taken as tokenizer.json says.
- Its special tokens (bos / eos / unk / pad from tokenizer_config.json, else the class's defaults) that
  are not added tokens yet are added as special tokens (matched whole in the text).
- The file's post-processor adds BOS / EOS (Llama-2's adds BOS); a file without one adds nothing.
  tokenizer_config.json's `add_bos_token` / `add_eos_token` do not count: transformers 5 drops them
  whenever there is a tokenizer.json (`_from_pretrained` pops both), then rebuilds a missing
  post-processor with both false. (transformers 4 honoured them for LlamaTokenizerFast.)
`hf_spec` reads the same files for `apr inspect`: vocab, merges, special tokens, BOS / EOS and whether they
are added, and the chat template as transformers 5 finds it (`chat_template.jinja` beside the tokenizer, else
tokenizer_config.json's `chat_template`: a string, or a list of named templates of which "default" is
used); `hf_backend` builds the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

from apr.errors import AprIOError, FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.files import read_regular
from apr.formats.jsonio import MAX_JSON_BYTES, load_json, maybe
from apr.formats.tokenizer_bpe import load

TOKENIZER_JSON: Final = "tokenizer.json"
TOKENIZER_CONFIG: Final = "tokenizer_config.json"
CHAT_TEMPLATE_FILE: Final = "chat_template.jinja"  # transformers 5 saves a single template here
CONFIG_JSON: Final = "config.json"
MODEL: Final = "tokenizer.json"  # TokenizerSpec.model of an HF tokenizer
MAX_VOCAB: Final = 1 << 24  # token ids past this are corrupt (the largest real vocabs are ~260k)
CONTROL, USER_DEFINED = 3, 4  # GGUF token types given to added tokens (special or not), for the summary
SPECIAL_KEYS: Final = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers 5 TOKENIZER_MAPPING_NAMES / MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, for apr's model types
REGISTERED: Final = {"qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer"}
WRONG_HUB_CLASS: Final = frozenset({"qwen2", "phi3"})
QWEN2_REGEX: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclass(frozen=True, slots=True)
class HfConfig:
    """What transformers takes from tokenizer_config.json (and config.json's model_type)."""

    tokenizer_class: str | None = None
    special: tuple[tuple[str, str], ...] = ()  # (key, token) for the SPECIAL_KEYS it sets
    legacy: bool = False
    add_prefix_space: bool | None = None
    model_type: str | None = None
    byte_level: bool = False  # tokenizer.json mentions "ByteLevel" (transformers' own test)

    @property
    def klass(self) -> str:
        """The class AutoTokenizer instantiates, without "Fast"."""
        hub = (self.tokenizer_class or "").removesuffix("Fast")
        registered = REGISTERED.get(self.model_type or "")
        if hub == "LlamaTokenizer" and self.model_type not in WRONG_HUB_CLASS and self.byte_level:
            return "TokenizersBackend"
        if registered and (not hub or self.model_type in WRONG_HUB_CLASS):
            return registered
        return hub or "TokenizersBackend"

    def token(self, key: str) -> str | None:
        """A special token: the config's, else the class's default."""
        given = dict(self.special)
        if key in given:
            return given[key]
        rebuild = REBUILDS.get(self.klass)
        return rebuild.defaults.get(key) if rebuild else None


def read_config(folder: Path, tokenizer_json: str = "") -> HfConfig:
    path = folder / TOKENIZER_CONFIG
    raw = _json(path) if path.is_file() else {}
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: not a JSON object")
    flags = {k: raw.get(k) for k in ("legacy", "add_prefix_space")}
    for k, v in flags.items():
        if v is not None and not isinstance(v, bool):
            raise FormatError(f"{path}: '{k}' must be true or false, got {v!r}")
    model = _json(folder / CONFIG_JSON) if (folder / CONFIG_JSON).is_file() else {}
    model = model if isinstance(model, dict) else {}
    klass = raw.get("tokenizer_class") or model.get("tokenizer_class")
    special = ((k, t) for k in SPECIAL_KEYS if (t := _token_text(raw.get(k))) is not None)
    return HfConfig(
        tokenizer_class=klass if isinstance(klass, str) else None,
        special=tuple(special),
        legacy=bool(flags["legacy"]),
        add_prefix_space=flags["add_prefix_space"],
        model_type=model.get("model_type") if isinstance(model.get("model_type"), str) else None,
        byte_level='"ByteLevel"' in tokenizer_json,
    )


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or a serialized AddedToken."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _json(path: Path) -> Any:
    return load_json(path)


def _text(path: Path) -> str:
    return read_regular(path, MAX_JSON_BYTES).decode("utf-8", errors="replace")


def hf_backend(path: Path) -> Any:
    """The `tokenizers.Tokenizer` transformers encodes with, for tokenizer.json at `path`."""
    if not path.is_file():
        raise AprIOError(f"tokenizer file not found: {path}")
    text = _text(path)
    backend = load(lambda: tokenizers.Tokenizer.from_str(text), f"{path}: ")
    cfg = read_config(path.parent, text)
    rebuild = REBUILDS.get(cfg.klass)
    if rebuild is not None:
        if not isinstance(backend.model, tokenizers.models.BPE):
            raise FormatError(f"{path}: {cfg.klass} needs a BPE model, got {type(backend.model).__name__}")
        rebuild.apply(backend, cfg)
    added = {a.content for a in backend.get_added_tokens_decoder().values()}
    missing = {t for k in SPECIAL_KEYS if (t := cfg.token(k)) is not None} - added
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(missing)])
    if backend.post_processor is None:  # transformers' update_post_processor with both flags false
        backend.post_processor = processors.TemplateProcessing(single="$A:0", special_tokens=[])
    return backend


def _llama(backend: Any, cfg: HfConfig) -> None:
    prefix = cfg.add_prefix_space is not False
    scheme = ("always" if cfg.legacy else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    backend.model.byte_fallback = True
    backend.model.fuse_unk = True


def _qwen2(backend: Any, cfg: HfConfig) -> None:
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.add_prefix_space), use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.model.byte_fallback = False
    backend.model.fuse_unk = False


@dataclass(frozen=True, slots=True)
class Rebuild:
    apply: Callable[[Any, HfConfig], None]
    defaults: dict[str, str]  # the class's special tokens


REBUILDS: Final[dict[str, Rebuild]] = {
    "LlamaTokenizer": Rebuild(_llama, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "Qwen2Tokenizer": Rebuild(
        _qwen2, dict.fromkeys(("eos_token", "unk_token", "pad_token"), "<|endoftext|>")
    ),
}


def hf_spec(folder: Path) -> TokenizerSpec | None:
    """The spec of the HF tokenizer in `folder` (None without tokenizer.json), filled for `apr inspect`."""
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        return None
    doc = _json(path)
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict):
        raise FormatError(f"{path}: no 'model' object")
    where = str(path)
    tokens, types = _vocab(model, maybe(doc, "added_tokens", list, where, []), path)
    cfg = read_config(folder, _text(path))
    ids = {t: i for i, t in enumerate(tokens)}
    bos, eos = _ends(doc.get("post_processor"))
    merges = maybe(model, "merges", list, f"{where}: 'model'", [])
    pre = maybe(doc, "pre_tokenizer", dict, where, {})
    return TokenizerSpec(
        model=MODEL,
        pre=str(pre.get("type", "none")),
        tokens=tokens,
        merges=[_merge(m, f"{where}: 'model.merges'") for m in merges],
        token_types=types,
        bos_id=ids.get(bos or cfg.token("bos_token") or ""),
        eos_id=ids.get(eos or cfg.token("eos_token") or ""),
        add_bos=bos is not None and bos in ids,
        add_eos=eos is not None and eos in ids,
        json_path=path,
        chat_template=chat_template(folder),
    )


def _merge(m: Any, what: str) -> str:
    """A merge as "a b", from tokenizers' old string or new [a, b] spelling."""
    if isinstance(m, str):
        return m
    if isinstance(m, list) and all(isinstance(x, str) for x in m):
        return " ".join(m)
    raise FormatError(f"{what}: a merge must be a string or an array of strings, found {m!r:.60}")


def chat_template(folder: Path) -> str | None:
    """The chat template transformers loads for the tokenizer in `folder`, or None."""
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        try:
            return read_regular(jinja, MAX_JSON_BYTES).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{jinja}: not UTF-8 text ({e})") from None
    path = folder / TOKENIZER_CONFIG
    raw = _json(path) if path.is_file() else {}
    template = raw.get("chat_template") if isinstance(raw, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _vocab(model: dict[str, Any], added: list[Any], path: Path) -> tuple[list[str], list[int]]:
    vocab = model.get("vocab") or {}
    if isinstance(vocab, dict):
        pairs = list(vocab.items())
    elif isinstance(vocab, list) and all(isinstance(v, list) and v for v in vocab):
        pairs = [(v[0], i) for i, v in enumerate(vocab)]
    else:
        raise FormatError(f"{path}: 'model.vocab' must be an object or an array of [token, score]")
    try:
        extra = [(a["content"], a["id"], a.get("special", False)) for a in added if isinstance(a, dict)]
    except KeyError as e:
        raise FormatError(f"{path}: an added token has no {e}") from None
    ids = [i for _, i in pairs] + [i for _, i, _ in extra]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_VOCAB for i in ids):
        raise FormatError(f"{path}: token ids must be integers in [0, {MAX_VOCAB})")
    if not all(isinstance(t, str) for t, _ in pairs) or not all(isinstance(t, str) for t, _, _ in extra):
        raise FormatError(f"{path}: tokens must be strings")
    n = max([i + 1 for i in ids], default=0)
    tokens, types = [""] * n, [1] * n
    for t, i in pairs:
        tokens[i] = t
    for t, i, special in extra:
        tokens[i], types[i] = t, CONTROL if special else USER_DEFINED
    return tokens, types


def _ends(post: Any) -> tuple[str | None, str | None]:
    """The special tokens the file's TemplateProcessing puts before and after the text."""
    if not isinstance(post, dict):
        return None, None
    single = [p for p in _single_template(post) if isinstance(p, dict)]
    found = [p.get("SpecialToken") for p in single[:1] + single[-1:]]
    special = [t.get("id") if isinstance(t, dict) and isinstance(t.get("id"), str) else None for t in found]
    return (special[0], special[-1]) if len(special) == 2 else (None, None)


def _single_template(post: dict[str, Any]) -> list[Any]:
    if post.get("type") == "Sequence" and isinstance(procs := post.get("processors"), list):
        found = [_single_template(p) for p in procs if isinstance(p, dict)]
        return next((s for s in found if s), [])
    single = post.get("single")
    return list(single) if post.get("type") == "TemplateProcessing" and isinstance(single, list) else []
