"""eval_niah.py: context builder, scorer, argument checks, reports, and a small end-to-end run."""
import json
import re
import subprocess
from pathlib import Path

import pytest

import eval_niah as E
from lab.decode import Sequence
from lab.harness import check_eval_arguments


class WordTok:
    """Stand-in tokenizer: a token is a word with the whitespace before it (decode(encode(x)) == x)."""

    def __init__(self):
        self.ids, self.pieces = {}, []

    def encode(self, text):
        out = []
        for piece in re.findall(r"\s*\S+|\s+", text):
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


@pytest.fixture(params=["stub", "default"])
def tok(request):
    """The stand-in tokenizer always; the real default one when model.py can load it."""
    if request.param == "stub":
        return WordTok()
    return request.getfixturevalue("default_model")[1]


@pytest.fixture(scope="module")
def haystack():
    return E.read_haystack()


# ----------------------------------------------------------------------------- context builder

@pytest.mark.parametrize("length", [600, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_length_needle_depth_and_real_text(tok, haystack, length, depth):
    hay = E.haystack_ids(tok, haystack, length)
    p = E.build_prompt(tok, hay, length, depth)
    assert abs(len(p["ids"]) - length) <= 3, "prompt length should be within a few tokens of the request"
    assert p["context_ids"] + p["question_ids"] == p["ids"] == tok.encode(p["text"])  # what both protocols prefill
    assert tok.decode(p["question_ids"]).startswith(" </book>.")  # all after the haystack is the question
    assert p["text"].endswith(E.ANSWER_PREFIX) and E.QUESTION in p["text"]
    ctx, nc = p["context"], p["needle_char"]
    assert ctx[nc:nc + len(E.NEEDLE)] == E.NEEDLE
    assert tok.decode(p["ids"][p["needle_start"]:p["needle_start"] + 3]).strip().startswith("The best")
    # the context is real haystack text, cut only to insert the needle
    before, after = ctx[:nc].rstrip(), ctx[nc + len(E.NEEDLE):].strip()
    assert haystack.startswith(before)
    if depth < 1:
        assert after[:300] in haystack
    else:
        assert after == ""
    # the needle sits at a sentence boundary, within one sentence before the requested depth
    if 0 < depth < 1:
        assert E.SENTENCE_END.search(before[-3:] + "X"), "needle not at a sentence end"
    k = p["target"] - p["context_start"]
    target_text = tok.decode(hay[:k])
    assert len(before) <= len(target_text)
    assert not E.SENTENCE_END.search(target_text[len(before):-1]), "a whole sentence between needle and target"
    gap = p["target"] - p["needle_start"]
    assert 0 <= gap <= 100
    if depth == 0:
        assert p["needle_start"] == p["context_start"]


def test_haystack_repeats_when_short(tok, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("One short sentence. Another one here.")
    text = E.read_haystack(f)
    p = E.build_prompt(tok, E.haystack_ids(tok, text, 400), 400, 0.5)
    assert abs(len(p["ids"]) - 400) <= 3 and p["context"].count("Another one here.") > 5


def test_haystack_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        E.read_haystack(tmp_path / "empty.txt")
    (tmp_path / "no_text").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        E.read_haystack(tmp_path / "no_text")
    with pytest.raises(FileNotFoundError):
        E.read_haystack(tmp_path / "missing.txt")
    assert E.default_haystack_dir().name == "PaulGrahamEssays"
    with pytest.raises(ValueError, match="too short"):
        E.build_prompt(WordTok(), list(range(100)), 20, 0.5)


# ----------------------------------------------------------------------------- scorer

ANSWER = "eat a sandwich and sit in dolores park on a sunny day"


def test_answer_is_needle_after_the_prefix():
    assert E.answer_of(E.NEEDLE, E.ANSWER_PREFIX) == ANSWER
    assert E.answer_of("The code is 42.", "Something else") == "the code is 42"


@pytest.mark.parametrize("response, score, exact", [
    ("eat a sandwich and sit in Dolores Park on a sunny day.", 1.0, True),
    ("  Eat a sandwich, and sit in DOLORES PARK on a sunny day!  ", 1.0, True),
    ("to eat a sandwich and sit in Dolores Park on a sunny day, says Paul.", 1.0, True),
    ("eat a sandwich", 3 / 12, False),
    ("sit in Dolores Park and eat a sandwich on a sunny day", 1.0, False),  # all words, wrong order
    ("a a a a", 2 / 12, False),  # clipped: "a" counts at most twice
    ("go to the Golden Gate Bridge.", 0.0, False),
    ("", 0.0, False),
])
def test_recall_and_exact(response, score, exact):
    assert E.recall_score(ANSWER, response) == pytest.approx(score)
    assert E.exact_match(ANSWER, response) is exact


def test_rouge1_and_response_cleaning():
    assert E.rouge1_f(E.NEEDLE, f"{E.ANSWER_PREFIX} eat a sandwich and sit in Dolores Park on a sunny day.") == 1.0
    assert E.rouge1_f(E.NEEDLE, "unrelated words only") == 0.0
    half = E.rouge1_f("a b c d", "a b")  # P = 1, R = 1/2
    assert half == pytest.approx(2 / 3)
    assert E.clean_response(" eat a sandwich.\nUser: next question") == "eat a sandwich."
    assert E.exact_match("sit", "sitting") is False  # whole words only


# ----------------------------------------------------------------------------- arguments

def check(argv):
    return E.check_args(E.build_parser().parse_args(argv))


def test_argument_and_length_checks():
    lengths, depths, methods, budgets, protocols = check(["--lengths", "600", "--depths", "0,1", "--methods",
                                                          "full,snapkv,laprox:selection=layer:pool=0",
                                                          "--budget", "0.05", "--protocol", "agnostic,aware"])
    assert (lengths, depths, budgets, protocols) == ([600], [0.0, 1.0], [0.05], ["agnostic", "aware"])
    assert methods == {"full": ("full", {}), "snapkv": ("snapkv", {}),
                       "laprox:selection=layer:pool=0": ("laprox", {"selection": "layer", "pool": 0})}
    for bad, match in [(["--methods", "nope"], "unknown method"), (["--depths", "1.5"], r"\[0, 1\]"),
                       (["--budget", "0"], r"\(0, 1\]"), (["--budget", "2"], r"\(0, 1\]"),
                       (["--lengths", "-5"], "positive"), (["--window", "0"], "window"),
                       (["--protocol", "aware,blind"], "aware, agnostic"), (["--max-new-tokens", "0"], ">= 1"),
                       (["--methods", "laprox:colour=red"], "unknown flag"),
                       (["--methods", "laprox:pool"], "key=value")]:
        with pytest.raises(ValueError, match=match):
            check(bad)
    E.check_lengths([2000, 7500], 8192, 24, min_length=120)
    with pytest.raises(ValueError, match="exceed the model's context"):
        E.check_lengths([9000], 8192, 24)
    with pytest.raises(ValueError, match="too short"):
        E.check_lengths([50], 8192, 24, min_length=120)


@pytest.mark.parametrize("argv, words", [
    (["--budget", "0.001"], "0.001 of the largest 7500-token prompt is 8 tokens a head (aware); use --budget 0.0048"),
    (["--budget", "0.001", "--lengths", "115", "--depths", "0"], "use --budget 0.3131"),  # 35500+ > the 8192 context
    (["--budget", "0.01", "--lengths", "2000", "--protocol", "agnostic", "--methods", "full,laprox"],
     "under agnostic the budget is a fraction of the context"),
])
def test_a_budget_that_fits_no_cell_is_refused_before_the_weights_load(argv, words, tmp_path, one_line_error,
                                                                        monkeypatch):
    """The exact prompt and context sizes come from the tokenizer alone: the weights never load."""
    from lab import harness
    monkeypatch.setattr(harness, "load_checkpoint", lambda *a, **k: pytest.fail("the weights loaded"))
    err = one_line_error(E.main, argv + ["--out", str(tmp_path / "out")], words)
    assert "observation window plus 4 sinks for streamingllm" in err or "laprox" in argv[-1]
    assert ("--lengths of" in err) == ("agnostic" in argv)  # a longer prompt only where it fits the model's context


# ----------------------------------------------------------------------------- reports

def test_reports_from_rows(tmp_path):
    rows = [dict(method=m, budget=b, length=l, depth=d, protocol=p, score=s, content=s, exact=s == 1.0, rouge1=s,
                 kept_fraction=b)
            for m, b, s in [("full", 1.0, 1.0), ("laprox", 0.05, 0.75), ("snapkv", 0.05, 0.5), ("snapkv", 0.2, 0.75)]
            for l in (600, 1200) for d in (0.0, 0.5, 1.0) for p in ("aware", "agnostic")]
    rows.append(dict(rows[0], length=9999))  # outside the grid: ignored
    meta = dict(model="m", checkpoint=None, dtype="float32", window=32, config="c")
    s = E.write_reports(rows, tmp_path, [600, 1200], [0.0, 0.5, 1.0], ["full", "laprox", "snapkv"], [0.05, 0.2],
                        meta, ("aware", "agnostic"))
    aware = s["protocols"]["aware"]
    assert aware["score"]["snapkv"] == {"0.05": 0.5, "0.2": 0.75}
    assert aware["score"]["full"] == {"0.05": 1.0, "0.2": 1.0} and aware["n"]["full"]["0.05"] == 6
    assert s["score"] == aware["score"] and s["exact"] == aware["exact"]  # the first protocol's, as before
    for name in ("heatmap_full.png", "heatmap_snapkv_0.05.png", "heatmap_snapkv_0.2.png", "heatmap_full_agnostic.png",
                 "heatmap_snapkv_0.2_agnostic.png", "scores_vs_budget.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["protocols"]["agnostic"]["exact"]["full"]["0.2"] == 1.0
    at = {b["budget"]: b for b in saved["stats"]["protocols"]["aware"]["budgets"]}
    assert at[0.05]["scores"]["snapkv"]["mean"] == pytest.approx(0.5) and at[0.05]["scores"]["snapkv"]["n"] == 6
    difference = at[0.05]["differences"]["snapkv"]
    assert difference["mean"] == pytest.approx(0.25) and difference["significant"]
    assert at[0.05]["loss_ratio"]["ratio"] == pytest.approx(0.5) and at[0.05]["best_baseline"] == "snapkv"
    md = (tmp_path / "summary.md").read_text()
    assert "full (no eviction)" in md and "holm" in md.lower()
    assert "**+0.250 [+0.250, +0.250] better**" in md and "## exact (whole answer phrase present) (agnostic)" in md
    # NIAH's own units, in plain words: cells resampled within their length, no "tasks"
    assert "cells resampled within each length, so each length keeps its size; the mean is the mean of the length means" in md
    assert "task" not in md
    assert "paired over the cells both have" in md and "(n=...) after a mean counts its cells" in md
    assert "KVCache-Factory's NIAH score is 10 times this" in md


# ----------------------------------------------------------------------------- end to end

@pytest.fixture
def small_run(niah_small_run):
    """conftest's small grid in both protocols: (argv, rows made, results lines, printed)."""
    return niah_small_run


def test_both_protocols_on_a_small_grid(small_run):
    argv, rows, lines, printed = small_run
    out = Path(argv[-1])
    assert len(rows) == len(lines) == 2 * 2 * 3  # cells x protocols x (full, laprox, snapkv:pool=0)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(E.__file__).parent, capture_output=True,
                          text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head)  # the tests run in a git checkout (CI clones one)
    for r in map(json.loads, lines):
        assert r["commit"] in (head, head + "+dirty")  # the code that made the row
        assert {"method", "budget", "protocol", "length", "depth", "score", "exact", "kept_fraction", "kept_of",
                "answer", "prompt_tokens", "context_tokens", "prefill_s", "compress_s", "question_s",
                "decode_s"} <= set(r)
        assert r["length"] == 600 and r["depth"] in (0.0, 1.0) and 0 <= r["score"] <= 1
        assert r["prompt_tokens"] == 600 and 500 < r["context_tokens"] < 590
        assert r["kept_of"] == ("prompt" if r["protocol"] == "aware" else "context")
        assert (r["question_s"] > 0) == (r["protocol"] == "agnostic")
        if r["method"] == "full":
            assert r["budget"] == 1.0 and r["kept_fraction"] == pytest.approx(1.0)
        else:  # of the prompt in aware, of the context in agnostic
            assert r["budget"] == 0.2 and r["kept_fraction"] == pytest.approx(0.2, abs=0.01)
    for name in ("heatmap_full.png", "heatmap_snapkv:pool=0_0.2.png", "heatmap_laprox_0.2_agnostic.png",
                 "scores_vs_budget.png", "summary.md", "summary.json"):
        assert (out / name).exists()
    md = (out / "summary.md").read_text()
    assert "### protocol: aware" in md and "### protocol: agnostic" in md and "laprox minus" in md
    assert "loss ratio laprox / best" in md and "## score (agnostic)" in md
    assert "cores), torch with 1 thread(s)" in md  # the hardware and threads of the run (conftest's: one)
    assert "full (no eviction)" in printed and "protocol agnostic" in printed


def test_agnostic_budget_runs_a_subset_and_reports_it(small_model, small_run, tmp_path):
    """--agnostic-budget 0.2 of --budget 0.1,0.2: the agnostic 0.1 cases never run, the tables say n/a
    there, and the rows of the cases that run are the small run's (one prefill a cell, as before)."""
    import shutil
    argv, _, lines, _ = small_run
    out = tmp_path / "niah"
    shutil.copytree(argv[-1], out)
    grid = [a for a in argv[:-2] if a != "0.2"]
    at = grid.index("--budget")
    grid[at + 1:at + 1] = ["0.1,0.2"]
    model, tok, _ = small_model
    rows = E.run(E.build_parser().parse_args(grid + ["--agnostic-budget", "0.2", "--out", str(out)]), model, tok)
    assert {(r["budget"], r["protocol"]) for r in rows} == {(0.1, "aware")}   # 0.2 resumed; no agnostic 0.1
    md = (out / "summary.md").read_text()
    agnostic = md[md.index("## score (agnostic)"):].split("\n\n")[1]
    assert "| laprox | n/a | " in agnostic


def test_aware_rows_are_what_the_path_before_the_protocols_gave(small_model, small_run):
    """Today's path, written out: one-shot tokenization of the prompt text, one prefill, compress, decode."""
    import torch
    from conftest import one_thread
    from lab.harness import parse_method
    from methods import compress
    model, tok, _ = small_model
    _, _, lines, _ = small_run
    hay = E.haystack_ids(tok, E.read_haystack(), 600)
    aware = [r for r in map(json.loads, lines) if r["protocol"] == "aware"]
    for depth in (0.0, 1.0):
        p = E.build_prompt(tok, hay, 600, depth)
        with torch.inference_mode(), one_thread():  # as the run was made
            prefill = model.prefill(torch.tensor([tok.encode(p["text"])]))
            for r in [r for r in aware if r["depth"] == depth]:
                name, flags = parse_method(r["method"])
                cache = compress(prefill, name, r["budget"], **flags)
                assert r["generated"] == E.answer(model, tok, Sequence.of(prefill, cache), 4), r["method"]
                assert r["kept_fraction"] == cache.kept_fraction()


def test_resume_after_a_torn_line_and_one_run_per_out(small_model, small_run, capsys, tmp_path):
    import shutil
    from conftest import one_thread
    from lab.harness import OutputLock
    model, tok, _ = small_model
    argv, _, lines, _ = small_run
    out = tmp_path / "niah"
    shutil.copytree(argv[-1], out)  # the shared run stays as it was
    args = E.build_parser().parse_args(argv[:-1] + [str(out)])
    assert E.run(args, model, tok) == []  # all done: nothing prefilled
    results = out / "results.jsonl"
    torn = "\n".join(lines[:-1]) + "\n" + lines[-1][:40]  # killed while writing the last row
    results.write_text(torn)
    capsys.readouterr()
    with one_thread():  # as the shared run was made
        redone = E.run(args, model, tok)
    err = capsys.readouterr().err
    assert "skipped 1 unreadable line(s)" in err and err.count("warning") == 1
    last = json.loads(lines[-1])
    case = lambda r: (r["method"], r["protocol"], r["depth"])
    assert [case(r) for r in redone] == [case(last)]
    assert redone[0]["generated"] == last["generated"]
    now = results.read_text().splitlines()
    assert now[:-1] == torn.splitlines() and json.loads(now[-1])["generated"] == last["generated"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cut_cells"] == [[600, 1.0]]  # its needle ends in the window: out of the comparisons
    assert summary["protocols"]["agnostic"]["n"]["laprox"]["0.2"] == 1  # every other row counted once
    with OutputLock(out):  # another run holds the folder
        with pytest.raises(ValueError, match="is in use by pid"):
            E.run(args, model, tok)


# ----------------------------------------------------------------------------- user errors: one line, no traceback

def _user_errors(tmp_path):
    afile = tmp_path / "a_file.txt"  # made by the test
    grid = ["--lengths", "600", "--depths", "0", "--methods", "full", "--out", str(tmp_path / "out")]
    return {  # argv: words of the error
        "method flag not a bool": (["--methods", "laprox:center=no"], "takes a bool"),
        "even pool kernel": (["--methods", "full,laprox:pool=4"], "must be odd"),
        "unknown selection": (["--methods", "laprox:selection=foo"], "one of model, layer, head"),
        "unknown method": (["--methods", "laprox,snap-kv"], "unknown method"),
        "out is a file": (["--out", str(afile)], "is a file"),
        "out under a file": (grid + ["--out", str(afile / "sub")], "Not a directory"),
        "haystack /dev/null": (grid + ["--haystack", "/dev/null"], "not a text file or a folder"),
        "haystack missing": (grid + ["--haystack", str(tmp_path / "missing.txt")], "does not exist"),
        "offline hub id": (grid + ["--model", "no-owner/no-such-model"], "could not download"),
        "no such folder": (grid + ["--model", "./no/such/checkpoint"], "no checkpoint folder"),
        "no such device": (grid + ["--device", "bogus"], "is not a device"),
        "cuda without cuda": (grid + ["--device", "cuda"], "not available"),
        "budget not a number": (["--budget", "abc"], "not a number"),
        "unknown protocol": (["--protocol", "blind"], "aware, agnostic"),
        "budget above 1": (["--budget", "2"], "(0, 1]"),
        "depth above 1": (["--depths", "1.5"], "[0, 1]"),
        "window 0": (["--window", "0"], ">= 1"),
    }


@pytest.mark.parametrize("case", list(_user_errors(Path("."))))
def test_user_errors_are_one_line_and_exit_2(tmp_path, one_line_error, case):
    (tmp_path / "a_file.txt").write_text("not a folder")
    argv, words = _user_errors(tmp_path)[case]
    one_line_error(E.main, argv, words, cuda=case == "cuda without cuda")
    assert not (tmp_path / "out" / "results.jsonl").exists()  # failed before any case ran


def test_the_command_line_itself_prints_no_traceback(tmp_path):
    """The same, as a user runs it: a subprocess, its exit code and its whole stderr."""
    import subprocess
    import sys
    root = Path(E.__file__).resolve().parent
    for argv in (["eval_niah.py", "--methods", "laprox:center=off", "--out", str(tmp_path)],
                 ["bench.py", "--layers", "--device", "bogus", "--out", str(tmp_path / "b.json")]):
        done = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"{argv[0]}: error: ")


# ----------------------------------------------------------------------------- issue 35: scores, window, offsets

def test_stop_words_are_the_vendored_snowball_list():
    lines = [l for l in E.STOP_WORDS_FILE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert len(lines) == 174 and len(set(lines)) == 174  # Snowball's English list has 174 entries
    assert "Source:" in E.STOP_WORDS_FILE.read_text() and "BSD" in E.STOP_WORDS_FILE.read_text()
    sw = E.stop_words()
    assert {"a", "and", "in", "on", "the", "don", "t"} <= sw
    assert not sw & {"eat", "sandwich", "sit", "dolores", "park", "sunny", "day"}


@pytest.mark.parametrize("response", ["eat a sandwich", "Sit in the park on a sunny day, and eat.", "a and in on a",
                                      "dolores dolores park", "", "eat a sandwich and sit in dolores park on a sunny day"])
def test_content_recall_against_a_naive_count(response):
    answer = E.answer_of(E.NEEDLE, E.ANSWER_PREFIX)
    stop = set(E.stop_words())
    ref = [w for w in re.findall(r"[a-z0-9]+", answer.lower()) if w not in stop]
    hyp = [w for w in re.findall(r"[a-z0-9]+", response.lower()) if w not in stop]
    hits = 0
    for w in set(ref):  # clipped: a word counts as often as both sides have it
        hits += min(ref.count(w), hyp.count(w))
    assert len(ref) == 7
    assert E.content_recall(answer, response) == pytest.approx(hits / len(ref))
    assert E.content_recall("a the and", "a the and") == 0.0  # no content word: nothing to find


def test_needle_end_and_the_window_cut(tok, haystack):
    hay = E.haystack_ids(tok, haystack, 700)
    for depth, cut in [(0.0, False), (0.5, False), (1.0, True)]:
        p = E.build_prompt(tok, hay, 600, depth)
        needle = tok.decode(p["ids"][p["needle_start"]:p["needle_end"]])
        assert E.NEEDLE.rstrip(".") in needle and len(needle) < len(E.NEEDLE) + 8  # the needle's tokens, no more
        row = dict(needle_token=p["needle_start"], needle_end=p["needle_end"], context_tokens=len(p["context_ids"]),
                   window=32)
        assert E.in_window(row) == cut
        assert E.in_window({k: v for k, v in row.items() if k != "needle_end"}) == cut  # old rows: its start
    assert not E.in_window({"length": 600, "depth": 1.0})  # no positions: nothing to judge


def test_haystack_offsets_per_cell_and_the_default_prompts_unchanged(tok, haystack):
    default = E.build_parser().parse_args([])
    assert default.haystack_offset == "none"
    check_eval_arguments(default)  # as the script does: --dtype resolves to the default model's float32
    # today's rows (docs/niah) were made with this fingerprint: a new flag must not move it
    assert E.run_config(default, haystack)["config"] == "fe67c40d7415"
    cell = E.build_parser().parse_args(["--haystack-offset", "cell"])
    check_eval_arguments(cell)
    assert E.run_config(cell, haystack)["config"] != "fe67c40d7415"
    offsets = {(l, d): E.haystack_offset(haystack, 0, l, d) for l in (2000, 4000) for d in (0.0, 0.5, 1.0)}
    assert len(set(offsets.values())) == len(offsets)  # every cell its own stretch
    assert offsets == {(l, d): E.haystack_offset(haystack, 0, l, d) for l, d in offsets}  # seeded: the same again
    assert E.haystack_offset(haystack, 1, 2000, 0.5) != offsets[2000, 0.5]
    start = offsets[2000, 0.5]
    rotated = E.rotate(haystack, start)
    assert rotated.startswith(haystack[start:].lstrip()[:200]) and len(rotated) >= len(haystack)
    assert E.rotate(haystack, 0) == haystack
    a = E.build_prompt(tok, E.haystack_ids(tok, rotated, 700), 600, 0.5)
    b = E.build_prompt(tok, E.haystack_ids(tok, haystack, 700), 600, 0.5)
    assert a["ids"] != b["ids"] and len(a["ids"]) == len(b["ids"]) == 600


def test_reports_leave_cut_cells_out_and_report_three_metrics(tmp_path):
    rows = [dict(method=m, budget=b, length=l, depth=d, protocol=p, score=s, exact=s == 1.0, rouge1=s,
                 kept_fraction=b, answer="eat a sandwich" if m != "full" else "eat a sandwich and sit in dolores park",
                 needle_token=520 if d == 1.0 else 100, needle_end=544 if d == 1.0 else 124, context_tokens=560,
                 window=32)
            for m, b, s in [("full", 1.0, 1.0), ("laprox", 0.05, 0.5), ("snapkv", 0.05, 0.25)]
            for l in (600, 1200) for d in (0.0, 0.5, 0.7, 1.0) for p in ("aware", "agnostic")]
    meta = dict(model="m", checkpoint=None, dtype="float32", window=32, config="c")
    s = E.write_reports(rows, tmp_path, [600, 1200], [0.0, 0.5, 0.7, 1.0], ["full", "laprox", "snapkv"], [0.05],
                        meta, ("aware", "agnostic"))
    assert s["cut_cells"] == [(600, 1.0), (1200, 1.0)]
    for protocol in ("aware", "agnostic"):
        at = s["stats"]["protocols"][protocol]["budgets"][0]
        assert at["scores"]["laprox"]["n"] == 6  # 8 cells less the 2 cut, under both protocols
        assert at["scores"]["laprox"]["mean"] == pytest.approx(2 / 7)  # content words: eat, sandwich of 7
        assert s["protocols"][protocol]["n"]["laprox"]["0.05"] == 6
    recall = s["stats_by_metric"]["score"]["protocols"]["aware"]["budgets"][0]
    assert recall["differences"]["snapkv"]["mean"] == pytest.approx(0.25)
    assert set(s["stats_by_metric"]) == {"content", "score", "exact"}
    md = (tmp_path / "summary.md").read_text()
    assert "600 @ 1, 1200 @ 1" in md and "## exact match (a secondary metric)" in md
    # laprox 0.5 vs snapkv 0.25 in recall, both 2/7 in content words, both 0 in exact: the verdicts differ
    assert "| aware | 0.05 | snapkv | no difference | better | no difference | **no** |" in md
    assert (tmp_path / "heatmap_laprox_0.05.png").exists() and (tmp_path / "scores_vs_budget_exact.png").exists()


def test_a_run_with_haystack_offsets_records_them(small_model, small_run, tmp_path):
    import contextlib
    import io
    from conftest import one_thread
    model, tok, folder = small_model
    argv = ["--lengths", "600", "--depths", "0.5", "--methods", "full", "--max-new-tokens", "2",
            "--haystack-offset", "cell", "--model", str(folder), "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()), one_thread():
        (row,) = E.run(E.build_parser().parse_args(argv), model, tok)
    text = E.read_haystack()
    offset = E.haystack_offset(text, 0, 600, 0.5)
    p = E.build_prompt(tok, E.haystack_ids(tok, E.rotate(text, offset), 600), 600, 0.5)
    assert row["haystack_offset"] == offset and row["needle_end"] == p["needle_end"]
    assert row["context_tokens"] == len(p["context_ids"]) and "content" in row and not E.in_window(row)
    default_rows = [json.loads(line) for line in small_run[2]]
    assert "haystack_offset" not in default_rows[0] and default_rows[0]["config"] != row["config"]


def test_heatmaps_show_the_primary_metric(tmp_path, monkeypatch):
    """The heatmaps plot content-word recall, the plan's primary metric, not all-word recall: each
    cell's value and the title's mean are the rows' `content`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import eval_niah as N
    rows = [dict(length=n, depth=d, score=0.9, content=c) for n, d, c in
            ((2000, 0.0, 0.25), (2000, 0.5, 0.5), (4000, 0.0, 1.0), (4000, 0.5, 0.75))]
    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.update(
        texts=sorted(t.get_text() for t in fig.axes[0].texts), title=fig.axes[0].get_title()))
    N.plot_heatmap(rows, tmp_path / "h.png", "laprox @ budget 0.05")
    assert seen["texts"] == ["0.25", "0.50", "0.75", "1.00"] and seen["title"].endswith("mean 0.625")
    assert (tmp_path / "h.png").is_file()
