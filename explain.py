"""Why did a method fail on this case? Restore what it evicted, one unit at a time, and re-decode.

Where the full cache answers a case and a method does not, the evicted entries of some layer or
head usually carry the answer. `explain` puts back the evicted entries of one layer at a time,
then of one KV head at a time within the layers whose restoration raises the score (or, if no
single layer does, within the 3 layers that gain most), and optionally a token span (such as the
answer's tokens) in every layer and head at once. It prints one row per unit tried:

    unit          restored   kept    score  answer
    none                 0   4,590   0.00   '4471'
    layer 18          3,614   8,204   1.00   '4471096'
    layer 18 head 2   1,205   5,795   1.00   '4471096'

    python explain.py --task niah_single_1 --index 0 --length 4000 --method laprox --budget 0.05
    python explain.py --niah 4000,0.5 --method laprox --budget 0.05 --span answer
    python explain.py --failures docs/ruler --method laprox --budget 0.05 --per-task 3

--failures DIR diagnoses the failures an eval's results hold: the aware cases where `full` scores
1 and the method less (at most --per-task a RULER task, --cells NIAH cells spread over the
failing ones), each with its answer span, appending every case's rows to DIR/explain.jsonl (a
rerun skips the cases done) and tabulating in DIR/explain.md how many failures one layer, one
head or the answer's tokens fix, and which layers and heads recur. It reads only the rows made with
the prompts it rebuilds (the eval's defaults: their "config") and the method's current flags; a
record counts as done only if it has both, and explain.md tabulates every record held with both:
the cases picked now first, then any left from an earlier pick, marked "(not picked now)".

Aware protocol only (the question in the prompt when the cache is compressed): restoring an
entry of the compressed prompt is then one change to one cache. Each restoration has its own
cache; the caches of a round (the layers, then the heads) are decoded together as batches.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from cache import KVCache, Prefill
from lab.decode import Decoding, Sequence, answer_text, decode_in_groups
from lab.harness import parse_method
from methods import select


@dataclass
class Trial:
    """One row of the diagnosis: which unit was restored, how many entries that put back, the
    cache's total prompt entries, the case's score and what was generated."""
    unit: str
    restored: int
    kept: int
    score: float
    answer: str


def restore(kept: list[list[torch.Tensor]], n: int, layer: int | None = None, head: int | None = None,
            span: range | None = None) -> tuple[list[list[torch.Tensor]], int]:
    """kept (per layer, a list over KV heads of sorted int64 indices) with one unit put back: every
    prompt token of `layer` (all its heads, or only `head`), or the tokens of `span` in every layer
    and head. Returns (the new kept sets, how many entries were added)."""
    out, added = [], 0
    for l, heads in enumerate(kept):
        row = []
        for g, idx in enumerate(heads):
            if span is not None:
                want = torch.tensor(list(span), dtype=idx.dtype, device=idx.device)
            elif l == layer and head in (None, g):
                want = torch.arange(n, dtype=idx.dtype, device=idx.device)
            else:
                row.append(idx)
                continue
            new = torch.unique(torch.cat([idx, want]))  # sorted
            added += len(new) - len(idx)
            row.append(new)
        out.append(row)
    return out, added


def explain(prefill: Prefill, kept: list[list[torch.Tensor]], answers: Callable[[list[Sequence]], list[str]],
            score: Callable[[str], float], span: range | None = None, top: int = 3,
            log: Callable[[Trial], None] = lambda t: None) -> list[Trial]:
    """Restore the evicted entries of one unit at a time and re-decode; returns one Trial per unit.

    prefill: the aware prefill of the case's whole prompt. kept: the method's kept sets on it
    (methods.select). answers(seqs) -> the generated text of each decode.Sequence (greedy; the
    script decodes them as batches, decode.decode_in_groups); score(text) -> the
    case's score. Units: "none", each layer, then each KV head of the layers whose restoration
    raises the score (if none does, of the `top` layers with the largest gain, ties to the
    shallower layer), then the token span if one is given: three rounds of decoding. log(trial)
    sees each row as its round finishes (the script prints it).
    """
    trials = []

    def tried(units: list[tuple[str, list, int]]) -> list[Trial]:  # (unit, kept sets, entries added)
        caches = [KVCache.from_prefill(prefill, new_kept) for _, new_kept, _ in units]
        texts = answers([Sequence.of(prefill, cache) for cache in caches])
        made = [Trial(unit, added, int(cache.prompt_lengths.sum()), float(score(text)), text)
                for (unit, _, added), cache, text in zip(units, caches, texts)]
        for t in made:
            log(t)
        trials.extend(made)
        return made

    base, *layers = tried([("none", kept, 0)] + [(f"layer {l}", *restore(kept, prefill.n, layer=l))
                                                 for l in range(prefill.n_layers)])
    fixing = [l for l, t in enumerate(layers) if t.score > base.score]
    if not fixing:
        fixing = sorted(range(len(layers)), key=lambda l: (-(layers[l].score - base.score), l))[:top]
    tried([(f"layer {l} head {g}", *restore(kept, prefill.n, layer=l, head=g))
           for l in fixing for g in range(prefill.n_kv_heads)])
    if span is not None:
        tried([(f"tokens {span.start}:{span.stop}", *restore(kept, prefill.n, span=span))])
    return trials


def find_span(ids: list[int], tok, text: str) -> range:
    """Where the tokens of `text` first occur in the prompt `ids` (encoded with and without a leading
    space, as a tokenizer spells a word inside a sentence); a clear error if nowhere."""
    for variant in (" " + text, text):
        sub = tok.encode(variant, add_special_tokens=False)
        for i in range(len(ids) - len(sub) + 1):
            if sub and ids[i:i + len(sub)] == sub:
                return range(i, i + len(sub))
    raise ValueError(f"the answer {text!r} does not occur in the prompt as tokens; pass --span START:END instead")


# ----------------------------------------------------------------------------- the script

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    case = p.add_mutually_exclusive_group(required=True)
    case.add_argument("--task", help="a RULER task (eval_ruler.py), with --index and --length")
    case.add_argument("--niah", help="a NIAH cell LENGTH,DEPTH (eval_niah.py's prompt), e.g. 4000,0.5")
    case.add_argument("--failures", help="an eval's output folder (eval_ruler.py's or eval_niah.py's --out): "
                      "diagnose its failures, see the docstring")
    p.add_argument("--per-task", type=int, default=3, help="--failures: at most this many samples a RULER task")
    p.add_argument("--cells", type=int, default=6, help="--failures: at most this many NIAH cells")
    p.add_argument("--index", type=int, default=0, help="the RULER sample's index (default 0)")
    p.add_argument("--length", type=int, default=4000, help="the RULER prompt length (default 4000)")
    p.add_argument("--method", default="laprox", help="a method spec, e.g. laprox or laprox:floor=0.2")
    p.add_argument("--budget", type=float, default=0.05, help="fraction of the KV entries kept (default 0.05)")
    p.add_argument("--span", help="also restore a token span in every layer and head: START:END or 'answer'")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    from lab.harness import DTYPES
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="the eval's --dtype; default: the model's, as the evals choose it (checkpoint.choose_dtype)")
    from eval_niah import HAYSTACK_OFFSETS
    p.add_argument("--haystack-offset", default="none", choices=HAYSTACK_OFFSETS,
                   help="NIAH: the eval's --haystack-offset (cell: each cell's own seeded haystack start)")
    return p


def ruler_case(tok, args):
    """(prompt ids, its Decoding, score(text), the text whose tokens --span answer restores) of one
    RULER sample: its answer's value."""
    import eval_ruler as R
    s = R.make_sample(tok, args.task, args.length, args.index, args.seed, R.has_chat_template(tok))
    return (s["ids"], Decoding(s["max_new_tokens"], stop_ids=frozenset(tok.eos_ids)),
            lambda text: R.score(text, s["answers"], s["metric"]), s["answers"][0])


def niah_case(tok, args):
    """The same for one NIAH cell, with eval_niah's defaults (needle, question, decoding) and its
    primary score, content-word recall; --haystack-offset cell rebuilds the cell's own haystack
    start (with --seed); --span answer restores the needle sentence."""
    import eval_niah as N
    d = N.build_parser().parse_args([])
    length, depth = args.niah
    text = N.read_haystack(d.haystack)
    if getattr(args, "haystack_offset", "none") == "cell":
        text = N.rotate(text, N.haystack_offset(text, args.seed, length, depth))
    hay = N.haystack_ids(tok, text, length)
    p = N.build_prompt(tok, hay, length, depth, d.needle, d.question, d.answer_prefix)
    reference = N.answer_of(d.needle, d.answer_prefix)
    return (p["ids"], N.decoding(tok, d.max_new_tokens),
            lambda text: N.content_recall(reference, N.clean_response(text)), d.needle.strip())


def check_case(args) -> None:
    """Refuse a bad --task / --niah before the model loads (args.niah becomes (length, depth))."""
    if isinstance(args.niah, str):
        try:
            length, depth = args.niah.split(",")
            args.niah = (int(length), float(depth))
        except ValueError:
            raise ValueError(f"--niah {args.niah!r} must be LENGTH,DEPTH, e.g. 4000,0.5") from None
    elif args.task is not None:
        import eval_ruler as R
        if args.task not in R.TASKS:
            raise ValueError(f"--task {args.task!r} is not a RULER task; known: {', '.join(R.TASKS)}")


def diagnose(model, tok, args, log: Callable[[str], None] = print) -> tuple[float, list[Trial]]:
    """The full cache's score and the Trials of one case (args.task or args.niah, checked), printed
    through log as they come."""
    name, flags = parse_method(args.method)
    ids, spec, score, reference = (ruler_case if args.task else niah_case)(tok, args)

    def answers(seqs):  # decoded as batches, each at most one full cache (decode.decode_in_groups)
        texts = [""] * len(seqs)
        for group, tokens in decode_in_groups(model, seqs, [spec] * len(seqs), tok.decode):
            for i, t in zip(group, tokens):
                texts[i] = answer_text(tok, t, spec)
        return texts
    span = None
    if args.span == "answer":
        span = find_span(ids, tok, reference)
    elif args.span:
        a, _, b = args.span.partition(":")
        span = range(int(a), int(b))
    with torch.inference_mode():
        prefill = model.prefill(torch.tensor([ids]), window=args.window)
        kept = select(prefill, name, args.budget, **flags)
        full = score(answers([Sequence.of(prefill)])[0])
        log(f"{len(ids)}-token prompt; full cache scores {full:.2f}; {args.method} at {args.budget:g} (aware):")
        log(f"{'unit':<22} {'restored':>9} {'kept':>9} {'score':>6}  answer")
        return full, explain(prefill, kept, answers, score, span, log=lambda t: log(
            f"{t.unit:<22} {t.restored:>9,} {t.kept:>9,} {t.score:>6.2f}  {t.answer.strip()[:60]!r}"))


def failing_cases(rows: list[dict], method: str, budget: float, per_task: int, cells: int) -> list[dict]:
    """The cases of an eval's rows to diagnose: aware, where `full` scores 1 and `method` at `budget`
    scores less (rows: the eval's results, of the method's current definition). RULER rows (with a
    task): {"task", "index", "length"}, at most per_task a task, the lowest indices; NIAH rows:
    {"length", "depth"}, at most `cells`, spread evenly over the failing cells in grid order, scored
    on content-word recall (the primary metric; from the answer for rows made before it), a cell
    whose needle ends in the observation window never (eval_niah.in_window: it leaves every comparison)."""
    ruler = any("task" in r for r in rows)
    unit = (lambda r: (r["task"], r["length"], r["index"])) if ruler else (lambda r: (r["length"], r["depth"]))
    aware = [r for r in rows if r.get("protocol", "aware") == "aware"]
    score = lambda r: r["score"]
    if not ruler:
        import eval_niah as N
        reference = N.answer_of(N.NEEDLE, N.ANSWER_PREFIX)  # explain rebuilds the default needle only
        score = lambda r: r["content"] if "content" in r else N.content_recall(reference, r["answer"])
        aware = [r for r in aware if not N.in_window(r)]
    full = {unit(r) for r in aware if r["method"] == "full" and score(r) == 1}
    failed = sorted({unit(r) for r in aware if r["method"] == method and r["budget"] == budget
                     and score(r) < 1 and unit(r) in full})
    if ruler:
        picked, taken = [], Counter()
        for u in failed:  # sorted: each task's lowest indices first
            taken[u[0]] += 1
            if taken[u[0]] <= per_task:
                picked.append(u)
        return [dict(task=t, length=n, index=i) for t, n, i in picked]
    step = max(1, len(failed) / cells)
    picked = [failed[int(k * step)] for k in range(min(cells, len(failed)))]
    return [dict(length=n, depth=d) for n, d in picked]


def tabulate(done: list[dict]) -> str:
    """explain.md: one line per case (which single layers, heads and the span restore the full
    cache's score), then how many failures each kind of unit fixes and the units that recur."""
    def fixes(case, kind):
        return [t["unit"] for t in case["trials"] if t["score"] >= case["full"] and kind(t["unit"])]
    is_layer = lambda u: u.startswith("layer ") and " head " not in u
    is_head, is_span = (lambda u: " head " in u), (lambda u: u.startswith("tokens "))
    lines = ["| case | method score | layers that fix it | heads that fix it | answer's tokens fix it |",
             "|---|---|---|---|---|"]
    layer_counts, head_counts, n = Counter(), Counter(), len(done)
    by = {"layer": 0, "head": 0, "span": 0}
    for c in done:
        layers, heads, span = fixes(c, is_layer), fixes(c, is_head), fixes(c, is_span)
        layer_counts.update(layers)
        head_counts.update(heads)
        by["layer"] += bool(layers)
        by["head"] += bool(heads)
        by["span"] += bool(span)
        base = c["trials"][0]["score"]
        lines.append(f"| {c['case']} | {base:.2f} | {', '.join(u[6:] for u in layers) or '-'} | "
                     f"{', '.join(u[6:] for u in heads) or '-'} | {'yes' if span else 'no'} |")
    recur = lambda counts: ", ".join(f"{u} ({k})" for u, k in counts.most_common(8) if k > 1) or "none"
    head = [f"{n} failure(s) diagnosed (aware; the full cache scores 1, the method less). A unit fixes a "
            "failure when restoring its evicted entries alone gives the full cache's score.", "",
            f"- one layer's restoration fixes {by['layer']} of {n}; one KV head's {by['head']} of {n} "
            f"(heads are tried within the layers that raise the score, else the 3 that gain most); "
            f"the answer's tokens in every layer and head fix {by['span']} of {n}.",
            f"- layers that fix more than one failure: {recur(layer_counts)}.",
            f"- heads that fix more than one failure: {recur(head_counts)}.", ""]
    return "\n".join(head + lines) + "\n"


def model_dtype(args) -> str:
    """The dtype explain loads the model in: --dtype, or the model's, as the evals choose it on the CPU,
    so that a case is re-decoded as its row was made (the 1.5B's rows are bfloat16)."""
    from checkpoint import choose_dtype
    return choose_dtype(args.model, "cpu", getattr(args, "dtype", None))[0]


def eval_configs(rows: list[dict], args) -> Callable[[dict], str]:
    """config(case or row) -> the fingerprint ("config") an eval row of that case has when made with the
    prompts and decoding explain rebuilds: the eval's defaults, with this run's --model, --window and
    --seed and the dtype the eval resolves (eval_niah.run_config, eval_ruler.run_configs, after
    harness.check_eval_arguments); None for a RULER QA task (not rebuilt)."""
    given = [*(["--model", args.model] if args.model else []), "--window", str(args.window), "--seed", str(args.seed),
             "--dtype", model_dtype(args)]
    if any("task" in r for r in rows):  # the synthetic tasks: explain rebuilds no QA sample (no --data-dir)
        import eval_ruler as R
        tasks = sorted({r["task"] for r in rows if r["task"] in R.TASKS and R.TASKS[r["task"]].kind != "qa"})
        _, configs = R.run_configs(R.build_parser().parse_args(given), tasks, R.read_haystack())
        return lambda case: configs.get(case["task"])
    import eval_niah as N
    d = N.build_parser().parse_args(given + ["--haystack-offset", getattr(args, "haystack_offset", "none")])
    config = N.run_config(d, N.read_haystack(d.haystack))["config"]
    return lambda case: config


def run_failures(args) -> list[dict]:
    """--failures: diagnose the failing cases of an eval's output folder, resumably (explain.jsonl).
    Only rows of the method's current definition (harness.same_definitions) and of the prompts
    explain rebuilds (eval_configs) are read; each record keeps both (method_flags, config), and a
    rerun takes a record as done only if both are today's. explain.md shows every record of today's
    definitions, the ones today's rule does not pick marked. Returns the records of the cases picked now."""
    from lab.harness import load_checkpoint, read_rows, same_definitions
    from methods import resolved_flags
    folder = Path(args.failures)
    results = folder / "results.jsonl"
    if not results.is_file():
        raise ValueError(f"--failures {folder}: no results.jsonl there; pass eval_ruler.py's or eval_niah.py's --out")
    for name in ("per_task", "cells"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    label, spec = args.method, parse_method(args.method)
    flags = resolved_flags(*spec)
    rows = same_definitions(read_rows(results, required=("method", "budget", "score")), {label: spec})
    config = eval_configs(rows, args)
    ours = [r for r in rows if r.get("config") == config(r)]  # a row has its case's keys (task, for RULER)
    if rows and not ours:
        raise ValueError(f"--failures {folder}: none of its rows was made with the prompts explain rebuilds (the "
                         f"eval's defaults with --model, --window {args.window}, --seed {args.seed}); pass the "
                         f"eval's --model/--window/--seed, or diagnose one case with --task or --niah")
    if len(ours) < len(rows):
        print(f"note: {len(rows) - len(ours)} row(s) of {results} have other prompt settings or are of a QA task "
              f"(explain rebuilds the synthetic tasks only): not read")
    cases = failing_cases(ours, label, args.budget, args.per_task, args.cells)
    out = folder / "explain.jsonl"
    key = lambda c: json.dumps({k: c.get(k) for k in ("case", "method", "budget", "method_flags", "config", "metric")},
                               sort_keys=True)  # metric: NIAH's records are scored on content-word recall
    done = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    records = [dict(case=c, method=label, budget=args.budget, method_flags=flags, config=config(c),
                    **({} if "task" in c else {"metric": "content"})) for c in cases]
    seen = {key(d) for d in done}
    todo = [r for r in records if key(r) not in seen]
    print(f"{len(cases)} failing case(s) of {label} at {args.budget:g} in {results}; {len(todo)} to diagnose")
    if todo:
        model, tok = load_checkpoint(args.model, "cpu", model_dtype(args))
        for record in todo:
            c = record["case"]
            niah = (c["length"], c["depth"]) if "depth" in c else None
            case_args = argparse.Namespace(**{**vars(args), "task": c.get("task"), "index": c.get("index", 0),
                                              "length": c["length"], "niah": niah, "span": "answer"})
            print(f"\n{c}")
            full, trials = diagnose(model, tok, case_args, log=lambda line: print(line, flush=True))
            record.update(full=full, trials=[asdict(t) for t in trials])
            with open(out, "a", encoding="utf-8") as f:  # one line per case: an interrupted run loses none
                f.write(json.dumps(record) + "\n")
            done.append(record)
    wanted = {key(r) for r in records}
    mine = list({key(d): d for d in done if key(d) in wanted}.values())  # the latest record of each case
    # explain.md reports every record held for today's definitions (method, budget, flags, config), not only the
    # cases today's rule picks: a record left from an earlier pick is shown and marked, never silently dropped
    current = lambda d: (d.get("method") == label and d.get("budget") == args.budget
                         and d.get("method_flags") == flags and d.get("config") == config(d["case"])
                         and d.get("metric") == (None if "task" in d["case"] else "content"))
    held = list({key(d): d for d in done if current(d)}.values())
    held.sort(key=lambda d: key(d) not in wanted)  # the picked cases first, in the order of the pick
    left = len(held) - len(mine)
    note = (f"{len(held)} record(s) held for these definitions: the {len(mine)} case(s) today's rule picks, and "
            f"{left} left from an earlier pick (marked), reported too.\n\n" if left else "")
    (folder / "explain.md").write_text(f"# Why {label} fails at {args.budget:g} ({folder.name})\n\n"
                                       f"`python explain.py --failures {args.failures} --method {label} "
                                       f"--budget {args.budget:g} --per-task {args.per_task} --cells {args.cells}"
                                       f"{prompt_options(args)}`\n\n"
                                       + note + tabulate([dict(d, case=_case_name(d["case"]) + (
                                           "" if key(d) in wanted else " (not picked now)")) for d in held]))
    print(f"\nwrote {folder / 'explain.md'}")
    return mine


def prompt_options(args) -> str:
    """The options that rebuild the eval's prompts, where not explain's defaults (for explain.md's command)."""
    default = build_parser().get_default
    names = ("model", "window", "seed", "dtype", "haystack_offset")
    return "".join(f" --{n.replace('_', '-')} {getattr(args, n)}" for n in names if getattr(args, n) != default(n))


def _case_name(c: dict) -> str:
    return f"{c['task']} #{c['index']}" if "task" in c else f"NIAH {c['length']} @ {c['depth']:g}"


def run(args):
    parse_method(args.method)  # before the model loads
    if not 0 < args.budget <= 1:
        raise ValueError(f"--budget {args.budget} must be a fraction in (0, 1]")
    if args.failures:
        return run_failures(args)
    check_case(args)
    from lab.harness import load_checkpoint
    model, tok = load_checkpoint(args.model, "cpu", model_dtype(args))
    return diagnose(model, tok, args, log=lambda line: print(line, flush=True))[1]


def main(argv=None):
    from lab.harness import run_main
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
