"""A toy eval run through distributed.py as the real ones are (tests/test_distributed.py starts it
with torchrun's environment): work units are ints, each gives two rows that are a small
deterministic function of it; no model. Prints which units this rank computed.

    python tests/toy_eval.py --units 12 --out DIR [--bad-on-rank R] [--fail-at-unit U]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import ExitStack
from datetime import timedelta
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import distributed  # noqa: E402


def unit_length(u: int) -> int:
    """The toy's "prompt length" of unit u: uneven, so that the shares are balanced by cost."""
    return 200 * (1 + (7 * u) % 5)


def unit_rows(u: int) -> list[dict]:
    return [dict(unit=u, case=case, length=unit_length(u), value=math.sin(u + 0.25 * c), text=f"unit {u} ✓")
            for c, case in enumerate(("a", "b"))]


def read_done(results: Path) -> list[int]:
    """Units with both rows in the results file."""
    if not results.is_file():
        return []
    count: dict[int, int] = {}
    for line in results.read_text().splitlines():
        count[json.loads(line)["unit"]] = count.get(json.loads(line)["unit"], 0) + 1
    return sorted(u for u, c in count.items() if c == 2)


def write_row(f, row: dict) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


class ToyLock:
    """The output folder's lock as the tests see it: refused when <out>/busy exists, and each holder
    appends its rank to <out>/lock.log."""

    def __init__(self, out: Path, rank: int):
        self.out, self.rank = out, rank

    def __enter__(self):
        if (self.out / "busy").exists():
            raise ValueError(f"--out {self.out} is in use by another run; wait for it or pass another --out")
        with open(self.out / "lock.log", "a") as f:
            f.write(f"{self.rank}\n")
        return self

    def __exit__(self, *exc):
        return None


def check(args, rank: int) -> None:
    if args.units < 1:
        raise ValueError(f"--units must be >= 1, got {args.units}")
    if args.bad_on_rank == rank:
        raise ValueError(f"--bad-on-rank {rank}: this rank finds the arguments wrong; pass another value")


def run(args) -> None:
    with distributed.start(timeout=timedelta(seconds=60)) as group:
        group.together(lambda: check(args, group.rank))
        out = Path(args.out)
        if group.is_main:
            out.mkdir(parents=True, exist_ok=True)
        with group.hold(lambda: ToyLock(out, group.rank)):
            results = out / "results.jsonl"
            done = set(group.from_main(lambda: read_done(results)))
            todo = [u for u in range(args.units) if u not in done]
            mine = [todo[i] for i in group.share([distributed.unit_cost(unit_length(u), 1000.0) for u in todo])]
            print(f"rank {group.rank} computes {json.dumps(mine)}", flush=True)
            with ExitStack() as stack:
                f = stack.enter_context(open(results, "a", encoding="utf-8")) if group.is_main else None
                put = stack.enter_context(group.rows(partial(write_row, f) if f else None))
                for u in mine:
                    if u == args.fail_at_unit:
                        raise ValueError(f"unit {u} failed (--fail-at-unit)")
                    for row in unit_rows(u):
                        put(row)
            if group.is_main:
                (out / "summary.json").write_text(json.dumps({"units": len(read_done(results))}))


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
