"""explain.py: on a tiny model where one planted head holds the answer, the method fails, restoring
the planted head (or its layer) fixes it, and restoring any other unit does not."""
import torch

import explain
from cache import KVCache
from lab.decode import Decoding, decode_batch
from methods import select
from model import decode_greedy
from checkpoint import load_model
from test_model import BASE, make_checkpoint

PLANTED = (1, 0)  # (layer, KV head) that carries the answer


def planted_model(tmp_path):
    """A tiny random GQA model (3 layers, 4 query heads on 2 KV heads) whose attention output is,
    but for 1e-4 of it, the planted KV head's: every other head writes through a scaled-down o_proj."""
    _, folder = make_checkpoint(tmp_path, "llama-gqa", seed=5)
    model = load_model(str(folder))[0]
    G = model.config.n_heads // model.config.n_kv_heads
    D = model.config.head_dim
    with torch.no_grad():
        for l, block in enumerate(model.layers):
            w = block.attn.o_proj.weight
            for h in range(model.config.n_heads):
                if (l, h // G) != PLANTED:
                    w[:, h * D:(h + 1) * D] *= 1e-4
                else:
                    w[:, h * D:(h + 1) * D] *= 4.0
    return model



def niah_eval_config(*argv: str) -> str:
    """The config eval_niah.py writes into its rows when run with argv: its arguments checked as the
    eval checks them (the dtype resolved), not as explain rebuilds them."""
    import eval_niah as N
    from lab.harness import check_eval_arguments
    d = N.build_parser().parse_args(list(argv))
    check_eval_arguments(d)
    return N.run_config(d, N.read_haystack(d.haystack))["config"]


def test_failures_read_the_rows_of_an_eval_run_with_the_same_options():
    """explain's config of a case is the one the eval wrote, the dtype included: the model's own
    (float32 for SmolLM2, bfloat16 for the 1.5B on a CPU with bf16 instructions), or --dtype."""
    import eval_ruler as R
    from lab.harness import check_eval_arguments
    for argv in ([], ["--model", "qwen2.5-coder-1.5b", "--haystack-offset", "cell"], ["--dtype", "bfloat16"]):
        args = explain.build_parser().parse_args(["--failures", "x", *argv])
        assert explain.eval_configs([dict(length=600, depth=0.5)], args)({}) == niah_eval_config(*argv)
    for argv in ([], ["--model", "qwen2.5-coder-1.5b"]):
        args = explain.build_parser().parse_args(["--failures", "x", *argv])
        d = R.build_parser().parse_args(argv)
        check_eval_arguments(d)
        want = R.run_configs(d, ["vt"], R.read_haystack())[1]["vt"]
        assert explain.eval_configs([dict(task="vt", index=0)], args)(dict(task="vt")) == want

def test_explain_finds_the_planted_head(tmp_path):
    model = planted_model(tmp_path)
    ids = torch.randint(3, BASE["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prefill = model.prefill(ids, window=8)
        reference = str(decode_greedy(model, KVCache.from_prefill(prefill), prefill.n, prefill.logits, 8))  # alone
        answers = lambda seqs: [str(t) for t in decode_batch(model, seqs, [Decoding(8)] * len(seqs))]
        kept = select(prefill, "snapkv", 0.1)
        trials = explain.explain(prefill, kept, answers, lambda text: float(text == reference))
    rows = {t.unit: t for t in trials}
    assert rows["none"].score == 0.0 and rows["none"].restored == 0
    assert rows["none"].kept == 3 * 2 * 20
    l, g = PLANTED
    assert rows[f"layer {l}"].score == 1.0 and rows[f"layer {l}"].restored == 2 * (200 - 20)
    assert rows[f"layer {l} head {g}"].score == 1.0 and rows[f"layer {l} head {g}"].restored == 180
    others = [u for u in rows if u not in ("none", f"layer {l}", f"layer {l} head {g}")]
    assert others == [f"layer {x}" for x in (0, 2)] + [f"layer {l} head {1 - g}"]  # heads of the fixing layer only
    assert all(rows[u].score == 0.0 for u in others)


def test_restore_puts_back_one_unit():
    kept = [[torch.tensor([0, 5, 9]), torch.tensor([9])], [torch.tensor([2, 9]), torch.tensor([1, 9])]]
    new, added = explain.restore(kept, 10, layer=1, head=0)
    assert new[1][0].tolist() == list(range(10)) and added == 8 and new[0][0] is kept[0][0]
    new, added = explain.restore(kept, 10, span=range(4, 6))
    assert [i.tolist() for i in new[0]] == [[0, 4, 5, 9], [4, 5, 9]] and added == 1 + 2 + 2 + 2


def ruler_row(task, index, method, score, budget=0.05, protocol="aware"):
    return dict(task=task, length=4000, index=index, method=method, budget=budget, protocol=protocol, score=score)


def test_failing_cases_are_aware_cases_that_full_answers_and_the_method_misses():
    rows = [ruler_row("vt", i, "full", 1.0) for i in range(5)] + [ruler_row("vt", 4, "full", 0.0)]
    rows += [ruler_row("vt", i, "laprox", 0.0) for i in range(5)]                # 4: full fails too
    rows += [ruler_row("vt", 9, "laprox", 0.0), ruler_row("cwe", 0, "full", 1.0), ruler_row("cwe", 0, "laprox", 0.5),
             ruler_row("cwe", 1, "full", 1.0), ruler_row("cwe", 1, "laprox", 1.0),             # answered
             ruler_row("cwe", 2, "full", 1.0), ruler_row("cwe", 2, "laprox", 0.0, budget=0.2),  # other budget
             ruler_row("cwe", 3, "full", 1.0, protocol="agnostic"), ruler_row("cwe", 3, "laprox", 0.0, protocol="agnostic")]
    rows = [r for r in rows if not (r["index"] == 4 and r["score"] == 1.0)]     # the latest full row of vt #4 is 0
    got = explain.failing_cases(rows, "laprox", 0.05, per_task=3, cells=6)
    assert got == [dict(task="cwe", length=4000, index=0)] + [dict(task="vt", length=4000, index=i) for i in range(3)]
    niah = [dict(length=n, depth=d, method=m, budget=0.05, score=1.0, content=s) for n in (2000, 4000)
            for d in (0, 0.5, 1) for m, s in (("full", 1.0), ("laprox", 0.2))]  # content: NIAH's primary score
    assert explain.failing_cases(niah, "laprox", 0.05, 3, cells=3) == [
        dict(length=2000, depth=0), dict(length=2000, depth=1), dict(length=4000, depth=0.5)]   # spread evenly
    # the needle in the window: out; a row without content is scored from its answer
    cut = dict(needle_token=1990, needle_end=1999, context_tokens=2000, window=32)
    rows = [dict(r, **cut) if (r["length"], r["depth"]) == (2000, 1) else r for r in niah]
    rows = [r if r["method"] == "full" or r["length"] == 2000 else
            dict({k: v for k, v in r.items() if k != "content"}, answer="eat a sandwich") for r in rows]
    assert explain.failing_cases(rows, "laprox", 0.05, 3, cells=9) == [
        dict(length=2000, depth=0), dict(length=2000, depth=0.5), dict(length=4000, depth=0),
        dict(length=4000, depth=0.5), dict(length=4000, depth=1)]


def test_tabulate_counts_what_fixes_each_failure():
    def case(name, fixing):
        trials = [dict(unit="none", score=0.0)] + [dict(unit=u, score=1.0 if u in fixing else 0.0) for u in
                                                    ("layer 3", "layer 5", "layer 3 head 1", "layer 3 head 2", "tokens 4:9")]
        return dict(case=name, full=1.0, trials=trials)
    md = explain.tabulate([case("a", {"layer 3", "layer 3 head 2", "tokens 4:9"}), case("b", {"layer 3", "layer 5"}),
                           case("c", set())])
    assert "one layer's restoration fixes 2 of 3; one KV head's 1 of 3" in md and "fix 1 of 3" in md
    assert "more than one failure: layer 3 (2)." in md and "heads that fix more than one failure: none." in md
    assert "| a | 0.00 | 3 | 3 head 2 | yes |" in md and "| c | 0.00 | - | - | no |" in md


def test_failures_of_a_folder_without_results_is_one_line(tmp_path, one_line_error):
    one_line_error(explain.main, ["--failures", str(tmp_path)], "no results.jsonl there")
    (tmp_path / "results.jsonl").write_text("")
    one_line_error(explain.main, ["--failures", str(tmp_path), "--cells", "0"], "--cells must be >= 1")


def test_failures_resume_only_records_of_todays_definition_and_prompts(tmp_path, monkeypatch, capsys):
    """--failures reads the rows made with the prompts explain rebuilds (the eval's config) and the
    method's current flags; a record of explain.jsonl counts as done only with both; others are
    diagnosed again, appended, and explain.md tabulates the cases picked now."""
    import json

    import eval_niah as N
    from lab import harness
    from lab.harness import parse_method
    from methods import resolved_flags
    config = niah_eval_config()
    flags = resolved_flags(*parse_method("laprox"))
    row = lambda n, dep, m, s, cfg=config: dict(length=n, depth=dep, method=m, budget=0.05, protocol="aware", score=s,
                                              content=s, config=cfg, method_flags=resolved_flags(*parse_method(m)))
    rows = [row(n, 0.5, m, s) for n in (2000, 4000) for m, s in (("full", 1.0), ("laprox", 0.0))]
    rows += [row(6000, 0.5, "full", 1.0, "other"), row(6000, 0.5, "laprox", 0.0, "other")]  # other prompts
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = lambda n, **kw: dict(case=dict(length=n, depth=0.5), method="laprox", budget=0.05, full=1.0,
                                  trials=[dict(unit="none", restored=0, kept=9, score=0.0, answer="")],
                                  metric="content", **kw)
    (tmp_path / "explain.jsonl").write_text(json.dumps(record(2000, method_flags=flags, config=config)) + "\n"
                                            + json.dumps(record(4000, method_flags={**flags, "pool": 0},
                                                                config=config)) + "\n")
    diagnosed = []
    monkeypatch.setattr(harness, "load_checkpoint", lambda *a: (None, None))
    monkeypatch.setattr(explain, "diagnose", lambda model, tok, a, log: (
        diagnosed.append(a.niah), (1.0, [explain.Trial("none", 0, 9, 0.0, ""), explain.Trial("layer 3", 5, 14, 1.0, "")]))[1])
    mine = explain.main(["--failures", str(tmp_path), "--method", "laprox", "--budget", "0.05"])
    assert diagnosed == [(4000, 0.5)]  # 2000 is done; 4000's record is of another laprox; 6000's rows other prompts
    assert "2 row(s)" in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "explain.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and lines[-1]["method_flags"] == flags and lines[-1]["config"] == config
    assert [m["case"]["length"] for m in mine] == [2000, 4000]
    md = (tmp_path / "explain.md").read_text()
    assert "2 failure(s) diagnosed" in md and "one layer's restoration fixes 1 of 2" in md
    assert explain.main(["--failures", str(tmp_path), "--method", "laprox", "--budget", "0.05"]) == mine
    assert diagnosed == [(4000, 0.5)]  # a rerun diagnoses nothing


def test_failures_of_rows_with_other_prompts_is_one_line(tmp_path, one_line_error):
    import json
    row = dict(length=2000, depth=0.5, method="full", budget=None, protocol="aware", score=1.0, config="other")
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    one_line_error(explain.main, ["--failures", str(tmp_path)], "none of its rows was made with the prompts")


def test_failures_report_every_record_of_todays_definitions(tmp_path, monkeypatch):
    """A record of today's flags and config that today's rule no longer picks (an earlier pick) is
    reported in explain.md, marked; a record of other flags is not."""
    import json

    import eval_niah as N
    from lab import harness
    from lab.harness import parse_method
    from methods import resolved_flags
    config = niah_eval_config()
    flags = resolved_flags(*parse_method("laprox"))
    row = lambda n, m, s: dict(length=n, depth=0.5, method=m, budget=0.05, protocol="aware", score=s, content=s,
                               config=config, method_flags=resolved_flags(*parse_method(m)))
    rows = [row(2000, "full", 1.0), row(2000, "laprox", 0.0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = lambda n, f, fixed: dict(case=dict(length=n, depth=0.5), method="laprox", budget=0.05, method_flags=f,
                                      config=config, metric="content", full=1.0, trials=[dict(unit="none", restored=0, kept=9, score=0.0,
                                                                            answer=""),
                                                                       dict(unit="layer 3", restored=5, kept=14,
                                                                            score=1.0 if fixed else 0.0, answer="")])
    (tmp_path / "explain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        record(2000, flags, True), record(6000, flags, False), record(8000, {**flags, "pool": 0}, True))))
    monkeypatch.setattr(harness, "load_checkpoint", lambda *a: (None, None))
    mine = explain.main(["--failures", str(tmp_path), "--method", "laprox", "--budget", "0.05"])
    assert [m["case"]["length"] for m in mine] == [2000]  # what today's rule picks
    md = (tmp_path / "explain.md").read_text()
    assert "2 record(s) held for these definitions: the 1 case(s) today's rule picks, and 1 left" in md
    assert "| NIAH 2000 @ 0.5 | 0.00 | 3 |" in md and "| NIAH 6000 @ 0.5 (not picked now) | 0.00 | - |" in md
    assert "8000" not in md and "one layer's restoration fixes 1 of 2" in md
    old = dict(record(2000, flags, True))
    del old["metric"]  # a record scored before content-word recall was NIAH's score: another definition
    (tmp_path / "explain.jsonl").write_text(json.dumps(old) + "\n")
    monkeypatch.setattr(explain, "diagnose", lambda model, tok, a, log: (1.0, [explain.Trial("none", 0, 9, 0.0, "")]))
    explain.main(["--failures", str(tmp_path), "--method", "laprox", "--budget", "0.05"])
    lines = (tmp_path / "explain.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["metric"] == "content"  # diagnosed again, on content


def test_niah_cases_rebuild_the_eval_s_haystack_offsets(default_model):
    import argparse

    import eval_niah as N
    tok = default_model[1]
    args = explain.build_parser().parse_args(["--failures", "x", "--haystack-offset", "cell", "--seed", "3"])
    rows = [dict(length=600, depth=0.5)]
    assert explain.eval_configs(rows, args)({}) == niah_eval_config("--haystack-offset", "cell", "--seed", "3")
    text = N.read_haystack()
    case = argparse.Namespace(**{**vars(args), "niah": (600, 0.5)})
    ids, _, score, _ = explain.niah_case(tok, case)
    hay = N.haystack_ids(tok, N.rotate(text, N.haystack_offset(text, 3, 600, 0.5)), 600)
    assert ids == N.build_prompt(tok, hay, 600, 0.5)["ids"]
    assert ids != explain.niah_case(tok, argparse.Namespace(**{**vars(case), "haystack_offset": "none"}))[0]
    assert abs(score("eat a sandwich") - 2 / 7) < 1e-12  # content-word recall: eat, sandwich of 7
