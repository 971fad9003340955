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
method, budget and protocol is evaluated on that prefill (harness.run_unit). Under --protocol
agnostic the prompt splits where {context} ends in the official template (after truncation and
the chat template): everything after it is the question, also on tasks without one (gov_report,
passage_count, lcc: the instruction after the context). Scores come with 95% bootstrap CIs over
the samples (stratified by task), LaProx's paired differences and the loss ratio (stats.py).

    python eval_longbench.py --budget 0.05                       # all 16 tasks, default model
    python eval_longbench.py --tasks hotpotqa,trec --limit 20 --methods full,laprox,snapkv
    python eval_longbench.py --data-dir ~/LongBench/data         # official jsonl files, no download
    python eval_longbench.py --protocol aware,agnostic --budget 0.05,0.2

Outputs under --out (default results/longbench/<model>/): predictions.jsonl (one line per
sample, method, budget and protocol; a rerun skips what is there; one run per --out at a time),
results.json, results.md and scores_vs_budget.png.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import string
import zipfile
from collections import Counter
from pathlib import Path

from lab.decode import Decoding, answer_text, decode_case
from lab.distributed import Group
from lab.harness import (SINGLE, Eval, OneLineParser, Unit, add_eval_arguments, check_eval_arguments, encode_split,
                     fingerprint, latest, machine_line, make_cases, model_label, read_rows, run_eval, run_main,
                     stats_report)

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

# The rules of pred.py that are code, not tables (part of every prediction's configuration hash;
# not the aware / agnostic protocol, which each prediction line names).
OFFICIAL_RULES = ("max_length: context // 1000 * 1000 - 500 unless given; middle truncation; chat template "
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

def build_prompt(tok, sample: dict, task: str, max_length: int, chat: bool = True) -> tuple[str, int]:
    """The official prompt text and `context_end`, the character offset where its {context} ends
    (everything after it, the question and the instructions that follow the context, the chat
    template's closing tokens, is "the question": harness.encode_split).

    As pred.py: the task template filled in, cut in the middle to `max_length` tokens when longer
    (the first and last max_length // 2 tokens kept, decoded and joined again as text), then the
    model's chat template except for NO_CHAT_TASKS. chat=False (a checkpoint without a chat
    template) keeps the raw prompt, as pred.py's build_chat does for a model it has no template for.
    After a cut, the context ends where the text after it (the tail) starts, when the kept end
    holds the whole tail; else in the kept start if it lay there; else at the cut itself (the
    question then is what is kept of a tail longer than half the prompt)."""
    before, after = DATASET2PROMPT[task].split("{context}")
    head, tail = before.format(**sample), after.format(**sample)
    prompt = head + sample["context"] + tail
    end = len(head) + len(sample["context"])
    ids = tok.encode(prompt)
    if len(ids) > max_length:
        half = int(max_length / 2)
        first, second = tok.decode(ids[:half]), tok.decode(ids[-half:])
        if second.endswith(tail):
            end = len(first) + len(second) - len(tail)
        elif not (end <= len(first) and prompt.startswith(first)):
            end = len(first)
        prompt = first + second
    if chat and task not in NO_CHAT_TASKS:
        wrapped = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        start = wrapped.find(prompt)
        if start < 0:
            raise ValueError(f"{task}: the chat template changed the prompt's text; its context cannot be located")
        prompt, end = wrapped, start + end
    return prompt, end


def build_prompt_ids(tok, sample: dict, task: str, max_length: int, chat: bool = True) -> list[int]:
    """Token ids of the official prompt (build_prompt): one tokenization of its text, as pred.py."""
    return tok.encode(build_prompt(tok, sample, task, max_length, chat)[0])


def has_chat_template(tok) -> bool:
    """Whether the checkpoint ships a chat template (checkpoint.Tokenizer.chat_template)."""
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


def decoding(tok, task: str) -> Decoding:
    """The greedy decoding of pred.py (num_beams=1, do_sample=False): at most DATASET2MAXLEN[task]
    tokens, stopping at the model's eos ids. On samsum pred.py also passes min_length=prompt+1 and
    eos_token_id=[eos, newline_id]: neither may be the first new token (their logits are -inf
    for it), and generation stops on either id only (a token that merely contains "\n", such
    as ".\n", does not stop it). The text (decode.answer_text) skips special tokens; a stopping
    "\n" stays, as in pred.py (eval.py scores the first line).

    eos: tok.eos_ids, i.e. generation_config's eos_token_id (what transformers' generate stops
    on) and the tokenizer's eos_token (what pred.py names on samsum); they differ only on
    checkpoints with several end tokens."""
    stop = frozenset(tok.eos_ids) | ({newline_id(tok)} if task == "samsum" else set())
    return Decoding(DATASET2MAXLEN[task], stop_ids=stop, first_banned=stop if task == "samsum" else frozenset())


def decode_answer(model, tok, seq, task: str) -> str:
    """The answer of one decode.Sequence (a cache and where its sequence stands), decoded alone
    (decode.decode_case) by `decoding`'s rule."""
    spec = decoding(tok, task)
    return answer_text(tok, decode_case(model, seq, spec), spec)


# ---- predictions file ----

PREDICTION_FIELDS = ("task", "index", "method", "budget", "pred", "answers", "all_classes", "kept_fraction", "config")


def run_key(task: str, index: int, method: str, budget, protocol: str = "aware") -> tuple:
    """What identifies one prediction: (task, sample index, method, budget, protocol); "full"
    has budget None."""
    return task, int(index), method, None if budget is None else float(budget), protocol


def line_key(line: dict) -> tuple:
    """run_key of a prediction line; a line written before the protocols existed was aware."""
    return run_key(line["task"], line["index"], line["method"], line["budget"], line.get("protocol", "aware"))


def read_predictions(path: Path, config: str) -> list[dict]:
    """The prediction lines of `path` made with this configuration, the last one per case (a
    --no-resume rerun appends newer ones); a line that is not a whole prediction (cut short by a
    killed run) is skipped with one warning and its case runs again (harness.read_rows)."""
    lines = [dict(x, protocol=x.get("protocol", "aware")) for x in read_rows(path, required=PREDICTION_FIELDS)
             if x.get("config") == config]
    return latest(lines, line_key)


def run_config(args) -> str:
    """Hash of what changes the predictions (checkpoint, dtype, window, truncation, prompts): lines
    of another configuration in the same predictions file are neither skipped nor scored. args: checked
    (check_args resolves --dtype to the model's own when it is not given)."""
    return fingerprint(dict(checkpoint=args.model, dtype=args.dtype, window=args.window, max_length=args.max_length,
                            prompts=DATASET2PROMPT, maxlen=DATASET2MAXLEN, protocol=OFFICIAL_RULES))


# ---- scores ----

def score_of(line: dict) -> float:
    """A prediction line's score in [0, 1] (score_prediction)."""
    return score_prediction(line["task"], line["pred"], line["answers"], line["all_classes"])


def aggregate(lines: list[dict]) -> list[dict]:
    """Per (method, budget, protocol): task scores (mean x 100, rounded to 2 decimals as eval.py
    does), the six category averages, "avg" (over tasks, as KV-cache papers report) and
    "avg_categories" (over categories, as the LongBench leaderboard), mean kept fraction, n."""
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        groups.setdefault((line["method"], line["budget"], line.get("protocol", "aware")), []).append(line)
    results = []
    for (method, budget, protocol), group in groups.items():
        per_task: dict[str, list[float]] = {}
        for x in group:
            per_task.setdefault(x["task"], []).append(score_of(x))
        tasks = {t: round(100 * sum(v) / len(v), 2) for t, v in per_task.items()}
        cats = {c: round(sum(tasks[t] for t in ts if t in tasks) / sum(t in tasks for t in ts), 2)
                for c, ts in CATEGORIES.items() if any(t in tasks for t in ts)}
        results.append({
            "method": method, "budget": budget, "protocol": protocol,
            "tasks": {t: tasks[t] for t in TASKS if t in tasks},
            "categories": cats,
            "avg": round(sum(tasks.values()) / len(tasks), 2),
            "avg_categories": round(sum(cats.values()) / len(cats), 2),
            "kept_fraction": round(sum(x["kept_fraction"] for x in group) / len(group), 4),
            "n": {t: len(per_task[t]) for t in TASKS if t in per_task},
        })
    return results


def results_markdown(results: list[dict], budgets: list, protocols: tuple = ("aware",)) -> str:
    """One table per protocol and budget: rows are tasks, categories, averages and the kept
    fraction (of the prompt under aware, of the context under agnostic); columns are the methods
    ("full" in every table as the reference). Under it, the number of samples each method was
    scored on per task: a budget that leaves a prompt (or context) less than some method's window
    (+ sinks) skips that sample for every method but "full", which a note then names."""
    out = []
    for p in protocols:
        at_p = [r for r in results if r.get("protocol", "aware") == p]
        for b in budgets:
            cols = [r for r in at_p if r["budget"] is None] + [r for r in at_p if r["budget"] == b]
            if not cols:
                continue
            tasks = [t for t in TASKS if any(t in r["tasks"] for r in cols)]
            cats = [c for c in CATEGORIES if any(c in r["categories"] for r in cols)]
            header = ["| | " + " | ".join(r["method"] for r in cols) + " |", "|---" * (len(cols) + 1) + "|"]
            out += [f"## protocol {p}, budget {b}", ""] + header
            for name, get in ([(t, lambda r, t=t: r["tasks"].get(t)) for t in tasks]
                              + [(f"**{c}**", lambda r, c=c: r["categories"].get(c)) for c in cats]
                              + [("**avg (tasks)**", lambda r: r["avg"]),
                                 ("**avg (categories)**", lambda r: r["avg_categories"]),
                                 ("kept fraction", lambda r: r["kept_fraction"])]):
                out.append(f"| {name} | " + " | ".join("-" if get(r) is None else f"{get(r):g}" for r in cols) + " |")
            out += ["", f"samples scored (protocol {p}, budget {b}):", ""] + header
            for t in tasks:
                out.append(f"| {t} | " + " | ".join(str(r["n"].get(t, 0)) for r in cols) + " |")
            uneven = [t for t in tasks if len({r["n"].get(t, 0) for r in cols}) > 1]
            if uneven:
                out += ["", f"note: the methods were scored on different samples of {', '.join(uneven)} (a sample "
                            f"too short for budget {b} is skipped for every method but full)"]
            out.append("")
    return "\n".join(out)


def max_length_line(lines: list[dict], given: int | None) -> str:
    """The sentence of results.md that says how long the prompts were allowed to be."""
    used = sorted({x["max_length"] for x in lines if "max_length" in x})
    value = ", ".join(map(str, used)) or "(not recorded)"
    how = "--max-length" if given else "the official rule: the model's context in thousands x 1000 - 500"
    return f"Prompts middle-truncated to max_length = {value} tokens ({how})."


def stat_rows(lines: list[dict]) -> list[dict]:
    """The lines as stats.py reads them: a unit is a sample (its index), its stratum its task."""
    return [dict(unit=x["index"], stratum=x["task"], method=x["method"], budget=x["budget"],
                 protocol=x.get("protocol", "aware"), score=score_of(x)) for x in lines]


# ---- command line ----

def parse_names(text: str, known, what: str) -> list[str]:
    """A comma list of names, each checked against `known`."""
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n")[0])
    add_eval_arguments(p, budget_help="comma list: fractions in (0, 1] of the KV entries (of the prompt's under "
                                      "aware, of the context's under agnostic) or integers (tokens per head)",
                       out_help="output folder (default results/longbench/<model>/)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of LongBench tasks")
    p.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    p.add_argument("--data-dir", type=Path, default=None, help="folder of the official jsonl files (skips the download)")
    p.add_argument("--max-length", type=int, default=None,
                   help="middle-truncate prompts to this many tokens (default, as the official scripts: "
                        "the model's context in thousands x 1000 - 500, e.g. 8192 -> 7500)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args, group: Group = SINGLE) -> tuple[dict, list, list[str], list[str]]:
    """(methods, budgets, protocols, tasks) from the command line, each checked (harness.
    check_eval_arguments, also this rank's devices), or a ValueError naming the problem."""
    methods, budgets, protocols = check_eval_arguments(args, tokens=True, group=group)
    tasks = parse_names(args.tasks, TASKS, "task")
    for name in ("limit", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return methods, budgets, protocols, tasks


def read_work(args, tasks: list[str]) -> list[tuple[str, dict]]:
    """(task, sample) of every sample asked for: the first --limit of each task's file in --data-dir,
    or in the downloaded data (fetch_data); a missing or broken file is a ValueError naming it."""
    data_dir = args.data_dir.expanduser() if args.data_dir else fetch_data()
    check_data_dir(data_dir, tasks)
    return [(task, s) for task in tasks for s in load_task(data_dir, task, args.limit)]


def length_estimate(sample: dict, max_length: int | None) -> int:
    """A sample's prompt length in tokens, roughly and without a tokenizer, to balance torchrun's ranks
    (never a result): LongBench's own `length` field (the words of an English context, the characters
    of a Chinese one), else the context's characters / 4; at most max_length (the cut) when given."""
    n = sample.get("length")
    n = n if isinstance(n, int) and n > 0 else len(sample["context"]) // 4 + 1
    return min(n, max_length or n)


def run(args, model=None, tok=None, group: Group = SINGLE) -> list[dict]:
    """Check the arguments, run what is missing, write the predictions, tables and plot; returns the
    results table (aggregate). model, tok: reuse a loaded model (tests) instead of loading
    args.model. group: torchrun's ranks (distributed.py: each predicts its share of the samples,
    rank 0 merges the predictions and writes the reports; the others return [])."""
    methods, budgets, protocols, tasks = group.together(lambda: check_args(args, group))
    if args.data_dir is None:  # each node's first rank downloads the data, its other ranks then find it
        group.together(lambda: fetch_data() if group.local_rank == 0 else None)
    work = group.together(lambda: read_work(args, tasks))

    model_name = model_label(args.model)
    out = Path(args.out or Path("results") / "longbench" / model_name).expanduser()
    pred_path = out / "predictions.jsonl"
    config = run_config(args)
    cases = make_cases(methods, budgets, protocols, agnostic_budgets=args.agnostic_budgets)

    def units(done):
        todo = [Unit((task, s["index"]), todo, s) for task, s in work
                if (todo := [c for c in cases if case_key(task, s, c) not in done])]
        if group.is_main:
            print(f"{len(work)} samples, {len(work) - len(todo)} already done, {len(todo)} to run")
        return todo

    def sizes(tok):  # each sample's exact prompt and context tokens, before the weights load
        from checkpoint import load_config
        max_length = args.max_length or official_max_length(load_config(args.model).max_position)
        chat = has_chat_template(tok)

        def size(unit):
            context, question = encode_split(tok, *build_prompt(tok, unit.data, unit.key[0], max_length, chat))
            return len(context) + len(question), len(context)
        return size

    def prepare(model, tok):
        max_position = model.config.max_position
        max_length = args.max_length or official_max_length(max_position)
        chat = has_chat_template(tok)
        if not chat and any(t not in NO_CHAT_TASKS for t in tasks) and group.is_main:
            print("note: this checkpoint has no chat template: the chat tasks get the raw prompt, as the "
                  "official pred.py does for models it has no template for")
        group.together(lambda: check_context(tok, tasks, max_length, max_position, chat))

        def prompt(unit):
            (task, index), sample = unit.key, unit.data
            context, question = encode_split(tok, *build_prompt(tok, sample, task, max_length, chat))
            check_prompt_fits(context + question, task, index, max_position, max_length)
            return context, question, (task, sample, len(context) + len(question), len(context))

        def row(unit, info, result):
            task, sample, n, c = info
            line = {"task": task, "_id": sample.get("_id"), "index": sample["index"], **result.row(),
                    "budget": None if result.case.name == "full" else result.case.budget, "pred": result.generated,
                    "answers": sample["answers"], "all_classes": sample["all_classes"], "length": sample.get("length"),
                    "prompt_tokens": n, "context_tokens": c, "max_length": max_length, "config": config}
            del line["generated"]
            return line
        return prompt, lambda info: decoding(tok, info[0]), row

    def report(lines):
        wanted = {case_key(task, s, c) for task, s in work for c in cases}
        lines = [x for x in lines if line_key(x) in wanted]
        results = aggregate(lines)
        summary, stats_md = stats_report(stat_rows(lines), out / "scores_vs_budget.png",
                                         f"LongBench {model_name}", scale=100, digits=2)
        (out / "results.json").write_text(json.dumps(
            {"model": model_name, "tasks": tasks, "methods": list(methods), "budgets": budgets,
             "protocols": protocols, "limit": args.limit,
             "max_length": sorted({x["max_length"] for x in lines if "max_length" in x}), "results": results,
             "stats": summary}, indent=2))
        table = results_markdown(results, budgets, tuple(protocols))
        (out / "results.md").write_text(
            f"# LongBench, model {model_name}\n\n{max_length_line(lines, args.max_length)}\n\n{machine_line(args.model, args.dtype)}\n\n"
            f"## Average over the tasks (the mean of the task means), scores x 100, with 95% bootstrap CIs over the "
            f"samples\n\n{stats_md}\n\n{table}")
        print(table)
        print(f"wrote {pred_path}, results.json, results.md and scores_vs_budget.png under {out}")
        return results

    longest = args.max_length and args.max_length + max(DATASET2MAXLEN[t] for t in tasks)  # (None: the model's)
    ev = Eval(pred_path, lambda: read_predictions(pred_path, config), line_key, units,
              lambda unit: length_estimate(unit.data, args.max_length), longest, prepare, report, sizes=sizes,
              desc="LongBench samples")
    return run_eval(args, ev, methods, group, model, tok)[1] or []


def case_key(task: str, sample: dict, case) -> tuple:
    """run_key of a case on a sample; "full" has budget None in the predictions."""
    return run_key(task, sample["index"], case.method, None if case.name == "full" else case.budget, case.protocol)


def main(argv=None) -> list[dict]:
    """The command line: a user error (bad flag, data, checkpoint, device, output folder) is one
    line naming the problem and the fix, exit code 2, never a traceback."""
    return run_main(build_parser(), run, argv, torchrun=True)


if __name__ == "__main__":
    main()
