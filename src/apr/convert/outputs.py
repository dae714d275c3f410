"""Where a conversion may write: never over its own source, never under a name whose suffix says another
format than the one written (`x.gguf` holding .apr bytes). A name without a model suffix is taken as given."""

from __future__ import annotations

import os
from pathlib import Path

from apr.errors import ValidationError
from apr.formats import formats


def named_format(path: Path) -> str | None:
    """The format a path's suffix names (`.gguf` → "gguf"), or None for a name without a model suffix."""
    suffix = path.suffix.lower()
    return next((f.name for f in formats() if suffix in f.suffixes), None)


def export_format(out: Path, fmt: str | None, *, folder: bool = False) -> str:
    """`apr export`'s format: `--format` when given, else gguf for a name ending in .gguf, else an HF folder.
    `folder`: the name was written with a trailing / (`x.gguf/`), so it names a folder whatever its suffix.
    A `--format` that the name's suffix (or slash) contradicts (gguf vs another model suffix) is refused."""
    if folder:
        if fmt == "gguf":
            raise ValidationError(
                f"-o {out}/ names a folder, but --format gguf writes one file: name the file"
            )
        if out.suffix and named_format(out) is not None:
            raise ValidationError(
                f"-o {out}/ names a folder, but a folder named {out.name} would pass for a "
                f"{named_format(out)} file: choose a folder name without a model suffix"
            )
        return "safetensors"
    named = named_format(out)
    if fmt is None:
        return "gguf" if named == "gguf" else "safetensors"
    if named is not None and (named == "gguf") != (fmt == "gguf"):
        raise ValidationError(
            f"--format {fmt} contradicts the suffix of -o {out}: drop --format, or choose another name"
        )
    return fmt


def check_output(src: Path, out: Path, fmt: str | None, writes: str) -> None:
    """Refuse `out` when it is `src` itself, or when its suffix names another format than `fmt` (None: a
    folder, which no model suffix names). `writes` completes "… names a gguf file, but <writes>"."""
    if _same(src, out):
        raise ValidationError(f"-o {out} is the input model itself: choose another output")
    named = named_format(out)
    if named is not None and named != fmt:
        article = "an" if named[0] in "aeiou" else "a"
        raise ValidationError(f"-o {out} names {article} {named} file, but {writes}")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (or cannot be looked at: then writing it fails, named)
        return False
