"""Selection: budgets, pooling, and every rule against a naive loop written here (Python lists,
sorted(), no torch top-k), on random scores and on every registered method's own scores."""
import math
from fractions import Fraction

import pytest
import torch

import baselines
import methods
from baselines import pyramid_budgets, select_criticalkv, select_pyramid
from cache import (Prefill, kept_counts, pool_scores, resolve_budget,
                   select_adakv, select_model, select_scope, select_uniform)
from methods import method_scores, select


def make_prefill(L=3, H=6, H_kv=2, n=300, w=8, D=16, d=48, seed=0, h2o=True) -> Prefill:
    """A random prefill (no model): keys/values (1, H_kv, n, D), queries (1, H, w, D), o_proj (d, H*D)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)
    return Prefill(
        keys=[rnd(1, H_kv, n, D) for _ in range(L)],
        values=[rnd(1, H_kv, n, D) for _ in range(L)],
        queries=[2 * rnd(1, H, w, D) for _ in range(L)],  # x2: peakier attention
        o_proj=[rnd(d, H * D) / math.sqrt(H * D) for _ in range(L)],
        resid_norm=torch.rand(L, generator=g) + 1.0,
        out_norm=torch.rand(L, generator=g) + 0.1,
        h2o=[torch.rand(1, H, n, generator=g) for _ in range(L)] if h2o else None,
        logits=rnd(1, 50),
        window=w,
    )


# ---------------- naive references (lists and sorted(), independent of cache.py) ----------------

def forced_set(n, w, sinks):
    return set(range(sinks)) | set(range(n - w, n))


def naive_uniform(S, k, w, sinks=0):
    """S: nested lists [L][H][n] of floats. Each head: forced tokens, then best score, earlier token first."""
    out = []
    for layer in S:
        heads = []
        for row in layer:
            n = len(row)
            fs = forced_set(n, w, sinks)
            order = sorted(range(n), key=lambda j: (j not in fs, -row[j], j))
            heads.append(sorted(order[:k]))
        out.append(heads)
    return out


def naive_pyramid_budgets(free, L, room, beta):
    if L == 1:
        return [free]
    lo = Fraction(free, 1) / Fraction(beta).limit_denominator(10**9)
    hi = 2 * free - lo
    if hi >= room:
        hi, lo = Fraction(room), 2 * free - Fraction(room)
    vals = [hi - (hi - lo) * l / (L - 1) for l in range(L)]
    base = [v.numerator // v.denominator for v in vals]
    left = L * free - sum(base)
    rank = sorted(range(L), key=lambda l: (-(vals[l] - base[l]), l))
    return [base[l] + (1 if l in rank[:left] else 0) for l in range(L)]


def naive_pyramid(S, k, w, sinks=0, beta=20):
    n, f = len(S[0][0]), w + sinks
    budgets = naive_pyramid_budgets(k - f, len(S), n - f, beta)
    return [naive_uniform([layer], f + b, w, sinks)[0] for layer, b in zip(S, budgets)]


def naive_layer_alloc(layer, k, w, sinks, alpha):
    """AdaKV for one layer: returns a set of (head, token)."""
    H, n = len(layer), len(layer[0])
    fs = forced_set(n, w, sinks)
    safe = math.floor(alpha * (k - len(fs)))
    chosen = set()
    for g, row in enumerate(layer):
        chosen |= {(g, j) for j in fs}
        others = sorted((j for j in range(n) if j not in fs), key=lambda j: (-row[j], j))
        chosen |= {(g, j) for j in others[:safe]}
    rest = sorted(((g, j) for g in range(H) for j in range(n) if (g, j) not in chosen),
                  key=lambda e: (-layer[e[0]][e[1]], e[0], e[1]))
    chosen |= set(rest[: H * k - len(chosen)])
    return chosen


def naive_adakv(S, k, w, sinks=0, alpha=0.2):
    out = []
    for layer in S:
        chosen = naive_layer_alloc(layer, k, w, sinks, alpha)
        out.append([sorted(j for (g2, j) in chosen if g2 == g) for g in range(len(layer))])
    return out


def naive_model(S, k, w, sinks=0, floor=0.0):
    """One top-k over the model; with a floor, each head's forced tokens and its top
    floor(floor * (k - forced)) others come first."""
    L, H, n = len(S), len(S[0]), len(S[0][0])
    fs = forced_set(n, w, sinks)
    first = set()
    for l in range(L):
        for g in range(H):
            order = sorted((j for j in range(n) if j not in fs), key=lambda j: (-S[l][g][j], j))
            first |= {(l, g, j) for j in order[: math.floor(floor * (k - len(fs)))]}
    entries = [(l, g, j) for l in range(L) for g in range(H) for j in range(n)]
    order = sorted(entries, key=lambda e: (e[2] not in fs and e not in first, -S[e[0]][e[1]][e[2]], e))
    chosen = set(order[: L * H * k])
    return [[sorted(j for j in range(n) if (l, g, j) in chosen) for g in range(H)] for l in range(L)]


def naive_criticalkv(S, S2, k, w, sinks=0, alpha=0.2, first_stage=0.5):
    """S: SnapKV scores (window sums); S2: the stage-2 key (S / w + eps) * weights (the window mean,
    as in the authors' code), computed by the caller."""
    out = []
    for l, layer in enumerate(S):
        n = len(layer[0])
        fs = forced_set(n, w, sinks)
        safe = math.floor(alpha * (k - len(fs)))
        chosen = naive_layer_alloc(layer, k, w, sinks, alpha)
        heads = []
        for g, row in enumerate(layer):
            c = sum(1 for (g2, _) in chosen if g2 == g)
            first = max(safe, math.floor(first_stage * (c - len(fs))))
            others = sorted((j for j in range(n) if j not in fs), key=lambda j: (-row[j], j))
            keep = set(fs) | set(others[:first])
            second = sorted((j for j in range(n) if j not in keep), key=lambda j: (-S2[l][g][j], j))
            keep |= set(second[: c - len(keep)])
            heads.append(sorted(keep))
        out.append(heads)
    return out


def as_lists(kept):
    return [[t.tolist() for t in layer] for layer in kept]


def nested(scores):
    return [s[0].tolist() for s in scores]


def check_invariants(kept, L, H_kv, n, w, sinks, k):
    assert len(kept) == L and all(len(layer) == H_kv for layer in kept)
    for layer in kept:
        for idx in layer:
            assert idx.dtype == torch.int64 and idx.dim() == 1
            lst = idx.tolist()
            assert lst == sorted(set(lst)), "indices must be sorted and unique"
            assert set(range(n - w, n)) <= set(lst), "the window must always be kept"
            assert set(range(sinks)) <= set(lst), "the sinks must always be kept"
            assert len(lst) >= w + sinks >= 0 and len(lst) > 0
    assert int(kept_counts(kept).sum()) == L * H_kv * k


# ---------------- budget ----------------

def test_resolve_budget_values():
    assert resolve_budget(0.05, 300, 8) == 15
    assert resolve_budget(0.2, 300, 32) == 60
    assert resolve_budget(1.0, 300, 32) == 300
    assert resolve_budget(40, 300, 32) == 40
    assert resolve_budget(12, 300, 8, sinks=4) == 12


@pytest.mark.parametrize("bad, exc, words", [
    (0, ValueError, ">= 1"), (-3, ValueError, ">= 1"), (0.0, ValueError, "(0, 1]"), (-0.1, ValueError, "(0, 1]"),
    (1.5, ValueError, "(0, 1]"), (float("nan"), ValueError, "(0, 1]"), (True, TypeError, "budget"),
    ("0.1", TypeError, "budget"), (301, ValueError, "exceeds"),
    (0.01, ValueError, "window"), (5, ValueError, "window"), (1, ValueError, "did you mean 1.0")])
def test_resolve_budget_errors(bad, exc, words):
    with pytest.raises(exc, match=None) as err:
        resolve_budget(bad, 300, 8)
    assert words in str(err.value)


def test_budget_below_window_plus_sinks():
    with pytest.raises(ValueError, match="sink"):
        resolve_budget(10, 300, 8, sinks=4)


# ---------------- pooling ----------------

def naive_pool(row, kernel, w, mode="avg"):
    """Pool the n - w candidates: the max of the span, or its sum over the kernel size (zero padding
    counted, as F.avg_pool1d does by default)."""
    n, r = len(row), kernel // 2
    if kernel <= 1:
        return list(row)
    m = n - w
    spans = [row[max(0, j - r): min(m, j + r + 1)] for j in range(m)]
    pooled = [max(x) for x in spans] if mode == "max" else [math.fsum(x) / kernel for x in spans]
    return pooled + list(row[m:])


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kernel", [0, 1, 3, 7])
@pytest.mark.parametrize("w", [0, 8])
def test_pool_matches_naive(kernel, w, mode):
    s = torch.randn(1, 3, 50)
    out = pool_scores(s, kernel, window=w, mode=mode)
    assert out.shape == s.shape
    for g in range(3):
        want = torch.tensor(naive_pool(s[0, g].double().tolist(), kernel, w, mode), dtype=torch.float64)
        assert torch.allclose(out[0, g].double(), want, rtol=0, atol=1e-6)


def test_average_pooling_edges_by_hand():
    """Kernel 7 over candidates 1, 2, .., 10 (window of 3 left as it is): zero padding counts, so the
    first candidate averages 1 + 2 + 3 + 4 over 7 and the last 7 + 8 + 9 + 10 over 7; the window's
    large scores do not leak into the candidates before it."""
    s = torch.tensor([[[1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 100., 200., 300.]]])
    out = pool_scores(s, 7, window=3, mode="avg")[0, 0].tolist()
    want = [10 / 7, 15 / 7, 21 / 7, 28 / 7, 35 / 7, 42 / 7, 49 / 7, 45 / 7, 40 / 7, 34 / 7, 100, 200, 300]
    assert out == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        pool_scores(s, 7, window=3, mode="mean")


@pytest.mark.parametrize("bad", [2, 6, -1, 1.5, True])
def test_pool_bad_kernel(bad):
    with pytest.raises(ValueError, match="kernel"):
        pool_scores(torch.randn(1, 2, 20), bad)


# ---------------- rules on random scores (with many ties) ----------------

def tie_scores(L=3, H=3, n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 6, (1, H, n), generator=g).float() for _ in range(L)]  # quantised: lots of ties


@pytest.mark.parametrize("k, w, sinks", [(20, 8, 0), (20, 8, 3), (8, 8, 0), (60, 4, 2), (120, 8, 0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rules_match_naive_with_ties(k, w, sinks, seed):
    scores = tie_scores(seed=seed)
    S, L, H, n = nested(scores), 3, 3, 120
    cases = [
        (select_uniform(scores, k, w, sinks=sinks), naive_uniform(S, k, w, sinks)),
        (select_pyramid(scores, k, w, sinks=sinks), naive_pyramid(S, k, w, sinks)),
        (select_pyramid(scores, k, w, sinks=sinks, beta=3), naive_pyramid(S, k, w, sinks, beta=3)),
        (select_adakv(scores, k, w, sinks=sinks), naive_adakv(S, k, w, sinks)),
        (select_adakv(scores, k, w, sinks=sinks, alpha=0.5), naive_adakv(S, k, w, sinks, alpha=0.5)),
        (select_model(scores, k, w, sinks=sinks), naive_model(S, k, w, sinks)),
        (select_scope(scores, k, w, selection="layer", sinks=sinks), naive_adakv(S, k, w, sinks, alpha=0.0)),
        (select_scope(scores, k, w, selection="head", sinks=sinks), naive_uniform(S, k, w, sinks)),
        (select_scope(scores, k, w, sinks=sinks), naive_model(S, k, w, sinks)),
        (select_model(scores, k, w, sinks=sinks, floor=0.2), naive_model(S, k, w, sinks, floor=0.2)),
        (select_scope(scores, k, w, sinks=sinks, floor=0.5), naive_model(S, k, w, sinks, floor=0.5)),
        (select_scope(scores, k, w, selection="layer", sinks=sinks, floor=0.5), naive_adakv(S, k, w, sinks, 0.5)),
    ]
    weights = [torch.rand(1, H, n) for _ in range(L)]
    key2 = [(s.float() / w + 1e-4) * wt.float() for s, wt in zip(scores, weights)]
    cases.append((select_criticalkv(scores, k, w, weights=weights, sinks=sinks),
                  naive_criticalkv(S, nested(key2), k, w, sinks)))
    for got, want in cases:
        assert as_lists(got) == want
        check_invariants(got, L, H, n, w, sinks, k)


def test_criticalkv_stage2_weighs_the_window_mean():
    """eps = 1e-4 is calibrated for the window MEAN (the authors' SnapKV score is a mean): on window
    sums whose mean is of the order of eps, the mean and the sum select differently; ours is the mean."""
    g = torch.Generator().manual_seed(3)
    L, H, n, w, k = 2, 3, 200, 16, 40
    scores = [torch.rand(1, H, n, generator=g) * 2e-3 for _ in range(L)]  # sums over 16 queries: means ~ 6e-5
    weights = [torch.rand(1, H, n, generator=g) for _ in range(L)]
    mean_key = [(s / w + 1e-4) * wt for s, wt in zip(scores, weights)]
    sum_key = [(s + 1e-4) * wt for s, wt in zip(scores, weights)]
    got = as_lists(select_criticalkv(scores, k, w, weights=weights))
    assert got == naive_criticalkv(nested(scores), nested(mean_key), k, w)
    assert got != naive_criticalkv(nested(scores), nested(sum_key), k, w)


def test_pyramid_budgets_reference_formula():
    # KVCache-Factory: min = free // beta, max = 2 free - min, step = (max - min) // (L - 1)
    assert pyramid_budgets(100, 3, 1000, 20) == [195, 100, 5]
    assert pyramid_budgets(100, 3, 150, 20) == [150, 100, 50]  # max clamped to what a head can hold
    b = pyramid_budgets(37, 7, 500, 20)
    assert sum(b) == 7 * 37 and b == sorted(b, reverse=True) and min(b) >= 0
    assert pyramid_budgets(10, 1, 20) == [10]
    for free, L, room in [(0, 4, 10), (10, 4, 10), (13, 5, 20), (3, 32, 1000)]:
        b = pyramid_budgets(free, L, room)
        assert sum(b) == L * free and all(0 <= x <= room for x in b)
        assert b == naive_pyramid_budgets(free, L, room, 20)
    with pytest.raises(ValueError, match="beta"):
        pyramid_budgets(10, 3, 100, beta=0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_floor_bounds_model_wide_selection(seed):
    """floor=0 is plain model-wide selection and floor=1 the uniform per-head budget; in between,
    every head keeps at least its window + floor(alpha * (k - window)) and the total stays exact."""
    g = torch.Generator().manual_seed(seed)
    L, H, n, w, k = 4, 3, 150, 8, 30
    # one concentrated head per layer (a few large scores, a tiny tail): a global cut starves it
    scores = [torch.rand(1, H, n, generator=g) for _ in range(L)]
    for s in scores:
        s[0, 0] *= 1e-3
        s[0, 0, :5] = 10.0
    assert as_lists(select_model(scores, k, w, floor=0.0)) == as_lists(select_model(scores, k, w))
    assert as_lists(select_model(scores, k, w, floor=1.0)) == as_lists(select_uniform(scores, k, w))
    starved = kept_counts(select_model(scores, k, w))[:, 0]
    assert (starved == w + 5).all()  # window + its 5 large scores, nothing of its tail
    for alpha in (0.2, 0.5):
        kept = select_model(scores, k, w, floor=alpha)
        counts = kept_counts(kept)
        assert (counts >= w + math.floor(alpha * (k - w))).all()
        assert int(counts.sum()) == L * H * k
        assert (counts[:, 0] == starved.clamp_min(w + math.floor(alpha * (k - w)))).all()  # its tail: just the floor
    with pytest.raises(ValueError, match="floor"):
        select_model(scores, k, w, floor=1.5)


def test_rule_errors():
    scores = tie_scores()
    with pytest.raises(ValueError, match="window"):
        select_uniform(scores, 5, 8)  # k below the window
    with pytest.raises(ValueError, match="selection"):
        select_scope(scores, 20, 8, selection="global")
    with pytest.raises(ValueError, match="alpha"):
        select_adakv(scores, 20, 8, alpha=1.5)
    with pytest.raises(ValueError, match="NaN"):
        select_uniform([torch.full((1, 3, 120), float("nan"))], 20, 8)
    with pytest.raises(ValueError, match="shape"):
        select_model([torch.rand(1, 3, 120), torch.rand(1, 2, 120)], 20, 8)


# ---------------- every registered method, end to end, vs the naive rule ----------------

NAIVE = {
    select_uniform: lambda S, k, w, f, p: naive_uniform(S, k, w, f["sinks"]),
    select_pyramid: lambda S, k, w, f, p: naive_pyramid(S, k, w, f["sinks"], f["beta"]),
    select_adakv: lambda S, k, w, f, p: naive_adakv(S, k, w, f["sinks"], f["alpha"]),
    select_scope: lambda S, k, w, f, p: naive_model(S, k, w, f["sinks"], f["floor"]),
}

CONFIGS = {  # name: (prefill kwargs, budgets that fit above the window)
    "gqa3_w8": (dict(H_kv=2, n=1300, w=8, seed=1), [0.01, 0.05, 0.2]),
    "gqa2_w32": (dict(H_kv=3, n=330, w=32, seed=2), [0.2]),
}
_PREFILLS = {}


def prefill_for(name):
    if name not in _PREFILLS:
        _PREFILLS[name] = make_prefill(**CONFIGS[name][0])
    return _PREFILLS[name]


@pytest.mark.parametrize("method", [m for m in methods.METHODS if m != "full"])
@pytest.mark.parametrize("config, budget", [(c, b) for c, (_, bs) in CONFIGS.items() for b in bs])
def test_method_matches_naive(method, config, budget):
    p = prefill_for(config)
    m = methods.METHODS[method]
    L, H_kv, n, w = p.n_layers, p.n_kv_heads, p.n, p.window
    kept = select(p, method, budget)
    k = round(budget * n)
    scores = method_scores(p, method)  # the method's own scores, pooled
    S = nested(scores)
    flags = m.select_flags
    if method == "criticalkv":
        key2 = [(s / w + flags["eps"]) * wt for s, wt in zip(scores, baselines.projected_value_l1(p))]
        want = naive_criticalkv(S, nested(key2), k, w, flags["sinks"], flags["alpha"], flags["first_stage"])
    else:
        want = NAIVE[m.rule](S, k, w, flags, p)
    assert as_lists(kept) == want
    check_invariants(kept, L, H_kv, n, w, flags["sinks"], k)
    achieved = float(kept_counts(kept).sum()) / (L * H_kv * n)
    assert abs(achieved - budget) <= 0.5 / n + 1e-12


# ---------------- the paper's LaProx and the pooled baselines' defaults, from scratch in float64 ----------------

def window_attention64(q, K, w):
    """q (w, D), K (n, D) float64 -> (w, n) causal softmax of the window rows (row t at n - w + t)."""
    n, D = K.shape
    logits = q @ K.T / math.sqrt(D)
    for t in range(w):
        logits[t, n - w + t + 1:] = -math.inf
    return torch.softmax(logits, dim=-1)


def avg_pool7(row):
    """Kernel 7, stride 1, zero padding counted, over a list of candidates."""
    m = len(row)
    return [math.fsum(row[max(0, j - 3): min(m, j + 4)]) / 7 for j in range(m)]


def paper_laprox_shares(p):
    """Algorithms 1-2 with Appendix A: per query head ||A_h[:, j]|| * ||W_O^h v_j||, the group mean,
    average pooling of the candidates, divided by the layer's candidate sum. [l][g][j], j < n - w."""
    H, H_kv, n, w, D = p.n_heads, p.n_kv_heads, p.n, p.window, p.head_dim
    G, out = H // H_kv, []
    for l in range(p.n_layers):
        q, K, V, Wo = (t.double() for t in (p.queries[l][0], p.keys[l][0], p.values[l][0], p.o_proj[l]))
        rows = []
        for g in range(H_kv):
            per = torch.zeros(n, dtype=torch.float64)
            for h in range(g * G, (g + 1) * G):
                A = window_attention64(q[h], K[g], w)
                u = V[g] @ Wo[:, h * D:(h + 1) * D].T          # (n, d): value j through head h's o_proj rows
                per += A.norm(dim=0) * u.norm(dim=1)
            rows.append(avg_pool7((per / G)[: n - w].tolist()))
        mass = math.fsum(x for r in rows for x in r)
        out.append([[x / mass for x in r] for r in rows])
    return out


def kept_from_choice(chosen, L, H_kv, n, w):
    return [[sorted({j for (l2, g2, j) in chosen if (l2, g2) == (l, g)} | set(range(n - w, n))) for g in range(H_kv)]
            for l in range(L)]


def assert_equal_up_to_cut_ties(got, want, share, cut, rel=1e-5):
    """Kept sets equal, except entries whose float64 score is within rel of the cut (float ties)."""
    differ = [(l, g, j) for l in range(len(got)) for g in range(len(got[l]))
              for j in set(got[l][g]) ^ set(want[l][g])]
    assert len(differ) <= 4, differ
    for l, g, j in differ:
        assert abs(share(l, g, j) - cut(l, g)) <= rel * abs(cut(l, g)), (l, g, j)


@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_laprox_default_is_the_papers_algorithm(budget):
    p = make_prefill(L=3, H=6, H_kv=2, n=300, w=8, seed=7)
    L, H_kv, n, w = p.n_layers, p.n_kv_heads, p.n, p.window
    S = paper_laprox_shares(p)
    k = round(budget * n)
    entries = sorted(((l, g, j) for l in range(L) for g in range(H_kv) for j in range(n - w)),
                     key=lambda e: (-S[e[0]][e[1]][e[2]], e))
    chosen = entries[: L * H_kv * (k - w)]                       # one top-K over the model's candidates
    want = kept_from_choice(set(chosen), L, H_kv, n, w)
    got = as_lists(select(p, "laprox", budget))
    cut = S[chosen[-1][0]][chosen[-1][1]][chosen[-1][2]]
    assert_equal_up_to_cut_ties(got, want, lambda l, g, j: S[l][g][j], lambda l, g: cut)
    assert len({(l, g) for l, g, _ in chosen}) > 1 and kept_counts(select(p, "laprox", budget)).unique().numel() > 1


@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_snapkv_default_is_the_papers_setting(budget):
    """SnapKV under the LaProx paper's Appendix A: window attention summed over the window queries,
    the group mean, average pooling (kernel 7) of the candidates, per-head top-k beyond the window."""
    p = make_prefill(L=2, H=6, H_kv=2, n=300, w=8, seed=8)
    H, H_kv, n, w = p.n_heads, p.n_kv_heads, p.n, p.window
    G, k = H // H_kv, round(budget * n)
    want, pooled = [], {}
    for l in range(p.n_layers):
        q, K = p.queries[l][0].double(), p.keys[l][0].double()
        heads = []
        for g in range(H_kv):
            a = sum(window_attention64(q[h], K[g], w).sum(0) for h in range(g * G, (g + 1) * G)) / G
            pooled[l, g] = row = avg_pool7(a[: n - w].tolist())
            top = sorted(range(n - w), key=lambda j: (-row[j], j))[: k - w]
            heads.append(sorted(set(top) | set(range(n - w, n))))
        want.append(heads)
    cut = lambda l, g: sorted(pooled[l, g], reverse=True)[k - w - 1]
    assert_equal_up_to_cut_ties(as_lists(select(p, "snapkv", budget)), want, lambda l, g, j: pooled[l, g][j], cut)


def test_below_window_budgets_raise_for_every_method():
    p = prefill_for("gqa2_w32")  # n = 330, w = 32: 0.05 keeps 16 < 32
    for method in methods.METHODS:
        if method == "full":
            continue
        with pytest.raises(ValueError, match="window"):
            select(p, method, 0.05)


def test_select_flags_and_methods():
    p = make_prefill(n=200, w=8)
    with pytest.raises(ValueError, match="known methods: .*snapkv.*laprox"):
        select(p, "snap-kv", 0.2)
    with pytest.raises(ValueError, match="unknown flag 'kernel'"):
        select(p, "snapkv", 0.2, kernel=7)
    with pytest.raises(ValueError, match="window is fixed by the prefill"):
        select(p, "snapkv", 0.2, window=16)
    full = select(p, "full", 0.01)  # full ignores the budget
    assert all(idx.tolist() == list(range(200)) for layer in full for idx in layer)
    # flags reach the scorer, the rule and the pooling
    a = as_lists(select(p, "snapkv", 0.2, pool=0))
    assert a == naive_uniform(nested(baselines.snapkv_scorer(p)), 40, 8)
    assert as_lists(select(p, "laprox", 0.2, selection="head")) == naive_uniform(nested(method_scores(p, "laprox")), 40, 8)
    assert as_lists(select(p, "adakv", 0.2, alpha=1.0)) == as_lists(select(p, "snapkv", 0.2))
    assert as_lists(select(p, "random", 0.2, seed=3)) != as_lists(select(p, "random", 0.2, seed=4))
    s = as_lists(select(p, "streamingllm", 0.2, sinks=2))
    assert all(idx == [0, 1] + list(range(162, 200)) for layer in s for idx in layer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selection_on_cuda_matches_cpu_rule():
    """Scores and kept indices stay on the prefill's device; the rule gives the same sets as on the CPU."""
    p = make_prefill(n=400, w=8, seed=3)
    pc = Prefill(**{f: ([t.cuda() for t in v] if isinstance(v, list) else v.cuda() if torch.is_tensor(v) else v)
                    for f, v in vars(p).items()})
    for method in [m for m in methods.METHODS if m != "full"]:
        m = methods.METHODS[method]
        kept = select(pc, method, 0.1)
        assert all(idx.is_cuda for layer in kept for idx in layer)
        scores = [s.cpu() for s in method_scores(pc, method)]
        extra = {} if m.weights is None else {"weights": [t.cpu() for t in m.weights(pc)]}
        assert as_lists(kept) == as_lists(m.rule(scores, 40, 8, **m.select_flags, **extra)), method


def test_normalisation_moves_model_wide_budget_between_layers():
    """Model-wide LaProx selection: a layer whose residual stream is larger gets a smaller share
    under normalize="residual" (its scores are divided by that norm), "output" and "none" ignore
    the residual norm, "mass" ignores both (each layer's shares sum to 1), and the total is always
    the request."""
    p = make_prefill(L=3, H=6, H_kv=2, n=300, w=8, seed=5)
    p.resid_norm = torch.ones(3)
    counts = lambda **f: kept_counts(select(p, "laprox", 0.1, pool=0, **f)).sum(1)  # (L,) kept per layer
    base = counts(normalize="residual")
    assert torch.equal(base, counts(normalize="none"))  # all norms 1: same scores
    mass = counts()
    p.resid_norm = torch.tensor([1.0, 100.0, 1.0])
    shrunk = counts(normalize="residual")
    assert shrunk[1] < base[1] and shrunk[1] == 2 * 8  # only the window of its 2 heads is left
    assert shrunk.sum() == base.sum() == 3 * 2 * 30 and (shrunk[[0, 2]] >= base[[0, 2]]).all()
    assert torch.equal(counts(normalize="none"), base)
    p.out_norm = torch.tensor([1.0, 1.0, 0.01])  # a small output: its entries count 100x more
    assert counts(normalize="output")[2] > counts(normalize="none")[2]
    assert torch.equal(counts(), mass) and int(mass.sum()) == 3 * 2 * 30
    p.values[1] = p.values[1] * 1000.0  # a layer 1000x louder: its raw scores win, its shares do not move
    assert torch.equal(counts(), mass) and counts(normalize="none")[1] > mass[1]
