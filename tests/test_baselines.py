"""Each baseline scorer against a naive reference of its formula (explicit loops, math.exp softmax),
the registry, and compress end to end."""
import math

import pytest
import torch

import baselines
import methods
import test_selection
import laprox
from cache import POOLING_MODES, Prefill, check_pool_kernel, kept_counts
from lab.harness import parse_method
from methods import compress, select

L, H, D, d = 3, 6, 16, 48


def make_prefill(H_kv=2, n=60, w=8, seed=0, h2o=True) -> Prefill:
    return test_selection.make_prefill(L=L, H=H, H_kv=H_kv, n=n, w=w, D=D, d=d, seed=seed, h2o=h2o)


def naive_attention_row(p, l, h, i):
    """Softmax of window query i of head h over the keys it sees (0 .. n-w+i), by hand."""
    n, w, G = p.n, p.window, H // p.n_kv_heads
    q, keys = p.queries[l][0, h, i].tolist(), p.keys[l][0, h // G].tolist()
    seen = n - w + i + 1
    logits = [sum(a * b for a, b in zip(q, keys[j])) / math.sqrt(D) for j in range(seen)]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e] + [0.0] * (n - seen)


def close(got, want, tol=1e-5):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()


@pytest.mark.parametrize("H_kv", [2, 3])
def test_snapkv_scorer(H_kv):
    p = make_prefill(H_kv=H_kv)
    G = H // H_kv
    for l, s in enumerate(baselines.snapkv_scorer(p)):
        assert s.shape == (1, H_kv, p.n) and s.dtype == torch.float32
        want = []
        for g in range(H_kv):
            per_head = [[sum(col) for col in zip(*[naive_attention_row(p, l, h, i) for i in range(p.window)])]
                        for h in range(g * G, (g + 1) * G)]
            want.append([sum(c) / G for c in zip(*per_head)])
        close(s[0], want)


def test_tova_scorer():
    p = make_prefill(H_kv=3)
    for l, s in enumerate(baselines.tova_scorer(p)):
        rows = [naive_attention_row(p, l, h, p.window - 1) for h in range(H)]
        mean = [sum(c) / H for c in zip(*rows)]
        close(s[0], [mean] * 3)  # one choice, shared by every KV head


def test_h2o_scorer_and_missing():
    p = make_prefill(H_kv=2)
    for l, s in enumerate(baselines.h2o_scorer(p)):
        a = p.h2o[l][0].tolist()
        close(s[0], [[(a[3 * g][j] + a[3 * g + 1][j] + a[3 * g + 2][j]) / 3 for j in range(p.n)] for g in range(2)])
    with pytest.raises(ValueError, match="h2o=True"):
        baselines.h2o_scorer(make_prefill(h2o=False))
    with pytest.raises(ValueError, match="h2o=True"):
        select(make_prefill(h2o=False), "h2o", 0.5)


def test_knorm_scorer():
    p = make_prefill(H_kv=3)
    for l, s in enumerate(baselines.knorm_scorer(p)):
        k = p.keys[l][0].tolist()
        close(s[0], [[-math.sqrt(sum(x * x for x in k[g][j])) for j in range(p.n)] for g in range(3)])


def test_recency_and_streamingllm():
    p = make_prefill(n=100, w=8)
    for s in baselines.recency_scorer(p):
        assert s.shape == (1, 2, 100) and s[0, 1].tolist() == list(range(100))
    kept = select(p, "streamingllm", 0.2)  # 20 per head: sinks 0..3 and the 16 most recent
    assert all(idx.tolist() == [0, 1, 2, 3] + list(range(84, 100)) for layer in kept for idx in layer)


def test_random_scorer_seeded():
    p = make_prefill(n=100)
    a, b, c = baselines.random_scorer(p, seed=1), baselines.random_scorer(p, seed=1), baselines.random_scorer(p, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    assert all(x.shape == (1, 2, 100) and 0 <= x.min() and x.max() < 1 for x in a)
    with pytest.raises(ValueError, match="seed"):
        select(p, "random", 0.2, seed="x")


@pytest.mark.parametrize("H_kv", [2, 3])
def test_projected_value_l1(H_kv):
    p = make_prefill(H_kv=H_kv, n=20)
    G = H // H_kv
    for l, s in enumerate(baselines.projected_value_l1(p)):
        W, V = p.o_proj[l].tolist(), p.values[l][0].tolist()  # o_proj (d, H*D): y = W @ concat(heads)
        want = []
        for g in range(H_kv):
            row = []
            for j in range(p.n):
                l1 = [sum(abs(sum(W[r][h * D + c] * V[g][j][c] for c in range(D))) for r in range(d))
                      for h in range(g * G, (g + 1) * G)]
                row.append(sum(l1) / G)
            want.append(row)
        close(s[0], want, tol=1e-4)


def test_group_mean_rejects_bad_groups():
    with pytest.raises(ValueError, match="multiple"):
        baselines.group_mean(torch.rand(1, 6, 10), 4)


# The paper's default and the baselines the README lists: a registry may hold more (docs/add-a-method.md).
DOCUMENTED = {"full", "laprox", "random", "streamingllm", "h2o", "tova", "knorm", "snapkv", "pyramidkv", "adakv",
              "criticalkv"}


def test_registry():
    """Every entry well formed, the documented methods present with their defaults; the set is not frozen:
    test_house runs this test again after adding the guide's method."""
    assert DOCUMENTED <= set(methods.METHODS), f"missing: {DOCUMENTED - set(methods.METHODS)}"
    for name, m in methods.METHODS.items():
        assert isinstance(m, methods.Method) and parse_method(name) == (name, {}), name
        assert (m.scorer is None) == (m.rule is None) == (name == "full"), f"{name}: a scorer needs a rule"
        assert all(isinstance(f, dict) and all(isinstance(k, str) for k in f) for f in (m.score_flags, m.select_flags))
        assert not set(m.score_flags) & set(m.select_flags), f"{name}: a flag goes to the scorer or the rule"
        assert all(callable(f) for f in (m.scorer, m.rule, m.weights) if f is not None), name
        check_pool_kernel(m.pool)
        assert m.pooling in POOLING_MODES and m.normalize in (None, *laprox.NORMALIZE_MODES), name
    lp = methods.METHODS["laprox"]
    assert lp.scorer is laprox.laprox_scorer and (lp.pool, lp.pooling, lp.normalize) == (7, "avg", "mass")
    assert lp.select_flags == {"selection": "model", "sinks": 0, "floor": 0.0} and lp.score_flags["group"] == "sum"
    for name in ("snapkv", "pyramidkv", "adakv", "criticalkv"):  # the LaProx paper's Appendix A
        m = methods.METHODS[name]
        assert m.scorer is baselines.snapkv_scorer and (m.pool, m.pooling, m.normalize) == (7, "avg", None)
    for name in ("random", "streamingllm", "h2o", "tova", "knorm"):  # unpooled, as before
        assert methods.METHODS[name].pool == 0
    assert methods.METHODS["pyramidkv"].select_flags["beta"] == 20
    assert methods.METHODS["adakv"].select_flags["alpha"] == 0.2
    assert methods.METHODS["streamingllm"].select_flags["sinks"] == 4
    assert methods.METHODS["criticalkv"].weights is baselines.projected_value_l1


def test_laprox_flags_reach_the_scorer():
    p = make_prefill(n=120)
    a = methods.method_scores(p, "laprox", pool=0, normalize="residual")
    b = methods.method_scores(p, "laprox", pool=0, normalize="none")
    ratio = [(x / y).mean().item() for x, y in zip(a, b)]
    close(ratio, (1 / p.resid_norm).tolist(), tol=1e-4)
    mass = methods.method_scores(p, "laprox")  # pooled, then each layer's candidates sum to 1
    close([s[..., : p.n - p.window].double().sum().item() for s in mass], [1.0] * len(mass), tol=1e-5)
    assert methods.resolved_flags("laprox", {"floor": 0}) == {
        "group": "sum", "center": False, "use_triton": None, "selection": "model", "sinks": 0, "floor": 0.0,
        "pool": 7, "pooling": "avg", "normalize": "mass"}
    with pytest.raises(ValueError, match="normalize"):
        select(p, "laprox", 0.2, normalize="bogus")


@pytest.mark.parametrize("method", ["snapkv", "laprox", "pyramidkv", "full"])
def test_compress_builds_the_kept_cache(method):
    p = make_prefill(n=200, w=8)
    c = compress(p, method, 0.1)
    kept = select(p, method, 0.1)
    assert torch.equal(c.lengths, kept_counts(kept))
    assert abs(c.kept_fraction() - (1.0 if method == "full" else 0.1)) < 1e-9
    for l in range(L):
        for g in range(2):
            k, v = c.head(l, g)
            assert torch.equal(k, p.keys[l][0, g, kept[l][g]]) and torch.equal(v, p.values[l][0, g, kept[l][g]])
    with pytest.raises(ValueError, match="unknown flag"):
        compress(p, method, 0.1, bogus=1)
