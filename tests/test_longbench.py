"""eval_longbench.py: official LongBench metrics, prompts, truncation, data handling, tables.

Metric expectations are computed by hand; each also agrees with the official metrics.py run
with the `rouge` 1.0.1 and `fuzzywuzzy` 0.18 packages (checked when the module was written).
No network: the hub download is replaced by a stub that fails (or hands over a local zip).
"""
import json
import re
import zipfile

import pytest

import methods

import eval_longbench as lb
from lab.decode import Sequence


# ---- a tiny fixture folder in the official format ----

HOTPOT = {
    "input": "Which city is the capital of the country where the Eiffel Tower stands?",
    "context": ("Passage 1:\nThe Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
                "It is named after the engineer Gustave Eiffel.\nPassage 2:\nParis is the capital and most "
                "populous city of France, with an estimated population of two million residents."),
    "answers": ["Paris"], "length": 60, "dataset": "hotpotqa", "language": "en", "all_classes": None,
    "_id": "hotpot-0",
}
TREC = {
    "input": "Question: What is the fastest land animal ?\nType:",
    "context": ("Question: What do you call a baby cat ?\nType: Animal\nQuestion: What does NASA stand for ?\n"
                "Type: Expression abbreviated\nQuestion: Where is the Louvre ?\nType: Other location"),
    "answers": ["Animal"], "length": 40, "dataset": "trec", "language": "en",
    "all_classes": ["Animal", "Expression abbreviated", "Other location", "Food"], "_id": "trec-0",
}
TRIVIA = {
    "input": "Passage: The Nile is a major north-flowing river in northeastern Africa.\nQuestion: On which continent is the Nile?\nAnswer:",
    "context": ("Passage: Mount Everest is Earth's highest mountain above sea level, in the Himalayas.\n"
                "Question: In which mountain range is Mount Everest?\nAnswer: the Himalayas"),
    "answers": ["Africa"], "length": 45, "dataset": "triviaqa", "language": "en", "all_classes": None,
    "_id": "trivia-0",
}

SAMSUM = {  # written by hand in the official format: few-shot dialogues, then the one to summarise
    "input": "Dialogue: Ben: Are we still meeting at 6?\nLucy: Yes, at the cinema.\nBen: Great, I'll buy the tickets.\nSummary: ",
    "context": ("Dialogue: Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you tomorrow :-)\n"
                "Summary: Amanda baked cookies and will bring Jerry some tomorrow.\n\n"
                "Dialogue: Olivia: Who are you voting for in this election?\nOliver: Liberals as always.\nOlivia: Me too!!\n"
                "Oliver: Great\nSummary: Olivia and Oliver are voting for liberals in this election.\n\n"
                "Dialogue: Tim: Hi, what's up?\nKim: Bad mood tbh, I was going to do lots of stuff but ended up "
                "procrastinating\nTim: What did you plan on doing?\nKim: Oh you know, uni stuff and cleaning my room\n"
                "Tim: Maybe tomorrow you'll do everything\nKim: I was hoping that but it's too late\n"
                "Summary: Kim may try the pomodoro technique recommended by Tim to get more stuff done.\n\n"),
    "answers": ["Ben and Lucy are meeting at the cinema at 6. Ben will buy the tickets."], "length": 120,
    "dataset": "samsum", "language": "en", "all_classes": None, "_id": "samsum-0",
}


@pytest.fixture
def data_dir(tmp_path):
    """Official-format jsonl files: two samples per task (the second a renamed copy)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for sample in (HOTPOT, TREC, TRIVIA):
        with open(folder / f"{sample['dataset']}.jsonl", "w") as f:
            for i in range(2):
                f.write(json.dumps({**sample, "_id": f"{sample['_id']}-{i}"}) + "\n")
    return folder


class CharTokenizer:
    """One token per character; a visible chat template. Makes truncation checkable exactly."""
    chat_template = "<user>{content}</user><assistant>"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}</user><assistant>"


def fails(capsys, argv) -> str:
    """lb.main(argv) exits with code 2 and one line on stderr, no traceback; returns that line."""
    with pytest.raises(SystemExit) as done:
        lb.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- metrics ----

@pytest.mark.parametrize("text, expected", [
    ("The Cat, sat!", "cat sat"),            # case, punctuation, article
    ("an apple a day", "apple day"),
    ("Theory of the anthem", "theory of anthem"),  # articles only as whole words
    ("  U.S.A.\t\n (1990) ", "usa 1990"),    # punctuation removed, not replaced by a space
    ("a-n", ""),                             # punctuation goes first: "a-n" -> "an", an article
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert lb.normalize_answer(text) == expected


def test_qa_f1_hand_values():
    assert lb.qa_f1_score("The cat sat.", "a cat sat down") == pytest.approx(0.8)  # P=1, R=2/3
    assert lb.qa_f1_score("PARIS", "paris") == 1.0
    assert lb.qa_f1_score("", "paris") == 0.0
    assert lb.qa_f1_score("the", "a") == 0.0  # both normalise to nothing
    assert lb.qa_f1_score("cat cat dog", "cat") == pytest.approx(0.5)  # P=1/3, R=1 (bag of words)


def test_rouge_l_hand_values():
    f = lambda p, r: 2 * p * r / (p + r + 1e-8)
    # one sentence each: LCS "the cat on the mat" -> distinct words {the, cat, on, mat}
    assert lb.rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(f(4 / 5, 4 / 5))
    # summary level: union of the LCS of the reference with each prediction sentence
    assert lb.rouge_score("the cat sat. the dog ran", "the dog sat") == pytest.approx(f(3 / 5, 1.0))
    # the package counts distinct words: repeats change nothing
    assert lb.rouge_score("a a a b", "a b") == pytest.approx(f(1.0, 1.0))
    # case sensitive, no normalisation
    assert lb.rouge_score("The cat", "the cat") == pytest.approx(f(0.5, 0.5))
    # empty prediction (or only dots): the package raises, LongBench scores 0
    assert lb.rouge_score("", "the cat") == 0.0
    assert lb.rouge_score("...", "the cat") == 0.0
    assert lb.rouge_score("dog", "the cat") == 0.0


def test_classification_hand_values():
    classes = ["Other", "location", "Other location", "Animal"]
    assert lb.classification_score("Animal", "Animal", all_classes=classes) == 1.0
    assert lb.classification_score("Food", "Animal", all_classes=classes) == 0.0  # no match: 0 (no fallback)
    assert lb.classification_score("Animal or Other", "Animal", all_classes=classes) == 0.5
    # "Other" is a strict substring of the true class: dropped
    assert lb.classification_score("Other location", "Other location", all_classes=["Other", "Other location"]) == 1.0
    assert lb.classification_score("Other location", "Other", all_classes=["Other", "Other location"]) == 0.5
    # official quirk: removing while iterating skips "location", which stays: 1/2, not 1
    assert lb.classification_score("Other location", "Other location", all_classes=classes) == 0.5


def test_retrieval_and_count_hand_values():
    assert lb.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert lb.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert lb.retrieval_score("Paragraph 30", "Paragraph 3") == 0.0  # whole numbers compared
    assert lb.retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert lb.count_score("5", "5") == 1.0
    assert lb.count_score("There are 5 of the 10", "5") == 0.5
    assert lb.count_score("", 5) == 0.0


def test_code_sim_hand_values():
    assert lb.code_sim_score("```python\n# set x\nx = foo(1)\ny = 2", "x = foo(1)") == 1.0  # first non-comment line
    assert lb.code_sim_score("\n\nx = foo(2)", "x = foo(1)") == 0.9     # 2*9/20
    assert lb.code_sim_score("abc", "abd") == 0.67                      # fuzzywuzzy rounds to an integer %
    assert lb.code_sim_score("// only a comment", "x = 1") == 0.0      # nothing left: empty line
    assert lb.code_sim_score("", "") == 1.0                             # fuzzywuzzy: equal strings are 100
    # difflib (fuzzywuzzy without python-Levenshtein), not the Indel ratio (rapidfuzz would give 0.67)
    assert lb.code_sim_score(" a ", "ab ") == 0.33


def test_score_prediction_first_line_and_max_over_answers():
    classes = TREC["all_classes"]
    assert lb.score_prediction("trec", "\nAnimal\nOther location", ["Animal"], classes) == 1.0
    assert lb.score_prediction("triviaqa", "Africa\nQuestion: next", ["Africa"], None) == 1.0
    assert lb.score_prediction("hotpotqa", "Paris\nmore words here", ["Paris"], None) == pytest.approx(0.4)
    assert lb.score_prediction("hotpotqa", "Paris, France", ["London", "Paris", "paris france"], None) == 1.0
    assert lb.score_prediction("hotpotqa", "x", [], None) == 0.0


# ---- data, prompts, truncation ----

def test_load_task_limit_and_fields(data_dir):
    samples = lb.load_task(data_dir, "hotpotqa", limit=1)
    assert len(samples) == 1 and samples[0]["index"] == 0 and samples[0]["answers"] == ["Paris"]
    assert [s["_id"] for s in lb.load_task(data_dir, "trec")] == ["trec-0-0", "trec-0-1"]


def test_prompts_follow_the_official_templates(data_dir):
    tok = CharTokenizer()
    trec = lb.load_task(data_dir, "trec")[0]
    hotpot = lb.load_task(data_dir, "hotpotqa")[0]
    # trec: no chat template, the template filled with context and input
    ids = lb.build_prompt_ids(tok, trec, "trec", max_length=10_000)
    expected = ("Please determine the type of the question below. Here are some examples of questions.\n\n"
                + TREC["context"] + "\n" + TREC["input"])
    assert tok.decode(ids) == expected
    # hotpotqa: chat template around the filled template
    text = tok.decode(lb.build_prompt_ids(tok, hotpot, "hotpotqa", max_length=10_000))
    assert text.startswith("<user>Answer the question based on the given passages.")
    assert text.endswith(f"Question: {HOTPOT['input']}\nAnswer:</user><assistant>")


@pytest.mark.parametrize("max_length", [100, 101])
def test_middle_truncation(data_dir, max_length):
    tok = CharTokenizer()
    sample = lb.load_task(data_dir, "trec")[0]
    full = lb.DATASET2PROMPT["trec"].format(**sample)
    assert len(full) > max_length
    ids = lb.build_prompt_ids(tok, sample, "trec", max_length)
    half = max_length // 2  # pred.py: int(max_length / 2) from each end
    assert tok.decode(ids) == full[:half] + full[-half:]
    # chat tasks: truncate first, then wrap (so the template is never cut)
    hotpot = lb.load_task(data_dir, "hotpotqa")[0]
    full = lb.DATASET2PROMPT["hotpotqa"].format(**hotpot)
    text = tok.decode(lb.build_prompt_ids(tok, hotpot, "hotpotqa", max_length))
    assert text == f"<user>{full[:half] + full[-half:]}</user><assistant>"


GOV = {"input": "", "context": "The agency reviewed 12 programs and found gaps in oversight. " * 3, "answers": ["x"],
       "all_classes": None, "index": 0}


@pytest.mark.parametrize("task, sample, question_starts", [
    ("hotpotqa", HOTPOT, "\n\nAnswer the question based on the given passages."),
    ("trec", TREC, "\n" + TREC["input"]),                                          # no chat template
    ("gov_report", GOV, "\n\nNow, write a one-page summary of the report."),      # no separate question:
    ("passage_count", GOV, "\n\nPlease enter the final count"),                   # the instruction after
    ("lcc", {**GOV, "context": "def f(x):\n    return x\n"}, "Next line of code:"),  # the context is
])
@pytest.mark.parametrize("cut", [False, True])
def test_the_prompt_splits_where_its_context_ends(task, sample, question_starts, cut):
    """Also after the middle cut (a character a token; the kept end holds the text after {context}
    and 10 characters of the context): the context ends where the text after {context} starts;
    the chat template's closing goes to the question."""
    tok = CharTokenizer()
    head, tail = [part.format(**sample) for part in lb.DATASET2PROMPT[task].split("{context}")]
    max_length = 2 * (len(tail) + 10) if cut else 10_000
    assert (len(head + sample["context"] + tail) > max_length) == cut
    text, end = lb.build_prompt(tok, sample, task, max_length)
    assert tok.encode(text) == lb.build_prompt_ids(tok, sample, task, max_length)
    assert text[end:].startswith(question_starts)
    assert text[:end].endswith(sample["context"][-10:] if cut else head + sample["context"])
    assert text[end:] == tail + ("" if task in lb.NO_CHAT_TASKS else "</user><assistant>")


def test_the_split_when_the_cut_falls_in_the_question():
    """A question longer than half of max_length: the cut removed the context's end and the
    question's start; the question is what is kept of it, the context the first half."""
    tok = CharTokenizer()
    sample = {**HOTPOT, "input": "Which city? " * 20}
    text, end = lb.build_prompt(tok, sample, "hotpotqa", 100)
    assert end == len("<user>") + 50 and text[end:].endswith("Which city? \nAnswer:</user><assistant>")
    short = {**HOTPOT, "context": "tiny"}  # the context ends in the kept first half
    text, end = lb.build_prompt(tok, {**short, "input": "Which city? " * 20}, "hotpotqa", 300)
    assert text[:end].endswith("passages.\ntiny")


def test_without_a_chat_template_the_raw_prompt_is_fed(data_dir):
    tok = CharTokenizer()
    hotpot = lb.load_task(data_dir, "hotpotqa")[0]
    ids = lb.build_prompt_ids(tok, hotpot, "hotpotqa", max_length=10_000, chat=False)
    assert tok.decode(ids) == lb.DATASET2PROMPT["hotpotqa"].format(**hotpot)
    assert lb.has_chat_template(tok) and not lb.has_chat_template(object())


@pytest.mark.parametrize("context, expected", [(4096, 3500), (8192, 7500), (16384, 15500), (32768, 31500),
                                                (131072, 130500), (2048, 1500), (1024, 500)])
def test_official_max_length(context, expected):
    """config/model2maxlen.json: llama2-7b-chat-4k 3500, xgen-7b-8k 7500, vicuna-v1.5-7b-16k 15500,
    longchat-v1.5-7b-32k 31500."""
    assert lb.official_max_length(context) == expected


def test_official_max_length_refuses_a_tiny_context():
    with pytest.raises(ValueError, match="--max-length"):
        lb.official_max_length(999)


def test_check_context_counts_template_and_generation():
    tok = CharTokenizer()
    template = len("<user></user><assistant>")  # what the chat template adds: 24 characters
    limit = 1000 - template - lb.DATASET2MAXLEN["hotpotqa"]
    lb.check_context(tok, ["hotpotqa"], limit, 1000, chat=True)  # exactly fits
    with pytest.raises(ValueError, match=f"hotpotqa: {limit + 1} prompt \\+ {template} chat-template \\+ 32 "
                                         f"generated tokens > the model's context of 1000; use --max-length {limit} "):
        lb.check_context(tok, ["hotpotqa", "trec"], limit + 1, 1000, chat=True)
    lb.check_context(tok, ["hotpotqa"], limit + template, 1000, chat=False)  # no template, no overhead
    # trec has no chat template and 64 new tokens: 936 fits, 937 does not
    lb.check_context(tok, ["trec"], 936, 1000, chat=True)
    with pytest.raises(ValueError, match="use --max-length 936 "):
        lb.check_context(tok, ["trec"], 937, 1000, chat=True)


def test_check_prompt_fits():
    lb.check_prompt_fits(list(range(968)), "hotpotqa", 3, 1000, 968)
    with pytest.raises(ValueError, match="hotpotqa sample 3: 970 prompt \\+ 32 generated tokens exceed the "
                                         "model's context of 1000; use --max-length 966"):
        lb.check_prompt_fits(list(range(970)), "hotpotqa", 3, 1000, 968)


def test_tables_match_the_official_config():
    assert len(lb.TASKS) == 16 and set(lb.TASKS) == set(lb.DATASET2MAXLEN) == set(lb.DATASET2METRIC)
    assert sorted(t for ts in lb.CATEGORIES.values() for t in ts) == sorted(lb.TASKS)
    assert lb.DATASET2MAXLEN["gov_report"] == 512 and lb.DATASET2MAXLEN["samsum"] == 128
    assert lb.DATASET2MAXLEN["hotpotqa"] == 32 and lb.DATASET2MAXLEN["trec"] == 64
    for task, template in lb.DATASET2PROMPT.items():
        assert "{context}" in template, task


def test_check_data_dir_errors(data_dir, tmp_path):
    lb.check_data_dir(data_dir, ["hotpotqa", "trec"])
    with pytest.raises(ValueError, match="is not a folder"):
        lb.check_data_dir(tmp_path / "nowhere", ["hotpotqa"])
    with pytest.raises(ValueError, match="lacks qasper.jsonl"):
        lb.check_data_dir(data_dir, ["hotpotqa", "qasper"])


@pytest.mark.parametrize("line, message", [
    ('{"input": "q", "context": "c", "answers": ["a"]', "line 2 is not valid JSON"),
    ('["input", "context"]', "line 2 is not a JSON object"),
    ('{"input": "q", "answers": ["a"]}', "line 2 lacks the str field 'context'"),
    ('{"input": "q", "context": "c", "answers": "a"}', "line 2 lacks the list field 'answers'"),
    ('{"input": "q", "context": "c", "answers": [1]}', "line 2: 'answers' must be a list of strings"),
])
def test_malformed_data_lines_are_one_line_errors(data_dir, tmp_path, line, message, capsys):
    path = data_dir / "hotpotqa.jsonl"
    path.write_text(json.dumps(HOTPOT) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} {message}")):
        lb.load_task(data_dir, "hotpotqa")
    assert len(lb.load_task(data_dir, "hotpotqa", limit=1)) == 1  # lines beyond --limit are not read
    assert re.search(re.escape(message), fails(capsys,
        ["--data-dir", str(data_dir), "--tasks", "hotpotqa", "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_empty_data_file_is_an_error(data_dir):
    (data_dir / "trec.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="trec.jsonl holds no samples"):
        lb.load_task(data_dir, "trec")


def test_offline_download_fails_with_a_clear_message(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("LAPROX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConnectionError, match="--data-dir") as err:
        lb.fetch_data()
    assert "THUDM/LongBench" in str(err.value) and "network is unreachable" in str(err.value)
    assert re.search("--data-dir", fails(capsys,
        ["--tasks", "trec", "--out", str(tmp_path / "out")]))  # the command line says the same


def test_download_unpacks_data_zip(monkeypatch, tmp_path):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/narrativeqa.jsonl", json.dumps(HOTPOT) + "\n")
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: str(archive))
    monkeypatch.setenv("LAPROX_CACHE", str(tmp_path / "cache"))
    folder = lb.fetch_data()
    assert folder == tmp_path / "cache" / "longbench" / "data" and (folder / "narrativeqa.jsonl").is_file()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", None)  # second call: found in the cache
    assert lb.fetch_data() == folder


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "hotpotqa,nope"], "unknown task nope"),
    (["--tasks", "multifieldqa_zh"], "unknown task multifieldqa_zh"),
    (["--methods", "full,magic"], "unknown method 'magic'"),
    (["--methods", "full,laprox:pool=4"], "must be odd"),
    (["--protocol", "aware,blind"], "expected a comma list of aware, agnostic"),
    (["--budget", "0"], "out of range"),
    (["--budget", "1.5"], "out of range"),
    (["--budget", "-0.1"], "out of range"),
    (["--budget", "0.1,abc"], "not a number"),
    (["--window", "0"], "--window must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--max-length", "0"], "--max-length must be >= 1"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
])
def test_bad_arguments_fail_before_model_work(argv, message, data_dir, tmp_path, capsys):
    assert re.search(re.escape(message), fails(capsys,
        argv + ["--data-dir", str(data_dir), "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_missing_data_dir_fails_before_model_work(tmp_path, capsys):
    assert re.search("is not a folder", fails(capsys,
        ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]))
    (tmp_path / "a-file").write_text("x")
    assert re.search("a-file is not a folder", fails(capsys,
        ["--data-dir", str(tmp_path / "a-file"), "--out", str(tmp_path / "out")]))


def test_cuda_without_cuda_is_a_one_line_error(data_dir, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert re.search("--device cuda: CUDA is not available .* use --device cpu", fails(capsys,
        ["--device", "cuda", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_a_one_line_error(data_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert re.search("--out .*taken is a file, not a folder", fails(capsys,
        ["--data-dir", str(data_dir), "--tasks", "trec", "--out", str(tmp_path / "taken")]))
    assert re.search("cannot create the output folder --out .*taken/sub", fails(capsys,
        ["--data-dir", str(data_dir), "--tasks", "trec", "--out", str(tmp_path / "taken" / "sub")]))


@pytest.mark.parametrize("model, message", [
    ("nobody/no-such-model", "cannot load --model nobody/no-such-model: OSError: could not download"),
    ("./no/such/folder", "cannot load --model ./no/such/folder: FileNotFoundError: no checkpoint folder"),
])
def test_unloadable_checkpoint_is_a_one_line_error(data_dir, tmp_path, model, message, capsys):
    """The hub id fails offline (conftest sets HF_HUB_OFFLINE=1) before any prefill."""
    assert re.search(re.escape(message), fails(capsys,
        ["--model", model, "--data-dir", str(data_dir), "--tasks", "trec", "--methods", "full",
         "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out" / "predictions.jsonl").exists() or not (tmp_path / "out" / "predictions.jsonl").read_text()


def test_budgets_parse():
    from lab.harness import parse_budgets
    assert parse_budgets("0.05, 0.2,1.0,128", tokens=True) == [0.05, 0.2, 1.0, 128]


# ---- predictions, resume, scores ----

def fake_line(task, index, method, budget, pred, sample, kept=1.0):
    return {"task": task, "_id": sample["_id"], "index": index, "method": method,
            "method_flags": methods.resolved_flags(method, {}), "budget": budget,
            "pred": pred, "answers": sample["answers"], "all_classes": sample["all_classes"],
            "length": sample["length"], "kept_fraction": kept}


def test_aggregate_table():
    lines = [
        fake_line("hotpotqa", 0, "full", None, "Paris", HOTPOT),
        fake_line("hotpotqa", 1, "full", None, "Lyon", HOTPOT),
        fake_line("trec", 0, "full", None, "Animal", TREC),
        fake_line("hotpotqa", 0, "snapkv", 0.1, "Paris, France", HOTPOT, kept=0.1),  # F1 2/3
        fake_line("trec", 0, "snapkv", 0.1, "Food", TREC, kept=0.12),
    ]
    results = {(r["method"], r["budget"]): r for r in lb.aggregate(lines)}
    full, snap = results[("full", None)], results[("snapkv", 0.1)]
    assert full["tasks"] == {"hotpotqa": 50.0, "trec": 100.0} and full["n"] == {"hotpotqa": 2, "trec": 1}
    assert full["categories"] == {"multi-doc QA": 50.0, "few-shot": 100.0}
    assert full["avg"] == 75.0 and full["avg_categories"] == 75.0
    assert snap["tasks"] == {"hotpotqa": 66.67, "trec": 0.0}  # rounded to 2 decimals, as eval.py
    assert snap["avg"] == 33.34 and snap["kept_fraction"] == pytest.approx(0.11)
    md = lb.results_markdown(lb.aggregate(lines), [0.1])
    assert "## protocol aware, budget 0.1" in md and "| | full | snapkv |" in md
    assert "| hotpotqa | 50 | 66.67 |" in md and "| **avg (tasks)** | 75 | 33.34 |" in md


def test_category_averages_over_tasks_then_categories():
    lines = [fake_line("hotpotqa", 0, "full", None, "Paris", HOTPOT),     # multi-doc 100
             fake_line("trec", 0, "full", None, "Food", TREC),            # few-shot: trec 0
             fake_line("triviaqa", 0, "full", None, "Africa", TRIVIA)]    # few-shot: triviaqa 100
    r = lb.aggregate(lines)[0]
    assert r["categories"] == {"multi-doc QA": 100.0, "few-shot": 50.0}
    assert r["avg"] == pytest.approx(66.67) and r["avg_categories"] == 75.0


def test_case_keys_and_lines_written_before_the_protocols():
    from lab.harness import make_cases, parse_methods
    cases = make_cases(parse_methods("full,snapkv"), [0.05], ["aware", "agnostic"])
    keys = {lb.case_key("trec", {"index": 3}, c) for c in cases}
    assert keys == {("trec", 3, m, b, p) for m, b in [("full", None), ("snapkv", 0.05)] for p in ("aware", "agnostic")}
    old = fake_line("trec", 3, "snapkv", 0.05, "Food", TREC)  # no protocol field: made aware
    assert lb.line_key(old) == ("trec", 3, "snapkv", 0.05, "aware") in keys


def test_rerun_with_all_predictions_done_scores_without_a_model(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lines = [fake_line("hotpotqa", 0, "full", None, "Paris", HOTPOT),
             fake_line("hotpotqa", 0, "snapkv", 0.2, "Lyon", HOTPOT, kept=0.2),
             fake_line("trec", 0, "full", None, "Animal", TREC),
             fake_line("trec", 0, "snapkv", 0.2, "Animal", TREC, kept=0.2),
             fake_line("trec", 1, "snapkv", 0.2, "Food", TREC, kept=0.2)]  # beyond --limit: not scored
    argv = ["--data-dir", str(data_dir), "--tasks", "hotpotqa,trec", "--limit", "1",
            "--methods", "full,snapkv", "--budget", "0.2", "--out", str(out)]
    args = lb.parse_args(argv)
    lb.check_args(args)  # as main does: --dtype resolves to the default model's float32
    config = lb.run_config(args)
    other = dict(lines[0], config="another-configuration", pred="wrong")  # neither skipped nor scored
    lines = [dict(x, config=config) for x in lines]
    (out / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [other] + lines) + '{"task": "tr')
    results = lb.main(argv)
    assert "skipped 1 unreadable line(s)" in capsys.readouterr().err
    by = {r["method"]: r for r in results}
    assert by["full"]["avg"] == 100.0 and by["snapkv"]["tasks"] == {"hotpotqa": 0.0, "trec": 100.0}
    saved = json.loads((out / "results.json").read_text())
    assert saved["budgets"] == [0.2] and len(saved["results"]) == 2
    assert "| trec | 100 | 100 |" in (out / "results.md").read_text()
    assert (out / "scores_vs_budget.png").stat().st_size > 0


# ---- end to end (conftest.small_model) ----

def test_end_to_end_both_protocols(small_model, tmp_path):
    """On conftest's small model (the default's tokenizer and chat template): the aware lines are
    what the path before the protocols gave (one prefill of the official prompt's ids, compress,
    decode as pred.py); agnostic keeps 20% of the context."""
    import torch
    from lab.harness import encode_split
    from methods import compress
    data_dir, out = tmp_path / "data", tmp_path / "out"
    data_dir.mkdir()
    samples = {}
    for sample in (HOTPOT, TRIVIA):  # contexts x 4: 0.2 x the context must cover the 32-token window
        samples[sample["dataset"]] = {**sample, "context": sample["context"] * 4, "index": 0}
        (data_dir / f"{sample['dataset']}.jsonl").write_text(json.dumps(samples[sample["dataset"]]) + "\n")
    argv = ["--data-dir", str(data_dir), "--tasks", "hotpotqa,triviaqa", "--limit", "1", "--methods", "full,snapkv",
            "--budget", "0.2", "--protocol", "aware,agnostic", "--model", str(small_model[2]), "--out", str(out)]
    model, tok, _ = small_model
    results = lb.run(lb.parse_args(argv), model, tok)
    print((out / "results.md").read_text())
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {(x["task"], x["method"], x["budget"], x["protocol"]) for x in lines} == {
        (t, m, b, p) for t in ("hotpotqa", "triviaqa") for m, b in [("full", None), ("snapkv", 0.2)]
        for p in ("aware", "agnostic")}
    assert {x["kept_fraction"] for x in lines if x["method"] == "full"} == {1.0}
    assert all(x["kept_fraction"] == pytest.approx(0.2, abs=0.01) for x in lines if x["method"] == "snapkv")
    assert all(x["kept_of"] == ("prompt" if x["protocol"] == "aware" else "context") for x in lines)
    for task, sample in samples.items():
        text, end = lb.build_prompt(tok, sample, task, 7500)
        context, question = encode_split(tok, text, end)
        ids = lb.build_prompt_ids(tok, sample, task, 7500)
        assert context + question == ids and text[:end].endswith(sample["context"])
        with torch.inference_mode():
            prefill = model.prefill(torch.tensor([ids]))
            for x in [x for x in lines if x["task"] == task]:
                assert (x["prompt_tokens"], x["context_tokens"]) == (len(ids), len(context))
                if x["protocol"] == "aware":
                    cache = compress(prefill, x["method"], 1.0 if x["budget"] is None else x["budget"])
                    assert x["pred"] == lb.decode_answer(model, tok, Sequence.of(prefill, cache), task), (task, x["method"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocols"] == ["aware", "agnostic"] and set(saved["stats"]["protocols"]) == {"aware", "agnostic"}
    md = (out / "results.md").read_text()
    assert "## protocol agnostic, budget 0.2" in md and "### protocol: agnostic" in md and "x 100" in md
    assert (out / "scores_vs_budget.png").stat().st_size > 0
    assert {(r["method"], r["protocol"]) for r in results} == {(m, p) for m in ("full", "snapkv")
                                                               for p in ("aware", "agnostic")}
    lb.main(argv)  # rerun from the command line: everything is done, nothing is added
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8


# ---- decoding as pred.py ----

class WordTokenizer:
    """A fixed vocabulary: id 0 is the (special) eos, id 1 is "\n", id 4 is ".\n"."""
    vocab = ["<eos>", "\n", "Hi", " there", ".\n", "!"]
    eos_ids = [0]

    def encode(self, text, add_special_tokens=True):
        return [self.vocab.index(text)]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids if i not in self.eos_ids)


class ScriptedModel:
    """Stands in for model.Model in decode_greedy: step t's logits are scripted[t] (one
    preference order per step, best first; fresh random values otherwise)."""

    def __init__(self, orders, seed=0):
        import torch
        g = torch.Generator().manual_seed(seed)
        self.logits = []
        for order in orders:
            x = torch.rand(1, len(WordTokenizer.vocab), generator=g)  # (1, vocab) in [0, 1)
            for rank, token in enumerate(order):
                x[0, token] = 10.0 - rank
            self.logits.append(x)
        self.fed = []

    def __call__(self, input_ids, cache, pos):
        self.fed.append(int(input_ids[0, 0]))
        return self.logits[len(self.fed)][:, None]  # (1, 1, vocab)


def decode_scripted(task, orders):
    model = ScriptedModel(orders)
    first = model.logits[0].clone()
    pred = lb.decode_answer(model, WordTokenizer(), Sequence(cache=None, pos=0, logits=model.logits[0]), task)
    assert torch_equal(model.logits[0], first)  # the prefill's logits are not masked in place
    return pred, model.fed


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


def test_samsum_forbids_newline_and_eos_first_then_stops_on_the_newline_id():
    # step 0 prefers "\n", then eos, then "Hi": pred.py's min_length masks both, so "Hi" comes first;
    # ".\n" contains a newline but is another id: no stop; the "\n" id stops and is kept.
    orders = [[1, 0, 2], [4, 1], [1, 0], [2]]
    pred, fed = decode_scripted("samsum", orders)
    assert pred == "Hi.\n\n" and fed == [2, 4]
    assert lb.score_prediction("samsum", pred, ["Hi."], None) == pytest.approx(1.0)  # eval.py: first line "Hi."
    # eos after the first token stops, and is not in the text
    assert decode_scripted("samsum", [[0, 2], [0], [2]]) == ("Hi", [2])


def test_other_tasks_stop_on_eos_only():
    # the same scores on hotpotqa: "\n" may come first and does not stop; eos does
    pred, fed = decode_scripted("hotpotqa", [[1, 0, 2], [4, 1], [1, 0], [0]])
    assert pred == "\n.\n\n" and fed == [1, 4, 1]
    assert decode_scripted("hotpotqa", [[0, 1]]) == ("", [])


def test_decoding_stops_at_the_task_generation_length():
    pred, fed = decode_scripted("hotpotqa", [[5]] * 40)  # never eos: 32 tokens (dataset2maxlen)
    assert pred == "!" * 32 and len(fed) == 31


# ---- predictions file: torn fragments, newer lines ----

def test_read_predictions_skips_torn_lines_and_keeps_the_newest(tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    good = {k: 0 for k in lb.PREDICTION_FIELDS}
    lines = [dict(good, pred="old"), dict(good, pred="other config", config=1), dict(good, pred="new"),
             dict(good, index=1, protocol="agnostic")]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"task": "tr\n7\n')  # killed mid-write, junk
    read = lb.read_predictions(path, config=0)
    assert [(x["index"], x["pred"], x["protocol"]) for x in read] == [(0, "new", "aware"), (1, 0, "agnostic")]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 2 unreadable line(s)" in err and "line 5, 6" in err


# ---- results.md: sample counts and max_length ----

def test_results_markdown_shows_sample_counts_per_method():
    lines = [fake_line("hotpotqa", 0, "full", None, "Paris", HOTPOT),
             fake_line("hotpotqa", 1, "full", None, "Paris", HOTPOT),
             fake_line("hotpotqa", 0, "snapkv", 0.1, "Paris", HOTPOT),   # sample 1 did not fit 0.1
             fake_line("trec", 0, "full", None, "Animal", TREC),
             fake_line("trec", 0, "snapkv", 0.1, "Animal", TREC)]
    md = lb.results_markdown(lb.aggregate(lines), [0.1])
    counts = md[md.index("samples scored (protocol aware, budget 0.1):"):]
    assert "| hotpotqa | 2 | 1 |" in counts and "| trec | 1 | 1 |" in counts
    assert "note: the methods were scored on different samples of hotpotqa" in md
    even = lb.results_markdown(lb.aggregate([x for x in lines if x["index"] == 0]), [0.1])
    assert "note:" not in even and "| hotpotqa | 1 | 1 |" in even


def test_max_length_line():
    lines = [dict(fake_line("trec", 0, "full", None, "Animal", TREC), max_length=7500)]
    assert "max_length = 7500 tokens (the official rule" in lb.max_length_line(lines, None)
    assert "max_length = 300 tokens (--max-length)" in lb.max_length_line([dict(lines[0], max_length=300)], 300)


# ---- with real checkpoints ----

def test_samsum_decoding_matches_transformers_generate_with_the_official_arguments(default_model):
    """pred.py's samsum call, literally, on transformers' model of the default checkpoint (the
    independent reference) against ours on the same prompt and full cache."""
    import torch
    transformers = pytest.importorskip("transformers")
    from checkpoint import default_checkpoint_dir
    model, tok = default_model
    ids = lb.build_prompt_ids(tok, SAMSUM, "samsum", max_length=7500)
    prefill = model.prefill(torch.tensor([ids]))
    nl = lb.newline_id(tok)
    # this sample exercises the rule: unconstrained, the first new token is the newline
    assert int(prefill.logits[0].argmax()) == nl
    ours = lb.decode_answer(model, tok, Sequence.of(prefill), "samsum")

    folder = str(default_checkpoint_dir())
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    assert ref_tok.encode("\n", add_special_tokens=False)[-1] == nl
    x = torch.tensor([ids])
    with torch.no_grad():
        output = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=lb.DATASET2MAXLEN["samsum"],
                              num_beams=1, do_sample=False, temperature=1.0, min_length=x.shape[1] + 1,
                              eos_token_id=[ref_tok.eos_token_id, nl], pad_token_id=ref_tok.eos_token_id)[0]
    expected = ref_tok.decode(output[x.shape[1]:], skip_special_tokens=True)
    print(f"samsum prediction: {ours!r}; transformers: {expected!r}")
    assert ours == expected and ours.lstrip("\n").split("\n")[0].strip()


def test_checkpoint_without_chat_template_end_to_end(tmp_path, data_dir, capsys):
    """A tiny random Llama (no chat template, 512-token context): the raw prompt on the chat
    tasks, said once; the default max_length refused for so short a context, and a
    --max-length that leaves no room for the answer refused before any prefill."""
    from test_model import make_checkpoint
    _, folder = make_checkpoint(tmp_path, "llama-gqa")
    capsys.readouterr()  # the checkpoint writer's progress
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--data-dir", str(data_dir), "--tasks", "hotpotqa,triviaqa",
            "--methods", "full", "--out", str(out)]
    assert re.search(r"context \(512 tokens\) is too short .* pass --max-length", fails(capsys, argv))
    assert re.search("--max-length 490 does not fit hotpotqa: .* use --max-length 480 or less", fails(capsys,
        argv + ["--max-length", "490"]))
    assert not (out / "predictions.jsonl").exists()
    capsys.readouterr()
    lb.main(argv + ["--max-length", "480"])
    printed = capsys.readouterr().out
    assert printed.count("has no chat template") == 1
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {x["max_length"] for x in lines} == {480}
    from checkpoint import load_model
    _, tok = load_model(str(folder))
    raw = len(tok.encode(lb.DATASET2PROMPT["hotpotqa"].format(**HOTPOT)))
    assert {x["prompt_tokens"] for x in lines if x["task"] == "hotpotqa"} == {raw}
    assert "max_length = 480 tokens (--max-length)" in (out / "results.md").read_text()


def test_a_budget_that_fits_no_sample_is_refused_before_the_weights_load(data_dir, tmp_path, capsys, monkeypatch):
    """The samples' exact sizes come from the tokenizer alone (harness.fitting_units): the weights never load."""
    from lab import harness
    monkeypatch.setattr(harness, "load_checkpoint", lambda *a, **k: pytest.fail("the weights loaded"))
    for budget, words in (("0.001", "no compressed method fits any case"), ("8", "8 tokens a head are fewer than the 36")):
        assert words in fails(capsys, ["--budget", budget, "--tasks", "trec", "--data-dir", str(data_dir),
                                       "--out", str(tmp_path / "out")])
