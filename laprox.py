"""LaProx: keep the KV entries whose eviction would move each layer's output least, model-wide.

Mai and Kim, "Reformulating KV Cache Eviction Problem for Long-Context LLM Inference", arXiv
2605.07234. This file reads top-down: the paper's method first (this derivation; its score written
literally, paper_scores; the whole method as one function, paper_method), then, below a marked
line, our variants and the fast paths, each tested against paper_scores. The derivations of our
variants, and the algebra of the fast paths, are in docs/derivation.md.

Setting. One decoder layer after the prefill of n prompt tokens. H query heads share H_kv KV heads,
G = H / H_kv query heads per KV head; query head h reads KV head g(h) = h // G. Head dim D, model
dim d. The observation window is the last w = 32 prompt tokens: their queries stand in for the
queries decoding will issue.

1. Window attention. A_h (w x n) is the softmax of q_t . k_j / sqrt(D) over the keys, causal:
   window row t (position n-w+t) sees keys 0 .. n-w+t. Column j, A_h[:, j], says how much each
   window query reads key j.
2. The layer's output splits into one term per entry. With W_O^h the D x d block of the output
   projection that head h writes through,
       Y = sum_h A_h V_{g(h)} W_O^h = sum_h sum_j A_h[:, j] (v_j W_O^h)        (w x d),
   a sum of rank-1 terms, one per query head h and key j (v_j is row j of V_{g(h)}).
3. Evicting an entry removes its terms (ignoring the softmax's renormalisation), and by the
   triangle inequality the output moves by at most the sum of the evicted terms' norms. A rank-1
   term's Frobenius norm is the product of its factors' norms, so the score of key j for query
   head h is (Algorithm 1)
       p_{h,j} = ||A_h[:, j]||_2 * ||W_O^h v_j||_2,
   and keeping the largest scores minimises the bound.
4. GQA (Appendix A). The G query heads of a KV head share its entries; the paper averages their
   p_{h,j} over the group. We sum them: G is the same in every layer, so the sum ranks exactly
   as the mean once step 6 divides each layer by its total.
5. Pooling (Appendix A). Each KV head's scores are smoothed by average pooling, kernel 7, over
   the candidates (the n - w tokens before the window; zero padding counted), so that the tokens
   around an important one are kept with it.
6. Across layers (Algorithm 2). Scores of different layers are in units of different outputs,
   whose norms differ by orders of magnitude. Each layer's pooled scores are divided by their sum
   over that layer's candidates and KV heads: a score becomes the entry's share of its layer's
   bound, and keeping the largest shares model-wide minimises the sum over layers of each
   layer's bound relative to its size.
7. Selection (Algorithm 2). The budget is k = round(budget * n) entries per KV head on average,
   the window included: the window is always kept, and one top-K over the whole model's
   candidates, K = L * H_kv * (k - w), picks the rest. Layers and heads keep unequal shares: a
   layer whose mass sits on a few entries gives the rest of its budget to the others.

Shapes: queries (B, H, w, D), keys and values (B, H_kv, n, D), the o_proj weight (d, H*D) as
nn.Linear stores it (head h writes through its columns h*D:(h+1)*D: W_O^h is their transpose);
scores (B, H_kv, n), higher = keep, float32 (float64 for float64 inputs, as the tests use).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from cache import pool_scores, resolve_budget, select_model


# ===================================================================== the paper's method

def window_attention(queries, keys, dtype=torch.float32):
    """Softmax attention of the window queries over all keys, step (1).

    queries: (B, H, w, D) post-RoPE queries of the last w prompt tokens.
    keys:    (B, H_kv, n, D) post-RoPE keys of the whole prompt.
    Returns  (B, H, w, n) in `dtype` (float32; the reference passes float64 for float64 inputs).
    Window row i (absolute position n-w+i) sees keys 0 .. n-w+i; scale 1/sqrt(D); query head h
    reads KV head h // G. This is the one place the window attention is computed (baselines reuse it).
    """
    B, H, H_kv, G, w, n, D = check_qkv(queries, keys, keys)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the window attention is computed in float32 or float64, not {dtype}")
    q = queries.to(dtype).reshape(B, H_kv, G * w, D) / math.sqrt(D)  # the group's rows side by side
    logits = torch.matmul(q, keys.to(dtype).transpose(-1, -2))       # (B, H_kv, G*w, n)
    logits = logits.view(B, H_kv, G, w, n)
    # causal inside the window: row i (position n-w+i) must not see the window keys after it;
    # only the last w columns can be in the future, so only they are masked
    future = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., n - w:].masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(B, H, w, n)


def paper_scores(queries, keys, values, o_proj_weight):
    """Steps 3-4 as written: p_{h,j} = ||A_h[:, j]||_2 * ||W_O^h v_j||_2 per query head, summed over
    the G query heads of each KV head. The reference every fast path is tested against; it forms
    the projected values (B, H, n, d), so it is meant for small inputs.

    queries: (B, H, w, D); keys, values: (B, H_kv, n, D); o_proj_weight: (d, H*D). Returns (B, H_kv, n).
    """
    B, H, w, D = queries.shape
    G = H // keys.shape[1]
    dtype = _compute_dtype(queries, keys, values, o_proj_weight)
    A = window_attention(queries, keys, dtype)                        # (B, H, w, n)      step 1
    W_O = o_proj_weight.to(dtype).T.reshape(H, D, -1)                 # W_O[h] = W_O^h    (H, D, d)
    V = values.to(dtype).repeat_interleave(G, dim=1)                  # v_j as head h reads it (B, H, n, D)
    p = A.norm(dim=2) * (V @ W_O).norm(dim=-1)                        # p_{h,j}  (B, H, n) step 3
    return p.view(B, H // G, G, -1).sum(2)                            # over the group   step 4


def normalize_mass(scores_per_layer, window):
    """Step 6: each layer's scores divided by their sum over its candidates (the n - window tokens
    before the window) and KV heads; a layer whose candidates sum to 0 is left as it is.

    scores_per_layer: list over layers of (B, H_kv, n), pooled. Returns a new list, float32.
    """
    out = []
    for s in scores_per_layer:
        mass = s[..., : s.shape[-1] - window].float().sum(dim=(-2, -1), keepdim=True)   # (B, 1, 1)
        out.append(s.float() / torch.where(mass > 0, mass, torch.ones_like(mass)))
    return out


def paper_method(prefill, budget=0.05):
    """The paper's LaProx end to end, steps 1-7: which prompt tokens each (layer, KV head) keeps.

    prefill: a cache.Prefill (per layer keys, values (1, H_kv, n, D), window queries (1, H, w, D),
    o_proj (d, H*D); window w). budget: a fraction of the prompt, or an entry count, per KV head
    on average, the window included (cache.resolve_budget). Returns per layer a list over H_kv
    heads of sorted int64 indices: what methods.select(prefill, "laprox", budget) returns.
    """
    w = prefill.window
    k = resolve_budget(budget, prefill.n, w)                        # step 7: entries per head
    scores = laprox_scorer(prefill)                                 # steps 1-4, per layer (1, H_kv, n)
    scores = [pool_scores(s, 7, window=w, mode="avg") for s in scores]   # step 5
    scores = normalize_mass(scores, w)                              # step 6
    return select_model(scores, k, w)                               # step 7: one top-K, window kept


# ##################################################################################################
# Below this line: our variants and the fast paths. Each computes what paper_scores computes (or,
# for a variant, what docs/derivation.md derives; the numbers (1)-(9) cite its steps), and is
# tested against it in tests/test_laprox.py and tests/test_kernels.py.
# ##################################################################################################

GROUP_MODES = ("sum", "exact")                           # the paper's first
NORMALIZE_MODES = ("mass", "residual", "output", "none")  # the paper's first


# ===================================================================== the Prefill scorer

def laprox_scorer(prefill, *, group="sum", center=False, use_triton=None):
    """LaProx scores s_{g,j} of step (4)-(5) for every layer of a Prefill (cache.Prefill), before
    pooling and the across-layer normalisation (paper_method and methods.method_scores apply
    both, in the paper's order: pool, then normalise).

    prefill: has keys, values (per layer (1, H_kv, n, D)), queries (per layer (1, H, w, D)) and
    o_proj (per layer (d, H*D), the model's own weights: M is kept on them). Returns a list over
    layers of (1, H_kv, n) float32 scores (higher = keep). Triton on CUDA, PyTorch otherwise (see
    laprox_scores_auto).
    """
    return [laprox_scores_auto(q, k, v, o, group=group, center=center, use_triton=use_triton)
            for q, k, v, o in zip(prefill.queries, prefill.keys, prefill.values, prefill.o_proj)]


# ------------------------------------------- the dispatch: optimisation 3, Triton on a GPU

log = logging.getLogger(__name__)
_FALLBACKS_LOGGED = set()   # reasons already logged by laprox_scores_auto


def laprox_scores_auto(queries, keys, values, o_proj_weight, *, group="sum", center=False,
                       use_triton=None):
    """laprox_scores on the best available path; same arguments and result.

    use_triton=None: the Triton kernels (laprox_triton.py) when the tensors are on CUDA, center=False
    and triton is installed; the PyTorch path otherwise. True forces the kernels (on a CPU they
    then need TRITON_INTERPRET=1 set before triton is imported); False forces PyTorch. When no
    tiling of the kernels fits the device (laprox_triton.KernelDoesNotFit), the PyTorch path runs
    instead, and one line says why (logged once per reason).
    """
    if use_triton not in (None, True, False):
        raise ValueError(f"use_triton must be None, True or False, got {use_triton!r}")
    if use_triton is None:
        use_triton = keys.is_cuda and not center
        if use_triton:
            import laprox_triton   # lazy: triton is optional on a CPU
            use_triton = laprox_triton.triton_available()
    if use_triton:
        if center:
            raise ValueError("center=True is only implemented in the PyTorch path; pass use_triton=False")
        import laprox_triton
        B, H, H_kv, G, w, n, D = check_qkv(queries, keys, values, o_proj_weight)
        M = value_gram_pairs(o_proj_weight, H, D, H_kv).to(keys.device)
        try:  # Triton launches on the current CUDA device; a model placed on several has layers elsewhere
            with torch.cuda.device(keys.device) if keys.is_cuda else contextlib.nullcontext():
                return laprox_triton.laprox_scores_triton(queries, keys, values, M, group=group)
        except laprox_triton.KernelDoesNotFit as why:
            if str(why) not in _FALLBACKS_LOGGED:
                _FALLBACKS_LOGGED.add(str(why))
                log.warning("LaProx score: the Triton kernels do not fit (%s); using the PyTorch path", why)
    return laprox_scores(queries, keys, values, o_proj_weight, group=group, center=center)


# ===================================================================== checks

def check_qkv(queries, keys, values, o_proj_weight=None):
    """Validate the shapes shared by every scorer; return (B, H, H_kv, G, w, n, D).

    queries: (B, H, w, D); keys, values: (B, H_kv, n, D); o_proj_weight: (d, H*D) or None.
    """
    if queries.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError(
            f"expected queries (B, H, w, D) and keys/values (B, H_kv, n, D), got "
            f"queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}")
    B, H, w, D = queries.shape
    Bk, H_kv, n, Dk = keys.shape
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    if Bk != B or Dk != D:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} disagree on batch "
                         f"size or head dim (need queries (B, H, w, D), keys (B, H_kv, n, D))")
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"number of query heads H={H} must be a multiple of the number of KV heads "
                         f"H_kv={H_kv} (GQA group size G = H // H_kv)")
    if not 1 <= w <= n:
        raise ValueError(f"window w={w} must satisfy 1 <= w <= n={n} (the window is the last w prompt tokens)")
    if o_proj_weight is not None:
        if o_proj_weight.dim() != 2 or o_proj_weight.shape[1] != H * D:
            raise ValueError(f"o_proj_weight must be (d, H*D) = (d, {H * D}) as nn.Linear stores it, "
                             f"got {tuple(o_proj_weight.shape)}")
    return B, H, H_kv, H // H_kv, w, n, D


def _check_group(group):
    if group not in GROUP_MODES:
        raise ValueError(f"group must be one of {GROUP_MODES}, got {group!r}")


def _compute_dtype(*tensors):
    """float64 when any input is float64 (the tests' reference), else float32: never 16 bits."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ===================================================================== the reference of the variants
#
# docs/derivation.md step by step, for reading and for checking the fast paths: the full G x G
# Grams of every key (group="exact" needs them), no pair layout, no chunks, no caches. It holds
# (B, H_kv, G, G, n) tensors (and, with center, a (B, H_kv, G, w, n, D) one): for small inputs.

def value_gram_matrices(o_proj_weight, n_heads, head_dim, n_kv_heads):
    """M_{hh'} = W_h^T W_{h'} for every pair of query heads in a GQA group, step (6).

    o_proj_weight: (d, H*D) as nn.Linear stores it; head h writes through columns
    h*D:(h+1)*D. Returns M: (H_kv, G, G, D, D), float32 (float64 for a float64 weight), with
    M[g, a, b] = M_{hh'} for h = g*G + a, h' = g*G + b, so that u_{h,j} . u_{h',j} = v_j^T M[g, a, b] v_j.
    """
    d, HD = o_proj_weight.shape
    if HD != n_heads * head_dim:
        raise ValueError(f"o_proj_weight has {HD} input columns, expected n_heads*head_dim = "
                         f"{n_heads}*{head_dim} = {n_heads * head_dim}")
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    G = n_heads // n_kv_heads
    W = o_proj_weight.to(_compute_dtype(o_proj_weight)).reshape(d, n_kv_heads, G, head_dim)  # W[:, g, a] = W_h
    return torch.einsum("xgad,xgbe->gabde", W, W).contiguous()      # sum over the d model dims


def head_outputs(attn, values):
    """obar_{h,t} = sum_j p_{h,t,j} v_j, each query head's output before W_O, step (9).

    attn: (B, H, w, n); values: (B, H_kv, n, D). Returns (B, H_kv, G, w, D) in attn's dtype.
    """
    B, H, w, n = attn.shape
    H_kv = values.shape[1]
    return torch.matmul(attn.view(B, H_kv, H // H_kv, w, n), values.to(attn.dtype).unsqueeze(2))


def group_norm(C, group):
    """Scores from the G x G terms of ||T_{g,j}||_F^2, steps (4)-(5).

    C: (B, H_kv, G, G, n), C[b, g, a, c, j] = C_{hh',j} for h = g*G + a, h' = g*G + c.
    group="exact": sqrt(sum_{h,h'} C_{hh'}) = ||T_{g,j}||_F; group="sum": sum_h sqrt(C_{hh}), the
    paper's per-head norms summed. Returns (B, H_kv, n). Rounding can leave a tiny negative value
    where the true one is 0: clamped before the square root.
    """
    if group == "exact":
        return C.sum(dim=(2, 3)).clamp_min(0).sqrt()
    return C.diagonal(dim1=2, dim2=3).clamp_min(0).sqrt().sum(-1)


def reference_scores(queries, keys, values, o_proj_weight, *, group="sum", center=False):
    """LaProx score of every KV entry of one layer, as the derivation reads: steps (1), (6), (5), (9), (4).

    queries: (B, H, w, D) post-RoPE window queries; keys, values: (B, H_kv, n, D);
    o_proj_weight: (d, H*D). group in GROUP_MODES; center=True is step (9).
    Returns (B, H_kv, n), higher = more important: float64 when an input is float64, else float32.
    laprox_scores computes the same, faster and in less memory.
    """
    B, H, H_kv, G, w, n, D = check_qkv(queries, keys, values, o_proj_weight)
    _check_group(group)
    dtype = _compute_dtype(queries, keys, values, o_proj_weight)
    A = window_attention(queries, keys, dtype).view(B, H_kv, G, w, n)    # (1) A[b, g, a, t, j] = p_{h,t,j}
    V = values.to(dtype)                                                   # (B, H_kv, n, D)
    M = value_gram_matrices(o_proj_weight.to(dtype), H, D, H_kv)           # (6) (H_kv, G, G, D, D)
    if center:
        # (9) C_{hh',j} = sum_t p_{h,t,j} p_{h',t,j} (v_j - obar_{h,t})^T M_{hh'} (v_j - obar_{h',t})
        obar = head_outputs(A.view(B, H, w, n), V)                         # (B, H_kv, G, w, D)
        PX = A.unsqueeze(-1) * (V[:, :, None, None] - obar.unsqueeze(-2))  # (B, H_kv, G, w, n, D)
        C = torch.einsum("bgatjd,gacde,bgctje->bgacj", PX, M, PX)
    else:
        # (5) C_{hh',j} = (a_{h,j} . a_{h',j}) (u_{h,j} . u_{h',j}), the second factor by (6)
        attention_gram = torch.einsum("bgatj,bgctj->bgacj", A, A)          # (B, H_kv, G, G, n)
        value_gram = torch.einsum("bgjd,gacde,bgje->bgacj", V, M, V)       # (B, H_kv, G, G, n)
        C = attention_gram * value_gram
    return group_norm(C, group)                                            # (4)-(5)


def eviction_error(queries, keys, values, o_proj_weight, keep):
    """||Y - Y_S||_F of step (4): how far the layer's window output moves when only the entries
    in `keep` stay (no renormalisation), i.e. the norm of the sum of the evicted terms T_{g,j}.

    queries: (B, H, w, D); keys, values: (B, H_kv, n, D); o_proj_weight: (d, H*D);
    keep: (B, H_kv, n) bool. Returns (B,) float32. Used to compare kept sets of different
    methods by what LaProx minimises a bound of.
    """
    B, H, H_kv, G, w, n, D = check_qkv(queries, keys, values, o_proj_weight)
    if keep.shape != (B, H_kv, n) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (B, H_kv, n) = {(B, H_kv, n)} bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    A = window_attention(queries, keys)                                     # (B, H, w, n)
    evicted = (~keep).float().repeat_interleave(G, dim=1).unsqueeze(2)      # (B, H, 1, n)
    V = values.float().repeat_interleave(G, dim=1)                          # (B, H, n, D)
    heads = torch.matmul(A * evicted, V)                                    # (B, H, w, D)
    dY = heads.transpose(1, 2).reshape(B, w, H * D) @ o_proj_weight.float().T   # (B, w, d)
    return dY.flatten(1).norm(dim=1)


# ===================================================================== optimisations
#
# Each computes what reference_scores computes, within float32 rounding, and is tested against it
# (tests/test_laprox.py, tests/test_kernels.py):
#   1. M once per weight (value_gram_pairs), kept on the weight tensor.
#   2. The pair layout and the chunked pair GEMM (laprox_scores): only the head pairs a <= b the
#      mode needs (the G diagonal pairs for "sum"), the keys a chunk at a time, so that the window
#      attention is the one layer-sized tensor held.
#   3. The Triton kernels (laprox_triton.py), which never hold the window attention
#      (laprox_scores_auto, above).

# --------------------------------------------------- optimisation 1: M once per weight

def head_pairs(G):
    """The pairs (a, b), a <= b, of query heads in a GQA group of G, in the order of the pair
    layout: (0,0), (0,1), .., (0,G-1), (1,1), .., (G-1,G-1); G(G+1)/2 of them. M_{h'h} = M_{hh'}^T,
    so these pairs carry all of (5)'s value Gram."""
    return [(a, b) for a in range(G) for b in range(a, G)]


# M depends on the weights only, so it is computed once per o_proj weight and reused by every
# prompt. It is kept on the weight tensor itself (an attribute): it lives exactly as long as the
# weights the model holds, with no registry beside the model, and neither model.py nor this file
# has to import the other (model -> Prefill -> scorer stays one-way). A fingerprint (storage address,
# version counter, shape, strides, dtype, device) changes when the weight is modified in place,
# reloaded or moved, and M is then recomputed. Writes through `.data` bypass the version counter
# (as they bypass autograd): call forget_value_grams(weight) after those.
_GRAMS_ATTR = "laprox_value_grams"


def _weight_fingerprint(weight):
    try:
        version = weight._version
    except RuntimeError:   # inference tensors keep no version counter: never cached
        return None
    return weight.data_ptr(), version, tuple(weight.shape), weight.stride(), weight.dtype, weight.device


def forget_value_grams(o_proj_weight):
    """Drop the M kept on this weight (it is recomputed on the next call)."""
    o_proj_weight.__dict__.pop(_GRAMS_ATTR, None)


def value_gram_pairs(o_proj_weight, n_heads, head_dim, n_kv_heads):
    """M_{hh'} for the head pairs of head_pairs(G) only: (H_kv, P, D, D) float32, P = G(G+1)/2,
    M_pairs[g, p] = M[g, a, b] for (a, b) = head_pairs(G)[p] (see value_gram_matrices).

    o_proj_weight: (d, H*D). Computed once per weight and kept on it (above): every prompt, and
    both the PyTorch and the Triton path, reuse it. Lives on the weight's device.
    """
    key = (_weight_fingerprint(o_proj_weight), n_heads, head_dim, n_kv_heads)
    kept = getattr(o_proj_weight, _GRAMS_ATTR, None)
    if key[0] is not None and kept is not None and kept[0] == key:
        return kept[1]
    with torch.no_grad():   # a constant of the weights: a graph kept with it would hold the weight
        M = value_gram_matrices(o_proj_weight, n_heads, head_dim, n_kv_heads)
        a, b = zip(*head_pairs(n_heads // n_kv_heads))
        M_pairs = M[:, list(a), list(b)].float().contiguous()
    if key[0] is not None:
        setattr(o_proj_weight, _GRAMS_ATTR, (key, M_pairs))
    return M_pairs


# ---------------------------------- optimisation 2: the pair layout, a chunk of keys at a time

def attention_column_gram(attn, n_kv_heads, pairs):
    """Gram of attention columns within each GQA group, first factor of step (5), for some pairs.

    attn: (B, H, w, n); pairs: list of head pairs (a, b) of a group (head_pairs).
    Returns (B, H_kv, len(pairs), n): [b, g, p, j] = a_{h,j} . a_{h',j}, h = g*G + a, h' = g*G + b.
    """
    B, H, w, n = attn.shape
    P = attn.view(B, n_kv_heads, H // n_kv_heads, w, n)
    return torch.stack([torch.linalg.vecdot(P[:, :, a], P[:, :, b], dim=2) for a, b in pairs], dim=2)


def projected_value_gram(values, M_pairs):
    """Gram of projected values within each GQA group, second factor of step (5), via (6).

    values: (B, H_kv, n, D); M_pairs: (H_kv, P, D, D), one D x D matrix per head pair.
    Returns (B, H_kv, P, n) float32: [b, g, p, j] = v_j^T M_p v_j = u_{h,j} . u_{h',j}.
    One GEMM per KV head over all pairs at once, V_g (B*n x D) @ [M_0 | M_1 | ..] (D x P*D),
    in float32: plain TF32 would miss the 1e-4 agreement (the Triton path splits the operands
    to keep float32 accuracy on tensor cores).
    """
    B, H_kv, n, D = values.shape
    P = M_pairs.shape[1]
    V = values.float().transpose(0, 1).reshape(H_kv, B * n, D)             # one batch per KV head
    M_cat = M_pairs.permute(0, 2, 1, 3).reshape(H_kv, D, P * D)            # [M_0 | M_1 | ..]
    VM = torch.bmm(V, M_cat).view(H_kv, B * n, P, D)                       # v_j^T M_p for every p
    vMv = torch.matmul(VM, V.unsqueeze(-1)).squeeze(-1)                    # (H_kv, B*n, P)
    return vMv.view(H_kv, B, n, P).permute(1, 0, 3, 2)


def centering_factors(obar, M_pairs, pairs):
    """The key-independent parts of step (9)'s correction, per head pair (a, b) = (h, h').

    obar: (B, H_kv, G, w, D) head outputs (head_outputs); M_pairs: (H_kv, P, D, D) for `pairs`.
    Returns Z (B, H_kv, P, w, D), Z_{hh',t} = M_{hh'} obar_{h',t} + M_{hh'}^T obar_{h,t}, and
    K (B, H_kv, P, w), K_{hh',t} = obar_{h,t}^T M_{hh'} obar_{h',t}.
    """
    Z, K = [], []
    for p, (a, b) in enumerate(pairs):
        M_ob = torch.einsum("gde,bgte->bgtd", M_pairs[:, p], obar[:, :, b])   # M_{hh'} obar_{h',t}
        Mt_oa = torch.einsum("ged,bgte->bgtd", M_pairs[:, p], obar[:, :, a])  # M_{hh'}^T obar_{h,t}
        Z.append(M_ob + Mt_oa)
        K.append((obar[:, :, a] * M_ob).sum(-1))
    return torch.stack(Z, dim=2), torch.stack(K, dim=2)


def centering_correction(attn, values, Z, K, pairs):
    """C_{hh',j} - (a_{h,j} . a_{h',j}) (v_j^T M_{hh'} v_j) of step (9), for a chunk of keys.

    attn: (B, H, w, c) the chunk's attention columns; values: (B, H_kv, c, D); Z, K: from
    centering_factors for `pairs`. Returns (B, H_kv, P, c):
    sum_t p_{h,t,j} p_{h',t,j} (K_{hh',t} - Z_{hh',t} . v_j) = -R_{hh',j} - R_{h'h,j} + the obar term.
    """
    B, H, w, c = attn.shape
    H_kv = values.shape[1]
    P = attn.view(B, H_kv, H // H_kv, w, c)
    V = values.float()
    out = []
    for p, (a, b) in enumerate(pairs):
        zv = torch.matmul(Z[:, :, p], V.transpose(-1, -2))                   # (B, H_kv, w, c) Z_{hh',t} . v_j
        out.append((P[:, :, a] * P[:, :, b] * (K[:, :, p, :, None] - zv)).sum(2))
    return torch.stack(out, dim=2)


def pair_group_norm(C, pairs, group):
    """group_norm for the pair layout: C (B, H_kv, len(pairs), n) -> scores (B, H_kv, n).

    group="sum": `pairs` are the G diagonal pairs, sum_h sqrt(C_{hh}). group="exact": `pairs` are
    all of head_pairs(G), and each pair a < b counts twice (C_{h'h} = C_{hh'}).
    """
    if group == "sum":
        return C.clamp_min(0).sqrt().sum(2)
    twice = C.new_tensor([1.0 if a == b else 2.0 for a, b in pairs])
    return torch.einsum("bgpn,p->bgn", C, twice).clamp_min(0).sqrt()


def _key_chunk(B, H_kv, w, n_pairs, D):
    """Keys per step of the PyTorch path: bounds its float32 temporaries (the GEMM's
    (B*chunk, P*D) product per KV head, a pair's attention product) to about 2^26 numbers,
    half the (H, w, n) attention of a 128k-token Llama-3.1-8B layer, in few enough steps."""
    return max(1, 2 ** 26 // (B * H_kv * max(n_pairs * D, w)))


def laprox_scores(queries, keys, values, o_proj_weight, *, group="sum", center=False, key_chunk=None):
    """reference_scores on the PyTorch path: the pair layout, a chunk of keys at a time.

    queries: (B, H, w, D) post-RoPE window queries; keys, values: (B, H_kv, n, D);
    o_proj_weight: (d, H*D). group in GROUP_MODES; center=True is the research variant of step
    (9); key_chunk: keys per step, an int >= 1 (default: _key_chunk). Returns (B, H_kv, n) float32
    (higher = more important), whatever the input dtype.
    Only the head pairs the mode needs are formed: the G diagonal ones for "sum" (G D^2 per key),
    all G(G+1)/2 for "exact". The window attention (B, H, w, n) is the one layer-sized tensor held
    (window_attention holds its logits beside it while the softmax runs); everything else is
    per chunk, or (B, H_kv, P, w, D) for center. M comes from value_gram_pairs (kept on the weight).
    """
    B, H, H_kv, G, w, n, D = check_qkv(queries, keys, values, o_proj_weight)
    _check_group(group)
    if key_chunk is not None and (type(key_chunk) is not int or key_chunk < 1):
        raise ValueError(f"key_chunk must be an int >= 1 or None, got {key_chunk!r}")
    A = window_attention(queries, keys)                                # (1)  (B, H, w, n)
    M = value_gram_pairs(o_proj_weight, H, D, H_kv).to(keys.device)    # (6)  (H_kv, G(G+1)/2, D, D)
    pairs = head_pairs(G)
    if group == "sum":                                                 # (5): the diagonal pairs are all it needs
        diagonal = [p for p, (a, b) in enumerate(pairs) if a == b]
        pairs, M = [pairs[p] for p in diagonal], M[:, diagonal]
    if center:                                                         # (9): what every key shares
        Z, K = centering_factors(head_outputs(A, values), M, pairs)
    step = key_chunk or _key_chunk(B, H_kv, w, len(pairs), D)
    scores = A.new_empty(B, H_kv, n)
    for j in range(0, n, step):
        chunk = slice(j, j + step)
        A_c, V_c = A[..., chunk], values[:, :, chunk]
        C = attention_column_gram(A_c, H_kv, pairs) * projected_value_gram(V_c, M)   # (5)
        if center:
            C = C + centering_correction(A_c, V_c, Z, K, pairs)                     # (9)
        scores[..., chunk] = pair_group_norm(C, pairs, group)                       # (4)-(5)
    return scores


# ===================================================================== (7) across-layer scaling, ours beside the paper's

def normalize_scores(scores_per_layer, resid_norm, out_norm, mode="mass", window=0):
    """Make scores of different layers comparable, step (7): the paper's normalize_mass or ours.

    scores_per_layer: list over L layers of (B, H_kv, n) tensors, pooled already (the paper
        normalises the pooled scores).
    resid_norm, out_norm: (L,) ||x_l + Y_l||_F and ||Y_l||_F over the window rows.
    mode: "mass" (the paper's) divides layer l by the sum of its scores over all KV heads and the
        n - window candidates (the tokens before the window; a layer with no candidates, or a zero
        sum, is left as it is: it has nothing to select); "residual" divides by resid_norm[l],
        "output" by out_norm[l]; "none" returns the scores unchanged.
    window: w, needed by "mass", in [0, n]. Returns a new list of float32 tensors.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")
    L = len(scores_per_layer)
    if mode == "none":
        return [s.float() for s in scores_per_layer]
    if mode == "mass":
        for s in scores_per_layer:
            if not 0 <= window <= s.shape[-1]:
                raise ValueError(f"window {window} must be in [0, n={s.shape[-1]}]")
        return normalize_mass(scores_per_layer, window)
    norms = resid_norm if mode == "residual" else out_norm
    norms = torch.as_tensor(norms, dtype=torch.float32).reshape(-1)
    if norms.numel() != L:
        raise ValueError(f"{mode} norms have {norms.numel()} entries but there are {L} layers of scores")
    if not (torch.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError(f"{mode} norms must be finite and > 0 to divide by, got {norms.tolist()}")
    return [s.float() / norms[l].to(s.device) for l, s in enumerate(scores_per_layer)]
