"""Long prompts: `apr trace` of SmolLM2 at 7, 512 and 2048 tokens against llama.cpp's plain eval.

The same file and token ids on both sides, every figure measured in this run (issue 12).

    .venv/bin/python bench/long.py                          # this tree
    .venv/bin/python bench/long.py --src /tmp/before/src    # another tree's apr (e.g. `git archive HEAD src`)
    .venv/bin/python bench/long.py --only 7,512             # prompt lengths to run
    .venv/bin/python bench/long.py --only 2048 --bisect     # also `apr bisect` at 2048 tokens

Rows: each case is one whole process (start-up, forward, writing the trace), best of --runs, taken by
turns with llama.cpp's (so that a machine slowing down mid-case slows both sides); the trace is written
to a temporary directory on the output filesystem and its size on disk reported. Token ids are
SmolLM2's tokens of a repeated English text, cut to the length. "T×T" are attn_scores and attn_softmax.
With --bisect, `apr bisect` of the model against itself at each length (two phases from 2048 tokens:
statistics of every stage, then the window in full), its peak RSS and the largest temporary disk it used
(its --keep directory, measured after the run; targets: ≤ 1.5 GiB, ≤ 512 MiB).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run as bench  # noqa: E402  (bench/run.py: the timed-child machinery and the table)
from tests.fixtures import models  # noqa: E402

from apr.stages import DENSE_STAGES, Stage  # noqa: E402
from apr.trace.run import prepare_trace  # noqa: E402

TEXT: Final = (
    "The quick brown fox jumps over the lazy dog. A model gives different numbers in two places, and "
    "apr finds the first stage where they part ways. "
)
# every stage SmolLM2 has (no q/k/v bias: naming qkv_bias is refused) but the T×T ones
NOT_TXT: Final = ",".join(
    s.value for s in DENSE_STAGES if s not in (Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX, Stage.QKV_BIAS)
)


@dataclass(frozen=True, slots=True)
class Case:
    tokens: int
    label: str
    stages: str
    extra: tuple[str, ...] = ()
    ratio_target: float | None = None  # issue 12's target for apr / llama.cpp, if it sets one
    disk_target: int | None = None  # and for the bytes written


CASES: Final = (
    Case(7, "every stage", "all", ratio_target=1.5),
    Case(512, "every stage", "all"),
    Case(512, "every stage but T×T", NOT_TXT),
    Case(2048, "every stage but T×T", NOT_TXT, ratio_target=1.5),
    Case(
        2048,
        "every stage, --save-tensor-positions -16..",
        "all",
        ("--save-tensor-positions", "-16.."),
        ratio_target=1.5,
        disk_target=64 << 20,
    ),
)


def token_ids(model: Path, n: int) -> tuple[int, ...]:
    prepared = prepare_trace(model, TEXT * (n // 20 + 1))
    prepared.model.close()
    ids = prepared.token_ids[:n]
    assert len(ids) == n, f"the text is {len(prepared.token_ids)} tokens, need {n}"
    return ids


def du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


# A trace of at most this size stays on disk until the bench ends, see `apr_case`.
KEEP_UNTIL_END: Final = 256 << 20
# ext4's inode flags (linux/fs.h): FS_IOC_GETFLAGS / FS_IOC_SETFLAGS on a long, and "top of a directory
# hierarchy", which makes the allocator spread the directories made in it over the block groups
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def spread_subdirectories(path: Path) -> bool:
    """Mark `path` as the top of a directory hierarchy (`chattr +T`): ext4 then puts each directory made
    in it into a block group of its own choosing (Orlov), not beside `path`. False where the filesystem
    does not take the flag. Why the bench wants it: `apr_case`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        value = int.from_bytes(flags, sys.byteorder) | FS_TOPDIR_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, value.to_bytes(8, sys.byteorder))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def apr_case(
    model: Path, case: Case, ids: Sequence[int], src: Path | None, scratch: Path
) -> tuple[bench.Proc, int]:
    """One `apr trace` process of the case, and the bytes its trace took on disk (written into a fresh
    directory under `scratch`).

    What a trace's 484 file creates cost depends on the filesystem's recent past, not on apr. On ext4
    without a journal (this machine's root filesystem), allocating an inode skips, one buffer lookup each,
    every free inode of the block group deleted in the last 60 s (360 s while its inode-table block is
    dirty; fs/ext4/ialloc.c, `recently_deleted`): after a test run or the previous bench run, 484 creates
    in a fresh directory under /tmp took 0.35–0.6 s of system time, against ~12 ms in a block group with no
    recent deletions (a journaled ext4 never checks). So `scratch` spreads its directories over the block
    groups (`spread_subdirectories`), and a trace of up to KEEP_UNTIL_END bytes is left for the bench's end
    to delete, so that this run's deletion does not slow the next run's creates."""
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)  # the children import apr from there
    out = Path(tempfile.mkdtemp(prefix="run-", dir=scratch)) / "trace"
    args = ["--quiet", "trace", str(model), "--tokens", ",".join(map(str, ids)), "--save-tensor"]
    args += [case.stages, "--save-tensor-layers", "0..30", *case.extra, "--save-tensor-dir", str(out)]
    proc = bench.run_process(bench.APR_CHILD, args)
    size = du(out)
    if size > KEEP_UNTIL_END:
        shutil.rmtree(out.parent)  # the 484 creates are noise beside these runs' seconds
    os.environ.pop("PYTHONPATH", None)
    return proc, size


def fastest(procs: Sequence[bench.Proc]) -> bench.Proc:
    return bench.Proc(min(p.seconds for p in procs), max(p.max_rss for p in procs))


BISECT_RSS_TARGET: Final = 3 << 29  # 1.5 GiB
BISECT_DISK_TARGET: Final = 512 << 20


def bisect_case(model: Path, ids: Sequence[int], src: Path | None) -> tuple[bench.Proc, int]:
    """`apr bisect MODEL MODEL` on the ids (one process), and the bytes its work directory held."""
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
    with tempfile.TemporaryDirectory(prefix="apr-long-bisect-") as d:
        keep = Path(d) / "work"
        args = ["--quiet", "bisect", str(model), str(model), "--tokens", ",".join(map(str, ids))]
        proc = bench.run_process(bench.APR_CHILD, [*args, "--keep", str(keep)])
        size = du(keep)
    os.environ.pop("PYTHONPATH", None)
    return proc, size


def bisect_rows(model: Path, n: int, src: Path | None) -> list[bench.Row]:
    bench.status(f"apr bisect, {n} tokens")
    proc, size = bisect_case(model, token_ids(model, n), src)
    rss_ok, disk_ok = proc.max_rss <= BISECT_RSS_TARGET, size <= BISECT_DISK_TARGET
    return [
        bench.Row(
            f"SmolLM2 Q4_1, {n} tokens, apr bisect (model vs itself)", "wall s", f"{proc.seconds:.2f}", "—"
        ),
        bench.Row(
            "  peak RSS, temporary disk",
            "MiB",
            f"{proc.max_rss / 2**20:.0f}, {size / 2**20:.0f}",
            "—",
            target="≤ 1536, ≤ 512",
            met="yes" if rss_ok and disk_ok else "NO",
        ),
    ]


def trace_rows(model: Path, lengths: set[int], args: argparse.Namespace, scratch: Path) -> list[bench.Row]:
    """The trace cases' rows: each case's apr and llama.cpp processes by turns, traces under `scratch`."""
    rows: list[bench.Row] = []
    reference: dict[int, list[bench.Proc]] = {}  # every llama.cpp run of a length, over the cases
    for case in CASES:
        if args.bisect_only:
            break
        if case.tokens not in lengths or (args.skip_positions and case.extra):
            continue
        ids = token_ids(model, case.tokens)
        bench.status(f"apr trace and llama.cpp eval by turns, {case.tokens} tokens, {case.label}")
        runs = []
        for _ in range(args.runs):  # by turns: a machine that slows down mid-case slows both sides
            reference.setdefault(case.tokens, []).append(bench.llamacpp(model, ids, 1))
            runs.append(apr_case(model, case, ids, args.src, scratch))
        ours, size = fastest([r for r, _ in runs]), runs[-1][1]
        theirs = fastest(reference[case.tokens])
        what = f"SmolLM2 Q4_1, {case.tokens} tokens, 30 layers, {case.label}"
        ratio = ours.seconds / theirs.seconds
        time_row = bench.Row(
            what, "wall s", f"{ours.seconds:.2f}", f"{theirs.seconds:.2f} llama.cpp", f"{ratio:.2f}×"
        )
        if case.ratio_target is not None:
            time_row = bench.with_target(time_row, f"≤ {case.ratio_target:g}×", ratio <= case.ratio_target)
        disk_row = bench.Row(
            "  written, peak RSS",
            "MiB",
            f"{size / 2**20:.0f}, {ours.max_rss / 2**20:.0f}",
            f"—, {theirs.max_rss / 2**20:.0f}",
        )
        if case.disk_target is not None:
            disk_row = bench.with_target(
                disk_row, f"≤ {case.disk_target >> 20} written", size <= case.disk_target
            )
        rows += [time_row, disk_row]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--src", type=Path, help="run apr from this source tree (its src/ folder)")
    parser.add_argument("--runs", type=int, default=1, help="best of N (default 1)")
    parser.add_argument("--only", default="7,512,2048", help="prompt lengths (default 7,512,2048)")
    parser.add_argument("--skip-positions", action="store_true", help="no --save-tensor-positions case")
    parser.add_argument("--bisect", action="store_true", help="also `apr bisect` at each length")
    parser.add_argument("--bisect-only", action="store_true", help="only the bisect rows")
    out_help = "write the traces under this directory (default: the system's temporary directory)"
    parser.add_argument("--out-dir", type=Path, help=out_help)
    args = parser.parse_args(argv)
    lengths = {int(n) for n in args.only.split(",")}
    bench.compile_apr(args.src)
    model = models.smollm2_gguf()
    bench.warm(model)
    rows: list[bench.Row] = []
    with tempfile.TemporaryDirectory(prefix="apr-long-", dir=args.out_dir) as scratch:
        spread = spread_subdirectories(Path(scratch))
        rows += trace_rows(model, lengths, args, Path(scratch))
    if args.bisect or args.bisect_only:
        for n in sorted(lengths):
            rows += bisect_rows(model, n, args.src)
    where = args.out_dir or tempfile.gettempdir()
    how = "each in its own block group (ext4 +T)" if spread else "(not spread: the filesystem has no +T)"
    print(f"apr from: {args.src or ROOT / 'src'}; traces written under {where}, {how}")
    print(bench.render(rows))


if __name__ == "__main__":
    main()
