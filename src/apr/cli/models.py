"""Commands that read or write model files: `inspect`, `import`, `convert`, `export`."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec

import click

from apr.cli.app import FileOutput, cli, names_folder, path_arg, show
from apr.convert.export import DTYPES, export_safetensors
from apr.convert.gguf_export import GGUF_TYPES, export_gguf
from apr.convert.importer import QUANTIZE_TARGETS, convert_apr, import_gguf
from apr.convert.outputs import export_format
from apr.cpus import default_threads
from apr.errors import FormatError
from apr.formats.apr import verify_checkpoint
from apr.models import open_model
from apr.models.summary import summarize
from apr.quant import parallel_dequant
from apr.report import inspect as inspect_report
from apr.report import json as jsonr
from apr.report import text
from apr.trace.fingerprint import check_intact

QUANTIZE_CHOICE = click.Choice(list(QUANTIZE_TARGETS), case_sensitive=False)
CONVERT_CHOICE = click.Choice(list(dict.fromkeys([*QUANTIZE_TARGETS, *GGUF_TYPES])), case_sensitive=False)
EXPORT_DTYPES = list(dict.fromkeys([*DTYPES, *GGUF_TYPES]))
P = ParamSpec("P")


def whole_tensors(command: Callable[P, None]) -> Callable[P, None]:
    """A command that dequantizes whole tensors: each shared among the CPUs (`apr.quant.parallel_dequant`)."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        with parallel_dequant(default_threads()):
            command(*args, **kwargs)

    return run


@cli.command()
@path_arg("model")
@click.option("--no-tensors", is_flag=True, help="Omit the tensor table.")
@click.option(
    "--verify",
    is_flag=True,
    help="Also verify whole-file checksums (.apr footer CRC; reads the file); exit 4 when one fails.",
)
def inspect(model: Path, no_tensors: bool, verify: bool) -> None:
    """Show a model's format, architecture, config, tokenizer and tensor table (no tensor data read).

    \b
    Example:  apr inspect SmolLM2-135M-Instruct.Q4_1.gguf --json
    """
    opened = open_model(model)
    summary = summarize(opened, verify)
    show(
        summary,
        inspect_report.inspect_doc,
        lambda s: inspect_report.render_inspect(s, not no_tensors),
    )
    if verify:
        _exit_if_corrupt(opened.ckpt)


def _exit_if_corrupt(ckpt: object) -> None:
    """After the report (text or JSON, which says it too): `error:` on stderr and exit 4 when the check the
    report ran failed (its remembered result: the file is not read again)."""
    try:
        verify_checkpoint(ckpt)
    except FormatError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(int(e.exit_code))


@cli.command("import")
@path_arg("source")
@click.option(
    "-o", "--output", type=FileOutput(), help="Output .apr file (default: SOURCE with the suffix .apr)."
)
@click.option(
    "--quantize",
    type=QUANTIZE_CHOICE,
    help="Requantize every weight matrix and MoE expert stack (default: keep F32/F16/BF16/Q4_K/Q6_K bytes, "
    "others as exact F32).",
)
@click.option("-v", "--verbose", is_flag=True, help="List every converted tensor.")
@whole_tensors
def import_(source: Path, output: Path | None, quantize: str | None, verbose: bool) -> None:
    """Convert a GGUF model to aprender's .apr v2 (names, config, tokenizer, tied embeddings).

    \b
    Example:  apr import SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2.apr
    """
    result = import_gguf(source, output or source.with_suffix(".apr"), quantize)
    show(result, jsonr.import_doc, lambda r: text.render_import(r, verbose))


@cli.command()
@path_arg("file")
@click.option(
    "-o", "--output", type=FileOutput(), required=True, help="Output .apr file, or .gguf (by its suffix)."
)
@click.option(
    "--quantize",
    type=CONVERT_CHOICE,
    required=True,
    help="Type of every weight matrix and MoE expert stack whose rows fit its blocks (norms and biases "
    "stay F32); .gguf output also takes f32, f16, bf16.",
)
@click.option("-v", "--verbose", is_flag=True, help="List every converted tensor.")
@whole_tensors
def convert(file: Path, output: Path, quantize: str, verbose: bool) -> None:
    """Requantize a model: .apr → .apr, or any model → .gguf (what `export --format gguf` writes).

    \b
    Example:  apr convert smollm2.apr -o smollm2-q4k.apr --quantize q4_k
              apr convert smollm2.apr -o smollm2-q4k.gguf --quantize q4_k
    """
    check_intact(file)  # an .apr whose footer CRC fails is refused, not converted
    if output.suffix.lower() == ".gguf":
        show(export_gguf(open_model(file), output, quantize), jsonr.gguf_export_doc, text.render_gguf_export)
        return
    show(convert_apr(file, output, quantize), jsonr.import_doc, lambda r: text.render_import(r, verbose))


@cli.command()
@path_arg("model")
@click.option(
    "-o",
    "--output",
    metavar="PATH",
    required=True,
    help="Output folder (replaced whole if it holds only model files), or .gguf file (a name ending in "
    "/ is a folder).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "gguf"]),
    help="Default: gguf when -o ends in .gguf, else safetensors (a folder).",
)
@click.option(
    "--dtype",
    type=click.Choice(EXPORT_DTYPES, case_sensitive=False),
    default="f32",
    show_default=True,
    help="safetensors: f32, f16; gguf: every choice (1-D tensors stay F32).",
)
@whole_tensors
def export(model: Path, output: str, fmt: str | None, dtype: str) -> None:
    """Write MODEL (.gguf, HF folder, .apr) as a Hugging Face folder or as a GGUF llama.cpp runs.

    \b
    safetensors: Q/K rows in HF order, quantized tensors dequantized exactly; transformers loads it.
    Its tokenizer.json (BPE and SentencePiece vocabs) tokenizes as llama.cpp does on the GGUF.
    gguf: the family's metadata and tokenizer, Q/K rows in GGUF order, fused tensors re-fused.
    Example:  apr export smollm2.gguf -o smollm2-hf/
              apr export smollm2-hf/ -o smollm2-q8.gguf --dtype q8_0
    """
    out = Path(output)  # drops a trailing /: names_folder keeps what it said
    check_intact(model)  # an .apr whose footer CRC fails is refused, not exported
    if export_format(out, fmt, folder=names_folder(output)) == "gguf":
        show(export_gguf(open_model(model), out, dtype), jsonr.gguf_export_doc, text.render_gguf_export)
        return
    show(
        export_safetensors(open_model(model), out, dtype),
        jsonr.export_doc,
        text.render_export,
    )
