"""A GPU check of the eval scripts under torchrun and --devices (not collected by pytest; the default
model, ~2-4 min on one GPU):

    python tests/gpu_dist_evals_check.py --out DIR

A small NIAH grid (2 lengths x 3 depths, full / laprox / snapkv at 5%, both protocols) run
1. plain on cuda:0, 2. by a 1-process torchrun with --device cuda (cuda:LOCAL_RANK), 3. with its
layers over --devices cuda:0,cuda:0; 2 and 3 must write exactly the rows of 1, timings aside. And
4. a 2-process torchrun with --device cuda on a machine with fewer GPUs than processes must stop
with one line from one rank, before any model loads. Prints PASS / FAIL per check; exit status 1 if
any fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRID = ["--lengths", "2000,4000", "--depths", "0,0.5,1", "--methods", "full,laprox,snapkv", "--budget", "0.05",
        "--protocol", "aware,agnostic", "--max-new-tokens", "8"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TIMINGS = ("prefill_s", "compress_s", "question_s", "decode_s")


def rows(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {(r["method"], r["protocol"], r["length"], r["depth"]): {k: v for k, v in r.items() if k not in TIMINGS}
            for r in lines}


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    out = p.parse_args().out
    import torch
    results, failed = {}, False

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failed
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)

    for name, command in (("plain", [sys.executable, "eval_niah.py", "--device", "cuda:0"]),
                          ("torchrun", TORCHRUN + ["--nproc-per-node", "1", "eval_niah.py", "--device", "cuda"]),
                          ("devices", [sys.executable, "eval_niah.py", "--devices", "cuda:0,cuda:0"])):
        done = run(command + GRID + ["--out", str(out / name)])
        check(f"{name} run", done.returncode == 0, done.stderr[-1500:] if done.returncode else "")
        results[name] = rows(out / name) if done.returncode == 0 else None
    for name in ("torchrun", "devices"):
        if results["plain"] is not None and results[name] is not None:
            differ = [k for k in results["plain"] if results[name].get(k) != results["plain"][k]]
            check(f"{name} rows == plain rows", not differ and len(results[name]) == len(results["plain"]),
                  f"{len(differ)} of {len(results['plain'])} differ, e.g. {differ[:2]}")
    n = torch.cuda.device_count()
    done = run(TORCHRUN + ["--nproc-per-node", str(n + 1), "eval_niah.py", "--device", "cuda"] + GRID +
               ["--out", str(out / "too_many")])
    said = [line for line in done.stderr.splitlines() if "eval_niah.py: error:" in line]
    check(f"{n + 1} processes on {n} GPU(s): one line", done.returncode != 0 and len(said) == 1, " | ".join(said))
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
