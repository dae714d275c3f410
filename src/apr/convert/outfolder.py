"""An export's output folder, replaced whole: written into a temporary sibling and swapped in when complete.

    <parent>/.<name>.lock           held (flock) while an export writes <name>; a second run is refused
    <parent>/.<name>.apr-tmp-XXXX   the folder being written; swapped with <parent>/<name> when complete

<name> then holds exactly what this export wrote (no tokenizer, shard or index of an earlier model left
beside new weights), and until the swap it holds the previous folder exactly as it was: an error, Ctrl-C or
SIGTERM removes the temporary folder; kill -9 leaves it behind (hidden), and the next export (or trace)
into <name> removes it. The lock and the temporary folder are a trace directory's (apr.trace.outdir), so
an export and a trace into one folder at once are refused too. The swap is one rename
(renameat2's RENAME_EXCHANGE over an existing folder; two renames where the filesystem lacks it), with
SIGINT and SIGTERM held. Only a folder that holds nothing but files the caller says it may replace is
replaced; anything else in it is the user's, so the export is refused naming it (the check is repeated
just before the swap). A symlink is followed: the swap happens at its target and the link stays. The new
folder takes the old one's permission bits and group.

apr.trace.outdir swaps trace directories the same way: the pieces both use are in apr.dirswap.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import apr.dirswap as dirswap
from apr.atomicfile import held_signals
from apr.errors import AprIOError, ValidationError

SHOWN: Final = 3  # files named in a refusal


@contextlib.contextmanager
def replacing_folder(out: Path, replaceable: Callable[[str], bool]) -> Iterator[Path]:
    """A temporary folder to write `out`'s new contents into; on clean exit it takes `out`'s place whole
    (the old folder removed), on any error or interrupt it is removed and `out` stays as it was.

    `replaceable(name)` says which files of an existing `out` the export may drop; a folder holding any
    other file, or a subfolder, is refused before anything is written.
    """
    real = _check_target(out, replaceable)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AprIOError(f"cannot write {out}: {e.strerror or e}") from None
    lock = dirswap.take_lock(real, out, "choose another output folder")
    try:
        dirswap.remove_leftovers(real)
        yield from _written(out, real, replaceable)
    finally:
        dirswap.drop_lock(real, lock)


def _written(out: Path, real: Path, replaceable: Callable[[str], bool]) -> Iterator[Path]:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}{dirswap.TMP_INFIX}", dir=real.parent))
    except OSError as e:
        raise AprIOError(f"cannot write {out}: {e.strerror or e}") from None
    sigterm = dirswap.catch_sigterm()
    try:
        dirswap.take_mode(tmp, real)
        yield tmp
        _refuse_foreign(out, real, replaceable)  # a file the user added while the export ran
        with held_signals():  # the swap and the removal of the old folder happen whole
            if real.is_dir():
                old = dirswap.swap_dirs(tmp, real, f".{real.name}{dirswap.TMP_INFIX}")
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, real)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AprIOError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if sigterm:
            dirswap.release_sigterm()


def _check_target(out: Path, replaceable: Callable[[str], bool]) -> Path:
    """The real path to swap at; refuses a file, an unswappable folder and one holding the user's files."""
    real = dirswap.swap_target(
        out,
        f"output folder {out} exists and is not a directory",
        f"cannot export to {out}: it is {{why}}, and an export replaces its folder whole "
        "(choose a new or empty directory)",
    )
    _refuse_foreign(out, real, replaceable)
    return real


def _refuse_foreign(out: Path, real: Path, replaceable: Callable[[str], bool]) -> None:
    if not real.is_dir():
        return
    try:
        entries = sorted(os.scandir(real), key=lambda e: e.name)
    except OSError as e:
        raise AprIOError(f"cannot read {out}: {e.strerror or e}") from None
    foreign = [
        e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
        for e in entries
        if e.is_dir(follow_symlinks=False) or not replaceable(e.name)
    ]
    if foreign:
        shown = ", ".join(foreign[:SHOWN]) + (
            f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        )
        raise ValidationError(
            f"{out} holds files that are not part of a model folder ({shown}); an export replaces the "
            "folder whole: choose a new or empty directory"
        )
