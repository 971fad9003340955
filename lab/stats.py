"""Error bars for the eval summaries: bootstrap confidence intervals and paired comparisons.

Every eval scores *units* (a NIAH cell, a RULER sample, a LongBench sample), each in a *stratum*
(its task; NIAH has one), with a score in [0, 1] for each (method, budget, protocol). This module
turns such scores into the numbers a claim needs, with 95% confidence intervals:

- the mean score of each method at each budget (`mean_ci`);
- LaProx - baseline, paired over the units both have (`paired_difference`), with a bootstrap
  p-value; its verdict (`verdict`) is better / worse when significant after Holm's correction
  (`holm`) over every difference of LaProx in one protocol (the family of docs/analysis-plan.md),
  "no difference" only when its CI lies inside +-MARGIN, otherwise "not significant"; each split
  by task (`decompose`: each task's contribution and the difference without the largest one);
- the paper's headline numbers per budget: the loss vs the full cache (full - method, paired) and
  the loss ratio LaProx / best baseline (`loss_ratio`); "2x less loss" means a ratio <= 0.5.

How. The bootstrap resamples units with replacement, 2000 times (`N_RESAMPLES`), from a seeded
numpy Generator, and reads the 95% interval off the 2.5th and 97.5th percentiles of the resampled
statistic (the percentile interval: it stays inside [0, 1] for scores and needs no normal
approximation; Efron & Tibshirani ask >= 1000 resamples for it, as its ends rest on the tails). Resampling is
*stratified* by default: units are drawn within each task, so each task keeps its size, and the
statistic is the pooled mean = the mean of the task means, the average over tasks that LongBench
and RULER report. The resample indices depend only on (seed, the units' strata, n_resamples), so
every statistic over the same units (a method's mean, a difference, a loss, the ratio) is computed
on the same resamples: the comparisons are paired and reproducible.

Input: a list of rows (dicts), one per (unit, method, budget, protocol):

    {"unit": 17, "stratum": "qasper", "method": "laprox", "budget": 0.05,
     "protocol": "aware", "score": 0.42}

unit: any hashable id, unique within its stratum (a list is made a tuple: JSON turns tuples into
lists); method: a method spec string ("laprox", "laprox:pool=0", "snapkv", "full"); budget: a
number > 0, or None for the reference (the full cache may also sit under any budget, e.g. 1.0:
its rows are used at every budget); protocol: "aware" or "agnostic"; score in [0, 1].

Usage (e.g. at the end of eval_niah.py, with its result rows):

    from lab import stats
    rows = [dict(unit=(r["length"], r["depth"]), stratum="niah", method=r["method"],
                 budget=r["budget"], protocol="aware", score=r["score"]) for r in results]
    summary = stats.summarize(rows)                    # JSON-serialisable dict, per protocol
    (out / "stats.md").write_text(stats.summary_markdown(summary))   # scale=100 for LongBench
    stats.plot_summary(summary, out / "scores_vs_budget.png", title="NIAH")
    stats.units_for_half_width(0.05, scores=[r["score"] for r in rows])  # units for +-0.05

The loss ratio divides by the best baseline's loss: "n/a" when that loss is <= 0; resamples
where it is <= 0 count as +inf, and when they are more than 2.5% (the baseline's loss is not
significantly > 0) the ratio's CI is "n/a": a ratio over a denominator near 0 has no interval.

The API, from arrays up (the array-level functions take numpy arrays, the comparisons take *score
tables*: dicts {(stratum, unit): score} of one method at one budget):

    resample_indices(strata, n_resamples, seed, stratified)  (R, N) seeded bootstrap draws
    bootstrap_mean(scores, strata, ...)        pooled mean with its percentile CI
    significant(ci)                            does the CI exclude 0
    units_for_half_width(h, scores= | sd=)     units a CI of half-width h needs
    mean_ci(table)                             a method's mean with its CI
    paired_difference(table_a, table_b)        a - b over the common units, CI, significant
    best_baseline(tables, baselines)           the best point mean, chosen before resampling
    loss_ratio(full, method, baseline)         (full - method) / (full - baseline) with its CI
    summarize(rows, method, reference, ...)    all of it per protocol and budget (JSON-able)
    summary_markdown(summary, scale, digits)   tables, significant differences in bold
    plot_summary(summary, path, title)         score vs budget with CI bars, full as a band
"""
import functools
import math
import numbers
import statistics

import numpy as np

# 50 resamples in each 2.5% tail: the CI's ends move by ~3.5% of its half-width between seeds (~5% at 1000)
N_RESAMPLES = 2000
CONFIDENCE = 0.95
PROTOCOLS = ("aware", "agnostic")
ROW_KEYS = ("unit", "stratum", "method", "budget", "protocol", "score")
NOTE = ("A difference is significant when its Holm-adjusted bootstrap p-value is < {alpha:g} (Holm over every "
        "difference of the method with another in one protocol); 'no difference' when its {conf:g}% CI lies inside "
        "+-{margin:g}; otherwise 'not significant'.")
# docs/analysis-plan.md, fixed before the runs: "no difference" only when the CI of a difference lies inside
# (-MARGIN, +MARGIN), 5 points on the 0-100 scale such tables are read on; Holm at level ALPHA
MARGIN = 0.05
ALPHA = 0.05


# ----------------------------------------------------------------------------- the bootstrap

def check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    """Raise ValueError unless n_resamples >= 1000 (an integer) and 0 < confidence < 1."""
    if not (isinstance(n_resamples, numbers.Integral) and n_resamples >= 1000):
        raise ValueError(f"n_resamples must be an integer >= 1000 (percentile CIs need the tails), got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}")


def unit_weights(strata, stratified: bool = True) -> np.ndarray:
    """Weights w (N,) with sum 1 such that scores @ w is the pooled mean.
    strata: (N,) task labels. stratified: w_i = 1 / (S * n_s(i)), the mean of the S task means;
    otherwise w_i = 1 / N, the mean over units."""
    strata = np.asarray(strata)
    if not stratified:
        return np.full(len(strata), 1.0 / len(strata))
    labels, codes, sizes = np.unique(strata, return_inverse=True, return_counts=True)
    return 1.0 / (len(labels) * sizes[codes])


def can_resample(strata, stratified: bool = True) -> bool:
    """Whether a bootstrap CI means anything: at least 2 units, and with stratified resampling at least 2
    in every stratum. A task with one sample is resampled into itself, so it adds no spread: with one
    sample a task, the CI would have width 0 whatever the scores are."""
    strata = np.asarray(strata)
    if not stratified:
        return len(strata) >= 2
    return len(strata) >= 2 and int(np.unique(strata, return_counts=True)[1].min()) >= 2


def resample_indices(strata, n_resamples: int = N_RESAMPLES, seed: int = 0,
                     stratified: bool = True) -> np.ndarray:
    """Bootstrap resamples of N units: (n_resamples, N) int indices into the units, seeded.
    strata: (N,) task labels. stratified: the units at the positions of task s are drawn from
    task s (with replacement), so every resample keeps each task's size and position; otherwise
    from all N units. With one stratum both draw the same indices."""
    check_bootstrap_args(n_resamples, CONFIDENCE)
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    n = len(strata)
    if not stratified:
        return rng.integers(0, n, size=(n_resamples, n))
    idx = np.empty((n_resamples, n), dtype=np.int64)
    for label in np.unique(strata):  # sorted labels: the tasks draw in a fixed order
        members = np.flatnonzero(strata == label)
        idx[:, members] = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
    return idx


def resample_counts(idx) -> np.ndarray:
    """counts (R, N) float: counts[r, j] = how often unit j is drawn in resample r, from idx (R, N).
    For a pooled mean, scores[idx] @ w == counts @ (w * scores) whenever a drawn unit has the
    weight of the position it fills (true for both kinds of resampling), and the matrix-vector
    product is ~10x faster than gathering the (R, N) resampled scores."""
    idx = np.asarray(idx)
    n_resamples, n = idx.shape
    flat = (idx + n * np.arange(n_resamples)[:, None]).ravel()  # a separate range of bins per resample
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(float)


@functools.lru_cache(maxsize=2)
def shared_resample_counts(strata: tuple, n_resamples: int, seed: int, stratified: bool) -> np.ndarray:
    """resample_counts(resample_indices(...)), remembered (read-only) for the last two unit sets: a
    summary needs the same units' resamples for every method and budget, and drawing them is most
    of the cost (~0.5 s for LongBench's ~4750 units)."""
    counts = resample_counts(resample_indices(np.array(strata), n_resamples, seed, stratified))
    counts.flags.writeable = False
    return counts


def percentile_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high): the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of values (R,),
    linear interpolation between order statistics (numpy's default)."""
    low, high = np.quantile(np.asarray(values, dtype=float), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_mean(scores, strata=None, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
                   confidence: float = CONFIDENCE, stratified: bool = True) -> dict:
    """Pooled mean of scores (N,) (any real values: scores in [0, 1], or differences in [-1, 1])
    with its percentile bootstrap CI. strata: (N,) task labels, None for one stratum.
    Returns {"mean", "low", "high", "n", "p"}; low/high/p are None when N < 2 or, stratified, a task
    has fewer than 2 units (can_resample: no spread to resample). p: the two-sided bootstrap p-value
    of "the mean is 0" (bootstrap_p), what a difference's Holm correction reads."""
    check_bootstrap_args(n_resamples, confidence)
    scores = np.asarray(scores, dtype=float)
    strata = np.zeros(len(scores), dtype=int) if strata is None else np.asarray(strata)
    if scores.ndim != 1 or len(strata) != len(scores):
        raise ValueError(f"scores and strata must be 1-D of the same length, got {scores.shape} and {strata.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite numbers: drop or rescore the units with NaN or inf")
    if len(scores) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    w = unit_weights(strata, stratified)
    out = {"mean": float(scores @ w), "low": None, "high": None, "n": len(scores), "p": None}
    if can_resample(strata, stratified):
        counts = shared_resample_counts(tuple(strata.tolist()), n_resamples, seed, stratified)  # (R, N)
        resampled = counts @ (w * scores)  # (R,) pooled means of the resamples
        out["low"], out["high"] = percentile_interval(resampled, confidence)
        out["p"] = bootstrap_p(resampled)
    return out


def bootstrap_p(resampled) -> float:
    """Two-sided bootstrap p-value of "the statistic is 0" from its resampled values (R,):
    min(1, 2 (min(#{<= 0}, #{>= 0}) + 1) / (R + 1)); the +1 keeps it > 0 (at least 2 / (R + 1),
    0.001 at R = 2000, below Holm's first threshold 0.05 / 30 for a family of 30)."""
    resampled = np.asarray(resampled, dtype=float)
    tail = min(int(np.sum(resampled <= 0)), int(np.sum(resampled >= 0)))
    return min(1.0, 2 * (tail + 1) / (len(resampled) + 1))


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: with the m p-values sorted ascending,
    adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)); a test is significant at level
    alpha when its adjusted p < alpha (Holm 1979: the family-wise error rate stays <= alpha)."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def verdict(diff: dict, p_adjusted: float | None, margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """A difference's verdict (docs/analysis-plan.md): "better" / "worse" when its adjusted p < alpha
    (by the sign of its mean), else "no difference" when its CI lies inside (-margin, +margin), else
    "not significant"; "no CI" without one."""
    if diff["low"] is None or p_adjusted is None:
        return "no CI"
    if p_adjusted < alpha:
        return "better" if diff["mean"] > 0 else "worse"
    if -margin < diff["low"] and diff["high"] < margin:
        return "no difference"
    return "not significant"


def loss_verdict(loss: dict, margin: float = MARGIN) -> str:
    """Claim 1, "performance kept" (full - method, docs/analysis-plan.md): "kept" when the loss's CI
    lies below +margin (non-inferior within the margin), "lost" when it lies above +margin, else
    "not settled"; "no CI" without one."""
    if loss["low"] is None:
        return "no CI"
    return "kept" if loss["high"] < margin else "lost" if loss["low"] > margin else "not settled"


def ratio_verdict(ratio: dict) -> str:
    """Claim 3, "2x less loss" (docs/analysis-plan.md), from a loss_ratio: "holds" when its CI lies
    at or below 0.5, "does not hold" when it lies above, "not settled" when it spans 0.5 or has no
    upper end, "n/a" when the best baseline loses nothing."""
    if ratio["ratio"] is None:
        return "n/a"
    if ratio["low"] is None:
        return "not settled"
    if ratio["high"] is not None and ratio["high"] <= 0.5:
        return "holds"
    return "does not hold" if ratio["low"] > 0.5 else "not settled"


def decompose(table_a: dict, table_b: dict, **bootstrap) -> dict | None:
    """a - b split by stratum (RULER's tasks, NIAH's lengths), over the units both tables have: the
    pooled difference is the sum of each stratum's contribution d_s / S. Returns {"by_stratum":
    {stratum: contribution {"mean", "low", "high", "n"}: the stratum's own difference and CI over S},
    "largest": the stratum with the largest |contribution| (point estimate, chosen before resampling;
    ties to the first in sorted order), "without_largest": paired_difference over the other strata};
    None with fewer than 2 strata."""
    keys = common_units(table_a, table_b)
    strata = sorted({str(k[0]) for k in keys})
    if len(strata) < 2:
        return None
    by = {}
    for s in strata:
        d = bootstrap_mean([table_a[k] - table_b[k] for k in keys if str(k[0]) == s], **bootstrap)
        by[s] = {"mean": d["mean"] / len(strata), "n": d["n"],
                 "low": None if d["low"] is None else d["low"] / len(strata),
                 "high": None if d["high"] is None else d["high"] / len(strata)}
    largest = max(strata, key=lambda s: abs(by[s]["mean"]))  # max keeps the first of equal values
    rest = [k for k in keys if str(k[0]) != largest]
    return {"by_stratum": by, "largest": largest,
            "without_largest": paired_difference({k: table_a[k] for k in rest}, {k: table_b[k] for k in rest},
                                                 **bootstrap)}


def significant(ci: dict) -> bool | None:
    """Whether the CI {"low", "high"} excludes 0; None when there is no CI."""
    if ci["low"] is None:
        return None
    return ci["low"] > 0 or ci["high"] < 0


def units_for_half_width(half_width: float, *, scores=None, sd: float | None = None,
                         confidence: float = CONFIDENCE) -> int:
    """Units N a CI of the given half-width needs: the smallest N with z * sd / sqrt(N) <= half_width
    (normal approximation; z = 1.96 for 95%). sd: the per-unit standard deviation, or scores (N,)
    observed per unit (their sample sd; pass per-unit differences for a paired comparison). Scores
    pooled over tasks include the spread between tasks, so N is conservative for a stratified mean.
    For 0/1 scores sd <= 0.5, so N = 385 always suffices for +-0.05."""
    if not half_width > 0:
        raise ValueError(f"half_width must be > 0, got {half_width}")
    if (scores is None) == (sd is None):
        raise ValueError("give exactly one of scores (observed per-unit scores) or sd")
    if sd is None:
        scores = np.asarray(scores, dtype=float)
        if len(scores) < 2:
            raise ValueError(f"scores must hold at least 2 values to estimate a spread, got {len(scores)}")
        sd = float(np.std(scores, ddof=1))
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd}")
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    return max(1, math.ceil((z * sd / half_width) ** 2))


# ----------------------------------------------------------------------------- comparisons of score tables

def common_units(*tables: dict) -> list:
    """The (stratum, unit) keys present in every table, in a fixed (sorted) order."""
    keys = set(tables[0]).intersection(*tables[1:])
    return sorted(keys, key=repr)  # repr sorts any mix of ids, and groups each stratum's keys


def mean_ci(table: dict, **bootstrap) -> dict:
    """A method's pooled mean with its CI over its units; table: {(stratum, unit): score}.
    bootstrap: n_resamples, seed, confidence, stratified (see bootstrap_mean)."""
    keys = common_units(table)
    return bootstrap_mean([table[k] for k in keys], [str(k[0]) for k in keys], **bootstrap)


def paired_difference(table_a: dict, table_b: dict, **bootstrap) -> dict:
    """a - b over the units both tables have, resampled jointly (the per-unit difference is
    resampled, so both methods see the same units). Returns {"mean", "low", "high", "n",
    "significant"}; mean is the pooled mean of a - b over the common units only."""
    keys = common_units(table_a, table_b)
    diff = bootstrap_mean([table_a[k] - table_b[k] for k in keys], [str(k[0]) for k in keys], **bootstrap)
    return {**diff, "significant": significant(diff)}


def best_baseline(tables: dict, baselines: list, stratified: bool = True) -> str | None:
    """The baseline with the best pooled mean (point estimate, each over its own units; ties go to
    the first in `baselines`), chosen once, before any resampling. tables: {method: score table}."""
    means = {}
    for name in baselines:
        keys = common_units(tables[name]) if tables.get(name) else []
        if keys:
            means[name] = float(np.array([tables[name][k] for k in keys])
                                @ unit_weights([str(k[0]) for k in keys], stratified))
    return max(means, key=means.get) if means else None  # max keeps the first of equal values


def loss_ratio(full: dict, method: dict, baseline: dict, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
               confidence: float = CONFIDENCE, stratified: bool = True) -> dict:
    """LaProx's loss vs the full cache over the best baseline's: (full - method) / (full - baseline),
    pooled means over the units all three tables have, numerator and denominator from the same
    resamples. The point ratio is None ("n/a") when the baseline's loss is <= 0: it loses nothing,
    so there is nothing to be 2x less than. In the resamples where the denominator is <= 0 the ratio
    is undefined; it is counted as +inf (the worst case for the claim, never dropped). When more than
    (1 - confidence) / 2 of the resamples have it (2.5%), the denominator's own CI reaches 0 and the
    ratio's interval is unbounded: low/high are None. Returns {"ratio", "low", "high", "n",
    "nonpositive_fraction", "at_most_half" (ratio <= 0.5, the "2x less loss" claim),
    "at_most_half_ci" (its CI's upper end <= 0.5 too), "note"}."""
    check_bootstrap_args(n_resamples, confidence)
    keys = common_units(full, method, baseline)
    out = {"ratio": None, "low": None, "high": None, "n": len(keys), "nonpositive_fraction": None,
           "at_most_half": None, "at_most_half_ci": None, "note": ""}
    strata = [str(k[0]) for k in keys]
    if not can_resample(strata, stratified):
        out["note"] = f"n/a: {len(keys)} unit(s) in common, fewer than 2 in some task"
        return out
    w = unit_weights(strata, stratified)
    loss_method = np.array([full[k] - method[k] for k in keys])      # (N,)
    loss_baseline = np.array([full[k] - baseline[k] for k in keys])  # (N,)
    counts = shared_resample_counts(tuple(strata), n_resamples, seed, stratified)  # (R, N)
    numerator, denominator = counts @ (w * loss_method), counts @ (w * loss_baseline)  # (R,) each
    out["nonpositive_fraction"] = float(np.mean(denominator <= 0))
    if loss_baseline @ w <= 0:
        out["note"] = "n/a: the best baseline loses nothing vs full"
        return out
    out["ratio"] = float((loss_method @ w) / (loss_baseline @ w))
    out["at_most_half"] = out["ratio"] <= 0.5
    if out["nonpositive_fraction"] > (1 - confidence) / 2:
        out["note"] = (f"CI n/a: the best baseline's loss is <= 0 in {100 * out['nonpositive_fraction']:.1f}% "
                       f"of the resamples, so the ratio is unbounded")
        return out
    ratios = np.full(n_resamples, np.inf)
    positive = denominator > 0
    ratios[positive] = numerator[positive] / denominator[positive]
    low, high = percentile_interval(ratios, confidence)
    out["low"], out["high"] = (low if math.isfinite(low) else None), (high if math.isfinite(high) else None)
    out["at_most_half_ci"] = out["high"] is not None and out["high"] <= 0.5
    return out


# ----------------------------------------------------------------------------- rows -> summary

def check_rows(rows: list[dict], reference: str = "full") -> list[dict]:
    """Validated copies of the rows (see the module docstring), lists of unit ids made tuples.
    Raises ValueError naming the first bad row and how to fix it."""
    if not rows:
        raise ValueError("no rows to summarise: run the eval first (or check its --out folder)")
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)}: every row needs {', '.join(ROW_KEYS)}")
        row = dict(row)
        if isinstance(row["unit"], list):
            row["unit"] = tuple(row["unit"])
        score, budget = row["score"], row["budget"]
        if isinstance(budget, numbers.Real) and not isinstance(budget, bool):  # numpy numbers -> JSON-able
            row["budget"] = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not 0 <= score <= 1:
            raise ValueError(f"row {i} has score {score!r}: scores must be numbers in [0, 1] "
                             f"(divide a 0-100 score by 100)")
        if budget is None and row["method"] != reference:
            raise ValueError(f"row {i} ({row['method']}) has budget None: only the reference {reference!r} may")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget > 0):
            raise ValueError(f"row {i} has budget {budget!r}: a budget is a number > 0 (or None for {reference!r})")
        if row["protocol"] not in PROTOCOLS:
            raise ValueError(f"row {i} has protocol {row['protocol']!r}: choose from {', '.join(PROTOCOLS)}")
        if not isinstance(row["method"], str) or not row["method"]:
            raise ValueError(f"row {i} has method {row['method']!r}: a method spec string such as 'laprox'")
        out.append(row)
    return out


def score_tables(rows: list[dict], reference: str = "full") -> dict:
    """{protocol: {(method, budget): {(stratum, unit): score}}} from validated rows; the
    reference's rows go under budget None whatever their budget. Raises ValueError on a repeated
    (protocol, method, budget, stratum, unit)."""
    tables: dict = {}
    for row in rows:
        budget = None if row["method"] == reference else row["budget"]
        table = tables.setdefault(row["protocol"], {}).setdefault((row["method"], budget), {})
        key = (row["stratum"], row["unit"])
        if key in table:
            raise ValueError(f"unit {key} of {row['method']} at budget {budget} ({row['protocol']}) appears twice: "
                             f"keep one row per (unit, method, budget, protocol), e.g. the last of a resumed run")
        table[key] = float(row["score"])
    return tables


def method_name(spec: str) -> str:
    """'laprox:pool=0' -> 'laprox': variants of a method share its name."""
    return spec.split(":")[0]


def summarize_protocol(tables: dict, method: str, reference: str, baselines: list | None, margin: float = MARGIN,
                       alpha: float = ALPHA, **bootstrap) -> dict:
    """The summary of one protocol; tables: {(method, budget): score table} (see summarize)."""
    full = tables.get((reference, None), {})
    methods = list(dict.fromkeys(m for m, b in tables if b is not None))
    budgets = sorted({b for m, b in tables if b is not None})
    others = [m for m in methods if m != method]
    candidates = baselines if baselines is not None else [m for m in others if method_name(m) != method_name(method)]
    out = {"reference": mean_ci(full, **bootstrap) if full else None, "methods": methods, "budgets": []}
    for b in budgets:
        at_b = {m: tables[(m, b)] for m in methods if (m, b) in tables}
        entry = {"budget": b,
                 "scores": {m: mean_ci(t, **bootstrap) for m, t in at_b.items()},
                 "differences": {}, "loss": {}, "best_baseline": None, "loss_ratio": None}
        if method in at_b:
            entry["differences"] = {m: paired_difference(at_b[method], at_b[m], **bootstrap)
                                    for m in others if m in at_b}
            entry["decomposition"] = {m: decompose(at_b[method], at_b[m], **bootstrap) for m in entry["differences"]}
        if full:
            entry["loss"] = {m: paired_difference(full, t, **bootstrap) for m, t in at_b.items()}
            for loss in entry["loss"].values():
                loss["verdict"] = loss_verdict(loss, margin)
            if method in at_b:  # the plan decomposes every loss that carries a verdict: the method's
                parts = entry["loss_decomposition"] = decompose(full, at_b[method], **bootstrap)
                if parts is not None:
                    parts["without_largest"]["verdict"] = loss_verdict(parts["without_largest"], margin)
            best = best_baseline(at_b, [m for m in candidates if m in at_b], bootstrap["stratified"])
            entry["best_baseline"] = best
            if best is not None and method in at_b:
                entry["loss_ratio"] = loss_ratio(full, at_b[method], at_b[best], **bootstrap)
                entry["loss_ratio"]["verdict"] = ratio_verdict(entry["loss_ratio"])
                parts = entry["decomposition"].get(best)
                if parts is not None:  # the ratio over the other strata, without the one carrying method - best most
                    without = lambda t: {k: v for k, v in t.items() if str(k[0]) != parts["largest"]}
                    entry["loss_ratio_without_largest"] = {
                        "stratum": parts["largest"],
                        **loss_ratio(without(full), without(at_b[method]), without(at_b[best]), **bootstrap)}
        out["budgets"].append(entry)
    # Holm over the family: every difference of `method` with another in this protocol, all budgets
    family = [d for b in out["budgets"] for d in b["differences"].values() if d["p"] is not None]
    for d, p_adjusted in zip(family, holm([d["p"] for d in family])):
        d["p_holm"], d["family"] = p_adjusted, len(family)
    for b in out["budgets"]:
        for name, d in b["differences"].items():
            d["verdict"] = verdict(d, d.get("p_holm"), margin, alpha)
            parts = b["decomposition"].get(name)
            if parts is not None:  # uncorrected: a check of whether one stratum carries the verdict
                rest = parts["without_largest"]
                rest["verdict"] = verdict(rest, rest["p"], margin, alpha)
    return out


def summarize(rows: list[dict], method: str = "laprox", reference: str = "full", baselines: list | None = None, *,
              n_resamples: int = N_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE,
              stratified: bool = True, margin: float = MARGIN, alpha: float = ALPHA) -> dict:
    """Rows (see the module docstring) -> a JSON-serialisable summary:
    {"method", "reference", "n_resamples", "seed", "confidence", "stratified", "note",
     "protocols": {protocol: {"reference": CI of the full cache, "methods": [...],
        "budgets": [{"budget", "scores": {method: CI}, "differences": {other: method - other},
                     "loss": {method: full - method}, "best_baseline", "loss_ratio"}]}}}
    where a CI is {"mean", "low", "high", "n", "p"} (+ "significant" for differences and losses; a
    difference also has "p_holm", "family" (Holm's m) and "verdict", a loss "verdict" (loss_verdict),
    the loss ratio "verdict" (ratio_verdict));
    each budget also has "decomposition": {other: decompose(method, other)} and, with a best baseline
    and 2+ strata, "loss_ratio_without_largest" (loss_ratio without the stratum contributing most to
    method - best, named in its "stratum"). margin, alpha: the
    verdicts' equivalence margin and Holm's level (docs/analysis-plan.md).
    method: the method compared with all others (its variants included); baselines: the candidates
    for the best baseline (default: every method but the reference and `method`'s variants)."""
    check_bootstrap_args(n_resamples, confidence)
    bootstrap = dict(n_resamples=n_resamples, seed=seed, confidence=confidence, stratified=stratified)
    tables = score_tables(check_rows(rows, reference), reference)
    note = NOTE.format(alpha=alpha, conf=100 * confidence, margin=margin)
    return {"method": method, "reference": reference, **bootstrap, "margin": margin, "alpha": alpha, "note": note,
            "protocols": {p: summarize_protocol(tables[p], method, reference, baselines, margin, alpha, **bootstrap)
                          for p in PROTOCOLS if p in tables}}


# ----------------------------------------------------------------------------- markdown and plot

def format_ci(ci: dict | None, scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
    """'0.556 [0.410, 0.700]' (n/a when absent); sign: '+0.100 [+0.030, +0.170]'."""
    if ci is None or ci["mean"] is None:
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = f.format(scale * ci["mean"])
    if ci["low"] is not None:
        text += f" [{f.format(scale * ci['low'])}, {f.format(scale * ci['high'])}]"
    return text


def format_difference(ci: dict | None, up: str, down: str, scale: float = 1.0, digits: int = 3) -> str:
    """A difference with its CI: bold plus `up`/`down` when significant, 'not significant' when the
    CI includes 0 (e.g. up='better', down='worse'); a difference of the Holm family shows its verdict
    (no difference only within the margin), a loss its loss_verdict in parentheses."""
    if ci is None or ci["mean"] is None:
        return "n/a"
    text = format_ci(ci, scale, digits, sign=True)
    if ci["significant"] is None:
        return f"{text} (no CI)"
    if "p_holm" in ci:  # a difference of the Holm family: its verdict (better / worse, no difference, not significant)
        word = {"better": up, "worse": down}.get(ci["verdict"])
        return f"**{text} {word}**" if word else f"{text} {ci['verdict']}"
    kept = f" ({ci['verdict']})" if "verdict" in ci else ""  # a loss: kept / lost / not settled within the margin
    if not ci["significant"]:
        return f"{text} not significant{kept}"
    return f"**{text} {up if ci['mean'] > 0 else down}**{kept}"


def ratio_text(ratio: dict, best: str | None, digits: int = 2) -> str:
    """A loss ratio's number and CI, '0.86 [0.70, 1.07]' (ratio["ratio"] not None)."""
    text = f"{ratio['ratio']:.{digits}f}"
    if ratio["low"] is not None:
        high = "inf" if ratio["high"] is None else f"{ratio['high']:.{digits}f}"
        return text + f" [{ratio['low']:.{digits}f}, {high}]"
    # the denominator is <= 0 in too many resamples
    return text + f" [CI n/a: {best}'s loss <= 0 in {100 * ratio['nonpositive_fraction']:.1f}% of the resamples]"


def format_ratio(ratio: dict | None, best: str | None, digits: int = 2) -> str:
    """The loss ratio with its CI and whether the "2x less loss" claim (ratio <= 0.5) holds."""
    if ratio is None:
        return "n/a"
    if ratio["ratio"] is None:
        return ratio["note"].replace("the best baseline", best or "the best baseline")
    text = ratio_text(ratio, best, digits)
    if ratio["at_most_half_ci"]:
        return f"**{text} <= 0.5: 2x less loss (CI too)**"
    if ratio["at_most_half"]:
        return f"{text} <= 0.5: 2x less loss (CI reaches above 0.5)"
    return f"{text} > 0.5: not 2x less loss"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def scores_markdown(p: dict, reference: str, scale: float, digits: int) -> list[str]:
    """Table lines: each method's mean [CI] per budget, the reference's in every column; a cell
    over fewer units than the reference says its n. p: one protocol of a summary."""
    budgets = p["budgets"]
    n_all = p["reference"]["n"] if p["reference"] else max(ci["n"] for b in budgets for ci in b["scores"].values())

    def cell(ci):
        return format_ci(ci, scale, digits) + (f" (n={ci['n']})" if ci is not None and ci["n"] != n_all else "")

    rows = [[name] + [cell(b["scores"].get(name)) for b in budgets] for name in p["methods"]]
    if p["reference"] is not None:
        rows.append([f"{reference} (no eviction)"] + [format_ci(p["reference"], scale, digits)] * len(budgets))
    return markdown_table(["method"] + [f"budget {b['budget']:g}" for b in budgets], rows)


def differences_markdown(p: dict, method: str, scale: float, digits: int) -> list[str]:
    """Table lines: method - other, paired, per budget (better / worse / no difference)."""
    budgets = p["budgets"]
    others = [o for o in p["methods"] if any(o in b["differences"] for b in budgets)]
    rows = [[o] + [format_difference(b["differences"].get(o), "better", "worse", scale, digits) for b in budgets]
            for o in others]
    return markdown_table([f"{method} minus"] + [f"budget {b['budget']:g}" for b in budgets], rows) if rows else []


def without_largest_markdown(p: dict, method: str, scale: float, digits: int, stratum: str = "task") -> list[str]:
    """Lines: each difference without the stratum that contributes most to it (decompose), with that
    stratum's contribution; [] when the units have one stratum. stratum: its name in the text."""
    budgets = p["budgets"]
    others = [o for o in p["methods"] if any(b.get("decomposition", {}).get(o) for b in budgets)]

    def cell(b, o):
        parts = b.get("decomposition", {}).get(o)
        if not parts:
            return "n/a"
        rest, top = parts["without_largest"], parts["by_stratum"][parts["largest"]]
        return (f"{format_ci(rest, scale, digits, sign=True)} {rest['verdict']} without {parts['largest']} "
                f"(which contributes {scale * top['mean']:+.{digits}f})")
    if not others:
        return []
    rows = [[o] + [cell(b, o) for b in budgets] for o in others]
    return ([f"{method} - other without its largest {stratum} (the {stratum} contributing most to the pooled "
             f"difference, chosen on the point estimate; uncorrected verdicts):", ""]
            + markdown_table([f"{method} minus"] + [f"budget {b['budget']:g}" for b in budgets], rows) + [""])


def headline_markdown(p: dict, method: str, scale: float, digits: int) -> list[str]:
    """Table lines: every method's loss vs the reference (loss / gain / no difference), the best
    baseline and the loss ratio, per budget."""
    budgets = p["budgets"]
    rows = [[f"loss {name}"] + [format_difference(b["loss"].get(name), "loss", "gain", scale, digits) for b in budgets]
            for name in p["methods"]]
    if any(b.get("loss_decomposition") for b in budgets):
        rows.append([f"loss {method} without the stratum carrying the most of it"] + [
            f"{format_difference(d['without_largest'], 'loss', 'gain', scale, digits)} (without {d['largest']}, "
            f"which contributes {scale * d['by_stratum'][d['largest']]['mean']:+.{digits}f})"
            if (d := b.get("loss_decomposition")) else "n/a" for b in budgets])
    rows.append(["best baseline"] + [b["best_baseline"] or "n/a" for b in budgets])
    rows.append([f"loss ratio {method} / best"] + [format_ratio(b["loss_ratio"], b["best_baseline"]) for b in budgets])
    if any(b.get("loss_ratio_without_largest") for b in budgets):
        rows.append(["the same without the stratum carrying the most of it"] + [
            f"{format_ratio(w, b['best_baseline'])} (without {w['stratum']})" if (w := b.get("loss_ratio_without_largest"))
            else "n/a" for b in budgets])
    return markdown_table([""] + [f"budget {b['budget']:g}" for b in budgets], rows)


def summary_markdown(summary: dict, scale: float = 1.0, digits: int = 3, unit: str = "unit",
                     stratum: str | None = "task") -> str:
    """Markdown of a summary: a legend, then per protocol the scores with CIs, the method's paired
    differences with every other method, and the headline (losses vs the reference, loss ratio).
    Significant differences are bold with a word (better/worse, loss/gain); the others read
    'no difference'. scale, digits: display only (e.g. scale=100, digits=1 for LongBench's 0-100).
    unit, stratum: what the benchmark calls them (NIAH: "cell" and "length"; RULER, LongBench:
    "sample" and "task"), for the text."""
    m, ref, conf = summary["method"], summary["reference"], f"{100 * summary['confidence']:g}%"
    units = f"{unit}s"
    resampling = (f"{units} resampled within each {stratum}, so each {stratum} keeps its size; the mean is the "
                  f"mean of the {stratum} means" if summary["stratified"] and stratum
                  else f"{units} resampled together; the mean is over the {units}")
    out = [f"Means with {conf} bootstrap CIs [low, high] ({summary['n_resamples']} resamples, seed {summary['seed']}, "
           f"{resampling}).",
           f"Legend for {m} - other: **bold** = significant after Holm's correction over every such difference of the "
           f"protocol (adjusted p < {summary.get('alpha', ALPHA):g}), with its direction; 'no difference' = the CI lies "
           f"inside +-{summary.get('margin', MARGIN):g}; 'not significant' = neither. Losses: **bold** = the {conf} CI "
           f"excludes 0 (uncorrected). A value without [low, high] has no CI "
           f"(fewer than 2 {units}{f' in some {stratum}' if stratum else ''}): no claim.", ""]
    for protocol, p in summary["protocols"].items():
        out += [f"### protocol: {protocol}", "", f"Mean score of each method; (n=...) after a mean counts its {units} "
                f"where it has fewer than {ref}:", ""]
        out += scores_markdown(p, ref, scale, digits) + [""]
        if any(b["differences"] for b in p["budgets"]):
            out += [f"{m} - other method, paired over the {units} both have (> 0: {m} scores higher):", ""]
            out += differences_markdown(p, m, scale, digits) + [""]
            out += without_largest_markdown(p, m, scale, digits, stratum or "stratum")
        if p["reference"] is not None:
            out += [f"Headline: loss vs {ref} ({ref} - method, paired; > 0: the method loses score) and the loss "
                    f"ratio {m} / best baseline (best mean at that budget; <= 0.5 is the '2x less loss' claim):", ""]
            out += headline_markdown(p, m, scale, digits) + [""]
    return "\n".join(out)


def plot_summary(summary: dict, path, title: str = "") -> None:
    """Score vs budget (log axis), one line per method with its CI as error bars, the full cache
    as a horizontal line with its CI as a band; one panel per protocol. A single budget is no axis:
    then each method is a point with its CI whiskers, side by side. The legend sits beside the
    panels, never over the band. Writes a PNG to path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    protocols = summary["protocols"]
    single = all(len(p["budgets"]) == 1 for p in protocols.values())
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False, sharey=True)
    legend = {}
    for ax, (protocol, p) in zip(axes[0], protocols.items()):
        budgets = [b["budget"] for b in p["budgets"]]
        for i, name in enumerate(p["methods"]):
            pts = [(b["budget"], b["scores"][name]) for b in p["budgets"]
                   if b["scores"].get(name, {}).get("mean") is not None]
            if not pts:
                continue
            dodge = 1 + 0.05 * (i - (len(p["methods"]) - 1) / 2)  # spread the error bars apart on the log axis
            x = [i] if single else [bud * dodge for bud, _ in pts]
            y = [ci["mean"] for _, ci in pts]
            err = [[max(0.0, ci["mean"] - ci["low"]) if ci["low"] is not None else 0 for _, ci in pts],  # max: a
                   [max(0.0, ci["high"] - ci["mean"]) if ci["high"] is not None else 0 for _, ci in pts]]  # rounding
            # Dashed: a variant of a method (a name with flags). The marker changes every 10
            # methods, where matplotlib's 10 colours start over, so no two lines look the same.
            ax.errorbar(x, y, yerr=err, marker="os^D"[i // 10 % 4], linestyle="--" if ":" in name else "-",
                        capsize=3, label=name)
        ref = p["reference"]
        if ref is not None:
            ax.axhline(ref["mean"], color="k", linestyle="--", label=f"{summary['reference']} (no eviction): mean")
            if ref["low"] is not None:
                ax.axhspan(ref["low"], ref["high"], color="k", alpha=0.1,
                           label=f"{summary['reference']}: {round(100 * summary['confidence'])}% CI")
        if single:  # the methods side by side at the one budget, named on the axis
            ax.set_xticks(range(len(p["methods"])), p["methods"], rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(p["methods"]) - 0.5)
            ax.set_xlabel(f"method, at budget {budgets[0]:g}")
        else:
            ax.set_xscale("log")
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel("budget")
        ax.set_title(f"{title} ({protocol})" if title else protocol, fontsize=10)
        legend.update(zip(*ax.get_legend_handles_labels()[::-1]))
    axes[0][0].set_ylabel(f"score (mean, {round(100 * summary['confidence'])}% CI)")
    fig.legend(list(legend.values()), list(legend), fontsize=8, loc="upper left", bbox_to_anchor=(1, 0.95))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
