"""eval_ruler.py: generators, prompt split, length fitting, metric, QA files, CLI errors, reports, a tiny run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import eval_ruler as R
from test_niah import WordTok as NiahWordTok

ROOT = Path(__file__).resolve().parent.parent


class WordTok(NiahWordTok):
    """test_niah's stand-in tokenizer (a token is a word with the whitespace before it, a chat
    template) with a bos id first when add_special_tokens, as checkpoint.Tokenizer has."""
    BOS = -1

    def encode(self, text, add_special_tokens=True):
        return ([self.BOS] if add_special_tokens else []) + super().encode(text)

    def decode(self, ids):
        return super().decode([i for i in ids if i != self.BOS])


class RawTok(WordTok):
    """A checkpoint without a chat template (checkpoint.Tokenizer raises ValueError)."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        raise ValueError("this checkpoint has no chat template")


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model[1]


def words_of(n, seed):
    import random
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone", "cloud"]) for _ in range(n))


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    """Tiny files in RULER's formats: SQuAD v2.0 (answerable and impossible questions) with 30
    paragraphs, HotpotQA distractor with 3 questions of 3 paragraphs."""
    d = tmp_path_factory.mktemp("qa")
    articles = []
    for a in range(3):
        paragraphs = []
        for p in range(10):
            ctx = f"Paragraph {a}-{p}: the keeper of lighthouse {a}{p} was Captain Zed{a}{p}. " + words_of(30, a * 10 + p)
            paragraphs.append(dict(context=ctx, qas=[
                dict(question=f"Who kept lighthouse {a}{p}?", is_impossible=False,
                     answers=[dict(text=f"Captain Zed{a}{p}"), dict(text=f"Zed{a}{p}")]),
                dict(question="What is unanswerable?", is_impossible=True, answers=[])]))
        articles.append(dict(title=f"t{a}", paragraphs=paragraphs))
    (d / "squad.json").write_text(json.dumps(dict(version="v2.0", data=articles)))
    hotpot = [dict(question=f"Which river feeds lake {q}?", answer=f"River Q{q}",
                   context=[[f"Lake {q}", [f"Lake {q} is fed by the River Q{q}. ", words_of(20, q)]],
                            [f"Town {q}", ["A town. ", words_of(25, q + 7)]],
                            [f"Hill {q}", ["A hill. ", words_of(15, q + 9)]]]) for q in range(3)]
    (d / "hotpot_dev_distractor_v1.json").write_text(json.dumps(hotpot))
    return d


# ----------------------------------------------------------------------------- generators

@pytest.mark.parametrize("task", R.SYNTHETIC)
def test_samples_are_deterministic_and_hold_their_answers(tok, task):
    a = R.make_sample(tok, task, 1500, 0, seed=0)
    assert R.make_sample(tok, task, 1500, 0, seed=0) == a
    b, c = R.make_sample(tok, task, 1500, 0, seed=1), R.make_sample(tok, task, 1500, 1, seed=0)
    assert a["text"] != b["text"] and a["text"] != c["text"] and a["answers"] != b["answers"]
    for s in (a, b, c):
        context, question = s["text"][:s["context_end"]], s["text"][s["context_end"]:]
        assert s["answers"] and all(x in context for x in s["answers"]), "every reference is in the context"
        assert not any(x in question for x in s["answers"]), "the question does not give the answer away"
        assert s["max_new_tokens"] == R.KINDS[R.TASKS[task].kind]["max_new_tokens"] and s["metric"] == "all"


def test_task_settings_follow_ruler(tok):
    """Needle counts, value types, vt's chain and one-shot example, cwe's frequencies, fwe's ranks."""
    s = R.make_sample(tok, "niah_multivalue", 1500, 0)
    assert len(s["answers"]) == 4 and all(re.fullmatch(r"\d{7}", x) for x in s["answers"])
    assert "What are all the special magic numbers for" in s["text"]
    s = R.make_sample(tok, "niah_single_3", 1500, 0)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s["answers"][0])
    assert "What is the special magic uuid for" in s["text"] and "A special magic uuid is hidden" in s["text"]
    s = R.make_sample(tok, "niah_multikey_2", 1500, 0)
    ctx = s["text"][:s["context_end"]]
    assert ctx.count("One of the special magic numbers for") == s["units"] + 1  # distractors + the needle
    s = R.make_sample(tok, "niah_multiquery", 1500, 0)
    assert len(s["answers"]) == 4 and ", and " in s["text"][s["context_end"]:]

    s = R.make_sample(tok, "vt", 1500, 0)
    ctx = s["text"][:s["context_end"]]
    names = s["answers"]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", x) for x in names)
    value = re.search(rf"VAR {names[0]} = (\d+)", ctx).group(1)
    assert all(f"VAR {names[j + 1]} = VAR {names[j]} " in ctx for j in range(4))
    assert f"assigned the value {value}, they are:" in s["text"][s["context_end"]:]
    first = ctx.index("Memorize")
    example = ctx[first:ctx.index("Memorize", first + 1)]
    assert len(re.findall(r"VAR [A-Z]{3} = ", example)) == 5 and "they are:  " in example  # RULER's one-shot
    assert len(tok.encode(example.split(" Answer:")[0], add_special_tokens=False)) <= R.VT_ICL_TOKENS

    for length, freq in [(4000, (30, 3)), (1500, (6, 1))]:  # RULER's long / short settings
        s = R.make_sample(tok, "cwe", length, 0)
        body = s["text"][s["text"].rindex("Below is"):s["context_end"]].split("\n", 1)[1]
        counts = {}
        for w in re.split(r" ?\d+\. ", body)[1:]:
            counts[w] = counts.get(w, 0) + 1
        assert sorted(set(counts.values())) == sorted(set(freq))
        assert {w for w, c in counts.items() if c == freq[0]} == set(s["answers"])

    s = R.make_sample(tok, "fwe", 2000, 0)
    ctx = s["text"][s["text"].index("coded words. ") + 13:s["context_end"]].split(" ")
    counts = {w: ctx.count(w) for w in set(ctx)}
    ranked = sorted(counts, key=counts.get, reverse=True)
    assert ranked[0] == "..." and ranked[1:4] == s["answers"] and len(counts) <= 2000 // 50


def test_same_sample_in_another_process():
    """No hash() salt, no global random state: a fresh interpreter with another PYTHONHASHSEED draws the same."""
    code = ("import json, eval_ruler as R, test_ruler as T;"
            "print(json.dumps([R.make_sample(T.WordTok(), t, 900, 3, seed=7)['text'] for t in R.SYNTHETIC]))")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    here = [R.make_sample(WordTok(), t, 900, 3, seed=7)["text"] for t in R.SYNTHETIC]
    assert json.loads(out.stdout) == here


# ----------------------------------------------------------------------------- prompt and length

def test_prompt_ids_split_where_the_context_ends(tok):
    from lab.harness import encode_split
    s = R.make_sample(tok, "niah_single_2", 1200, 0)
    text, end = s["text"], s["context_end"]
    assert s["ids"] == tok.encode(text)  # the prompt's own ids, cut in two (harness.encode_split)
    assert s["ids"][:s["n_context"]] == tok.encode(text[:end])  # no token spans this seam
    assert tok.decode(s["ids"], skip_special_tokens=False) == text
    assert text[end:].startswith("\nWhat is the special magic number") and text.endswith("mentioned in the provided text is")
    w = WordTok()
    context, question = encode_split(w, "one two three four", 7)
    assert context == w.encode("one two") and question == w.encode(" three four", add_special_tokens=False)
    assert (context + question).count(WordTok.BOS) == 1 and context[0] == WordTok.BOS  # one bos, the context's


def test_render_chat_and_raw():
    d = R.Draft("Intro.\n", "CONTEXT", "\nQuestion?", " Answer:", ["x"])
    text, end = R.render(WordTok(), d, chat=True)
    assert text == "<|user|>\nIntro.\nCONTEXT\nQuestion?<|end|>\n<|assistant|>\nAnswer:" and text[:end].endswith("CONTEXT")
    assert R.has_chat_template(WordTok()) and not R.has_chat_template(RawTok())
    text, end = R.render(RawTok(), d, chat=False)
    assert text == "Intro.\nCONTEXT\nQuestion? Answer:" and end == len("Intro.\nCONTEXT")


@pytest.mark.parametrize("length", [2500, 6000])
def test_fitted_lengths_within_two_percent(tok, length):
    for task in R.SYNTHETIC:
        s = R.make_sample(tok, task, length, 2)
        assert 0.98 * length <= len(s["ids"]) <= length, (task, len(s["ids"]))


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_3", "cwe", "fwe", "niah_single_2"])
def test_fit_is_the_longest_haystack_that_fits(tok, task):
    """Short prompts can miss by up to one haystack unit (a 50-token UUID needle), never more."""
    s = R.make_sample(tok, task, 900, 0)
    draw, _, _ = R.drawer(tok, task, 900, 0)
    assert R.prompt_tokens(tok, draw(s["units"]), True) == len(s["ids"]) <= 900
    assert R.prompt_tokens(tok, draw(s["units"] + 1), True) > 900


def test_largest_fitting_and_too_short():
    assert R.largest_fitting(lambda n: 10 * n, 95, 1, "x") == 9
    assert R.largest_fitting(lambda n: 10 * n, 1000, 3, "x", most=20) == 20
    with pytest.raises(ValueError, match="even with the smallest haystack"):
        R.largest_fitting(lambda n: 10 * n, 5, 1, "x")
    with pytest.raises(ValueError, match="stops growing"):
        R.largest_fitting(lambda n: 7, 100, 1, "x")
    with pytest.raises(ValueError, match="vt at length 300"):
        R.make_sample(WordTok(), "vt", 300, 0)


# ----------------------------------------------------------------------------- metric

def test_metric_as_ruler():
    refs = ["1234567", "7654321", "ABCDE", "fghij"]
    assert R.score(" ".join(refs), refs, "all") == 1.0
    assert R.score("nothing here", refs, "all") == 0.0
    assert R.score("1234567 and abcde", refs, "all") == 0.5  # case-insensitive, fraction found
    assert R.score("\t 1234567\x00fghij \n", refs, "all") == 0.5
    assert R.postprocess("  a\x01b\tc \n") == "a\nb\nc"
    assert R.score("it is zed03", ["Captain Zed03", "Zed03"], "part") == 1.0  # any reference
    assert R.score("captain", ["Captain Zed03", "Zed03"], "part") == 0.0
    assert R.string_match_all("x", ["a", "x", "b"]) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- QA

@pytest.mark.parametrize("task,length", [("qa_1", 700), ("qa_1", 3000), ("qa_2", 200)])
def test_qa_from_ruler_files(qa_dir, task, length):
    w = WordTok()
    s = R.make_sample(w, task, length, 4, seed=0, data_dir=qa_dir)
    assert R.make_sample(w, task, length, 4, seed=0, data_dir=qa_dir) == s
    assert R.make_sample(w, task, length, 4, seed=1, data_dir=qa_dir)["text"] != s["text"]
    context = s["text"][:s["context_end"]]
    assert s["metric"] == "part" and s["max_new_tokens"] == 32
    assert all(x in context for x in s["answers"]) and "Document 1:\n" in context
    assert s["text"][s["context_end"]:].startswith("\n\nAnswer the question based on the given documents.")
    assert len(s["ids"]) <= length
    draw, _, _ = R.drawer(w, task, length, 4, data_dir=qa_dir)
    assert R.prompt_tokens(w, draw(s["units"] + 1), True) > length  # within one document of the length
    if task == "qa_1":  # the 4th answerable question (impossible ones skipped), its gold paragraph kept
        assert "Who kept lighthouse 04?" in s["text"] and s["answers"] == ["Captain Zed04", "Zed04"]
    else:
        assert s["answers"] == ["River Q1"] and "Lake 1\nLake 1 is fed by the River Q1." in context


# ----------------------------------------------------------------------------- command line

@pytest.mark.parametrize("argv,match", [
    (["--tasks", "niah_single_9"], "unknown task"),
    (["--lengths", "0"], "positive"),
    (["--lengths", "100"], "too short"),
    (["--lengths", "4k"], "--lengths"),
    (["--samples", "0"], "--samples"),
    (["--samples", "x"], "--samples"),
    (["--tasks", "qa_1"], "--data-dir"),
    (["--tasks", "all"], "--data-dir"),
    (["--methods", "full,nope"], "unknown method"),
    (["--budget", "2"], r"\(0, 1\]"),
    (["--protocol", "aware,blind"], "aware, agnostic"),
    (["--methods", "full,laprox:center=no"], "takes a bool"),
    (["--device", "bogus"], "is not a device"),
])
def test_cli_errors_are_one_line(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        R.main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and re.search(match, err)


def test_cli_errors_for_qa_files(capsys, tmp_path):
    with pytest.raises(SystemExit):
        R.main(["--tasks", "qa_2", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "hotpotqa.json" in err
    (tmp_path / "squad.json").write_text('{"data": [{"title": "no paragraphs"}]}')
    with pytest.raises(SystemExit):
        R.main(["--tasks", "qa_1", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a squad file" in err


# ----------------------------------------------------------------------------- reports and a tiny run

def test_reports_from_rows(tmp_path):
    rows = [dict(task=t, length=1000, index=i, method=m, budget=b, protocol=p, score=s)
            for t, base in [("vt", 1.0), ("cwe", 0.5)] for i in range(2) for p in ("aware", "agnostic")
            for m, b, s in [("full", 1.0, base), ("laprox", 0.05, base / 2 + 0.25 * i), ("snapkv", 0.05, base / 2),
                            ("snapkv", 0.2, base)]]
    meta = dict(model="m", checkpoint=None, dtype="float32", window=32, seed=0, prompts="chat template")
    s = R.write_reports(rows, tmp_path, ["vt", "cwe"], [1000], ["full", "laprox", "snapkv"], ["aware", "agnostic"],
                        meta)
    at = s["lengths"]["1000"]
    vt = at["tasks"]["aware"][0.05]["vt"]
    assert vt["snapkv"]["mean"] == 0.5 and at["tasks"]["agnostic"][0.2]["cwe"]["full"]["mean"] == 0.5
    assert vt["laprox"]["n"] == 2 and vt["laprox"]["mean"] == 0.625
    budgets = {b["budget"]: b for b in at["stats"]["protocols"]["aware"]["budgets"]}
    assert budgets[0.05]["scores"]["snapkv"]["mean"] == pytest.approx(0.375)  # the mean of the task means
    assert budgets[0.05]["differences"]["snapkv"]["mean"] == pytest.approx(0.125)
    assert at["stats"]["protocols"]["agnostic"]["reference"]["mean"] == pytest.approx(0.75)
    assert (tmp_path / "scores_1000.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "summary.md").read_text()
    assert "### length 1000, protocol agnostic, budget 0.05: per task, mean [95% CI]" in md
    assert "| vt | 0.625 [0.500, 0.750] | 0.500 [0.500, 0.500] | 1.000 [1.000, 1.000] |" in md
    assert "| **pooled** | 0.500 [0.375, 0.625] | 0.375 [0.375, 0.375] | 0.750 [0.750, 0.750] |" in md
    assert "samples resampled within each task, so each task keeps its size; the mean is the mean of the task means" in md
    assert "holm" in md.lower()
    assert md.index("protocol aware, budget 0.05") < md.index("protocol agnostic, budget 0.05")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["lengths"]["1000"]["stats"]["protocols"]["aware"]["reference"]["n"] == 4


def test_end_to_end_tiny_run_both_protocols_resumes(small_model, tmp_path, capsys):
    """vt (30 new tokens at most) at 1000 tokens, full and laprox in both protocols, on conftest's
    small model: the aware rows are what the path before the protocols gave (one prefill of the
    sample's ids, compress, decode)."""
    import torch
    from methods import compress
    from model import generate
    model, tok, folder = small_model
    out = tmp_path / "ruler"
    argv = ["--tasks", "vt", "--lengths", "1000", "--samples", "1", "--methods", "full,laprox",
            "--budget", "0.2", "--protocol", "aware,agnostic", "--model", str(folder), "--out", str(out)]
    rows = R.run(R.build_parser().parse_args(argv), model, tok)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(rows) == len(lines) == 4 and {(r["method"], r["protocol"]) for r in rows} == {
        (m, p) for m in ("full", "laprox") for p in ("aware", "agnostic")}
    sample = R.make_sample(tok, "vt", 1000, 0)
    with torch.inference_mode():  # the path before the protocols
        prefill = model.prefill(torch.tensor([sample["ids"]]))
        for r in map(json.loads, lines):
            assert r["prompt_tokens"] == len(sample["ids"]) and r["context_tokens"] == sample["n_context"]
            assert r["answers"] == sample["answers"] and 0 <= r["score"] <= 1 and r["chat"] is True
            assert r["kept_of"] == ("prompt" if r["protocol"] == "aware" else "context")
            if r["method"] == "full":
                assert r["budget"] == 1.0 and r["kept_fraction"] == pytest.approx(1.0)
            else:
                assert r["budget"] == 0.2 and r["kept_fraction"] == pytest.approx(0.2, abs=0.01)
            if r["protocol"] == "aware":
                cache = compress(prefill, r["method"], r["budget"])
                assert R.postprocess(generate(model, tok, cache=cache, prefill=prefill, max_new_tokens=30)) == r["prediction"]
    for name in ("summary.md", "summary.json", "scores_1000.png"):
        assert (out / name).exists()
    assert f"torch with {torch.get_num_threads()} thread(s)" in (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert "full (no eviction)" in printed and "protocol agnostic" in printed
    assert R.run(R.build_parser().parse_args(argv), model, tok) == []  # all done: nothing prefilled
    assert (out / "results.jsonl").read_text().splitlines() == lines


def test_a_budget_that_fits_no_sample_is_refused_before_the_weights_load(tmp_path, one_line_error, monkeypatch):
    """The samples' exact sizes come from the tokenizer alone (harness.fitting_units): the weights never load."""
    from lab import harness
    monkeypatch.setattr(harness, "load_checkpoint", lambda *a, **k: pytest.fail("the weights loaded"))
    one_line_error(R.main, ["--budget", "0.001", "--tasks", "niah_single_1", "--samples", "1", "--out", str(tmp_path)],
                   "tokens a head (aware); use --budget 0.009")


def test_cost_line_reads_the_first_finished_samples_sample_major():
    """The plan's sample-count rule: per finished sample its prefill once (the largest prefill_s of its
    cases) plus every case's compress_s, question_s and decode_s; the mean of the first finished ones
    in the run's order (length, index, task), times the samples to run. An unfinished sample is left out."""
    import random

    import eval_ruler as R
    rng = random.Random(7)
    tasks = list(R.TASKS)[:3]
    rows, want = [], {}
    for index in range(3):
        for task in tasks:
            n_cases = 2 if (index, task) == (0, tasks[1]) else 3          # (0, tasks[1]) is unfinished
            cases = [dict(task=task, index=index, length=4000, prefill_s=rng.uniform(100, 900),
                          compress_s=rng.uniform(0, 100), question_s=rng.uniform(0, 100), decode_s=rng.uniform(0, 200))
                     for _ in range(n_cases)]
            rows += cases
            want[(index, task)] = (max(c["prefill_s"] for c in cases)
                                   + sum(c["compress_s"] + c["question_s"] + c["decode_s"] for c in cases), n_cases)
    rng.shuffle(rows)  # ranks and resumes write rows in any order
    first = [k for k in [(i, t) for i in range(3) for t in tasks] if want[k][1] == 3][:4]
    mean = sum(want[k][0] for k in first) / 4
    line = R.cost_line(rows, samples=100, first=4)
    assert f"{mean:.0f} s a sample over the first 4 finished samples" in line
    assert f"100 samples at that rate: {mean * 100 / 3600:.1f} thread-hours" in line
    assert R.cost_line([], samples=10) == "time: no sample finished yet"
