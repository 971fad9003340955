"""LongBench (v1), the 16 English tasks, with the official prompts, truncation and metrics.

The protocol is the one of the official repository, https://github.com/THUDM/LongBench
(v1 lives under LongBench/ in newer versions): config/dataset2prompt.json and
config/dataset2maxlen.json (copied below as data), pred.py (prompt building, middle
truncation, chat template, greedy decoding), metrics.py and eval.py (scoring).

As there: prompts are cut in the middle to one max_length per model for every task (its
context in thousands of tokens minus 500, as config/model2maxlen.json; --max-length to
override), checked to leave room for the chat template and the answer before any prefill;
a checkpoint without a chat template gets the raw prompt; samsum decodes with pred.py's
min_length and newline stop. What is ours: each sample is prefilled once, and every eviction
method and budget is evaluated on that same prefill (eviction happens after prefill, so the
prefill does not depend on the method).

    python eval_longbench.py --budget 0.05                       # all 16 tasks, default model
    python eval_longbench.py --tasks hotpotqa,trec --limit 20 --methods full,laprox,snapkv
    python eval_longbench.py --data-dir ~/LongBench/data         # official jsonl files, no download

Outputs under --out (default results/longbench/<model>/): predictions.jsonl (one line per
sample, method and budget; a rerun skips what is there), results.json, results.md and
scores_vs_budget.png.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import string
import sys
import zipfile
from collections import Counter
from pathlib import Path

# ---- the official tables (THUDM/LongBench, LongBench/config/*.json), English tasks ----

# config/dataset2prompt.json, verbatim. "asconcisely" (narrativeqa) is the official text:
# the file as released and as copied by SnapKV, PyramidKV and lm-evaluation-harness.
# (One later revision of the file has "as concisely"; we keep the text the published numbers used.)
DATASET2PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# config/dataset2maxlen.json: maximum number of generated tokens per task.
DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32,
    "lcc": 64, "repobench-p": 64,
}

TASKS = list(DATASET2PROMPT)

# The six categories of the LongBench paper (English tasks), in the paper's order.
CATEGORIES = {
    "single-doc QA": ["narrativeqa", "qasper", "multifieldqa_en"],
    "multi-doc QA": ["hotpotqa", "2wikimqa", "musique"],
    "summarization": ["gov_report", "qmsum", "multi_news"],
    "few-shot": ["trec", "triviaqa", "samsum"],
    "synthetic": ["passage_count", "passage_retrieval_en"],
    "code": ["lcc", "repobench-p"],
}

# pred.py: "chat models are better off without build prompts on these tasks" (lsht is Chinese).
NO_CHAT_TASKS = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
# eval.py: only the first line of the prediction is scored on these tasks.
FIRST_LINE_TASKS = {"trec", "triviaqa", "samsum", "lsht"}

DEFAULT_METHODS = "full,laprox,snapkv,pyramidkv,adakv,criticalkv,streamingllm"

# The rules of pred.py that are code, not tables (part of every prediction's configuration hash).
PROTOCOL = ("max_length: context // 1000 * 1000 - 500 unless given; middle truncation; chat template "
            "except NO_CHAT_TASKS, raw prompt without one; greedy; samsum: min_length + stop on the newline id")

HUB_REPO, HUB_FILE = "THUDM/LongBench", "data.zip"


# ---- metrics (LongBench metrics.py, English ones; each returns a value in [0, 1]) ----

PUNCTUATION = set(string.punctuation)  # ASCII only, as official

def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token-level F1 between the normalised prediction and answer (bag of words)."""
    pred, truth = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """Words of one longest common subsequence of x and y, backtracked as the `rouge`
    package does (rouge_score._recon_lcs: on a tie, step along y)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = (table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1]
                           else max(table[i - 1][j], table[i][j - 1]))
    words, i, j = set(), len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F of the `rouge` package (pltrdy/rouge 1.0.1, Rouge().get_scores(...)["rouge-l"]["f"]).

    That package computes the summary-level ROUGE-L with word *sets* (its default
    exclusive=True): both texts are split into sentences at every ".", words at spaces
    (case and other punctuation kept); llcs = number of distinct words in the union, over
    all (reference sentence, prediction sentence) pairs, of one LCS of the pair;
    R = llcs / #distinct reference words, P = llcs / #distinct prediction words,
    F = 2PR / (P + R + 1e-8). An empty text makes the package raise; LongBench scores 0.
    """
    def sentences(text):
        return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]
    hyp, ref = sentences(prediction), sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    ref_words = [s.split(" ") for s in ref]
    union = set()
    for r in ref_words:
        for h in hyp_words:
            union |= _lcs_words(r, h)
    recall = len(union) / len({w for s in ref_words for w in s})
    precision = len(union) / len({w for s in hyp_words for w in s})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """1/k if the true class is among the k class names found in the prediction, else 0.

    Kept as official, quirks included: a found name that is a strict substring of the true
    class is dropped, but removing from the list while iterating over it skips the next
    entry; the difflib fallback of the official code is dead (`em_match_list != 0` is
    always true), so no match scores 0.
    """
    matches = [c for c in kwargs["all_classes"] if c in prediction]
    for term in matches:  # mutates while iterating, on purpose (official behaviour)
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the numbers in the prediction that equal the paragraph id of the answer."""
    truth = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    return sum(n == truth for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the numbers in the prediction that equal the answer."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(ground_truth) for n in numbers) / len(numbers) if numbers else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy.fuzz.ratio (0..100 integer) as `pip install fuzzywuzzy` gives it: without
    python-Levenshtein it is difflib's SequenceMatcher ratio, rounded. (rapidfuzz and
    python-Levenshtein use the Indel ratio, which differs on some strings: " a " vs "ab "
    is 33 here, 67 there.)"""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Edit similarity of the first prediction line without ` # or // to the true line.

    The numbers match the official metrics.py run with fuzzywuzzy's pure-Python backend
    (difflib, what `pip install fuzzywuzzy` gives without python-Levenshtein), not with
    python-Levenshtein or rapidfuzz installed (see fuzz_ratio)."""
    first = next((line for line in prediction.lstrip("\n").split("\n")
                  if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz_ratio(first, ground_truth) / 100


DATASET2METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "passage_count": count_score, "passage_retrieval_en": retrieval_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}


def score_prediction(task: str, pred: str, answers: list[str], all_classes) -> float:
    """One sample's score in [0, 1] (eval.py scorer): first line only for some tasks,
    the best over the reference answers."""
    if task in FIRST_LINE_TASKS:
        pred = pred.lstrip("\n").split("\n")[0]
    return max([0.0] + [DATASET2METRIC[task](pred, gt, all_classes=all_classes) for gt in answers])


# ---- data ----

def fetch_data() -> Path:
    """The folder of official jsonl files, downloaded once from the hub (THUDM/LongBench,
    data.zip, as the official README offers) and unpacked under $LAPROX_CACHE/longbench."""
    from checkpoint import cache_root
    root = cache_root() / "longbench"
    found = sorted(root.rglob("narrativeqa.jsonl")) if root.is_dir() else []
    if found:
        return found[0].parent
    try:
        from huggingface_hub import hf_hub_download
        archive = hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset",
                                  cache_dir=str(root.parent / "hub"))
    except Exception as e:  # offline, no such repo, hub client missing: all mean "use --data-dir"
        raise ConnectionError(
            f"could not download the LongBench data ({HUB_FILE} of the dataset {HUB_REPO}) from the "
            f"Hugging Face hub: {type(e).__name__}: {e}. Fix: get data.zip by other means, unzip it, "
            f"and pass --data-dir FOLDER (the folder that holds narrativeqa.jsonl, ...).") from None
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(root)
    except zipfile.BadZipFile:
        raise ValueError(f"{archive} is not a zip archive; delete it and run again, or pass --data-dir") from None
    found = sorted(root.rglob("narrativeqa.jsonl"))
    if not found:
        raise ValueError(f"{archive} holds no narrativeqa.jsonl; pass --data-dir with the official jsonl files")
    return found[0].parent


def check_data_dir(data_dir: Path, tasks: list[str]) -> None:
    """Fail early, naming the problem, if the folder or a task's jsonl file is missing."""
    if not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a folder; it must hold the official "
                         f"LongBench jsonl files (narrativeqa.jsonl, ...)")
    missing = [f"{t}.jsonl" for t in tasks if not (data_dir / f"{t}.jsonl").is_file()]
    if missing:
        raise ValueError(f"--data-dir {data_dir} lacks {', '.join(missing)} (official LongBench "
                         f"files, one per task; or choose other --tasks)")


def load_task(data_dir: Path, task: str, limit: int | None = None) -> list[dict]:
    """The first `limit` samples of <data_dir>/<task>.jsonl (official fields: input, context,
    answers, all_classes, length, _id, ...), each with its line number as "index".
    A line that is not such a sample is an error naming the file and the line."""
    path, samples = data_dir / f"{task}.jsonl", []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(samples) >= limit:
                break
            if line.strip():
                samples.append({**parse_sample(line, f"{path} line {number}"), "index": len(samples)})
    if not samples:
        raise ValueError(f"{path} holds no samples; use the official LongBench file (or leave {task} out of --tasks)")
    return samples


def parse_sample(line: str, where: str) -> dict:
    """One jsonl line as a sample dict, checked for the fields the prompts and metrics read."""
    fix = "fix the line or get the official file again"
    try:
        sample = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg}, column {e.colno}); {fix}") from None
    if not isinstance(sample, dict):
        raise ValueError(f"{where} is not a JSON object; {fix}")
    for field, kind in (("input", str), ("context", str), ("answers", list)):
        if not isinstance(sample.get(field), kind):
            raise ValueError(f"{where} lacks the {kind.__name__} field {field!r}; {fix}")
    if not all(isinstance(a, str) for a in sample["answers"]):
        raise ValueError(f"{where}: 'answers' must be a list of strings; {fix}")
    sample.setdefault("all_classes", None)
    return sample


# ---- prompts (pred.py) ----

def build_prompt_ids(tok, sample: dict, task: str, max_length: int, chat: bool = True) -> list[int]:
    """Token ids of the official prompt: the task template, the tokenised prompt cut in the
    middle to `max_length` tokens (first and last max_length // 2 kept, decoded and joined
    again as text), then the model's chat template except for NO_CHAT_TASKS. chat=False
    (a checkpoint without a chat template) feeds the raw prompt, as pred.py's build_chat
    does for a model it has no template for."""
    prompt = DATASET2PROMPT[task].format(**sample)
    ids = tok.encode(prompt)
    if len(ids) > max_length:
        half = int(max_length / 2)
        prompt = tok.decode(ids[:half]) + tok.decode(ids[-half:])
    if chat and task not in NO_CHAT_TASKS:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tok.encode(prompt)


def has_chat_template(tok) -> bool:
    """Whether the checkpoint ships a chat template (model.Tokenizer.chat_template)."""
    return bool(getattr(tok, "chat_template", None))


def official_max_length(max_position: int) -> int:
    """pred.py's prompt length for a model (config/model2maxlen.json), one number for every
    task: the nominal context in thousands of tokens, minus 500 (4096 -> 3500, 8192 -> 7500,
    16384 -> 15500, 32768 -> 31500). check_context checks that template and answer still fit."""
    max_length = max_position // 1000 * 1000 - 500
    if max_length < 1:
        raise ValueError(f"the model's context ({max_position} tokens) is too short for LongBench's rule "
                         f"(context in thousands minus 500); pass --max-length")
    return max_length


def check_context(tok, tasks: list[str], max_length: int, max_position: int, chat: bool) -> None:
    """Fail before any prefill if, on some task, a prompt cut to `max_length` tokens plus what
    the chat template adds plus the task's generation length would exceed the model's context."""
    empty = len(tok.encode(""))
    for task in tasks:
        template = 0
        if chat and task not in NO_CHAT_TASKS:
            wrapped = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True)
            template = len(tok.encode(wrapped)) - empty
        need = max_length + template + DATASET2MAXLEN[task]
        if need > max_position:
            raise ValueError(f"--max-length {max_length} does not fit {task}: {max_length} prompt + {template} "
                             f"chat-template + {DATASET2MAXLEN[task]} generated tokens > the model's context "
                             f"of {max_position}; use --max-length {max_length - (need - max_position)} or less")


def check_prompt_fits(ids: list[int], task: str, index: int, max_position: int, max_length: int) -> None:
    """The exact check for one prompt (re-tokenising the text at the cut can add a token or two)."""
    excess = len(ids) + DATASET2MAXLEN[task] - max_position
    if excess > 0:
        raise ValueError(f"{task} sample {index}: {len(ids)} prompt + {DATASET2MAXLEN[task]} generated tokens "
                         f"exceed the model's context of {max_position}; use --max-length {max_length - excess}")


# ---- decoding (pred.py) ----

def newline_id(tok) -> int:
    """pred.py's "\n" token: tokenizer.encode("\n", add_special_tokens=False)[-1]."""
    return tok.encode("\n", add_special_tokens=False)[-1]


def decode_answer(model, tok, cache, task: str) -> str:
    """The greedy answer as pred.py decodes it (num_beams=1, do_sample=False), from a fresh
    cache (its last_logits (1, vocab) are the prefill's): at most DATASET2MAXLEN[task] tokens,
    stopping at the model's eos ids. On samsum pred.py also passes min_length=prompt+1 and
    eos_token_id=[eos, newline_id]: neither may be the first new token (their logits are -inf
    for it), and generation stops on either id only (a token that merely contains "\n", such
    as ".\n", does not stop it). Returns the text with special tokens skipped; a stopping
    "\n" stays, as in pred.py (eval.py scores the first line).

    eos: tok.eos_ids, i.e. generation_config's eos_token_id (what transformers' generate stops
    on) and the tokenizer's eos_token (what pred.py names on samsum); they differ only on
    checkpoints with several end tokens."""
    from model import decode_greedy
    stop, first = set(tok.eos_ids), cache.last_logits
    if task == "samsum" and first is not None:
        stop.add(newline_id(tok))
        first = first.clone()
        first[:, sorted(stop)] = float("-inf")
    return tok.decode(decode_greedy(model, cache, DATASET2MAXLEN[task], stop_ids=stop, logits=first))


# ---- the model-touching part ----

def run_sample(model, tok, ids: list[int], task: str, runs: list[tuple[str, float | int | None]],
               window: int, device: str) -> list[dict]:
    """Prefill the prompt once, then for each (method, budget): compress the prefill's cache,
    decode as pred.py does, and return {method, budget, pred, kept_fraction} per run.
    ids: prompt token ids (n,); the prefill takes them as a (1, n) tensor."""
    import torch
    from methods import compress
    prefill = model.prefill(torch.tensor([ids], device=device), window=window,
                            h2o=any(m == "h2o" for m, _ in runs))
    out = []
    for method, budget in runs:
        cache = compress(prefill, method=method, budget=1.0 if budget is None else budget)
        out.append({"method": method, "budget": budget, "pred": decode_answer(model, tok, cache, task),
                    "kept_fraction": cache.kept_fraction()})
    return out


# ---- predictions file ----

PREDICTION_FIELDS = ("task", "index", "method", "budget", "pred", "answers", "all_classes", "kept_fraction", "config")


def read_predictions(path: Path) -> list[dict]:
    """All prediction lines of `path` ([] if absent). Lines that are not a whole prediction
    (a line cut short by a killed run) are skipped with one warning: their cases run again."""
    if not path.is_file():
        return []
    lines, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                x = json.loads(line)
            except json.JSONDecodeError:
                x = None
            if isinstance(x, dict) and all(k in x for k in PREDICTION_FIELDS):
                lines.append(x)
            else:
                skipped.append(number)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable line(s) of {path} (line {', '.join(map(str, skipped[:5]))}"
              f"{', ...' if len(skipped) > 5 else ''}; cut short by an interrupted run?): their cases are not "
              f"counted as done", file=sys.stderr)
    return lines


def open_for_append(path: Path):
    """`path` opened to append lines, starting on a fresh line: after a run killed mid-write the
    file ends in a torn line, and a line appended to it would be unreadable as well."""
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")
    if torn:
        f.write("\n")
    return f


def run_config(args) -> str:
    """Hash of what changes the predictions (checkpoint, dtype, window, truncation, prompts): lines
    of another configuration in the same predictions file are neither skipped nor scored."""
    from eval_niah import fingerprint
    return fingerprint(dict(checkpoint=args.model, dtype=args.dtype, window=args.window, max_length=args.max_length,
                            prompts=DATASET2PROMPT, maxlen=DATASET2MAXLEN, protocol=PROTOCOL))


def run_key(task: str, index: int, method: str, budget) -> tuple:
    """What identifies one prediction: (task, sample index, method, budget)."""
    return task, int(index), method, None if budget is None else float(budget)


def pending_runs(sample: dict, task: str, methods: list[str], budgets: list,
                 done: set) -> list[tuple[str, float | int | None]]:
    """(method, budget) pairs still to run on one sample; "full" runs once, with budget None."""
    runs = [("full", None)] if "full" in methods else []
    runs += [(m, b) for b in budgets for m in methods if m != "full"]
    return [(m, b) for m, b in runs if run_key(task, sample["index"], m, b) not in done]


# ---- scores ----

def aggregate(lines: list[dict]) -> list[dict]:
    """Per (method, budget): task scores (mean x 100, rounded to 2 decimals as eval.py does),
    the six category averages, "avg" (over tasks, as KV-cache papers report) and
    "avg_categories" (over categories, as the LongBench leaderboard), mean kept fraction, n."""
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        groups.setdefault((line["method"], line["budget"]), []).append(line)
    results = []
    for (method, budget), group in groups.items():
        per_task: dict[str, list[float]] = {}
        for x in group:
            per_task.setdefault(x["task"], []).append(
                score_prediction(x["task"], x["pred"], x["answers"], x["all_classes"]))
        tasks = {t: round(100 * sum(v) / len(v), 2) for t, v in per_task.items()}
        cats = {c: round(sum(tasks[t] for t in ts if t in tasks) / sum(t in tasks for t in ts), 2)
                for c, ts in CATEGORIES.items() if any(t in tasks for t in ts)}
        results.append({
            "method": method, "budget": budget,
            "tasks": {t: tasks[t] for t in TASKS if t in tasks},
            "categories": cats,
            "avg": round(sum(tasks.values()) / len(tasks), 2),
            "avg_categories": round(sum(cats.values()) / len(cats), 2),
            "kept_fraction": round(sum(x["kept_fraction"] for x in group) / len(group), 4),
            "n": {t: len(per_task[t]) for t in TASKS if t in per_task},
        })
    return results


def results_markdown(results: list[dict], budgets: list) -> str:
    """One table per budget: rows are tasks, categories, averages and the kept fraction;
    columns are the methods ("full" in every table as the reference). Under it, the number
    of samples each method was scored on per task: a budget that leaves a prompt less than
    the window (+ sinks) skips that sample for that method, so averages can cover different
    samples, which a note then names."""
    out = []
    for b in budgets:
        cols = [r for r in results if r["budget"] is None] + [r for r in results if r["budget"] == b]
        if not cols:
            continue
        tasks = [t for t in TASKS if any(t in r["tasks"] for r in cols)]
        cats = [c for c in CATEGORIES if any(c in r["categories"] for r in cols)]
        header = ["| | " + " | ".join(r["method"] for r in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        out += [f"## budget {b}", ""] + header
        for name, get in ([(t, lambda r, t=t: r["tasks"].get(t)) for t in tasks]
                          + [(f"**{c}**", lambda r, c=c: r["categories"].get(c)) for c in cats]
                          + [("**avg (tasks)**", lambda r: r["avg"]),
                             ("**avg (categories)**", lambda r: r["avg_categories"]),
                             ("kept fraction", lambda r: r["kept_fraction"])]):
            out.append(f"| {name} | " + " | ".join("-" if get(r) is None else f"{get(r):g}" for r in cols) + " |")
        out += ["", f"samples scored (budget {b}):", ""] + header
        for t in tasks:
            out.append(f"| {t} | " + " | ".join(str(r["n"].get(t, 0)) for r in cols) + " |")
        uneven = [t for t in tasks if len({r["n"].get(t, 0) for r in cols}) > 1]
        if uneven:
            out += ["", f"note: the methods were scored on different samples of {', '.join(uneven)} (a sample "
                        f"too short for budget {b} is skipped for the methods it does not fit)"]
        out.append("")
    return "\n".join(out)


def max_length_line(lines: list[dict], given: int | None) -> str:
    """The sentence of results.md that says how long the prompts were allowed to be."""
    used = sorted({x["max_length"] for x in lines if "max_length" in x})
    value = ", ".join(map(str, used)) or "(not recorded)"
    how = "--max-length" if given else "the official rule: the model's context in thousands x 1000 - 500"
    return f"Prompts middle-truncated to max_length = {value} tokens ({how})."


def plot_scores(results: list[dict], path: Path) -> None:
    """Average score (over tasks) against budget, one line per method; "full" as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        pts = sorted((r["budget"], r["avg"]) for r in results if r["method"] == method and r["budget"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    for r in results:
        if r["budget"] is None:
            ax.axhline(r["avg"], color="k", linestyle="--", label=r["method"])
    ax.set_xlabel("budget")
    ax.set_ylabel("LongBench average score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- command line ----

def parse_list(text: str, known, what: str) -> list[str]:
    """A comma list of names, each checked against `known`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    return names


def parse_budgets(text: str) -> list[float | int]:
    """Comma list of budgets: a fraction in (0, 1] of the prompt's KV entries, or an integer
    >= 1 (tokens per head on average)."""
    budgets = []
    for x in (x.strip() for x in text.split(",") if x.strip()):
        try:
            b = int(x) if re.fullmatch(r"\d+", x) else float(x)
        except ValueError:
            raise ValueError(f"--budget {x!r} is not a number") from None
        if (isinstance(b, int) and b < 1) or (isinstance(b, float) and not 0 < b <= 1):
            raise ValueError(f"--budget {x} is out of range: a fraction in (0, 1] or an integer >= 1")
        budgets.append(b)
    if not budgets:
        raise ValueError("--budget is empty")
    return budgets


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint name or folder (default: the project's default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--budget", default="0.05", help="comma list: fractions in (0, 1] or integers (tokens per head)")
    p.add_argument("--window", type=int, default=32, help="observation window w (last w prompt tokens)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    p.add_argument("--data-dir", type=Path, default=None, help="folder of the official jsonl files (skips the download)")
    p.add_argument("--max-length", type=int, default=None,
                   help="middle-truncate prompts to this many tokens (default, as the official scripts: "
                        "the model's context in thousands x 1000 - 500, e.g. 8192 -> 7500)")
    p.add_argument("--out", type=Path, default=None, help="default results/longbench/<model>/")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip (task, sample, method, budget) already in predictions.jsonl (default on)")
    return p.parse_args(argv)


def check_device(name: str) -> None:
    """Fail early, naming the fix, on a device string torch does not know or cannot use here."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                   else f"torch {torch.__version__} sees no GPU")
            raise ValueError(f"--device {name}: CUDA is not available ({why}); use --device cpu, or install "
                             f"the torch build for your CUDA on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")


def output_folder(args, model_name: str) -> Path:
    """--out (default results/longbench/<model>/), created; a path that is a file is an error."""
    out = args.out.expanduser() if args.out else Path("results") / "longbench" / model_name
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder --out {out} ({e.strerror}); pass another folder") from None
    return out


def load_checkpoint(args):
    """(model, tok) of --model; a checkpoint that cannot be loaded is a one-line error."""
    import torch
    from model import load_model
    try:
        return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    except Exception as e:  # a broken or unreachable checkpoint, whatever the library raises
        what = "the default model" if args.model is None else f"--model {args.model}"
        raise ValueError(f"cannot load {what}: {type(e).__name__}: {e}") from None


def run(args) -> list[dict]:
    """Check the arguments, run what is missing, write the predictions, tables and plot."""
    from methods import METHODS  # the methods compress knows
    tasks = parse_list(args.tasks, TASKS, "task")
    methods = parse_list(args.methods, list(METHODS), "method")
    budgets = parse_budgets(args.budget)
    for name in ("window", "limit", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_device(args.device)
    data_dir = args.data_dir.expanduser() if args.data_dir else fetch_data()
    check_data_dir(data_dir, tasks)
    work = [(task, s) for task in tasks for s in load_task(data_dir, task, args.limit)]

    from eval_niah import DEFAULT_MODEL_NAME
    model_name = DEFAULT_MODEL_NAME if args.model is None else Path(str(args.model).rstrip("/")).name
    out = output_folder(args, model_name)
    pred_path = out / "predictions.jsonl"
    if not args.resume and pred_path.exists():
        print(f"--no-resume: starting {pred_path} afresh")
        pred_path.unlink()
    config = run_config(args)
    previous = [x for x in read_predictions(pred_path) if x.get("config") == config]
    done = {run_key(x["task"], x["index"], x["method"], x["budget"]) for x in previous}
    todo = [(task, s, runs) for task, s in work if (runs := pending_runs(s, task, methods, budgets, done))]
    print(f"{len(work)} samples, {len(work) - len(todo)} already done, {len(todo)} to run")
    if todo:
        predict(args, todo, pred_path, config)

    wanted = {(task, s["index"]) for task, s in work}
    runs_wanted = {(m, None if m == "full" else b) for m in methods for b in budgets}
    lines = [x for x in read_predictions(pred_path)
             if x.get("config") == config and (x["task"], x["index"]) in wanted and (x["method"], x["budget"]) in runs_wanted]
    results = aggregate(lines)
    (out / "results.json").write_text(json.dumps(
        {"model": model_name, "tasks": tasks, "methods": methods, "budgets": budgets, "limit": args.limit,
         "max_length": sorted({x["max_length"] for x in lines if "max_length" in x}), "results": results}, indent=2))
    table = results_markdown(results, budgets)
    (out / "results.md").write_text(f"# LongBench, model {model_name}\n\n{max_length_line(lines, args.max_length)}\n\n{table}")
    plot_scores(results, out / "scores_vs_budget.png")
    print(table)
    print(f"wrote {pred_path}, results.json, results.md and scores_vs_budget.png under {out}")
    return results


def predict(args, todo: list[tuple[str, dict, list]], pred_path: Path, config: str) -> None:
    """Load the model, check that the prompts fit it, and append one prediction line per
    (sample, method, budget) of `todo` to pred_path, flushed after every sample."""
    from tqdm import tqdm
    from methods import budget_fits
    model, tok = load_checkpoint(args)
    max_position = model.config.max_position
    max_length = args.max_length or official_max_length(max_position)
    chat = has_chat_template(tok)
    tasks = list(dict.fromkeys(task for task, _, _ in todo))
    if not chat and any(t not in NO_CHAT_TASKS for t in tasks):
        print("note: this checkpoint has no chat template: the chat tasks get the raw prompt, as the "
              "official pred.py does for models it has no template for")
    check_context(tok, tasks, max_length, max_position, chat)
    with open_for_append(pred_path) as f:
        for task, s, runs in tqdm(todo, desc="LongBench"):
            ids = build_prompt_ids(tok, s, task, max_length, chat)
            check_prompt_fits(ids, task, s["index"], max_position, max_length)
            fits = [(m, b) for m, b in runs if b is None or budget_fits(m, b, len(ids), args.window)]
            if len(fits) < len(runs):
                print(f"note: {task} sample {s['index']} ({len(ids)} tokens) is too short for "
                      f"{sorted({b for m, b in runs if (m, b) not in fits})} (below the {args.window}-token "
                      f"window + sinks): skipped for those budgets")
            if not fits:
                continue
            for r in run_sample(model, tok, ids, task, fits, args.window, args.device):
                line = {"task": task, "_id": s.get("_id"), "index": s["index"], **r,
                        "answers": s["answers"], "all_classes": s["all_classes"], "length": s.get("length"),
                        "prompt_tokens": len(ids), "max_length": max_length, "config": config}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()


def main(argv=None) -> list[dict]:
    """The command line: a user error (bad flag, data, checkpoint, device, output folder) is one
    line naming the problem and the fix, never a traceback."""
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"eval_longbench.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("eval_longbench.py: interrupted; the same command resumes where it stopped")


if __name__ == "__main__":
    main()
