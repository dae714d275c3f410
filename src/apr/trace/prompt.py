"""What a run feeds the model: text (given, or read from a file), that text as a chat turn, or token ids.

`Prompt` is the request; `encode_prompt` turns it into the ids a model runs on:
- text / file: the model's own tokenizer, as its runtime adds BOS / EOS (`Tokenizer.encode`);
- chat: the model's chat template rendered on [system?, user] with the generation prompt
  (apr.formats.chat, transformers' `apply_chat_template`), then tokenized with nothing added;
- tokens: the ids as given, checked against the model's vocabulary only; no tokenizer is built, so a model
  without one (or two models whose tokenizers disagree, in `apr bisect`) can still run.
The manifest records which it was (`prompt_source`), the file, the system message and the rendered chat.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final

from apr.errors import AprIOError, FormatError, NotFoundError, ValidationError
from apr.formats.base import TokenizerSpec
from apr.models import Model
from apr.runtimes.base import check_token_ids

if TYPE_CHECKING:  # the tokenizers (and the `tokenizers` package) load when a prompt is text
    from apr.formats.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS: Final = 32768  # attn_scores alone is heads × T² floats: 4 GiB per head here
MAX_CHARS_PER_TOKEN: Final = 64  # no tokenizer packs more into one token; longer text is refused untokenized


class PromptSource(StrEnum):
    TEXT = "text"
    FILE = "file"
    TOKENS = "tokens"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class Prompt:
    """Exactly one of `text` and `token_ids`; `chat` (and `system`) only with text."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    file: Path | None = None  # where `text` was read from
    chat: bool = False
    system: str | None = None  # a system message before the user's (chat only)
    max_tokens: int = DEFAULT_MAX_TOKENS  # refuse a longer prompt (besides the model's context)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValidationError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if (self.text is None) == (self.token_ids is None):
            raise ValidationError("a prompt is either text or token ids, not both or neither")
        if self.token_ids is not None and (self.chat or self.file is not None):
            raise ValidationError("token ids are run as given: no chat template, no prompt file")
        if self.system is not None and not self.chat:
            raise ValidationError("a system message needs the chat template (chat=True)")

    @property
    def source(self) -> PromptSource:
        if self.token_ids is not None:
            return PromptSource.TOKENS
        if self.chat:
            return PromptSource.CHAT
        return PromptSource.FILE if self.file is not None else PromptSource.TEXT

    @classmethod
    def from_file(cls, path: Path, *, chat: bool = False, system: str | None = None) -> Prompt:
        """The whole file as UTF-8 text (nothing stripped: a trailing newline is part of the prompt)."""
        return cls(read_prompt_file(path), file=path, chat=chat, system=system)


def read_prompt_file(path: Path) -> str:
    if not path.exists():
        raise NotFoundError(f"File not found: {path}")
    if path.is_dir():
        raise AprIOError(f"cannot read prompt file {path}: it is a directory")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AprIOError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(
            f"prompt file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


@dataclass(frozen=True, slots=True)
class Encoded:
    token_ids: tuple[int, ...]
    tokenizer: Tokenizer | None  # None when the ids were given
    chat_text: str | None = None  # the rendered chat template, when it was applied


def encode_prompt(prompt: Prompt, model: Model) -> Encoded:
    """The ids `model` runs on for `prompt` (see the module docstring), refused beyond its context."""
    context = model.config.max_position
    limit = min(context, prompt.max_tokens)
    what = (
        f"the model's context of {context} tokens"
        if context <= prompt.max_tokens
        else (f"--max-tokens {prompt.max_tokens}")
    )
    if prompt.text is not None and len(prompt.text) > MAX_CHARS_PER_TOKEN * limit:
        raise ValidationError(
            f"the prompt has {len(prompt.text)} characters, far more than {what} holds; not tokenized"
        )
    enc = _encode(prompt, model)
    if len(enc.token_ids) > limit:
        raise ValidationError(f"the prompt is {len(enc.token_ids)} tokens, more than {what}")
    return enc


def _encode(prompt: Prompt, model: Model) -> Encoded:
    if prompt.token_ids is not None:
        return Encoded(check_token_ids(prompt.token_ids, model.config.vocab_size), None)
    assert prompt.text is not None  # __post_init__: text or ids
    spec = model.tokenizer_spec()
    if spec is None:
        raise FormatError(
            f"{model.path}: the model has no tokenizer; cannot trace without proper tokenization "
            "(give token ids with --tokens, or re-import with: apr import <source>.gguf -o <output>.apr)"
        )
    from apr.formats.tokenizer import build_tokenizer

    tok = build_tokenizer(spec)
    if not prompt.chat:
        return Encoded(_nonempty(tok.encode(prompt.text), prompt.text), tok)
    text = _render(spec, model, prompt.text, prompt.system)
    return Encoded(_nonempty(tok.encode_bare(text), text), tok, text)


def _render(spec: TokenizerSpec, model: Model, text: str, system: str | None) -> str:
    if not spec.chat_template:
        raise ValidationError(
            f"{model.path}: the model has no chat template (GGUF tokenizer.chat_template, HF "
            "chat_template.jinja or tokenizer_config.json chat_template), so --chat cannot apply one"
        )
    from apr.formats.chat import chat_messages, render_chat, template_tokens

    return render_chat(spec.chat_template, chat_messages(text, system), template_tokens(spec))


def _nonempty(ids: list[int], text: str) -> tuple[int, ...]:
    if not ids:
        raise ValidationError(f"the prompt {text!r} encodes to no tokens")
    return tuple(ids)
