"""Chat templates: apr's rendering equals transformers' `render_jinja_template` (the function behind
`apply_chat_template`) for templates that use each piece of its Jinja environment, and an HF folder's
template is found where transformers finds it (`chat_template.jinja` first, then tokenizer_config.json,
a named list's "default"), with the special tokens transformers passes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

from apr.errors import FormatError, ValidationError
from apr.formats.chat import chat_messages, render_chat, template_tokens
from apr.formats.tokenizer import build_tokenizer
from apr.formats.tokenizer_hf import hf_spec
from tests.fixtures.zoo import ZooModel

pytestmark = pytest.mark.oracle

TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}
TEMPLATES = {
    # trim_blocks / lstrip_blocks: the block tags' own lines and indentation vanish
    "whitespace": """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'system' %}
<<SYS>>{{ m['content'] }}<</SYS>>
    {% else %}
[{{ m['role'] | upper }}] {{ m['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}""",
    "tojson": "{{ messages | tojson }}|{{ messages[-1] | tojson(indent=2) }}|{{ dict(a=1, b=[2]) | tojson }}",
    "namespace_loopcontrols": (
        "{% set ns = namespace(n=0, last='') %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
        "{% endif %}{% if m['role'] == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% set ns.last = m['content'] %}{% endfor %}{{ ns.n }}:{{ ns.last }}"
    ),
    "generation": (
        "{% for m in messages %}{% generation %}<{{ m['role'] }}>{{ m['content'] }}{% endgeneration %}"
        "{% endfor %}{{ tools is none }}{{ documents is none }}{{ unk_token is defined }}"
    ),
}
MESSAGES = chat_messages("What is <b>2+2</b>?  \n 'really' & \"truly\"", system="Be brief.")


def oracle(template: str, messages: list[dict[str, str]], **tokens: str) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=True, **tokens
    )
    return str(rendered[0])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_rendering_equals_transformers(name: str) -> None:
    template = TEMPLATES[name]
    assert render_chat(template, MESSAGES, TOKENS) == oracle(template, MESSAGES, **TOKENS)


def test_raise_exception_is_a_validation_error_with_its_message() -> None:
    import jinja2

    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    template += "{% endif %}"
    with pytest.raises(jinja2.TemplateError, match="^System role not supported$"):
        oracle(template, MESSAGES)
    with pytest.raises(ValidationError) as e:
        render_chat(template, MESSAGES, {})
    assert str(e.value) == "the chat template refused the conversation: System role not supported"


def test_sandbox_refusals_are_validation_errors() -> None:
    for template in ("{% set ns = namespace(_x=1) %}", "{{ messages.__class__.__mro__ }}"):
        with pytest.raises(ValidationError, match="^the chat template refused the conversation: "):
            render_chat(template, MESSAGES, {})


def test_a_template_that_does_not_parse_is_a_format_error() -> None:
    with pytest.raises(FormatError) as e:
        render_chat("{% for m in messages %}", MESSAGES, {})
    assert str(e.value).startswith("the model's chat template is not valid Jinja (line 1: ")


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _write_jinja(folder: Path) -> None:
    (folder / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")


def _write_named_list(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    conf = json.loads(path.read_text())
    conf["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": TEMPLATE},
    ]
    path.write_text(json.dumps(conf))


def _write_both(folder: Path) -> None:  # the .jinja file wins over the config's entry
    path = folder / "tokenizer_config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps({**conf, "chat_template": "CONFIG"}))
    _write_jinja(folder)


WRITERS: dict[str, Callable[[Path], None]] = {
    "jinja": _write_jinja, "named_list": _write_named_list, "jinja_over_config": _write_both,
}  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # SentencePiece with BOS / byte-level BPE without
@pytest.mark.parametrize("where", sorted(WRITERS))
def test_hf_folder_template_ids_equal_apply_chat_template(
    zoo: Callable[[str], ZooModel], tmp_path: Path, family: str, where: str
) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(zoo(family).hf_dir, folder)
    WRITERS[where](folder)
    spec = hf_spec(folder)
    assert spec is not None and spec.chat_template == TEMPLATE
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    want: Any = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert template_tokens(spec) == tok.special_tokens_map
    text = render_chat(spec.chat_template, MESSAGES, template_tokens(spec))
    assert text == want
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert build_tokenizer(spec).encode_bare(text) == list(ids)
