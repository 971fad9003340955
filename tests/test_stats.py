"""stats.py against plain-Python loops over the same seeded resample indices, a coverage
simulation, and the summary's tables, markdown and plot on fresh random scores."""
import json
import math

import numpy as np
import pytest

from lab import stats

R = 1000  # the smallest resample count allowed: keeps the naive loops quick


# ----------------------------------------------------------------------------- naive references

def naive_percentile(values, q):
    """numpy's default ("linear") quantile, by hand: interpolate between order statistics."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def naive_pooled_mean(values, strata):
    """The mean of the per-stratum means, with dicts and loops."""
    groups = {}
    for v, s in zip(values, strata):
        groups.setdefault(s, []).append(v)
    return sum(sum(g) / len(g) for g in groups.values()) / len(groups)


def naive_bootstrap(values, strata, idx, stratified=True):
    """(mean, low, high): each resample r takes the units idx[r]; stratified: mean of task means
    (a drawn unit counts in its own task), else the plain mean."""
    resampled = []
    for row in idx:
        drawn = [values[i] for i in row]
        if stratified:
            resampled.append(naive_pooled_mean(drawn, [strata[i] for i in row]))
        else:
            resampled.append(sum(drawn) / len(drawn))
    mean = naive_pooled_mean(values, strata) if stratified else sum(values) / len(values)
    return mean, naive_percentile(resampled, 0.025), naive_percentile(resampled, 0.975)


def random_table(rng, strata_sizes, low=0.0, high=1.0, drop=0.0):
    """{(stratum, unit): score} with uniform scores; drop: fraction of units left out at random."""
    return {(s, u): float(rng.uniform(low, high)) for s, n in strata_sizes.items() for u in range(n)
            if rng.uniform() >= drop}


def shifted(rng, table, shift, noise=0.05):
    """The same units, score + shift + noise, clipped to [0, 1]."""
    return {k: float(np.clip(v + shift + rng.normal(0, noise), 0, 1)) for k, v in table.items()}


# ----------------------------------------------------------------------------- the bootstrap

@pytest.mark.parametrize("stratified", [True, False])
def test_bootstrap_matches_naive_loop(stratified):
    rng = np.random.default_rng(11)
    strata = ["qa"] * 5 + ["code"] * 8 + ["sum"] * 11
    scores = rng.uniform(0, 1, len(strata)).tolist()
    idx = stats.resample_indices(np.array(strata), R, seed=3, stratified=stratified)
    mean, low, high = naive_bootstrap(scores, strata, idx, stratified)
    got = stats.bootstrap_mean(scores, strata, n_resamples=R, seed=3, stratified=stratified)
    assert got["n"] == len(scores)
    assert got["mean"] == pytest.approx(mean, abs=1e-12)
    assert got["low"] == pytest.approx(low, abs=1e-12)
    assert got["high"] == pytest.approx(high, abs=1e-12)
    assert got["low"] < got["mean"] < got["high"]


def test_resample_indices_seeded_and_stratified():
    rng = np.random.default_rng(5)
    strata = rng.choice(["a", "b", "c"], size=30)  # shuffled labels, uneven sizes
    idx = stats.resample_indices(strata, R, seed=7)
    assert idx.shape == (R, 30)
    assert (stats.resample_indices(strata, R, seed=7) == idx).all()  # seeded
    assert (stats.resample_indices(strata, R, seed=8) != idx).any()
    assert (strata[idx] == strata).all()  # every position keeps its task: task sizes are kept
    assert len(np.unique(idx)) == 30  # and every unit can be drawn
    plain = stats.resample_indices(strata, R, seed=7, stratified=False)
    assert (strata[plain] != strata).any()  # plain resampling mixes tasks
    one = np.full(30, "niah")
    assert (stats.resample_indices(one, R, seed=7) == stats.resample_indices(one, R, seed=7, stratified=False)).all()


def test_resample_counts_count_the_draws():
    idx = stats.resample_indices(np.zeros(9), R, seed=2)
    counts = stats.resample_counts(idx)
    for r in (0, 17, R - 1):
        assert counts[r].tolist() == [list(idx[r]).count(j) for j in range(9)]


def test_ci_covers_the_true_mean():
    """95% CIs of a mean of 40 Beta(2, 5) scores (true mean 2/7) cover it in >= 90% of 200 seeded
    simulations, and stratified CIs of 3 tasks with different means cover the mean of task means."""
    covered = covered_strata = 0
    strata = ["a"] * 10 + ["b"] * 15 + ["c"] * 20
    task_p = {"a": 0.2, "b": 0.5, "c": 0.8}
    for sim in range(200):
        rng = np.random.default_rng(1000 + sim)
        ci = stats.bootstrap_mean(rng.beta(2, 5, 40), n_resamples=R, seed=sim)
        covered += ci["low"] <= 2 / 7 <= ci["high"]
        ci = stats.bootstrap_mean([float(rng.uniform() < task_p[s]) for s in strata], strata, n_resamples=R, seed=sim)
        covered_strata += ci["low"] <= 0.5 <= ci["high"]
    assert covered >= 180, covered
    assert covered_strata >= 180, covered_strata


def test_bootstrap_mean_checks_its_input():
    with pytest.raises(ValueError, match="n_resamples"):
        stats.bootstrap_mean([0.1, 0.2], n_resamples=100)
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_mean([0.1, 0.2], confidence=95)
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_mean([0.1, float("nan")])
    assert stats.bootstrap_mean([0.4])["low"] is None  # one unit: no interval


def test_no_interval_when_a_task_has_a_single_unit():
    """A stratum of one unit is resampled into itself: with one sample a task the stratified CI would have
    width 0 whatever the scores, so there is none; with 2+ in every task there is one, and it has width."""
    rng = np.random.default_rng(11)
    one_each = stats.bootstrap_mean(rng.uniform(size=5), ["a", "b", "c", "d", "e"])
    assert one_each["mean"] is not None and one_each["low"] is None and one_each["high"] is None
    assert stats.bootstrap_mean(rng.uniform(size=4), ["a", "a", "a", "b"])["low"] is None
    unstratified = stats.bootstrap_mean(rng.uniform(size=5), ["a", "b", "c", "d", "e"], stratified=False)
    assert unstratified["low"] < unstratified["high"]
    two_each = stats.bootstrap_mean(rng.uniform(size=6), ["a", "a", "b", "b", "c", "c"])
    assert two_each["low"] < two_each["mean"] < two_each["high"]
    keys = [("a", 0), ("b", 0), ("c", 0)]
    full, method, base = ({k: float(v) for k, v in zip(keys, rng.uniform(size=3))} for _ in range(3))
    assert stats.loss_ratio(full, method, base)["low"] is None


# ----------------------------------------------------------------------------- comparisons

def test_paired_difference_matches_naive_loop_and_skips_missing_units():
    rng = np.random.default_rng(21)
    a = random_table(rng, {"qa": 12, "code": 9}, drop=0.2)
    b = random_table(rng, {"qa": 12, "code": 9}, drop=0.2)
    common = sorted(set(a) & set(b), key=repr)
    assert set(stats.common_units(a, b)) == set(common) and len(common) < min(len(a), len(b))
    diffs = [a[k] - b[k] for k in common]
    strata = [k[0] for k in common]
    idx = stats.resample_indices(np.array(strata), R, seed=4)
    mean, low, high = naive_bootstrap(diffs, strata, idx)
    got = stats.paired_difference(a, b, n_resamples=R, seed=4)
    assert got["n"] == len(common)
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((mean, low, high), abs=1e-12)
    assert got["significant"] == (low > 0 or high < 0)


def test_significance_flags():
    assert stats.significant({"low": 0.01, "high": 0.2}) is True
    assert stats.significant({"low": -0.3, "high": -0.02}) is True
    assert stats.significant({"low": -0.1, "high": 0.2}) is False
    assert stats.significant({"low": None, "high": None}) is None
    rng = np.random.default_rng(8)
    a = random_table(rng, {"qa": 30, "code": 30}, 0.3, 0.7)
    better = stats.paired_difference(shifted(rng, a, 0.2), a, n_resamples=R)
    worse = stats.paired_difference(shifted(rng, a, -0.2), a, n_resamples=R)
    same = stats.paired_difference(shifted(rng, a, 0.0), a, n_resamples=R)
    assert better["significant"] and better["low"] > 0
    assert worse["significant"] and worse["high"] < 0
    assert not same["significant"] and same["low"] < 0 < same["high"]


def test_best_baseline_is_the_best_point_mean():
    rng = np.random.default_rng(9)
    tables = {m: random_table(rng, {"qa": 20, "code": 10}, lo, lo + 0.4)
              for m, lo in [("snapkv", 0.3), ("adakv", 0.35), ("streamingllm", 0.0)]}
    means = {m: naive_pooled_mean(list(t.values()), [k[0] for k in t]) for m, t in tables.items()}
    assert stats.best_baseline(tables, list(tables)) == max(means, key=means.get)
    assert stats.best_baseline(tables, ["streamingllm"]) == "streamingllm"
    assert stats.best_baseline({}, []) is None


@pytest.mark.parametrize("laprox_shift, baseline_shift, noise, rare_nonpositive", [
    (-0.1, -0.25, 0.05, False),  # a clear loss: the denominator stays > 0
    (-0.01, -0.02, 0.04, True),  # a loss near 0: 1.2% of the resamples count as +inf, the CI still exists
])
def test_loss_ratio_matches_hand_computation(laprox_shift, baseline_shift, noise, rare_nonpositive):
    rng = np.random.default_rng(13)
    full = random_table(rng, {"qa": 25, "code": 15}, 0.3, 0.8)
    laprox = shifted(rng, full, laprox_shift, noise)
    snapkv = shifted(rng, full, baseline_shift, noise)
    del laprox[("qa", 3)], snapkv[("code", 4)]  # each misses a unit: the ratio uses the units all three have
    common = stats.common_units(full, laprox, snapkv)
    assert len(common) == 38
    strata = [k[0] for k in common]
    num = [full[k] - laprox[k] for k in common]
    den = [full[k] - snapkv[k] for k in common]
    idx = stats.resample_indices(np.array(strata), R, seed=1)
    ratios, nonpositive = [], 0
    for row in idx:
        n = naive_pooled_mean([num[i] for i in row], [strata[i] for i in row])
        d = naive_pooled_mean([den[i] for i in row], [strata[i] for i in row])
        nonpositive += d <= 0
        ratios.append(n / d if d > 0 else math.inf)
    got = stats.loss_ratio(full, laprox, snapkv, n_resamples=R, seed=1)
    assert got["n"] == 38
    assert got["ratio"] == pytest.approx(naive_pooled_mean(num, strata) / naive_pooled_mean(den, strata), abs=1e-12)
    assert got["low"] == pytest.approx(naive_percentile(ratios, 0.025), abs=1e-12)
    assert got["high"] == pytest.approx(naive_percentile(ratios, 0.975), abs=1e-12)
    assert got["nonpositive_fraction"] == nonpositive / R
    assert (0 < nonpositive / R <= 0.025) if rare_nonpositive else nonpositive == 0
    assert got["at_most_half"] == (got["ratio"] <= 0.5) and got["at_most_half_ci"] == (got["high"] <= 0.5)


def test_loss_ratio_is_na_when_the_baseline_loses_nothing():
    rng = np.random.default_rng(14)
    full = random_table(rng, {"qa": 30}, 0.2, 0.8)
    laprox = shifted(rng, full, -0.1)
    lossless = shifted(rng, full, 0.05)  # the baseline scores above the full cache
    got = stats.loss_ratio(full, laprox, lossless, n_resamples=R)
    assert got["ratio"] is None and got["low"] is None and got["at_most_half"] is None
    assert "loses nothing" in got["note"]
    # a loss of exactly 0.005 on average but noisy (sd 0.2 a unit): the point ratio exists, its interval does not
    noise = rng.normal(0, 0.2, len(full))
    barely = {k: v - (0.005 + e - noise.mean()) for (k, v), e in zip(full.items(), noise)}
    got = stats.loss_ratio(full, laprox, barely, n_resamples=R)
    assert got["ratio"] is not None and got["ratio"] > 1
    assert got["nonpositive_fraction"] > 0.025
    assert got["low"] is None and got["high"] is None and "CI n/a" in got["note"]


# ----------------------------------------------------------------------------- rows, summary, markdown, plot

def eval_rows(seed, protocols=("aware", "agnostic"), full_budget=1.0, strata=("qa", "code", "sum")):
    """Rows like an eval's: 20 units per task; laprox loses 0.05, snapkv 0.15, adakv 0.12, streamingllm
    gains 0.05 (a baseline better than laprox: a negative result), laprox:pool=0 ties with laprox."""
    rng = np.random.default_rng(seed)
    shifts = {"laprox": -0.05, "snapkv": -0.15, "adakv": -0.12, "streamingllm": 0.05, "laprox:pool=0": -0.05}
    rows = []
    for protocol in protocols:
        for s in strata:
            for u in range(20):
                base = float(rng.uniform(0.4, 0.8))
                rows.append(dict(unit=[u, s], stratum=s, method="full", budget=full_budget, protocol=protocol,
                                 score=base))
                for b in (0.05, 0.2):
                    for m, shift in shifts.items():
                        score = float(np.clip(base + shift * (0.05 / b) + rng.normal(0, 0.03), 0, 1))
                        rows.append(dict(unit=[u, s], stratum=s, method=m, budget=b, protocol=protocol, score=score))
    return rows


def test_summary_is_json_and_consistent_with_the_functions():
    rows = eval_rows(3)
    summary = stats.summarize(rows, n_resamples=R, seed=2)
    assert json.loads(json.dumps(summary)) == summary  # plain JSON types only
    assert set(summary["protocols"]) == {"aware", "agnostic"} and "Holm" in summary["note"]
    tables = stats.score_tables(stats.check_rows(rows))["aware"]
    p = summary["protocols"]["aware"]
    assert [b["budget"] for b in p["budgets"]] == [0.05, 0.2]
    at = p["budgets"][0]
    boot = dict(n_resamples=R, seed=2)
    assert at["scores"]["snapkv"] == stats.mean_ci(tables[("snapkv", 0.05)], **boot)
    difference = stats.paired_difference(tables[("laprox", 0.05)], tables[("snapkv", 0.05)], **boot)
    assert {k: at["differences"]["snapkv"][k] for k in difference} == difference  # + p_holm, family, verdict
    loss = stats.paired_difference(tables[("full", None)], tables[("laprox", 0.05)], **boot)
    assert {k: at["loss"]["laprox"][k] for k in loss} == loss
    kept = "kept" if loss["high"] < 0.05 else "lost" if loss["low"] > 0.05 else "not settled"
    assert at["loss"]["laprox"]["verdict"] == kept
    assert at["best_baseline"] == "streamingllm"  # laprox's own variant is not a baseline
    assert at["loss_ratio"]["ratio"] is None and "loses nothing" in at["loss_ratio"]["note"]
    assert set(at["differences"]) == {"snapkv", "adakv", "streamingllm", "laprox:pool=0"}
    assert at["differences"]["snapkv"]["significant"] and at["differences"]["snapkv"]["mean"] > 0
    assert at["differences"]["streamingllm"]["significant"] and at["differences"]["streamingllm"]["mean"] < 0
    # without the better baseline, adakv (closest to laprox) is the best: a real ratio
    summary = stats.summarize(rows, baselines=["snapkv", "adakv"], n_resamples=R, seed=2)
    at = summary["protocols"]["aware"]["budgets"][0]
    assert at["best_baseline"] == "adakv"
    ratio = stats.loss_ratio(tables[("full", None)], tables[("laprox", 0.05)], tables[("adakv", 0.05)], **boot)
    assert {k: at["loss_ratio"][k] for k in ratio} == ratio  # + its verdict
    assert 0 < at["loss_ratio"]["ratio"] < 1


def test_summary_is_reproducible_and_full_budget_none_or_one():
    a = stats.summarize(eval_rows(4), n_resamples=R, seed=5)
    assert stats.summarize(eval_rows(4), n_resamples=R, seed=5) == a
    assert stats.summarize(eval_rows(4, full_budget=None), n_resamples=R, seed=5) == a
    other = stats.summarize(eval_rows(4), n_resamples=R, seed=6)
    assert other["protocols"]["aware"]["budgets"][0]["scores"]["laprox"]["low"] != \
        a["protocols"]["aware"]["budgets"][0]["scores"]["laprox"]["low"]


def test_markdown_marks_what_is_significant():
    rows = [r for r in eval_rows(6, protocols=("agnostic",))  # laprox misses one unit at 0.2
            if not (r["method"] == "laprox" and r["budget"] == 0.2 and r["unit"] == [0, "qa"])]
    summary = stats.summarize(rows, baselines=["snapkv", "adakv"], n_resamples=R)
    md = stats.summary_markdown(summary)
    assert md.count("(n=59)") == 1 and "(n=60)" not in md
    assert "### protocol: agnostic" in md and "### protocol: aware" not in md
    assert "Holm" in md
    head, rest = md.split("without its largest task")  # the differences, then the same without one task
    lines = {line.split(" |")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("|")}
    lines.update({line.split(" |")[0].lstrip("| "): line for line in head.splitlines() if line.startswith("|")})
    assert "without qa (which contributes" in rest
    assert "**+" in lines["snapkv"] and "better**" in lines["snapkv"]            # significantly worse than laprox
    assert "**-" in lines["streamingllm"] and "worse**" in lines["streamingllm"]  # a negative result, shown as such
    assert "no difference" in lines["laprox:pool=0"]                             # a tie
    assert "loss**" in lines["loss laprox"]
    assert "loss ratio laprox / best" in lines and "adakv" in lines["best baseline"]
    assert "2x less loss" in lines["loss ratio laprox / best"]
    assert "| full (no eviction) |" in md
    laprox = summary["protocols"]["agnostic"]["budgets"][0]["scores"]["laprox"]
    assert f"| laprox | {100 * laprox['mean']:.1f} [{100 * laprox['low']:.1f}, " in \
        stats.summary_markdown(summary, scale=100, digits=1)  # LongBench's 0-100 display


def test_plot_is_written(tmp_path):
    summary = stats.summarize(eval_rows(7), n_resamples=R)
    path = tmp_path / "scores.png"
    stats.plot_summary(summary, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.parametrize("budgets", [(0.05,), (0.05, 0.2)])
def test_plot_axes_and_legend(tmp_path, monkeypatch, budgets):
    """One budget: the methods side by side, named on the x axis (not spread as if they were budgets);
    several: the budgets on x. The full cache's CI band has a legend entry, and the legend stands
    beside the panels, not over them."""
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [r for r in eval_rows(7) if r["method"] == "full" or r["budget"] in budgets]
    stats.plot_summary(stats.summarize(rows, n_resamples=R), tmp_path / "scores.png")
    (fig,) = figures
    names = ["laprox", "snapkv", "adakv", "streamingllm", "laprox:pool=0"]
    for ax in fig.axes:
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == (names if len(budgets) == 1 else [f"{b:g}" for b in budgets])
        assert ax.get_legend() is None
    (legend,) = fig.legends
    assert "full: 95% CI" in [t.get_text() for t in legend.get_texts()]
    fig.canvas.draw()
    right = max(ax.get_window_extent().x1 for ax in fig.axes)
    assert legend.get_window_extent().x0 >= right
    monkeypatch.undo()
    plt.close(fig)


@pytest.mark.parametrize("bad, match", [
    (dict(score=1.5), "score"), (dict(score=float("nan")), "score"), (dict(budget=None), "budget None"),
    (dict(budget=0), "budget"), (dict(protocol="both"), "protocol"), (dict(method=""), "method"),
])
def test_bad_rows_get_a_clear_error(bad, match):
    row = dict(unit=1, stratum="qa", method="laprox", budget=0.05, protocol="aware", score=0.5)
    with pytest.raises(ValueError, match=match):
        stats.check_rows([{**row, **bad}])
    with pytest.raises(ValueError, match="lacks score"):
        stats.check_rows([{k: v for k, v in row.items() if k != "score"}])
    with pytest.raises(ValueError, match="appears twice"):
        stats.score_tables(stats.check_rows([row, {**row, "score": 0.7}]))
    with pytest.raises(ValueError, match="no rows"):
        stats.check_rows([])


# ----------------------------------------------------------------------------- sample size

def test_units_for_half_width():
    assert stats.units_for_half_width(0.05, sd=0.5) == 385  # 0/1 scores at worst: (1.96 * 0.5 / 0.05)^2
    rng = np.random.default_rng(17)
    scores = rng.beta(2, 3, 200)
    n = stats.units_for_half_width(0.04, scores=scores)
    sd = np.std(scores, ddof=1)
    assert 1.96 * sd / math.sqrt(n) <= 0.04 < 1.96 * sd / math.sqrt(n - 1) + 1e-4
    # and a bootstrap CI over that many fresh units has about that half-width
    ci = stats.bootstrap_mean(rng.beta(2, 3, n), n_resamples=R, seed=1)
    assert (ci["high"] - ci["low"]) / 2 == pytest.approx(0.04, rel=0.2)
    with pytest.raises(ValueError, match="exactly one"):
        stats.units_for_half_width(0.05)
    with pytest.raises(ValueError, match="half_width"):
        stats.units_for_half_width(0, sd=0.3)


# ----------------------------------------------------------------------------- Holm, verdicts, decomposition

def naive_holm(pvalues, alpha):
    """Holm's step-down procedure as written: visit the p-values from the smallest; reject the i-th
    (1-based) while p_(i) < alpha / (m - i + 1), stop at the first that is not. Returns the rejections."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: (pvalues[i], i))
    rejected = [False] * m
    for rank, i in enumerate(order):
        if pvalues[i] < alpha / (m - rank):
            rejected[i] = True
        else:
            break
    return rejected


def naive_holm_adjusted(pvalues):
    """adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)), with loops."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: (pvalues[i], i))
    out = [0.0] * m
    for rank, i in enumerate(order):
        out[i] = max(min(1.0, (m - j) * pvalues[order[j]]) for j in range(rank + 1))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_holm_against_the_step_down_procedure(seed):
    rng = np.random.default_rng(seed)
    p = list(rng.uniform(0, 0.02, 10)) + list(rng.uniform(0, 1, 20))  # a family of 30, some small
    p[3] = p[7]  # a tie
    adjusted = stats.holm(p)
    assert adjusted == pytest.approx(naive_holm_adjusted(p))
    for alpha in (0.01, 0.05, 0.1):
        assert [a < alpha for a in adjusted] == naive_holm(p, alpha)
    assert stats.holm([0.04]) == [0.04] and stats.holm([]) == []


@pytest.mark.parametrize("seed", range(3))
def test_bootstrap_p_against_a_loop_over_the_resamples(seed):
    rng = np.random.default_rng(seed)
    diffs = rng.normal(0.03 * seed, 0.1, 40)
    strata = np.repeat(["a", "b"], 20)
    idx = stats.resample_indices(strata, R, seed=seed)
    resampled = [naive_pooled_mean([diffs[i] for i in row], [strata[i] for i in row]) for row in idx]
    below, above = sum(r <= 0 for r in resampled), sum(r >= 0 for r in resampled)
    want = min(1.0, 2 * (min(below, above) + 1) / (R + 1))
    assert stats.bootstrap_mean(diffs, strata, n_resamples=R, seed=seed)["p"] == pytest.approx(want)
    assert stats.bootstrap_mean(diffs[:1], n_resamples=R)["p"] is None  # no resampling, no p


def test_verdicts_follow_the_plan():
    ci = lambda mean, low, high: {"mean": mean, "low": low, "high": high}
    assert stats.verdict(ci(0.1, 0.05, 0.15), 0.001) == "better"
    assert stats.verdict(ci(-0.1, -0.15, -0.05), 0.01) == "worse"
    assert stats.verdict(ci(0.1, 0.05, 0.15), 0.06) == "not significant"  # significant before Holm only
    assert stats.verdict(ci(0.01, -0.02, 0.04), 0.5) == "no difference"   # inside +-0.05
    assert stats.verdict(ci(0.028, -0.005, 0.066), 0.2) == "not significant"  # the example
    assert stats.verdict(ci(0.01, -0.02, 0.04), 0.5, margin=0.03) == "not significant"
    assert stats.verdict(ci(0.0, None, None), None) == "no CI"
    assert stats.loss_verdict(ci(0.01, -0.01, 0.04)) == "kept"
    assert stats.loss_verdict(ci(0.27, 0.20, 0.35)) == "lost"
    assert stats.loss_verdict(ci(0.045, 0.004, 0.091)) == "not settled"


def test_summary_holm_family_is_every_difference_of_a_protocol():
    summary = stats.summarize(eval_rows(8), n_resamples=R, seed=1)
    for p in summary["protocols"].values():
        family = [d for b in p["budgets"] for d in b["differences"].values()]
        assert len(family) == 8 and all(d["family"] == 8 for d in family)  # 4 others x 2 budgets
        assert [d["p_holm"] for d in family] == pytest.approx(naive_holm_adjusted([d["p"] for d in family]))
        for d in family:
            assert d["verdict"] == stats.verdict(d, d["p_holm"])
            assert d["p_holm"] >= d["p"]


def test_decomposition_by_task_against_its_definition():
    rows = eval_rows(9)
    tables = stats.score_tables(stats.check_rows(rows))["aware"]
    a, b = tables[("laprox", 0.05)], tables[("snapkv", 0.05)]
    # make one task carry the difference
    b = {k: (v - 0.3 if k[0] == "code" else v) for k, v in b.items()}
    parts = stats.decompose(a, b, n_resamples=R)
    pooled = stats.paired_difference(a, b, n_resamples=R)
    assert sum(c["mean"] for c in parts["by_stratum"].values()) == pytest.approx(pooled["mean"])
    for s, c in parts["by_stratum"].items():
        d = [a[k] - b[k] for k in a if k[0] == s]
        assert c["mean"] == pytest.approx(sum(d) / len(d) / 3) and c["n"] == 20
    assert parts["largest"] == "code"
    rest = stats.paired_difference({k: v for k, v in a.items() if k[0] != "code"},
                                   {k: v for k, v in b.items() if k[0] != "code"}, n_resamples=R)
    assert parts["without_largest"] == rest
    assert stats.decompose({("x", 0): 1.0, ("x", 1): 0.0}, {("x", 0): 0.0, ("x", 1): 0.0}, n_resamples=R) is None


def test_loss_ratio_without_the_largest_task():
    rows = eval_rows(10)
    rows = [dict(r, score=0.0) if r["method"] == "laprox" and r["stratum"] == "code" else r for r in rows]
    summary = stats.summarize(rows, baselines=["snapkv", "adakv"], n_resamples=R)
    at = summary["protocols"]["aware"]["budgets"][0]
    tables = stats.score_tables(stats.check_rows(rows))["aware"]
    w = at["loss_ratio_without_largest"]
    assert w["stratum"] == "code" == at["decomposition"][at["best_baseline"]]["largest"]
    drop = lambda t: {k: v for k, v in t.items() if k[0] != "code"}
    want = stats.loss_ratio(drop(tables[("full", None)]), drop(tables[("laprox", 0.05)]),
                            drop(tables[(at["best_baseline"], 0.05)]), n_resamples=R)
    assert {k: w[k] for k in want} == want and w["ratio"] < at["loss_ratio"]["ratio"]
    assert "(without code)" in stats.summary_markdown(summary)


def test_the_methods_loss_is_decomposed_by_task():
    """The plan decomposes every loss that carries a verdict: full - laprox, by task, and without the
    task carrying most of it, with that loss's own verdict (uncorrected, as the differences')."""
    rows = eval_rows(12)
    rows = [dict(r, score=0.0) if r["method"] == "laprox" and r["stratum"] == "qa" else r for r in rows]
    at = stats.summarize(rows, n_resamples=R)["protocols"]["aware"]["budgets"][0]
    tables = stats.score_tables(stats.check_rows(rows))["aware"]
    full, lap = tables[("full", None)], tables[("laprox", 0.05)]
    parts = at["loss_decomposition"]
    assert parts == stats.decompose(full, lap, n_resamples=R) | {"without_largest": parts["without_largest"]}
    assert sum(c["mean"] for c in parts["by_stratum"].values()) == pytest.approx(at["loss"]["laprox"]["mean"])
    assert parts["largest"] == "qa"
    rest = stats.paired_difference({k: v for k, v in full.items() if k[0] != "qa"},
                                   {k: v for k, v in lap.items() if k[0] != "qa"}, n_resamples=R)
    assert parts["without_largest"] == rest | {"verdict": stats.loss_verdict(rest)}
    assert "laprox without the stratum carrying the most of it" in stats.summary_markdown(stats.summarize(rows, n_resamples=R))


def test_ratio_verdicts_follow_the_plan():
    r = lambda ratio, low, high: {"ratio": ratio, "low": low, "high": high}
    assert stats.ratio_verdict(r(0.4, 0.3, 0.5)) == "holds"
    assert stats.ratio_verdict(r(0.44, 0.07, 0.73)) == "not settled"   # the point under 0.5, the CI above
    assert stats.ratio_verdict(r(0.86, 0.79, 0.93)) == "does not hold"
    assert stats.ratio_verdict(r(0.9, 0.6, None)) == "does not hold"   # unbounded above, but all above 0.5
    assert stats.ratio_verdict(r(0.3, None, None)) == "not settled"    # no CI
    assert stats.ratio_verdict(r(None, None, None)) == "n/a"
    summary = stats.summarize(eval_rows(11), baselines=["snapkv", "adakv"], n_resamples=R)
    ratio = summary["protocols"]["aware"]["budgets"][0]["loss_ratio"]
    assert ratio["verdict"] == stats.ratio_verdict(ratio)
