"""The paper's claims, judged by the rules of docs/analysis-plan.md, from the evaluations' summaries.

    python -m lab.claims --model SmolLM2-135M docs/niah docs/ruler docs/bench/smollm2-135m.json \
                         --model Qwen2.5-Coder-1.5B docs/qwen2.5-coder-1.5b/niah docs/qwen2.5-coder-1.5b/ruler \
                                                    docs/bench/qwen2.5-coder-1.5b.json

Each --model names a column and what it reads: a NIAH output folder (the summary.json eval_niah.py
writes), a RULER output folder (eval_ruler.py's), and bench.py's JSON (its overhead figures). Any of
them may be missing: that cell says "not run". Prints the README's claims table, one column per
model: each claim's number with its 95% CI and the plan's verdict under the aware protocol (NIAH on
content-word recall, then whether recall and exact match give the same verdict; RULER with its
largest task's share), then the same verdicts under the agnostic protocol.

Nothing here recomputes a statistic: the CIs, Holm's adjusted p-values, the margin and the
decompositions are the summaries' (lab/stats.py). This file only applies the plan's claim-level
rules to them, so that the table is made by a command, not by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lab import stats
from lab.harness import OneLineParser, run_main

BASELINES = ("snapkv", "pyramidkv", "adakv", "criticalkv", "streamingllm")   # "prior work" in the plan
SELECTIONS = {"per-layer": "laprox:selection=layer", "per-head": "laprox:selection=head"}  # Tables 5 and 6
PRIMARY_BUDGET = 0.05
KEPT = {"kept": "holds", "lost": "does not hold", "not settled": "not settled", "no CI": "no CI"}
METRIC_NAMES = {"score": "recall", "exact": "exact match"}


def read_sources(paths: list[str]) -> dict:
    """{"niah": {metric: stats summary}, "ruler": stats summary, "bench": overhead rows} from the
    given folders and files, recognised by what they hold."""
    out = {}
    for path in map(Path, paths):
        file = path / "summary.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{path}: no summary.json there; run the evaluation (or its report) first")
        data = json.loads(file.read_text())
        if "stats_by_metric" in data:                       # eval_niah.py (content-word recall first)
            out["niah"] = {m: s for m, s in data["stats_by_metric"].items() if s is not None}
        elif "lengths" in data:                             # eval_ruler.py: one length, the plan's 4000
            lengths = list(data["lengths"].values())
            if len(lengths) != 1:
                raise ValueError(f"{file}: RULER summary of {len(lengths)} lengths; the plan's claims read one (4000)")
            out["ruler"] = lengths[0]["stats"]
        elif "overhead" in data:                            # bench.py
            out["bench"] = data["overhead"]
        else:
            raise ValueError(f"{file}: neither a NIAH nor a RULER summary (made before the plan?) nor bench.py's JSON")
    return out


def budget_entry(summary: dict, protocol: str, budget: float) -> dict | None:
    p = summary["protocols"].get(protocol)
    return next((b for b in p["budgets"] if b["budget"] == budget), None) if p else None


def kept_at_5(summary: dict, protocol: str) -> tuple[str, str, str | None]:
    """Claim 1: (number, verdict, verdict without the largest stratum or None)."""
    b = budget_entry(summary, protocol, PRIMARY_BUDGET)
    if b is None or "laprox" not in b["loss"]:
        return "n/a", "not run", None
    loss = b["loss"]["laprox"]
    verdict = KEPT[loss["verdict"]]
    if verdict == "not settled" and loss.get("significant") is not None:
        verdict += ", the loss > 0" if loss["significant"] and loss["mean"] > 0 else ", the loss not significant"
    parts = b.get("loss_decomposition")
    rest = KEPT[parts["without_largest"]["verdict"]] if parts else None
    number = stats.format_ci(loss, sign=True) + ("" if loss["low"] is not None else " (no CI)")
    return f"loss {number}", verdict, rest and (rest, parts["largest"])


def verdict_counts(summary: dict, protocol: str, others) -> tuple[dict, list]:
    """{verdict: count} of laprox - other over `others` x every budget, and the tests whose verdict
    changes without their largest stratum: [(other, budget, verdict, verdict without, stratum)]."""
    p = summary["protocols"].get(protocol, {"budgets": []})
    counts, carried = {}, []
    for b in p["budgets"]:
        for other in others:
            d = b["differences"].get(other)
            if d is None:
                continue
            counts[d["verdict"]] = counts.get(d["verdict"], 0) + 1
            parts = b.get("decomposition", {}).get(other)
            if parts and parts["without_largest"].get("verdict") not in (None, d["verdict"]):
                carried.append((other, b["budget"], d["verdict"], parts["without_largest"]["verdict"], parts["largest"]))
    return counts, carried


def claim_verdict(counts: dict, reversible: bool = False) -> str:
    """The plan's rule from a claim's test verdicts {verdict: count}: holds if every test is "better";
    (claim 5 only, reversible) reversed if some are "worse" and none "better"; does not hold if any
    is "worse" or "no difference"; otherwise not shown."""
    if counts.get("better", 0) == sum(counts.values()):
        return "holds"
    if reversible and counts.get("worse") and not counts.get("better"):
        return "reversed"
    return "does not hold" if counts.get("worse") or counts.get("no difference") else "not shown"


def better_than_prior_work(summary: dict, protocol: str) -> tuple[str, str, list]:
    """Claim 2 over every baseline x budget test (claim_verdict)."""
    counts, carried = verdict_counts(summary, protocol, BASELINES)
    n = sum(counts.values())
    if not n:
        return "n/a", "not run", []
    words = ("better", "worse", "no difference", "not significant")
    text = ", ".join(f"{counts.get(w, 0)} {w}" for w in words) + f" of {n}"
    return text, claim_verdict(counts), carried


def loss_ratio_at_5(summary: dict, protocol: str) -> tuple[str, str, tuple | None]:
    """Claim 3: the loss ratio laprox / best baseline at 5% and its verdict (stats.ratio_verdict)."""
    b = budget_entry(summary, protocol, PRIMARY_BUDGET)
    if b is None or not b.get("loss_ratio"):
        return "n/a", "not run", None
    r = b["loss_ratio"]
    number = "n/a" if r["ratio"] is None else stats.ratio_text(r, b["best_baseline"])
    w = b.get("loss_ratio_without_largest")
    return f"{number} vs {b['best_baseline']}", r["verdict"], (stats.ratio_verdict(w), w["stratum"]) if w else None


def overhead(rows: list[dict] | None) -> tuple[str, str]:
    """Claim 4: holds if laprox's scoring + selection is <= 5% of the prefill at every length and
    <= 2x SnapKV's (bench.py's medians)."""
    if not rows:
        return "n/a", "not run"
    text = ", ".join(f"{100 * r['laprox']['ratio_to_prefill']:.1f}% ({r['laprox_vs_snapkv']:.1f}x SnapKV) at {r['n']}"
                     for r in rows)
    ok = all(r["laprox"]["ratio_to_prefill"] <= 0.05 and r["laprox_vs_snapkv"] <= 2.0 for r in rows)
    return f"of the prefill: {text}", "holds" if ok else "does not hold"


def model_wide(summary: dict, protocol: str) -> list[tuple[str, str, str, list]]:
    """Claim 5, per comparison over every budget (claim_verdict, which may read "reversed")."""
    out = []
    for name, other in SELECTIONS.items():
        counts, carried = verdict_counts(summary, protocol, [other])
        n = sum(counts.values())
        if not n:
            out.append((name, "n/a", "not run", []))
            continue
        text = ", ".join(f"{counts[w]} {w}" for w in counts) + f" of {n} budgets"
        out.append((name, text, claim_verdict(counts, reversible=True), carried))
    return out


def niah_cell(metrics: dict, claim, protocol: str) -> str:
    """A NIAH cell: the claim on content-word recall, then whether recall and exact match agree."""
    primary = claim(metrics["content"], protocol)
    others = {m: claim(metrics[m], protocol)[1] for m in METRIC_NAMES if m in metrics}
    agree = [METRIC_NAMES[m] for m, v in others.items() if v == primary[1]]
    differ = [f"{METRIC_NAMES[m]}: {v}" for m, v in others.items() if v != primary[1]]
    tail = "; ".join(([f"the same on {' and '.join(agree)}"] if agree else []) + differ)
    return f"{primary[0]}: **{primary[1]}**" + (f" ({tail})" if tail else "")


def ruler_cell(summary: dict, claim, protocol: str) -> str:
    """A RULER cell: the claim, and where its verdict changes without the largest task, which task."""
    number, verdict, extra = claim(summary, protocol)[:3]
    text = f"{number}: **{verdict}**"
    if isinstance(extra, tuple) and extra[0] != verdict:     # claims 1 and 3: (verdict without, task)
        text += f", carried by one task ({extra[1]}: {extra[0]} without it)"
    elif isinstance(extra, list) and extra:                  # claim 2: the tests a task carries
        text += "; " + carried_text(extra)
    return text


def carried_text(carried: list) -> str:
    """'carried by one task: t in a@0.05, b@0.2 (worse -> no difference without it)', per task."""
    parts = []
    for task in dict.fromkeys(c[4] for c in carried):
        mine = [c for c in carried if c[4] == task]
        moves = {(v, w) for _, _, v, w, _ in mine}
        if len(moves) == 1:
            (v, w), = moves
            tests = ", ".join(f"{o}@{b:g}" for o, b, *_ in mine) + f" ({v} -> {w} without it)"
        else:
            tests = ", ".join(f"{o}@{b:g} ({v} -> {w})" for o, b, v, w, _ in mine)
        parts.append(f"{task} in {tests}")
    return "carried by one task: " + "; ".join(parts)


def claims_table(columns: dict[str, dict], protocol: str = "aware") -> list[str]:
    """Markdown lines: one row per claim, one column per model."""
    names = list(columns)

    def cells(fn):
        return [fn(src) for src in columns.values()]

    def both(src, claim):
        parts = []
        if "niah" in src:
            parts.append("NIAH " + niah_cell(src["niah"], claim, protocol))
        if "ruler" in src:
            parts.append("RULER " + ruler_cell(src["ruler"], claim, protocol))
        return "<br>".join(parts) or "not run"

    def selection(src):
        parts = []
        for bench, summary in (("NIAH", src.get("niah", {}).get("content")), ("RULER", src.get("ruler"))):
            if summary:
                parts += [f"{bench} vs {name}: {text}: **{verdict}**"
                          + (f" ({carried_text(carried)})" if carried and bench == "RULER" else "")
                          for name, text, verdict, carried in model_wide(summary, protocol)]  # NIAH's split: descriptive
        return "<br>".join(parts) or "not run"

    rows = [["1. performance kept at 5%", *cells(lambda s: both(s, kept_at_5))],
            ["2. better than prior work (5 baselines x every budget, Holm)", *cells(lambda s: both(s, better_than_prior_work))],
            ["3. loss ratio <= 0.5 at 5%", *cells(lambda s: both(s, loss_ratio_at_5))],
            ["4. minimal overhead", *cells(lambda s: "{0}: **{1}**".format(*overhead(s.get("bench"))))],
            ["5. model-wide beats per-layer and per-head", *cells(selection)]]
    head = f"| claim ({protocol}) | " + " | ".join(names) + " |"
    return [head, "|---|" + "---|" * len(names)] + ["| " + " | ".join(r) + " |" for r in rows]


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", action="append", required=True, metavar=("NAME", "PATH"),
                    help="a column: its name, then its NIAH and RULER output folders and bench.py's JSON (any subset)")
    ap.add_argument("--protocol", default="aware,agnostic", help="comma list: a table per protocol")
    return ap


def run(args) -> list[str]:
    protocols = [p for p in args.protocol.split(",") if p]
    if not protocols or any(p not in ("aware", "agnostic") for p in protocols):
        raise ValueError(f"--protocol must be a comma list of aware and agnostic, got {args.protocol!r}")
    columns = {name: read_sources(paths) for name, *paths in args.model}
    lines = []
    for p in protocols:
        lines += claims_table(columns, p) + [""]
    print("\n".join(lines))
    return lines


def main(argv=None):
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
