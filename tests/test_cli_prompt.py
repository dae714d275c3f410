"""The prompt as users send it, on `apr trace` and `apr bisect`: --prompt, --prompt-file, --tokens, --chat
(+ --system), end to end on real models.

- --chat ids equal transformers' `apply_chat_template(..., add_generation_prompt=True, tokenize=True)` on
  the HF folder exported from the SmolLM2 GGUF (its tokenizer and the GGUF's chat template), for the GGUF
  and for the folder; the manifest records the source and the rendered text.
- --tokens runs the ids as given: a model without a tokenizer traces, and `bisect` of a zoo Gemma GGUF
  (llama.cpp's converter) against its HF folder — whose tokenizers disagree on "Hello" — works on them.
- Every misuse is one line with its exit code: 2 for usage, 3 / 7 / 4 for a missing / unreadable /
  non-UTF-8 prompt file, 5 for ids outside the vocabulary or a model without a chat template.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import run, run_unprivileged
from tests.fixtures.zoo import ZooModel

IDS = [1780, 314, 216, 34, 27, 34, 47]  # SmolLM2: "What is 2+2?"
TRY_TRACE, TRY_BISECT = "Try 'apr trace --help'.", "Try 'apr bisect --help'."


def trace_json(model: Path, out: Path, *prompt: str, stages: str = "lm_head") -> dict[str, Any]:
    """`apr trace --json` of `stages` into `out`; the run document plus the manifest under "manifest"."""
    code, stdout, stderr = run("trace", str(model), "--save-tensor", stages, "--save-tensor-dir", str(out),
                               "--json", *prompt)  # fmt: skip
    assert (code, stderr) == (0, ""), stderr
    return {**json.loads(stdout), "manifest": json.loads((out / "manifest.json").read_text())}


def chat_oracle(hf_dir: Path, text: str, system: str | None) -> tuple[list[int], str]:
    """transformers' ids and rendered text for [system?, user] with the generation prompt."""
    import transformers  # an oracle: a hard requirement of the suite (tests/conftest.py)

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids), str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def no_tokenizer_copy(z: ZooModel, out: Path) -> Path:
    """The zoo model's HF folder with only config.json and the weights: no tokenizer at all."""
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(z.hf_dir / name, out / name)
    return out


# -- --chat -------------------------------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("system", [None, "Answer in one word."])
@pytest.mark.parametrize("side", ["gguf", "hf"])
def test_chat_ids_equal_transformers_apply_chat_template(
    smollm2_gguf: Path, smollm2_hf: Path, tmp_path: Path, side: str, system: str | None
) -> None:
    text = "What is 2+2? <|im_end|> is a special token\n"  # a special token in the message is parsed too
    want_ids, want_text = chat_oracle(smollm2_hf, text, system)
    model = smollm2_gguf if side == "gguf" else smollm2_hf
    extra = ["--system", system] if system else []
    doc = trace_json(model, tmp_path / "t", "--chat", "--prompt", text, *extra)
    assert doc["token_ids"] == want_ids and doc["prompt"] == text
    m = doc["manifest"]
    assert (m["prompt_source"], m["prompt_file"], m["token_ids"]) == ("chat", None, want_ids)
    assert m["chat"] == {"system": system, "text": want_text} and m["prompt"] == text
    if system is None:  # SmolLM2's template adds its own system turn when the chat has none
        assert want_text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chat_text_output_shows_the_rendered_template(smollm2_gguf: Path, tmp_path: Path) -> None:
    code, stdout, _ = run("trace", str(smollm2_gguf), "--save-tensor", "lm_head", "--save-tensor-dir",
                          str(tmp_path / "t"), "--chat", "--prompt", "Hi", "--system", "S.")  # fmt: skip
    assert code == 0
    assert 'Test prompt:  "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n' in stdout
    ids = "1, 9690, 198, 67, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198"
    assert f'<|im_start|>assistant\n"\nToken ids:    [{ids}] (17 tokens)\n' in stdout


def test_chat_from_a_prompt_file(smollm2_gguf: Path, tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("Hi", encoding="utf-8")
    by_file = trace_json(smollm2_gguf, tmp_path / "a", "--chat", "--prompt-file", str(f))
    by_text = trace_json(smollm2_gguf, tmp_path / "b", "--chat", "--prompt", "Hi")
    assert by_file["token_ids"] == by_text["token_ids"]
    assert (by_file["manifest"]["prompt_source"], by_file["manifest"]["prompt_file"]) == ("chat", str(f))


def test_chat_without_a_template_names_the_model(zoo: Callable[[str], ZooModel]) -> None:
    for model in (zoo("llama").gguf, zoo("qwen2").hf_dir):
        code, stdout, stderr = run("trace", str(model), "--payload", "--chat", "--json")
        message = (
            f"{model}: the model has no chat template (GGUF tokenizer.chat_template, HF chat_template.jinja "
            "or tokenizer_config.json chat_template), so --chat cannot apply one"
        )
        assert (code, json.loads(stdout), stderr) == (
            5,
            {"error": message, "exit_code": 5},
            f"error: {message}\n",
        )


# -- --prompt-file ------------------------------------------------------------------------------------------


def test_prompt_file_is_read_whole_as_utf8(smollm2_gguf: Path, tmp_path: Path) -> None:
    f = tmp_path / "prompt.txt"
    f.write_bytes(b"What is 2+2?")
    doc = trace_json(smollm2_gguf, tmp_path / "a", "--prompt-file", str(f))
    assert doc["token_ids"] == IDS and doc["prompt"] == "What is 2+2?"
    assert (doc["manifest"]["prompt_source"], doc["manifest"]["prompt_file"]) == ("file", str(f))
    assert doc["manifest"]["chat"] is None
    f.write_bytes("Grüße,\n\tWelt — 2+2?\n".encode())  # nothing stripped: the newline is part of it
    doc = trace_json(smollm2_gguf, tmp_path / "b", "--prompt-file", str(f))
    assert doc["prompt"] == "Grüße,\n\tWelt — 2+2?\n"
    assert (
        doc["token_ids"] == trace_json(smollm2_gguf, tmp_path / "c", "--prompt", doc["prompt"])["token_ids"]
    )


def test_prompt_file_errors(smollm2_gguf: Path, tmp_path: Path) -> None:
    missing, bad = tmp_path / "missing.txt", tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        (missing, 3, f"File not found: {missing}"),
        (tmp_path, 7, f"cannot read prompt file {tmp_path}: it is a directory"),
        (bad, 4, f"prompt file {bad} is not UTF-8 text (byte 0xe9 at offset 3)"),
    ]
    for path, code, message in cases:
        assert run("trace", str(smollm2_gguf), "--payload", "--prompt-file", str(path)) == (
            code, "", f"error: {message}\n"
        )  # fmt: skip


def test_unreadable_prompt_file_exits_7(smollm2_gguf: Path, tmp_path: Path) -> None:
    f = tmp_path / "secret.txt"
    f.write_text("hi")
    f.chmod(0)
    try:
        code, stdout, stderr = run_unprivileged(
            "trace", str(smollm2_gguf), "--payload", "--prompt-file", str(f)
        )
    finally:
        f.chmod(0o644)
    assert (code, stdout, stderr) == (7, "", f"error: cannot read prompt file {f}: Permission denied\n")


# -- --tokens -----------------------------------------------------------------------------------------------


def test_tokens_run_as_given(smollm2_gguf: Path, tmp_path: Path) -> None:
    by_ids = trace_json(smollm2_gguf, tmp_path / "a", "--tokens", " 1780, 314,216,34,27,34,47 ")
    by_text = trace_json(smollm2_gguf, tmp_path / "b")  # the default prompt, tokenized
    assert by_ids["token_ids"] == by_text["token_ids"] == IDS and by_ids["prompt"] == ""
    m = by_ids["manifest"]
    assert (m["prompt_source"], m["prompt"], m["prompt_file"], m["chat"]) == ("tokens", "", None, None)
    assert (tmp_path / "a" / "lm_head.bin").read_bytes() == (tmp_path / "b" / "lm_head.bin").read_bytes()
    code, stdout, _ = run("trace", str(smollm2_gguf), "--save-tensor", "lm_head", "--save-tensor-dir",
                          str(tmp_path / "c"), "--tokens", "5,6")  # fmt: skip
    assert code == 0 and "Test prompt:  (token ids given)\nToken ids:    [5, 6] (2 tokens)\n" in stdout


def test_tokens_trace_a_model_without_a_tokenizer(zoo: Callable[[str], ZooModel], tmp_path: Path) -> None:
    z = zoo("llama")
    bare = no_tokenizer_copy(z, tmp_path / "bare")
    code, _, stderr = run("trace", str(bare), "--payload")
    assert code == 4 and stderr == (
        f"error: {bare}: the model has no tokenizer; cannot trace without proper tokenization (give token "
        "ids with --tokens, or re-import with: apr import <source>.gguf -o <output>.apr)\n"
    )
    ids = ",".join(map(str, z.token_ids()))
    a = trace_json(bare, tmp_path / "a", "--tokens", ids, stages="all")
    b = trace_json(z.hf_dir, tmp_path / "b", "--tokens", ids, stages="all")
    assert a["token_ids"] == b["token_ids"] == z.token_ids()
    assert (tmp_path / "a" / "lm_head.bin").read_bytes() == (tmp_path / "b" / "lm_head.bin").read_bytes()
    code, stdout, _ = run("trace", str(bare), "--payload", "--tokens", ids)  # top-5 ids, nothing decoded
    top = stdout.split("Top 5 predictions:\n")[1].splitlines()[:5]
    assert code == 0 and all(re.fullmatch(r"    token_id=\d+, logit=-?\d+\.\d{4}", line) for line in top)


TOKENS_USAGE = [
    ("", "no token ids (give them comma-separated, e.g. 1,2,3)."),
    ("1,,3", "'' is not a token id (a non-negative integer) in '1,,3'."),
    ("1,x", "'x' is not a token id (a non-negative integer) in '1,x'."),
    ("1,-2", "'-2' is not a token id (a non-negative integer) in '1,-2'."),
    ("1.5", "'1.5' is not a token id (a non-negative integer) in '1.5'."),
]


@pytest.mark.parametrize("command", ["trace", "bisect"])
@pytest.mark.parametrize(("value", "why"), TOKENS_USAGE)
def test_bad_token_lists_are_usage_errors(command: str, value: str, why: str) -> None:
    models = ["m.gguf"] if command == "trace" else ["a.gguf", "b.gguf"]
    hint = TRY_TRACE if command == "trace" else TRY_BISECT
    assert run(command, *models, "--tokens", value) == (
        2,
        "",
        f"error: Invalid value for '--tokens': {why} {hint}\n",
    )


def test_tokens_outside_the_vocabulary_exit_5(smollm2_gguf: Path, tmp_path: Path) -> None:
    code, stdout, stderr = run("trace", str(smollm2_gguf), "--save-tensor", "lm_head", "--save-tensor-dir",
                               str(tmp_path / "t"), "--tokens", "1,49152", "--json")  # fmt: skip
    message = "token id 49152 is outside the vocabulary (size 49152)"
    assert (code, json.loads(stdout), stderr) == (
        5,
        {"error": message, "exit_code": 5},
        f"error: {message}\n",
    )
    assert not (tmp_path / "t").exists()
    assert run("trace", str(smollm2_gguf), "--payload", "--tokens", "49151")[0] == 0  # the last id is fine


# -- which options go together ------------------------------------------------------------------------------

COMBINATIONS = [
    (["--prompt", "a", "--tokens", "1"],
     "give one of --prompt, --prompt-file, --tokens (got --prompt and --tokens)."),
    (["--prompt-file", "p", "--prompt", "What is 2+2?"],
     "give one of --prompt, --prompt-file, --tokens (got --prompt and --prompt-file)."),
    (["--prompt", "a", "--prompt-file", "p", "--tokens", "1"],
     "give one of --prompt, --prompt-file, --tokens (got --prompt and --prompt-file and --tokens)."),
    (["--chat", "--tokens", "1"], "--chat applies the chat template to text; it cannot take --tokens."),
    (["--system", "s"], "--system is the system message of --chat; give --chat too."),
    (["--prompt", "a", "--system", "s"], "--system is the system message of --chat; give --chat too."),
]  # fmt: skip


@pytest.mark.parametrize("command", ["trace", "bisect"])
@pytest.mark.parametrize(("args", "message"), COMBINATIONS)
def test_exactly_one_prompt_source(command: str, args: list[str], message: str) -> None:
    models = ["m.gguf"] if command == "trace" else ["a.gguf", "b.gguf"]
    hint = TRY_TRACE if command == "trace" else TRY_BISECT
    assert run(command, *models, *args) == (2, "", f"error: {message} {hint}\n")
    code, stdout, _ = run(command, *models, *args, "--json")
    assert (code, json.loads(stdout)) == (2, {"error": f"{message} {hint}", "exit_code": 2})


# -- bisect -------------------------------------------------------------------------------------------------


def test_bisect_gguf_against_hf_whose_tokenizers_disagree(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    """llama.cpp's converter gives Gemma's GGUF a vocab that tokenizes "Hello" unlike the HF folder does:
    on text, bisect refuses; on --tokens, both sides run the same ids and agree."""
    z = zoo("gemma2")
    code, _, stderr = run("bisect", str(z.gguf), str(z.hf_dir), "--prompt", "Hello")
    assert (
        code == 5 and "tokenize the prompt differently" in stderr and "give the ids with --tokens" in stderr
    )
    ids = z.token_ids()
    keep = tmp_path / "keep"
    code, stdout, stderr = run("bisect", str(z.gguf), str(z.hf_dir), "--tokens", ",".join(map(str, ids)),
                               "--keep", str(keep), "--json")  # fmt: skip
    doc = json.loads(stdout)
    assert (code, stderr) == (0, "") and doc["token_ids"] == ids and doc["first_divergence"] is None
    for side in ("a", "b"):
        m = json.loads((keep / side / "manifest.json").read_text())
        assert (m["prompt_source"], m["token_ids"], m["prompt"]) == ("tokens", ids, "")


def test_bisect_tokens_against_a_model_without_a_tokenizer(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    z = zoo("qwen2")
    bare = no_tokenizer_copy(z, tmp_path / "bare")
    ids = ",".join(map(str, z.token_ids()))
    code, stdout, _ = run("bisect", str(z.gguf), str(bare), "--tokens", ids, "--json")
    assert code == 0 and json.loads(stdout)["token_ids"] == z.token_ids()
    code, _, stderr = run("bisect", str(z.gguf), str(bare))
    assert code == 4 and "the model has no tokenizer" in stderr


def test_bisect_runs_a_model_on_a_traces_recorded_prompt(
    smollm2_gguf: Path, smollm2_apr: Path, tmp_path: Path
) -> None:
    """A trace made with --chat: the model side renders the same chat (system message included)."""
    t = trace_json(smollm2_gguf, tmp_path / "t", "--chat", "--prompt", "Hi", "--system", "S.")
    code, stdout, _ = run(
        "bisect", str(tmp_path / "t"), str(smollm2_apr), "--json", "--keep", str(tmp_path / "k")
    )
    assert code == 0 and json.loads(stdout)["token_ids"] == t["token_ids"]
    m = json.loads((tmp_path / "k" / "b" / "manifest.json").read_text())
    assert (m["prompt_source"], m["chat"]) == ("chat", t["manifest"]["chat"])


def test_bisect_runs_a_model_on_a_traces_recorded_tokens(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    z = zoo("gemma2")
    ids = z.token_ids()
    trace_json(z.gguf, tmp_path / "t", "--tokens", ",".join(map(str, ids)), stages="all")
    code, stdout, _ = run("bisect", str(tmp_path / "t"), str(z.hf_dir), "--json")  # no tokenizer run on B
    assert code == 0 and json.loads(stdout)["token_ids"] == ids


def test_token_ids_are_decoded_with_the_models_own_tokenizer(zoo: Callable[[str], ZooModel]) -> None:
    """A prompt of ids builds no tokenizer to encode, but the top-5 it shows are decoded with the model's
    (bisect's `text`, payload's quoted text), as transformers decodes them; they used to be bare ids."""
    import transformers

    z = zoo("llama")
    tok = transformers.AutoTokenizer.from_pretrained(z.hf_dir)
    ids = ",".join(map(str, z.token_ids()))
    code, out, err = run("bisect", str(z.hf_dir), str(z.gguf), "--tokens", ids, "--json")
    assert code in (0, 1), err
    top = json.loads(out)["logits"]["top_k_last"]
    for side in ("a", "b"):
        assert [x["text"] for x in top[side]] == [tok.decode([x["id"]]) for x in top[side]]
    code, stdout, err = run("trace", str(z.hf_dir), "--payload", "--tokens", ids)
    assert code == 0, err
    lines = stdout.split("Top 5 predictions:\n")[1].splitlines()[:5]
    for line in lines:
        m = re.fullmatch(r"    token_id=(\d+), logit=-?\d+\.\d{4}  (.+)", line)
        assert m is not None, line
        assert m[2] == repr(tok.decode([int(m[1])]))
