"""Chat templates: a user turn (and an optional system turn) rendered as transformers renders them.

The template is the checkpoint's own (`TokenizerSpec.chat_template`): GGUF `tokenizer.chat_template`, an
.apr's `tokenizer.chat_template`, an HF folder's `chat_template.jinja` or tokenizer_config.json's
`chat_template`.
`render_chat` replicates transformers 5's `apply_chat_template(messages, add_generation_prompt=True)`
(utils/chat_template_utils.py, `_cached_compile_jinja_template` and `render_jinja_template`):

- an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
  extension and a `{% generation %}` block tag that renders its body (transformers tracks assistant spans
  with it; a template that uses it must still parse);
- `tojson` without HTML escaping, `raise_exception(msg)`, `strftime_now(fmt)`, and transformers' guarded
  `dict` and `namespace` globals;
- the variables `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the tokenizer's
  special tokens as text (`bos_token`, `eos_token`, and for an HF folder `unk_token` / `pad_token` as
  tokenizer_config.json or the tokenizer class sets them: transformers' `special_tokens_map`).

The rendered text is tokenized with nothing added around it (`Tokenizer.encode_bare`, transformers'
`add_special_tokens=False`): a template writes its BOS itself. `strftime_now` makes a template that calls
it (Llama 3.1's "Today Date") depend on the day it runs; the trace manifest records the rendered text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

from apr.errors import FormatError, ValidationError
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer_hf import MODEL as HF_MODEL
from apr.formats.tokenizer_hf import SPECIAL_KEYS, read_config

Message = Mapping[str, str]


def chat_messages(text: str, system: str | None = None) -> list[dict[str, str]]:
    """The conversation apr sends: an optional system message, then one user message."""
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": text}]


def template_tokens(spec: TokenizerSpec) -> dict[str, str]:
    """The special tokens a template sees as variables, as transformers' `special_tokens_map` has them."""
    if spec.model == HF_MODEL and spec.json_path is not None:
        cfg = read_config(spec.json_path.parent)
        return {k: t for k in SPECIAL_KEYS if (t := cfg.token(k)) is not None}
    named = (("bos_token", spec.bos_id), ("eos_token", spec.eos_id))
    return {k: spec.tokens[i] for k, i in named if i is not None and 0 <= i < len(spec.tokens)}


def render_chat(
    template: str,
    messages: Sequence[Message],
    tokens: Mapping[str, str],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The template rendered on `messages`. A template that raises (`raise_exception`, an undefined call,
    a sandbox violation) is a ValidationError with its message; one that does not parse, a FormatError."""
    import jinja2

    compiled = _compile(template)
    try:
        text: str = compiled.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **tokens,
        )
    except jinja2.TemplateError as e:
        raise ValidationError(f"the chat template refused the conversation: {e}") from None
    return text


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    # jinja2 takes ~70 ms to import: only a chat prompt pays for it (pyproject requires >= 3.1.6, the
    # version transformers requires: older ones have known sandbox escapes)
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag(), jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(_GLOBALS)
    env.globals["namespace"] = _namespace_class()
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        where = f"line {e.lineno}: {e.message}"
        raise FormatError(f"the model's chat template is not valid Jinja ({where})") from None


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson: no HTML escaping (Jinja's own escapes <, >, &, ')."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """transformers' `dict` global: callable and `fromkeys`, no attribute access to the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


_GLOBALS: Final[dict[str, Callable[..., Any] | _TemplateDict]] = {
    "raise_exception": _raise_exception,
    "strftime_now": _strftime_now,
    "dict": _TemplateDict(),
}


def _namespace_class() -> type:
    """transformers' TemplateNamespace: a Jinja namespace that refuses underscore-prefixed names."""
    import jinja2.exceptions
    import jinja2.utils

    def check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(  # transformers' message
                "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"but got {name!r}. Please rename the attribute."
            )

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: namespace(self=...) works
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace


def _generation_tag() -> type:
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant spans with it; rendered as its
    body (apr renders a prompt, it tracks no spans)."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012  (Jinja's class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    return Generation
