"""`make fuzz`: a long campaign over every reader; prints the table and each escape site.

    python -m tests.fuzz [--inputs 100000] [--targets gguf,apr] [--seed 0] [--save] [--minutes M]

`--save` keeps the first input of every escape site under tests/fuzz/regressions/ (fix it, then the
regression test replays it). Exit status 1 when anything escaped or hung.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz.harness import HANG, SCRATCH, TARGETS, run_campaign, save_regression, table


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz")
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="stop each target after this long")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="apr-fuzz-", dir=SCRATCH) as tmp:
        for name in args.targets.split(","):
            start = time.monotonic()
            deadline = None if args.minutes is None else start + 60 * args.minutes
            s = run_campaign(name, args.inputs, Path(tmp), args.seed, deadline)
            results.append(s)
            print(f"{name}: {s.inputs:,} inputs in {time.monotonic() - start:.0f} s", file=sys.stderr)
            found = sorted(s.escapes.items(), key=lambda kv: -kv[1]) + ([(HANG, s.hangs)] if s.hangs else [])
            for where, count in found:
                print(f"  {count:6} × {where}", file=sys.stderr)
                if args.save:
                    rel, data = s.examples[where]
                    site = where.replace(" at ", "-").replace("/", "_").replace(":", "_").replace(" ", "_")
                    label = f"{site}-{hashlib.sha256(data).hexdigest()[:8]}"
                    print(f"         saved {save_regression(name, rel, data, label)}", file=sys.stderr)
    print(table(results))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"peak RSS of the whole campaign: {peak} MiB (seeds are under 40 kB each)")
    return 1 if any(s.other or s.hangs for s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
