"""A toy eval run through harness.py's torchrun path as the real ones are (lock_output, finished,
share, write_rows; tests/test_distributed.py starts it with torchrun's environment): work units
are ints, each gives two rows that are a small deterministic function of it; no model. Prints
which units this rank computes.

    python tests/toy_eval.py --units 12 --out DIR [--bad-on-rank R] [--fail-at-unit U]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import timedelta
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab import distributed  # noqa: E402
from lab.harness import finished, lock_output, read_rows, write_rows  # noqa: E402

CASES = ("a", "b")


def unit_length(u: int) -> int:
    """The toy's "prompt length" of unit u: uneven, so that the shares are balanced by cost."""
    return 200 * (1 + (7 * u) % 5)


def unit_rows(u: int) -> list[dict]:
    return [dict(unit=u, case=case, length=unit_length(u), value=math.sin(u + 0.25 * c), text=f"unit {u} ✓")
            for c, case in enumerate(CASES)]


def row_key(row: dict) -> tuple:
    return row["unit"], row["case"]


def check(args, rank: int) -> None:
    if args.units < 1:
        raise ValueError(f"--units must be >= 1, got {args.units}")
    if args.bad_on_rank == rank:
        raise ValueError(f"--bad-on-rank {rank}: this rank finds the arguments wrong; pass another value")


def rows(units: list[int], done: set, fail_at: int | None) -> Iterator[dict]:
    """The rows still to make of these units (a unit cut short by an interruption has one of two)."""
    for u in units:
        if u == fail_at:
            raise ValueError(f"unit {u} failed (--fail-at-unit)")
        yield from (row for row in unit_rows(u) if row_key(row) not in done)


def run(args) -> None:
    with distributed.start(timeout=timedelta(seconds=60)) as group:
        group.together(lambda: check(args, group.rank))
        out = Path(args.out)
        results = out / "results.jsonl"
        with lock_output(out, group):
            _, done = finished(lambda: read_rows(results), row_key, True, group)
            todo = [u for u in range(args.units) if any((u, case) not in done for case in CASES)]
            mine = [todo[i] for i in group.share([distributed.unit_cost(unit_length(u), 1000.0) for u in todo])]
            print(f"rank {group.rank} computes {json.dumps(mine)}", flush=True)
            new = write_rows(results, rows(mine, done, args.fail_at_unit), group)  # rank 0: every rank's
            if group.is_main:
                (out / "summary.json").write_text(json.dumps({"rows": len(done) + len(new)}))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--units", type=int, default=12)
    p.add_argument("--out", required=True)
    p.add_argument("--bad-on-rank", type=int, default=None)
    p.add_argument("--fail-at-unit", type=int, default=None)
    args = p.parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # as the eval scripts' main: one line, exit code 2
        p.exit(2, f"{p.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
