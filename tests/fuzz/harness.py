"""The fuzz harness: mutate a seed, feed it to one reader, and classify what happens.

Each input ends as: accepted, a clean error (an AprError with a one-line message: what the CLI prints as
`error: ...`), an escape (any other exception, or an AprError spanning several lines), or a hang (over
`TIME_LIMIT` seconds, cut by SIGALRM). Escapes are grouped by site (exception type + the innermost apr
frame) and the first input of each site is kept, so it can be saved under tests/fuzz/regressions/.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from apr.errors import AprError
from tests.fuzz.mutators import mutate_bytes, mutate_json
from tests.fuzz.seeds import TOKEN_IDS, write_all

TIME_LIMIT: Final = 10
REGRESSIONS: Final = Path(__file__).parent / "regressions"
# every input is written to disk: on tmpfs when there is one (an ext4 truncate can wait on a discard)
SCRATCH: Final = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class Hang(BaseException):
    """Raised by SIGALRM inside a reader that ran over TIME_LIMIT."""


def read_model(path: Path) -> None:
    """Open (strict validation), read every tensor, run the reference forward on TOKEN_IDS, and build and
    run the tokenizer a GGUF or .apr carries."""
    from apr.formats.tokenizer import build_tokenizer
    from apr.models import open_model
    from apr.stages import no_tap
    from apr.trace.run import ENGINES, TraceOptions

    model = open_model(path)
    for t in model.tensors():
        model.read(t.name)
    ENGINES["reference"](path, model, TOKEN_IDS, no_tap, TraceOptions(n_threads=1))
    spec = model.tokenizer_spec()  # GGUF / .apr tokenizer metadata (an HF folder's: the tokenizer target)
    if spec is not None and model.format_name != "safetensors":
        tok = build_tokenizer(spec)
        tok.decode(tok.encode("ab c abc"))


def read_tokenizer(folder: Path) -> None:
    from apr.formats.tokenizer import build_tokenizer
    from apr.formats.tokenizer_hf import hf_spec

    spec = hf_spec(folder)
    if spec is not None:
        tok = build_tokenizer(spec)
        tok.decode(tok.encode("ab c abc"))


def read_aprt_file(path: Path) -> None:
    from apr.diff.compare import diff_stage_files

    diff_stage_files(path, path)


def read_trace_dir(path: Path) -> None:
    from apr.diff.compare import diff_traces
    from apr.trace.reader import read_trace

    t = read_trace(path)
    diff_traces(t, t)


@dataclass(frozen=True)
class Target:
    """One reader: the seed it mutates, the files in it it may mutate (path relative to the seed, JSON?)."""

    name: str
    files: tuple[tuple[str, bool], ...]  # (relative path, "" = the seed itself; JSON-value mutations?)
    read: Callable[[Path], None]


TARGETS: Final = {
    "gguf": Target("gguf", (("", False),), read_model),
    "safetensors": Target(
        "safetensors",
        (("model.safetensors", False), ("model.safetensors", True), ("config.json", True)),
        read_model,
    ),
    "apr": Target("apr", (("", False),), read_model),
    "aprt": Target("aprt", (("", False),), read_aprt_file),
    "trace": Target(
        "trace",
        (
            ("manifest.json", True),
            ("layer-1/ffn_out.bin", False),
            ("manifest.json", False),
            ("lm_head.bin", False),
        ),
        read_trace_dir,
    ),
    "tokenizer": Target(
        "tokenizer", (("tokenizer.json", True), ("tokenizer_config.json", True)), read_tokenizer
    ),
}


def mutate_safetensors_header(data: bytes, r: random.Random) -> bytes:
    """A JSON-value mutation of the header inside a .safetensors file (the length prefix follows it)."""
    n = int.from_bytes(data[:8], "little")
    header = mutate_json(data[8 : 8 + n], r)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


@dataclass
class Stats:
    target: str
    inputs: int = 0
    accepted: int = 0
    clean_errors: int = 0
    hangs: int = 0
    escapes: dict[str, int] = field(default_factory=dict)
    examples: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # site -> (relative file, bytes)

    @property
    def other(self) -> int:
        return sum(self.escapes.values())


def site(e: BaseException) -> str:
    """`Type at src/apr/...py:line` of the innermost apr frame (or the innermost frame)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/src/apr/" in f.filename] or frames[-1:]
    where = f"{ours[-1].filename.split('/src/')[-1]}:{ours[-1].lineno}" if ours else "?"
    return f"{type(e).__name__} at {where}"


@contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise Hang

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


ACCEPTED, CLEAN, HANG = "accepted", "clean", "hang"


def classify(target: Target, path: Path) -> str:
    """ACCEPTED, CLEAN (a one-line AprError), HANG, or the escape's site."""
    try:
        with _alarm(TIME_LIMIT), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            target.read(path)
    except Hang:
        return HANG
    except AprError as e:
        return CLEAN if "\n" not in str(e) else f"multi-line {type(e).__name__}"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # classifying every escape is the point
        return site(e)
    return ACCEPTED


def seeds(root: Path) -> dict[str, Path]:
    marker = root / "seeds.done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_all(root)
        marker.write_text("")
    return {k: root / v for k, v in _SEED_NAMES.items()}


_SEED_NAMES: Final = {"gguf": "tiny.gguf", "safetensors": "hf", "apr": "tiny.apr",
                      "aprt": "trace/layer-1/ffn_out.bin", "trace": "trace", "tokenizer": "hf"}  # fmt: skip


def _case(seed: Path, work: Path) -> Path:
    """A fresh copy of `seed` in `work` (directories copied, files by name)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if seed.is_dir():
        return Path(shutil.copytree(seed, work / seed.name))
    shutil.copy(seed, work / seed.name)
    return work / seed.name


def apply(target: Target, case: Path, rel: str, data: bytes) -> None:
    (case / rel if rel else case).write_bytes(data)


def run_campaign(name: str, n: int, root: Path, seed: int = 0, deadline: float | None = None) -> Stats:
    """`n` mutated inputs for target `name` (stops early past `deadline`, a time.monotonic() value)."""
    target, stats = TARGETS[name], Stats(name)
    seed_path = seeds(root / "seeds")[name]
    work = root / f"work-{name}-{os.getpid()}"
    case = _case(seed_path, work)
    originals = {rel: (seed_path / rel if rel else seed_path).read_bytes() for rel, _ in target.files}
    for i in range(n):
        if deadline is not None and time.monotonic() > deadline:
            break
        r = random.Random(f"{name}-{seed}-{i}")
        rel, as_json = r.choice(target.files)
        data = originals[rel]
        if as_json and rel.endswith(".safetensors"):
            mutated = mutate_safetensors_header(data, r)
        else:
            mutated = mutate_json(data, r) if as_json else mutate_bytes(data, r)
        apply(target, case, rel, mutated)
        outcome = classify(target, case)
        apply(target, case, rel, data)
        stats.inputs += 1
        if outcome in (ACCEPTED, CLEAN):
            stats.accepted += outcome == ACCEPTED
            stats.clean_errors += outcome == CLEAN
            continue
        if outcome == HANG:
            stats.hangs += 1
            stats.examples.setdefault(HANG, (rel, mutated))
            continue
        stats.escapes[outcome] = stats.escapes.get(outcome, 0) + 1
        stats.examples.setdefault(outcome, (rel, mutated))
    shutil.rmtree(work, ignore_errors=True)
    return stats


def replay(name: str, rel: str, data: bytes, root: Path) -> str:
    """Classify one saved input (a regression file) against a fresh copy of the target's seed."""
    target = TARGETS[name]
    case = _case(seeds(root / "seeds")[name], root / f"replay-{name}")
    apply(target, case, rel, data)
    return classify(target, case)


def save_regression(name: str, rel: str, data: bytes, label: str) -> Path:
    """Keep an input as tests/fuzz/regressions/<target>/<label>/<file the input replaces>."""
    out = REGRESSIONS / name / label / (rel or "input")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def regressions() -> list[tuple[str, str, Path]]:
    """(target, relative file, saved input) of every kept regression."""
    found = []
    for p in sorted(REGRESSIONS.glob("*/*/**/*")):
        if p.is_file():
            name, _label, *rest = p.relative_to(REGRESSIONS).parts
            rel = "/".join(rest)
            found.append((name, "" if rel == "input" else rel, p))
    return found


def table(stats: list[Stats]) -> str:
    """The issue's table: reader, inputs, clean errors, other exceptions, hangs."""
    rows = [
        "| reader | inputs | accepted | clean errors | other exceptions | hangs |",
        "|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {s.target} | {s.inputs:,} | {s.accepted:,} | {s.clean_errors:,} | {s.other:,} | {s.hangs} |"
        for s in stats
    ]
    return "\n".join(rows)
