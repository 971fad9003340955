"""laprox.py: the paper's score (paper_scores) and the variants' reference against naive float64 loops,
the paper's method against the registry, the fast paths against both.

The naive references never call laprox: attention is a per-row softmax loop, T_{g,j} is built
from outer products, and its Frobenius norm is taken directly (docs/derivation.md, steps (3)-(5)).
laprox.reference_scores is checked against them in float64; each optimisation (M kept on the
weight, the chunked pair GEMM; the Triton kernels in test_kernels.py) against the reference.
"""
import gc
import math
import weakref
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import laprox  # noqa: E402

F64 = torch.float64


# ------------------------------------------------------------------ random layers

def make_layer(seed, B=1, H_kv=2, G=1, w=8, n=67, D=64, d=48, q_scale=1.5, dtype=torch.float32):
    """Random layer: queries (B, H, w, D), keys/values (B, H_kv, n, D) in `dtype`, o_proj (d, H*D) float32."""
    gen = torch.Generator().manual_seed(seed)
    H = H_kv * G
    q = torch.randn(B, H, w, D, generator=gen) * q_scale
    k = torch.randn(B, H_kv, n, D, generator=gen)
    v = torch.randn(B, H_kv, n, D, generator=gen) + 0.3       # non-zero mean: centring matters
    o = torch.randn(d, H * D, generator=gen) / math.sqrt(H * D)
    return q.to(dtype), k.to(dtype), v.to(dtype), o


def reference64(q, k, v, o, **flags):
    """laprox.reference_scores on float64 copies of the inputs: what every fast path is held to."""
    return laprox.reference_scores(q.double(), k.double(), v.double(), o.double(), **flags)


# ---------------------------------------------------------------- naive references

def naive_attention(q, k):
    """q (H, w, D), k (H_kv, n, D) -> (H, w, n) float64, one softmax row at a time."""
    q, k = q.to(F64), k.to(F64)
    H, w, D = q.shape
    H_kv, n, _ = k.shape
    G = H // H_kv
    A = torch.zeros(H, w, n, dtype=F64)
    for h in range(H):
        for t in range(w):
            last = n - w + t                                   # causal: keys 0..last
            logits = (k[h // G, : last + 1] @ q[h, t]) / math.sqrt(D)
            m = logits.max()
            e = torch.exp(logits - m)
            A[h, t, : last + 1] = e / e.sum()
    return A


def head_weight(o, h, D):
    """W_h (d, D): the columns of o_proj that head h writes through."""
    return o.to(F64)[:, h * D:(h + 1) * D]


def naive_terms(q, k, v, o):
    """All T_{g,j} (w x d) of batch element 0 as a dict {(g, j): T}, float64."""
    H, w, D = q.shape
    H_kv, n, _ = k.shape
    G = H // H_kv
    A = naive_attention(q, k)
    V = v.to(F64)
    T = {}
    for g in range(H_kv):
        for j in range(n):
            t_gj = torch.zeros(w, o.shape[0], dtype=F64)
            for a in range(G):
                h = g * G + a
                u = head_weight(o, h, D) @ V[g, j]             # projected value u_{h,j} (d,)
                t_gj += torch.outer(A[h, :, j], u)
            T[g, j] = t_gj
    return T, A


def naive_scores(q, k, v, o, group="exact", center=False):
    """(B, H_kv, n) float64 scores straight from the definitions."""
    B, H, w, D = q.shape
    _, H_kv, n, _ = k.shape
    G = H // H_kv
    out = torch.zeros(B, H_kv, n, dtype=F64)
    for b in range(B):
        A = naive_attention(q[b], k[b])
        V = v[b].to(F64)
        U = [V[h // G] @ head_weight(o, h, D).T for h in range(H)]     # (n, d) per head
        O = [A[h] @ U[h] for h in range(H)]                            # (w, d) head outputs o_{h,t}
        for g in range(H_kv):
            for j in range(n):
                parts = []
                for a in range(G):
                    h = g * G + a
                    if center:   # sum_t p_{h,t,j} e_t (u_{h,j} - o_{h,t})^T
                        parts.append(A[h, :, j, None] * (U[h][j][None, :] - O[h]))
                    else:        # a_{h,j} u_{h,j}^T
                        parts.append(torch.outer(A[h, :, j], U[h][j]))
                if group == "exact":
                    out[b, g, j] = torch.linalg.norm(sum(parts))
                else:
                    out[b, g, j] = sum(torch.linalg.norm(p) for p in parts)
    return out


def assert_scores_close(got, ref, rtol=1e-4):
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    err = (got.double() - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), f"max abs err {err:.3e} vs max {ref.abs().max().item():.3e}"


# ---------------------------------------------------------------------- the tests

SHAPES = [  # (G, H_kv, D, n, w, B)
    (1, 3, 64, 67, 8, 1),      # MHA
    (1, 2, 128, 131, 32, 1),
    (2, 2, 64, 131, 32, 1),
    (3, 2, 128, 67, 8, 2),
    (4, 1, 64, 67, 32, 1),
    (7, 1, 128, 67, 5, 1),
    (7, 2, 64, 41, 16, 1),
]


# ------------------------------------------------------------- the paper's method, literally

@pytest.mark.parametrize("G,H_kv,D,n,w,B", SHAPES)
def test_paper_scores_match_naive_loops_in_float64(G, H_kv, D, n, w, B):
    """The literal score (per head ||A_h[:, j]|| ||W_O^h v_j||, summed over the group) against the
    per-head outer products of naive_scores, and the variants' reference (group="sum") against it."""
    q, k, v, o = make_layer(seed=G * 31 + D + n, B=B, H_kv=H_kv, G=G, w=w, n=n, D=D)
    got = laprox.paper_scores(q.double(), k.double(), v.double(), o.double())
    ref = naive_scores(q, k, v, o, group="sum")
    assert got.dtype == F64 and got.shape == ref.shape and ref.min() > 0
    assert (got - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert (reference64(q, k, v, o, group="sum") - got).abs().max() <= 1e-10 * got.abs().max()


@pytest.mark.parametrize("G,H_kv,D,n,w,B", [SHAPES[0], SHAPES[3], SHAPES[6]])
def test_fast_paths_match_paper_scores(G, H_kv, D, n, w, B):
    """What runs (the chunked pair GEMM, through the dispatch and the Prefill scorer) is the paper's
    score in float32; group="exact" equals it for MHA and stays under it for GQA (the triangle
    inequality of derivation.md (5)); center moves it."""
    q, k, v, o = make_layer(seed=G * 7 + n, B=B, H_kv=H_kv, G=G, w=w, n=n, D=D)
    paper = laprox.paper_scores(q.double(), k.double(), v.double(), o.double())
    for chunk in (5, None):
        assert_scores_close(laprox.laprox_scores(q, k, v, o, key_chunk=chunk), paper)
    assert_scores_close(laprox.laprox_scores_auto(q, k, v, o), paper)
    if B == 1:
        prefill = SimpleNamespace(queries=[q], keys=[k], values=[v], o_proj=[o])
        assert_scores_close(laprox.laprox_scorer(prefill)[0], paper)
    exact = laprox.laprox_scores(q, k, v, o, group="exact").double()
    assert (exact <= paper * (1 + 1e-5)).all() and (G > 1 or (exact - paper).abs().max() <= 1e-4 * paper.max())
    assert not torch.allclose(laprox.laprox_scores(q, k, v, o, center=True).double(), paper, rtol=1e-2)


def random_prefill(seed, L=3, H_kv=2, G=3, n=90, w=8, D=16, d=40):
    """A cache.Prefill of random layers (fresh inputs, no model)."""
    from cache import Prefill
    gen = torch.Generator().manual_seed(seed)
    H = H_kv * G
    return Prefill(keys=[torch.randn(1, H_kv, n, D, generator=gen) for _ in range(L)],
                   values=[torch.randn(1, H_kv, n, D, generator=gen) + 0.3 for _ in range(L)],
                   queries=[torch.randn(1, H, w, D, generator=gen) * 1.5 for _ in range(L)],
                   o_proj=[torch.randn(d, H * D, generator=gen) * (0.3 + l) for l in range(L)],
                   resid_norm=torch.rand(L, generator=gen) + 1, out_norm=torch.rand(L, generator=gen) + 1,
                   h2o=None, logits=torch.randn(1, 10, generator=gen), window=w)


@pytest.mark.parametrize("budget", [0.2, 0.5, 40])
def test_paper_method_is_what_the_registry_runs_and_reads_as_written(budget):
    """paper_method keeps exactly what methods.select(prefill, "laprox") keeps, and the same as a
    naive run of steps 1-7 on paper_scores: per-row average pooling, shares, one sort of the model."""
    import methods
    prefill = random_prefill(seed=int(budget * 10))
    got = laprox.paper_method(prefill, budget)
    registry = methods.select(prefill, "laprox", budget)
    assert [len(layer) for layer in got] == [len(layer) for layer in registry]
    assert all(torch.equal(a, b) for la, lb in zip(got, registry) for a, b in zip(la, lb))
    n, w = prefill.n, prefill.window
    k = round(budget * n) if isinstance(budget, float) else budget
    shares = []
    for q, key, v, o in zip(prefill.queries, prefill.keys, prefill.values, prefill.o_proj):
        s = laprox.paper_scores(q.double(), key.double(), v.double(), o.double())[0]   # (H_kv, n)
        pooled = s.clone()
        for j in range(n - w):   # kernel 7, zero padding counted, over the candidates only
            pooled[:, j] = s[:, max(0, j - 3):min(n - w, j + 4)].sum(-1) / 7
        shares.append(pooled / pooled[:, :n - w].sum())
    L, H_kv = len(shares), shares[0].shape[0]
    entries = sorted(((shares[l][g, j].item(), l, g, j) for l in range(L) for g in range(H_kv)
                      for j in range(n - w)), reverse=True)[:L * H_kv * (k - w)]
    want = {(l, g, j) for _, l, g, j in entries} | {(l, g, j) for l in range(L) for g in range(H_kv)
                                                     for j in range(n - w, n)}
    kept = {(l, g, j) for l in range(L) for g in range(H_kv) for j in got[l][g].tolist()}
    assert len(kept ^ want) <= 2, "the top-K may differ by a near-tie at its edge (float32 vs float64)"
    assert len(kept) == L * H_kv * k


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("group", ["sum", "exact"])
@pytest.mark.parametrize("G,H_kv,D,n,w,B", SHAPES)
def test_reference_matches_naive_loops_in_float64(G, H_kv, D, n, w, B, group, center):
    q, k, v, o = make_layer(seed=G * 100 + D + n, B=B, H_kv=H_kv, G=G, w=w, n=n, D=D)
    got = reference64(q, k, v, o, group=group, center=center)
    ref = naive_scores(q, k, v, o, group=group, center=center)
    assert got.dtype == F64 and got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert ref.min() > 0                                       # no key scores 0: nothing compared is trivial


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("group", ["sum", "exact"])
@pytest.mark.parametrize("G,H_kv,D,n,w,B", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[6]])
def test_pytorch_path_in_key_chunks_matches_the_reference(G, H_kv, D, n, w, B, group, center):
    """The chunked pair GEMM (optimisation 2), float32: chunks that do not divide n, one chunk, the default."""
    q, k, v, o = make_layer(seed=7 + G + n, B=B, H_kv=H_kv, G=G, w=w, n=n, D=D)
    ref = reference64(q, k, v, o, group=group, center=center)
    for chunk in (7, n, None):
        assert_scores_close(laprox.laprox_scores(q, k, v, o, group=group, center=center, key_chunk=chunk), ref)


@pytest.mark.parametrize("center", [False, True])
def test_group_sum_forms_only_the_diagonal_pairs(monkeypatch, center):
    """group="sum" forms the G diagonal pairs only (G D^2 per key for v^T M_hh v), "exact" all G(G+1)/2."""
    q, k, v, o = make_layer(seed=13, H_kv=2, G=3, w=8, n=20, D=64)
    formed = []   # (step, head pairs it was given), for every per-key step laprox_scores takes

    def spy(name, pairs_of):
        real = getattr(laprox, name)

        def wrapper(*args):
            formed.append((name, pairs_of(*args)))
            return real(*args)
        monkeypatch.setattr(laprox, name, wrapper)

    spy("attention_column_gram", lambda attn, n_kv_heads, pairs: pairs)
    spy("projected_value_gram", lambda values, M_pairs: M_pairs.shape[1])
    spy("centering_correction", lambda attn, values, Z, K, pairs: pairs)
    for group, pairs in (("sum", [(0, 0), (1, 1), (2, 2)]), ("exact", laprox.head_pairs(3))):
        formed.clear()
        laprox.laprox_scores(q, k, v, o, group=group, center=center)
        want = [("attention_column_gram", pairs), ("projected_value_gram", len(pairs))]
        assert formed == want + ([("centering_correction", pairs)] if center else [])


@pytest.mark.parametrize("G,H_kv,D,n,w,B", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]])
def test_group_sum_bounds_exact(G, H_kv, D, n, w, B):
    q, k, v, o = make_layer(seed=11 + G, B=B, H_kv=H_kv, G=G, w=w, n=n, D=D)
    s_sum = laprox.laprox_scores(q, k, v, o, group="sum")
    s_exact = laprox.laprox_scores(q, k, v, o, group="exact")
    assert (s_sum >= s_exact * (1 - 1e-5)).all()
    if G == 1:
        torch.testing.assert_close(s_sum, s_exact, rtol=1e-5, atol=1e-7)
    else:
        assert (s_sum > s_exact * (1 + 1e-4)).any()            # the bound is not tight for GQA


@pytest.mark.parametrize("group", ["exact", "sum"])
@pytest.mark.parametrize("G,H_kv,D,n,w,B", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]])
def test_center_changes_the_scores(G, H_kv, D, n, w, B, group):
    q, k, v, o = make_layer(seed=23 + G, B=B, H_kv=H_kv, G=G, w=w, n=n, D=D)
    got = laprox.laprox_scores(q, k, v, o, group=group, center=True)
    assert not torch.allclose(got, laprox.laprox_scores(q, k, v, o, group=group), rtol=1e-2)


def test_center_is_first_order_renormalised_eviction():
    """MHA: evicting key j and renormalising moves row t by p/(1-p) (o_t - u_j), so
    score_c <= ||Y - Y'_{-j}||_F <= score_c / (1 - max_t p_{t,j})."""
    q, k, v, o = make_layer(seed=5, H_kv=2, G=1, w=8, n=40, D=64)
    sc = laprox.laprox_scores(q, k, v, o, center=True)[0].double()
    q, k, v = q[0].to(F64), k[0].to(F64), v[0].to(F64)
    H, w, D = q.shape
    n = k.shape[1]
    A = naive_attention(q, k)
    for h in range(H):
        W = head_weight(o, h, D)
        Y = A[h] @ v[h] @ W.T
        for j in (0, 3, 17, n - w, n - 2, n - 1):
            logits = q[h] @ k[h].T / math.sqrt(D)
            vis = torch.arange(n)[None, :] <= (n - w + torch.arange(w))[:, None]
            vis[:, j] = False                                  # evict key j
            A2 = torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1)
            dY = torch.linalg.norm(Y - A2 @ v[h] @ W.T).item()
            pmax = A[h, :, j].max().item()
            s = sc[h, j].item()
            assert s <= dY * (1 + 1e-4) + 1e-9
            assert dY <= s / (1 - pmax) * (1 + 1e-4) + 1e-9


@pytest.mark.parametrize("G,H_kv,D,n,w", [(1, 2, 64, 67, 8), (3, 2, 64, 41, 8), (7, 1, 128, 37, 5)])
def test_error_bound_holds_for_random_subsets(G, H_kv, D, n, w):
    q, k, v, o = make_layer(seed=31 + G, H_kv=H_kv, G=G, w=w, n=n, D=D)
    T, A = naive_terms(q[0], k[0], v[0], o)
    # the decomposition (3): Y = sum_h A_h V_g W_O^h equals the sum of all T_{g,j}
    Y = sum(A[h] @ v[0, h // G].double() @ head_weight(o, h, D).T for h in range(H_kv * G))
    torch.testing.assert_close(sum(T.values()), Y, rtol=1e-10, atol=1e-10)
    scores = laprox.laprox_scores(q, k, v, o, group="exact")[0].double()
    gen = torch.Generator().manual_seed(G)
    for keep_frac in (0.1, 0.5, 0.9):
        for _ in range(5):
            keep = torch.rand(H_kv, n, generator=gen) < keep_frac
            Y_S = sum(T[g, j] for g in range(H_kv) for j in range(n) if keep[g, j])
            err = torch.linalg.norm(Y - Y_S).item()
            bound = scores[~keep].sum().item()
            assert err <= bound * (1 + 1e-5), (err, bound)


def test_window_attention_matches_naive_and_is_causal():
    q, k, _, _ = make_layer(seed=3, B=2, H_kv=2, G=3, w=8, n=30, D=64)
    A = laprox.window_attention(q, k)
    assert A.shape == (2, 6, 8, 30) and A.dtype == torch.float32
    for b in range(2):
        torch.testing.assert_close(A[b].double(), naive_attention(q[b], k[b]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 6, 8))
    for t in range(8):
        assert (A[:, :, t, 30 - 8 + t + 1:] == 0).all()


def test_value_gram_matrices_give_projected_value_dots():
    _, _, v, o = make_layer(seed=4, H_kv=2, G=3, D=64, n=10)
    M = laprox.value_gram_matrices(o, 6, 64, 2)
    assert M.shape == (2, 3, 3, 64, 64) and M.dtype == torch.float32
    for g in range(2):
        for a in range(3):
            for c in range(3):
                vj = v[0, g, 5].double()
                want = (head_weight(o, g * 3 + a, 64) @ vj) @ (head_weight(o, g * 3 + c, 64) @ vj)
                got = vj @ M[g, a, c].double() @ vj
                assert abs(got - want) <= 1e-4 * abs(want) + 1e-6


# ------------------------------------------------- optimisation 1: M once per weight, kept on it

def test_value_grams_are_computed_once_and_follow_the_weight():
    _, _, v, o = make_layer(seed=9, H_kv=2, G=3, w=8, n=20, D=64)
    o = torch.nn.Parameter(o, requires_grad=False)            # as model.py holds o_proj.weight
    M = laprox.value_gram_pairs(o, 6, 64, 2)
    assert M.shape == (2, 6, 64, 64) and M.dtype == torch.float32
    full = laprox.value_gram_matrices(o, 6, 64, 2)
    for p, (a, b) in enumerate(laprox.head_pairs(3)):
        torch.testing.assert_close(M[:, p], full[:, a, b])
    assert laprox.value_gram_pairs(o, 6, 64, 2) is M             # reused, not recomputed
    q, k, _, _ = make_layer(seed=9, H_kv=2, G=3, w=8, n=20, D=64)
    laprox.laprox_scores(q, k, v, o, group="exact")
    assert laprox.value_gram_pairs(o, 6, 64, 2) is M             # the scorer used the same one
    with torch.no_grad():
        o.mul_(1.5)                                               # in place: same tensor, same address
    M2 = laprox.value_gram_pairs(o, 6, 64, 2)
    assert M2 is not M
    torch.testing.assert_close(M2, 2.25 * M)
    assert_scores_close(laprox.laprox_scores(q, k, v, o, group="exact"), reference64(q, k, v, o.detach(), group="exact"))
    laprox.forget_value_grams(o)                                  # after a write through .data
    assert laprox.value_gram_pairs(o, 6, 64, 2) is not M2


@pytest.mark.parametrize("requires_grad", [False, True])
def test_value_grams_go_with_a_dropped_weight(requires_grad):
    """M lives on the weight, no registry beside it: dropping the weight drops M (also for a weight
    that requires grad: M is a constant, no graph ties it back to the weight)."""
    o = torch.nn.Parameter(torch.randn(40, 4 * 64), requires_grad=requires_grad)
    M = laprox.value_gram_pairs(o, 4, 64, 2)
    assert not M.requires_grad
    M = weakref.ref(M)
    assert M() is not None
    del o
    gc.collect()
    assert M() is None                                            # nothing stale is kept


def test_value_grams_live_on_the_models_weights_across_prompts():
    """A model's prefill hands the scorer its own o_proj weights: M is formed on the first prompt,
    kept on each layer's weight and reused by the next prompt (under inference_mode, as the
    harness scores)."""
    from model import Config, Model
    cfg = Config(model_type="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 hidden_dim=64)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    weights = [layer.attn.o_proj.weight for layer in model.layers]
    kept = []
    for seed in (0, 1):
        ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            prefill = model.prefill(ids, window=8)
            laprox.laprox_scorer(prefill)
        assert all(o is w for o, w in zip(prefill.o_proj, weights))      # the weights, not copies
        kept.append([getattr(w, laprox._GRAMS_ATTR)[1] for w in weights])  # what the scorer left on them
    assert all(a is b for a, b in zip(*kept))                              # formed once, reused


def test_low_precision_inputs_are_scored_in_float32():
    q, k, v, o = make_layer(seed=9, H_kv=2, G=2, n=33, D=64)
    bf = [t.to(torch.bfloat16) for t in (q, k, v, o)]
    got = laprox.laprox_scores(*bf)
    ref = laprox.laprox_scores(*[t.float() for t in bf])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_argument_checks():
    q, k, v, o = make_layer(seed=1, H_kv=2, G=2, w=8, n=20, D=64)
    with pytest.raises(ValueError, match="multiple"):
        laprox.laprox_scores(q[:, :3], k, v, o[:, :3 * 64])
    with pytest.raises(ValueError, match="group"):
        laprox.laprox_scores(q, k, v, o, group="mean")
    with pytest.raises(ValueError, match="o_proj_weight"):
        laprox.laprox_scores(q, k, v, o[:, :-1])
    with pytest.raises(ValueError, match="window"):
        laprox.laprox_scores(q, k[:, :, :4], v[:, :, :4], o)
    with pytest.raises(ValueError, match="same shape"):
        laprox.laprox_scores(q, k, v[:, :, :-1], o)
    with pytest.raises(ValueError, match="head dim"):
        laprox.laprox_scores(q, k[..., :32], v[..., :32], o)
    with pytest.raises(ValueError, match="pass use_triton=False"):
        laprox.laprox_scores_auto(q, k, v, o, center=True, use_triton=True)
    with pytest.raises(ValueError, match="use_triton"):
        laprox.laprox_scores_auto(q, k, v, o, use_triton="yes")
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match="key_chunk"):
            laprox.laprox_scores(q, k, v, o, key_chunk=bad)
    with pytest.raises(ValueError, match="group"):
        laprox.reference_scores(q, k, v, o, group="mean")
    with pytest.raises(ValueError, match="multiple"):
        laprox.reference_scores(q[:, :3], k, v, o[:, :3 * 64])
    with pytest.raises(ValueError, match="keep must be"):
        laprox.eviction_error(q, k, v, o, torch.ones(1, 2, 19, dtype=torch.bool))


def test_normalize_scores_modes():
    gen = torch.Generator().manual_seed(2)
    scores = [torch.rand(1, 2, 10, generator=gen) + 0.1 for _ in range(3)]
    resid = torch.tensor([2.0, 4.0, 8.0])
    out = torch.tensor([0.5, 1.0, 3.0])
    for mode, norms in (("residual", resid), ("output", out)):
        got = laprox.normalize_scores(scores, resid, out, mode)
        for s, g, nrm in zip(scores, got, norms):
            torch.testing.assert_close(g, s / nrm)
    got = laprox.normalize_scores(scores, resid, out, "none")
    for s, g in zip(scores, got):
        torch.testing.assert_close(g, s)
    got = laprox.normalize_scores(scores, resid, out, "mass", window=3)  # the paper's: shares of the candidates
    for s, g in zip(scores, got):
        candidates = s[..., :7].double()
        torch.testing.assert_close(g.double(), s.double() / candidates.sum(), rtol=1e-6, atol=0)
        assert abs(g[..., :7].double().sum().item() - 1.0) < 1e-6
    with pytest.raises(ValueError, match="normalize mode"):
        laprox.normalize_scores(scores, resid, out, "layer")
    with pytest.raises(ValueError, match="3 layers"):
        laprox.normalize_scores(scores, resid[:2], out, "residual")
    with pytest.raises(ValueError, match="> 0"):
        laprox.normalize_scores(scores, resid, torch.tensor([1.0, 0.0, 1.0]), "output")
    with pytest.raises(ValueError, match="window 11"):
        laprox.normalize_scores(scores, resid, out, "mass", window=11)


def test_laprox_scorer_on_a_prefill():
    """The scorer gives each layer's raw scores (the paper's group sum by default); the flags reach them."""
    layers = [make_layer(seed=40 + l, H_kv=2, G=3, w=8, n=35, D=64) for l in range(3)]
    prefill = SimpleNamespace(
        queries=[q for q, _, _, _ in layers], keys=[k for _, k, _, _ in layers],
        values=[v for _, _, v, _ in layers], o_proj=[o for _, _, _, o in layers])
    for group in ("sum", "exact"):
        got = laprox.laprox_scorer(prefill, group=group)
        assert len(got) == 3
        for (q, k, v, o), s in zip(layers, got):
            assert s.shape == (1, 2, 35) and s.dtype == torch.float32
            assert_scores_close(s, reference64(q, k, v, o, group=group))
    got = laprox.laprox_scorer(prefill, group="sum", center=True)
    assert_scores_close(got[1], reference64(*layers[1], group="sum", center=True))
    with pytest.raises(ValueError, match="group"):
        laprox.laprox_scorer(prefill, group="max")


@pytest.mark.parametrize("G,H_kv,D,n,w", [(1, 2, 64, 41, 8), (3, 2, 64, 67, 8), (4, 1, 128, 131, 5)])
def test_eviction_error_is_the_norm_of_the_evicted_terms(G, H_kv, D, n, w):
    """eviction_error == ||sum of evicted T_{g,j}||_F (naive), and it is <= the evicted scores' sum."""
    q, k, v, o = make_layer(seed=41 + G, H_kv=H_kv, G=G, w=w, n=n, D=D)
    T, _ = naive_terms(q[0], k[0], v[0], o)
    keep = torch.rand(1, H_kv, n, generator=torch.Generator().manual_seed(G)) < 0.4
    ref = torch.linalg.norm(sum(T[g, j] for g in range(H_kv) for j in range(n) if not keep[0, g, j])).item()
    got = laprox.eviction_error(q, k, v, o, keep)
    assert got.shape == (1,) and abs(got.item() - ref) <= 1e-4 * ref
    assert got.item() <= laprox.laprox_scores(q, k, v, o, group="exact")[~keep].sum().item() * (1 + 1e-5)


def test_laprox_beats_snapkv_on_the_bound_it_minimises_on_the_default_model(default_model):
    """On a real prompt, LaProx's kept set moves each layer's window output less than SnapKV's
    at the same per-layer budget (both unpooled) on most layers."""
    import bench
    from eval_niah import build_prompt, haystack_ids, read_haystack
    model, tok = default_model
    ids = build_prompt(tok, haystack_ids(tok, read_haystack(), 1600), 1500, 0.5)["ids"]
    with torch.no_grad():
        ours, snap = bench.compare_with_snapkv(model.prefill(torch.tensor([ids])), budget=0.05)
    won = int((ours < snap).sum())
    print(f"LaProx mean {ours.mean():.4f}, SnapKV mean {snap.mean():.4f}, LaProx smaller on {won}/{len(ours)} layers")
    assert won > len(ours) // 2 and ours.mean() < snap.mean()
