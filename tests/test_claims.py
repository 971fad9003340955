"""lab/claims.py applies the analysis plan's claim-level rules to stats.py's summaries."""
import json

import numpy as np
import pytest

from lab import claims, stats

R = 1000


def rows(seed, shifts, strata=("qa", "code", "sum"), budgets=(0.05, 0.2), noise=0.03):
    """An eval's rows: 20 units a task, the full cache at 0.4-0.8, each method full + its shift."""
    rng = np.random.default_rng(seed)
    out = []
    for s in strata:
        for u in range(20):
            base = float(rng.uniform(0.4, 0.8))
            out.append(dict(unit=[u, s], stratum=s, method="full", budget=1.0, protocol="aware", score=base))
            for b in budgets:
                for m, shift in shifts.items():
                    score = float(np.clip(base + shift + rng.normal(0, noise), 0, 1))
                    out.append(dict(unit=[u, s], stratum=s, method=m, budget=b, protocol="aware", score=score))
    return out


def summary(shifts, **kw):
    return stats.summarize(rows(0, shifts, **kw), n_resamples=R)


LAYER, HEAD = claims.SELECTIONS["per-layer"], claims.SELECTIONS["per-head"]


def test_better_than_prior_work_follows_the_plan():
    ahead = {"laprox": -0.02, **{b: -0.3 for b in claims.BASELINES}, LAYER: -0.3, HEAD: -0.3}
    text, verdict, _ = claims.better_than_prior_work(summary(ahead), "aware")
    assert verdict == "holds" and text.startswith("10 better, 0 worse") and text.endswith("of 10")
    one_worse = dict(ahead, streamingllm=0.2)
    text, verdict, _ = claims.better_than_prior_work(summary(one_worse), "aware")
    assert verdict == "does not hold" and "2 worse" in text
    tied = {m: -0.1 for m in ahead}   # every difference inside the margin: "no difference" is a verdict too
    assert claims.better_than_prior_work(summary(tied, noise=0.001), "aware")[1] == "does not hold"
    by_hand = lambda verdicts: {"protocols": {"aware": {"budgets": [  # noqa: E731
        {"budget": 0.05, "differences": {b: {"verdict": v} for b, v in zip(claims.BASELINES, verdicts)}}]}}}
    assert claims.better_than_prior_work(by_hand(["better"] * 4 + ["not significant"]), "aware")[1] == "not shown"
    assert claims.better_than_prior_work(by_hand(["better"] * 5), "aware")[1] == "holds"


def test_model_wide_selection_verdicts():
    worse = {"laprox": -0.3, LAYER: -0.02, HEAD: -0.3, **{b: -0.1 for b in claims.BASELINES}}
    got = {name: verdict for name, _, verdict, _ in claims.model_wide(summary(worse), "aware")}
    assert got == {"per-layer": "reversed", "per-head": "does not hold"}   # per-head: no difference at both budgets
    better = dict(worse, laprox=0.0, **{LAYER: -0.3})
    got = {name: verdict for name, _, verdict, _ in claims.model_wide(summary(better), "aware")}
    assert got["per-layer"] == "holds"


def test_kept_and_loss_ratio_at_5_percent():
    s = summary({"laprox": -0.01, **{b: -0.2 for b in claims.BASELINES}})
    number, verdict, _ = claims.kept_at_5(s, "aware")
    b = claims.budget_entry(s, "aware", 0.05)
    assert verdict == "holds" and number == f"loss {stats.format_ci(b['loss']['laprox'], sign=True)}"
    text, verdict, without = claims.loss_ratio_at_5(s, "aware")
    assert verdict == stats.ratio_verdict(b["loss_ratio"]) == "holds" and b["best_baseline"] in text
    assert without[0] == "holds"
    lost = summary({"laprox": -0.3, **{b: -0.2 for b in claims.BASELINES}})
    assert claims.kept_at_5(lost, "aware")[1] == "does not hold"
    assert claims.loss_ratio_at_5(lost, "aware")[1] == "does not hold"


def test_a_task_that_carries_a_verdict_is_named():
    shifts = {"laprox": -0.05, **{b: -0.05 for b in claims.BASELINES}}
    r = [dict(x, score=0.0) if x["method"] == "laprox" and x["stratum"] == "qa" else x for x in rows(2, shifts)]
    s = stats.summarize(r, n_resamples=R)
    cell = claims.ruler_cell(s, claims.better_than_prior_work, "aware")
    assert "**does not hold**" in cell and "carried by one task: qa in " in cell and "(worse -> " in cell


def test_overhead_rule():
    row = lambda n, lap, snap: {"n": n, "laprox": {"ratio_to_prefill": lap}, "laprox_vs_snapkv": lap / snap}
    assert claims.overhead([row(2000, 0.037, 0.02), row(4000, 0.02, 0.011)])[1] == "holds"
    assert claims.overhead([row(2000, 0.06, 0.04)])[1] == "does not hold"          # above 5% of the prefill
    assert claims.overhead([row(2000, 0.03, 0.01)])[1] == "does not hold"          # 3x SnapKV's
    assert claims.overhead(None)[1] == "not run"


def test_the_table_from_files(tmp_path, capsys):
    shifts = {"laprox": -0.02, **{b: -0.3 for b in claims.BASELINES}, LAYER: -0.3, HEAD: -0.3}
    ruler = tmp_path / "ruler"
    ruler.mkdir()
    (ruler / "summary.json").write_text(json.dumps({"lengths": {"4000": {"stats": summary(shifts)}}}))
    niah = tmp_path / "niah"
    niah.mkdir()
    by_metric = {m: summary(shifts) for m in ("content", "score")}
    by_metric["exact"] = summary(dict(shifts, laprox=-0.5))
    (niah / "summary.json").write_text(json.dumps({"stats_by_metric": by_metric}))
    lines = claims.main(["--model", "tiny", str(niah), str(ruler), "--model", "none", "--protocol", "aware"])
    out = capsys.readouterr().out
    assert lines[0] == "| claim (aware) | tiny | none |" and out.strip() == "\n".join(lines).strip()
    better = [line for line in lines if line.startswith("| 2.")][0]
    assert "NIAH 10 better" in better and "the same on recall" in better and "exact match: does not hold" in better
    assert better.endswith("| not run |") and "4. minimal overhead | n/a: **not run**" in "\n".join(lines)


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        claims.main(["--model", "x", str(tmp_path)])
    assert e.value.code == 2 and "no summary.json there" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text(json.dumps({"score": {}}))
    with pytest.raises(SystemExit):
        claims.main(["--model", "x", str(tmp_path)])
    assert "made before the plan?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        claims.main(["--model", "x", "--protocol", "both"])
    assert "--protocol must be" in capsys.readouterr().err
