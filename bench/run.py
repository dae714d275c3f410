"""The scale-and-speed benchmark: one table, every figure measured in this run.

    .venv/bin/python bench/run.py              # everything: ~1 min here, + ~20 s to write the 7B file once
    .venv/bin/python bench/run.py --quick      # smaller dequant inputs, one run of each trace
    .venv/bin/python bench/run.py --skip-7b    # no 7B-shaped model
    .venv/bin/python bench/run.py --skip-moe   # no 30B-A3B-shaped MoE (a 17 GiB file written and deleted)

Rows:
- SmolLM2-135M Q4_1 (the test fixture): `apr trace` with every stage of every layer, as a whole process
  (start-up, tokenizer, forward, writing the trace), against llama.cpp (llama-cpp-python: load + eval of
  the same token ids) as a whole process. Wall time (best of 3, or 1 with --quick) and peak RSS (VmHWM).
- Dequantization throughput per type, apr.quant.dequantize vs gguf.quants.dequantize (bench/dequant.py, in a
  process of its own: gguf-py's speed depends on how warm the allocator is).
- GGUF open time vs gguf-py's GGUFReader (bench/open.py).
- Tokenizer build time for a synthetic 150k-token BPE and SPM vocab (bench/tokenizer.py; target ≤ 0.3 s).
- A 7B-shaped Q4_K_M GGUF (bench/synth.py, Qwen2.5-7B shapes; written to $APR_CACHE/bench on first use):
  `apr trace` of every stage of layers 0..28 and lm_head vs llama.cpp on the same file and tokens. The file
  is read once before timing, so both find it in the page cache, and its sha256 is in apr's fingerprint
  cache, as after any earlier trace of it; one more row times a first trace (APR_CACHE=off: hashed).
- A Qwen3-30B-A3B-shaped MoE GGUF (bench/moe.py): the same comparison, file written for the run and deleted.
Ratios are apr ÷ reference: below 1 is faster for times, above 1 is faster for throughputs.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

ROOT: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import dequant  # noqa: E402  (bench/dequant.py)
import moe  # noqa: E402  (bench/moe.py)
import open as open_bench  # noqa: E402  (bench/open.py)
import synth  # noqa: E402  (bench/synth.py)
import tokenizer as tokenizer_bench  # noqa: E402  (bench/tokenizer.py)
from tests.fixtures import models  # noqa: E402

from apr.cpus import default_threads  # noqa: E402
from apr.quant import QuantType  # noqa: E402
from apr.stages import Stage, StageId  # noqa: E402
from apr.trace.fingerprint import fingerprint  # noqa: E402
from apr.trace.reader import Trace, read_trace  # noqa: E402
from apr.trace.run import prepare_trace  # noqa: E402

PROMPT: Final = "The quick brown fox jumps over the lazy dog."
SYNTH_TAG: Final = "v1"  # bump when bench/synth.py's output changes, so the cached file is rewritten
FAST_TYPES: Final = frozenset({QuantType.Q4_K, QuantType.Q6_K, QuantType.Q8_0})  # target ≥ 3×
TRACE_RATIO_TARGET: Final = 3.0
LONG_RATIO_TARGET: Final = 1.5
RSS_TARGET: Final = 2 << 30

# Every timed child is `python -c PEAK + CODE PEAK_FILE ARGS...`: at exit it writes its own peak RSS (VmHWM
# of its address space) to PEAK_FILE. wait4's ru_maxrss would not do: Linux carries the parent's peak
# into a child's across fork and exec, so a child of this (large) process would report at least its size.
PEAK: Final = """
import atexit, sys
def _peak(path=sys.argv.pop(1)):
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(path, "w") as f:
        f.write(str(kb * 1024))
atexit.register(_peak)
"""
# apr's CLI, run in the child as `python -m apr` would
APR_CHILD: Final = (
    PEAK
    + """
import runpy
sys.argv[0] = "apr"
runpy.run_module("apr", run_name="__main__")
"""
)
# the llama.cpp side: load the model, evaluate the token ids, check the last position's logits
LLAMACPP_CHILD: Final = (
    PEAK
    + """
import numpy as np, llama_cpp
path, threads, ids = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")]
llm = llama_cpp.Llama(path, n_ctx=max(64, len(ids)), n_threads=threads, verbose=False, logits_all=False)
llm.eval(ids)
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
assert np.isfinite(logits).all() and logits.any(), "llama.cpp logits are not finite"
"""
)


@dataclass(frozen=True, slots=True)
class Proc:
    seconds: float
    max_rss: int  # bytes


@dataclass(frozen=True, slots=True)
class Row:
    what: str
    unit: str
    apr: str
    reference: str
    ratio: str = ""
    target: str = ""
    met: str = ""


def run_process(code: str, args: Sequence[str]) -> Proc:
    """Wall time and peak RSS of `python -c code args...` (one of the *_CHILD programs)."""
    with tempfile.TemporaryDirectory(prefix="apr-bench-") as d, tempfile.TemporaryFile() as err:
        peak = Path(d) / "peak"
        cmd = [sys.executable, "-c", code, str(peak), *args]
        start = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, check=False)
        seconds = time.perf_counter() - start
        if done.returncode:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}\n{tail}")
        return Proc(seconds, int(peak.read_text()))


def best(code: str, args: Sequence[str], runs: int) -> Proc:
    results = [run_process(code, args) for _ in range(runs)]
    return Proc(min(r.seconds for r in results), max(r.max_rss for r in results))


def apr_trace(
    model: Path,
    n_layers: int,
    runs: int,
    inspect: Callable[[Trace], None] | None = None,
    ids: Sequence[int] | None = None,
    extra: Sequence[str] = (),
) -> Proc:
    """Wall time and peak RSS of `apr trace`, every stage; `inspect` sees the trace before it is deleted."""
    with tempfile.TemporaryDirectory(prefix="apr-bench-") as d:
        out = Path(d) / "trace"
        every_stage = ["--save-tensor", "all", "--save-tensor-layers", f"0..{n_layers}", *extra]
        given = ["--prompt", PROMPT] if ids is None else ["--tokens", ",".join(map(str, ids))]
        args = ["--quiet", "trace", str(model), *given, *every_stage, "--save-tensor-dir", str(out)]
        proc = best(APR_CHILD, args, runs)
        trace = read_trace(out)
        logits = np.asarray(trace.load(StageId(Stage.LM_HEAD)))
        if not np.isfinite(logits).all():
            raise SystemExit(f"{model}: apr's lm_head is not finite")
        if inspect is not None:
            inspect(trace)
    return proc


def llamacpp(model: Path, ids: Sequence[int], runs: int) -> Proc:
    return best(LLAMACPP_CHILD, [str(model), str(default_threads()), ",".join(map(str, ids))], runs)


def trace_rows(
    label: str,
    model: Path,
    runs: int,
    target: bool,
    ratio_target: float = TRACE_RATIO_TARGET,
    inspect: Callable[[Trace], None] | None = None,
    n_tokens: int | None = None,
    extra: Sequence[str] = (),
) -> list[Row]:
    """`n_tokens`: that many ids of PROMPT repeated (given to both sides as ids) instead of PROMPT itself."""
    text = PROMPT if n_tokens is None else (PROMPT + " ") * (n_tokens // 8 + 1)
    prepared = prepare_trace(model, text)
    ids, n_layers = prepared.token_ids[: n_tokens or None], prepared.model.config.n_layers
    prepared.model.close()
    warm(model)
    given = None if n_tokens is None else ids
    ours = apr_trace(model, n_layers, runs, inspect, given, extra)
    theirs = llamacpp(model, ids, runs)
    ratio = ours.seconds / theirs.seconds
    how = " ".join(extra) or "all positions"
    what = f"{label}: trace, {n_layers} layers × all stages ({how}), {len(ids)} tokens"
    rows = [
        Row(what, "wall s", f"{ours.seconds:.2f}", f"{theirs.seconds:.2f} llama.cpp", f"{ratio:.2f}×"),
        Row(f"{label}: peak RSS", "GiB", _gib(ours.max_rss), f"{_gib(theirs.max_rss)} llama.cpp"),
    ]
    if target:
        rows[0] = with_target(rows[0], f"≤ {ratio_target:g}×", ratio <= ratio_target)
        rows[1] = with_target(rows[1], f"≤ {RSS_TARGET / 2**30:g} GiB", ours.max_rss <= RSS_TARGET)
    return rows


def dequant_rows(mb: float, repeat: int) -> list[Row]:
    rows = []
    for r in fresh_dequant_table(mb, repeat):
        qtype = QuantType[r.qtype]
        row = Row(f"dequantize {r.qtype}", "MB/s in", f"{r.apr_mbs:.0f} ({r.apr1_mbs:.0f} on 1 thread)", "—")
        if qtype is QuantType.F32:  # a zero-copy view on both sides: the times are call overhead
            row = Row(row.what, row.unit, "view", "view gguf", "", "", "n/a")
        elif r.ratio is not None:
            need = 3.0 if qtype in FAST_TYPES else 1.0
            row = Row(row.what, row.unit, row.apr, f"{r.gguf_mbs:.0f} gguf", f"{r.ratio:.2f}×")
            row = with_target(row, f"≥ {need:g}×", r.ratio >= need)
        rows.append(row)
    return rows


def fresh_dequant_table(mb: float, repeat: int) -> list[dequant.Row]:
    """bench/dequant.py's rows, measured in a new process: gguf-py allocates full-size temporaries, so its
    speed depends on how warm the allocator is, i.e. on whatever this process ran before."""
    code = f"import dataclasses, json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import dequant; "
    code += f"print(json.dumps([dataclasses.astuple(r) for r in dequant.rows({mb}, {repeat})]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [dequant.Row(*fields) for fields in json.loads(out.stdout)]


def open_rows(path: Path, runs: int) -> list[Row]:
    rows = []
    for r in open_bench.measure(path, runs):
        ratio = f"{r.apr_s / r.gguf_s:.3f}×"
        rows.append(Row(f"{path.name}: {r.what}", "s", f"{r.apr_s:.3f}", f"{r.gguf_s:.3f} GGUFReader", ratio))
    return rows


def tokenizer_rows(timings: list[tokenizer_bench.Timing]) -> list[Row]:
    rows = []
    for t in timings:
        row = Row(
            f"build tokenizer: {t.vocab // 1000}k-token {t.kind} (synthetic)", "s", f"{t.seconds:.3f}", "—"
        )
        rows.append(with_target(row, f"≤ {tokenizer_bench.TARGET_S:g} s", t.met))
    return rows


def seven_b(path: Path | None, seed: int) -> tuple[Path, str]:
    """The 7B-shaped file, written on first use; and a note saying how it came to be."""
    if path is not None:
        return path, f"{path} (given)"
    path = models.cache_dir() / "bench" / f"synth-7b-qwen2-s{seed}-{SYNTH_TAG}.gguf"
    if path.is_file():
        return path, f"{path} (cached)"
    status(f"writing the 7B-shaped model to {path} (once)")
    start = time.perf_counter()
    synth.write_synthetic_gguf(path, synth.SEVEN_B, seed)
    return path, f"{path} (written in {time.perf_counter() - start:.0f} s)"


def compile_apr(src: Path | None = None) -> None:
    """Byte-compile apr's sources (this tree's, or `src`'s) before timing anything, as `pip install` does
    for an installed package: an editable install under PYTHONDONTWRITEBYTECODE (as on this machine)
    would otherwise compile every module afresh in every timed child (~0.1 s of a 7-token trace)."""
    import apr

    package = src / "apr" if src is not None else Path(apr.__file__).parent
    if not compileall.compile_dir(package, quiet=1):
        raise SystemExit(f"cannot byte-compile {package}")


def warm(path: Path) -> None:
    """Read the file once, so that both sides find it in the page cache; and hash it, so that apr finds its
    sha256 in the fingerprint cache (apr.trace.fingerprint), as after any earlier trace of the file."""
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass
    fingerprint(path)


def first_trace_row(label: str, model: Path) -> Row:
    """The same trace as a first trace of the file: APR_CACHE=off, so the sha256 is computed (on a thread
    of its own, beside the forward pass)."""
    prepared = prepare_trace(model, PROMPT)
    n_layers = prepared.model.config.n_layers
    prepared.model.close()
    before = os.environ.get("APR_CACHE")
    os.environ["APR_CACHE"] = "off"
    try:
        cold = apr_trace(model, n_layers, 1)
    finally:
        if before is None:
            os.environ.pop("APR_CACHE")
        else:
            os.environ["APR_CACHE"] = before
    return Row(f"{label}: the same, a first trace (sha256 not cached)", "wall s", f"{cold.seconds:.2f}", "—")


def render(rows: list[Row]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    head = Row("what", "unit", "apr", "reference", "ratio", "target", "met")
    cells = [(r.what, r.unit, r.apr, r.reference, r.ratio, r.target, r.met) for r in [head, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def status(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def with_target(row: Row, target: str, ok: bool) -> Row:
    return Row(row.what, row.unit, row.apr, row.reference, row.ratio, target, "yes" if ok else "NO")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small dequant inputs, one run of each trace")
    parser.add_argument("--skip-7b", action="store_true", help="leave out the 7B-shaped model")
    parser.add_argument("--skip-moe", action="store_true", help="leave out the 30B-A3B-shaped MoE")
    parser.add_argument("--model-7b", type=Path, help="use this GGUF instead of the synthetic 7B")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic 7B (default 0)")
    long_help = "also trace the 7B at N tokens, the last 16 positions saved (0: skip; default 512)"
    parser.add_argument("--long-7b", type=int, default=512, metavar="N", help=long_help)
    args = parser.parse_args(argv)
    runs = 1 if args.quick else 3
    compile_apr()
    smollm2 = models.smollm2_gguf()
    notes = [
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({default_threads()} used by both engines), "
        f"python {platform.python_version()}, numpy {np.__version__}",
        f"prompt: {PROMPT!r}",
    ]
    status("SmolLM2 traces")
    rows = trace_rows("SmolLM2-135M Q4_1", smollm2, runs, target=False)
    status("dequantization")
    rows += dequant_rows(8.0 if args.quick else 16.0, 3 if args.quick else 10)
    status("open")
    rows += open_rows(smollm2, runs)
    status("tokenizer build")
    rows += tokenizer_rows(tokenizer_bench.measure(runs=runs + 2))
    if not args.skip_7b:
        path, note = seven_b(args.model_7b, args.seed)
        notes.append(f"7B-shaped model: {note}, {path.stat().st_size / 2**30:.2f} GiB")
        status("7B-shaped traces")
        rows += trace_rows("7B-shaped Q4_K_M", path, 1, target=True)
        rows.insert(len(rows) - 1, first_trace_row("7B-shaped Q4_K_M", path))
        if args.long_7b:  # issue 12: ≤ 1.5× llama.cpp, ≤ 2 GiB, at 512 tokens
            long = ("--save-tensor-positions", "-16..")  # every stage of the full 7B at 512 positions: 8 GB
            rows += trace_rows("7B-shaped Q4_K_M", path, 1, True, LONG_RATIO_TARGET, None, args.long_7b, long)
    if not args.skip_moe:
        moe_table, note = moe.moe_rows()
        notes.append(note)
        rows += moe_table
    print("\n".join(notes))
    print(render(rows))


if __name__ == "__main__":
    main()
