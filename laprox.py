"""LaProx: score each cached KV entry by how much the layer's output would move without it.

Reference implementation of the method as the project defines it (shared/laprox-spec.md).
The fused GPU kernel lives in kernels.py and must agree with the functions here.

The derivation, one step per numbered line; the code below cites these numbers.
-------------------------------------------------------------------------------

Setting. One decoder layer after prefill of n prompt tokens. H query heads share H_kv
key/value heads, G = H / H_kv query heads per KV head (G = 1 is MHA). Query head h
reads KV head g(h) = h // G. Head dim D, model dim d. The observation window is the
last w prompt tokens; their queries stand in for the queries decoding will issue.

(1) Window attention. For query head h, A_h (w x n) is the softmax over keys of
    q_t . k_j / sqrt(D), where window row t sits at absolute position n-w+t and sees
    keys 0 .. n-w+t only (causal). Column j of A_h is a_{h,j} (length w).

(2) Output projection per head. o_proj.weight is (d, H*D); head h writes through the
    D columns W_h = o_proj.weight[:, h*D:(h+1)*D] (d x D), i.e. W_O^h = W_h^T (D x d).
    Value j of KV head g, seen by head h, lands in model space as u_{h,j} = W_h v_{g,j}.

(3) Y splits by head: o_proj takes the heads' outputs side by side, [head_1 | ... | head_H]
    (w x H*D, head_h = A_h V_{g(h)}), and its weight is the columns [W_1 | ... | W_H], so
        Y = [head_1 | ... | head_H] o_proj.weight^T = sum_h head_h W_h^T.
    Writing out head_h, the attention output on the window is a sum of column-row products:
        Y = sum_h A_h V_{g(h)} W_O^h = sum_g sum_j T_{g,j},
        T_{g,j} = sum_{h in group g} a_{h,j} u_{h,j}^T            (a w x d matrix).
    Each KV entry (g, j) contributes exactly one term T_{g,j}.

(4) Evicting a set of entries removes their terms (we ignore the softmax
    renormalisation, see (9)). With Y_S the sum over the kept set S, the triangle
    inequality gives
        || Y - Y_S ||_F = || sum_{(g,j) not in S} T_{g,j} ||_F
                        <= sum_{(g,j) not in S} || T_{g,j} ||_F.
    So the score of entry (g, j) is s_{g,j} = ||T_{g,j}||_F, and keeping the largest
    scores minimises the bound. The bound is loose when evicted terms cancel (point in
    opposite directions), so the error itself is measured too: eviction_error below.

(5) Expand the squared norm of the group term. Since <x y^T, x' y'^T>_F = (x.x')(y.y'),
        ||T_{g,j}||_F^2 = sum_{h,h' in group g} (a_{h,j} . a_{h',j}) (u_{h,j} . u_{h',j}).
    Both factors are G x G Gram matrices: one of attention columns (length w), one of
    projected values (length d). Their elementwise product, summed, is the score^2.
    For G = 1 this is ||a_j|| ||u_j||: column norm times row norm.
    group="sum" replaces the exact group norm by its triangle-inequality upper bound
        s^sum_{g,j} = sum_h ||a_{h,j}|| ||u_{h,j}||  >=  s_{g,j}.

(6) The projected values never need to be formed in d dimensions:
        u_{h,j} . u_{h',j} = v_j^T W_h^T W_{h'} v_j = v_j^T M_{hh'} v_j,
        M_{hh'} = W_h^T W_{h'} = W_O^h (W_O^{h'})^T          (D x D, once per layer).
    M_{h'h} = M_{hh'}^T, so the value Gram is symmetric and only h <= h' is computed.
    Cost per key: G^2 D^2 instead of G D d.

(7) Across layers. Within a layer every s_{g,j} is measured in units of the same Y, so
    heads compare directly. Layer l's Y_l is added to the residual stream and the next
    layer reads RMSNorm(x_l + Y_l): what matters is the perturbation relative to that
    stream. Why relative: RMSNorm(x) = sqrt(d) x / ||x|| (times a gain), whose Jacobian
    scales each row by sqrt(d) / ||x_row|| (and projects out the row's own direction), so
    to first order a perturbation of a row matters in proportion to 1 / ||x_row||.
    normalize="residual" divides layer l's scores by ||x_l + Y_l||_F over the window rows:
    one Frobenius norm instead of a weight per row is our simplification. "output" divides
    by ||Y_l||_F; "none" leaves them as they are.

(8) Selection (pooling, budgets, top-k across the model) is cache.py's business.

(9) Research flag center=True: renormalisation to first order. Write p_{h,t,j} for the
    entries of A_h and let obar_{h,t} = sum_j p_{h,t,j} v_j (D-dim head output before
    W_O), so row t of head h's output is o_{h,t} = W_h obar_{h,t} = sum_i p_{h,t,i} u_{h,i}.
    Evicting key j and renormalising the rest gives (o_{h,t} - p_{h,t,j} u_{h,j}) / (1 - p_{h,t,j}),
    so the row changes by exactly
        p_{h,t,j} / (1 - p_{h,t,j}) * (o_{h,t} - u_{h,j}),
    whose first-order part is -p_{h,t,j} (u_{h,j} - o_{h,t}): the value centred on the
    output it feeds (the sign does not change the norm). The centred term is
        T^c_{g,j} = sum_{h in group g} sum_t p_{h,t,j} e_t (u_{h,j} - o_{h,t})^T,
    and, with u_{h,j} - o_{h,t} = W_h (v_j - obar_{h,t}),
        ||T^c_{g,j}||_F^2 = sum_{h,h'} C_{hh',j},
        C_{hh',j} = sum_t p_{h,t,j} p_{h',t,j} (v_j - obar_{h,t})^T M_{hh'} (v_j - obar_{h',t})
                  = (a_{h,j} . a_{h',j}) v_j^T M_{hh'} v_j                         [as (5)]
                    - R_{hh',j} - R_{h'h,j}
                    + sum_t p_{h,t,j} p_{h',t,j} obar_{h,t}^T M_{hh'} obar_{h',t},
        R_{hh',j} = sum_t p_{h,t,j} p_{h',t,j} v_j^T M_{hh'} obar_{h',t}.
    (The middle term uses obar_h^T M_{hh'} v = v^T M_{h'h} obar_h.) group="sum" takes
    sum_h sqrt(C_{hh,j}) as in (5). Only D x D products appear, as in (6).

Shapes used throughout: queries (B, H, w, D), keys and values (B, H_kv, n, D),
o_proj_weight (d, H*D); scores come out as (B, H_kv, n) float32. Everything is
computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

GROUP_MODES = ("exact", "sum")
NORMALIZE_MODES = ("residual", "output", "none")


# ----------------------------------------------------------------------------- checks

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


# ------------------------------------------------------------------ (1) window attention

def window_attention(queries, keys):
    """Softmax attention of the window queries over all keys, step (1).

    queries: (B, H, w, D) post-RoPE queries of the last w prompt tokens.
    keys:    (B, H_kv, n, D) post-RoPE keys of the whole prompt.
    Returns  (B, H, w, n) float32. Window row i (absolute position n-w+i) sees keys
    0 .. n-w+i; scale 1/sqrt(D); query head h reads KV head h // G.
    This is the one place the window attention is computed (baselines reuse it).
    """
    B, H, H_kv, G, w, n, D = check_qkv(queries, keys, keys)
    q = queries.float().reshape(B, H_kv, G * w, D) / math.sqrt(D)    # the group's rows side by side
    logits = torch.matmul(q, keys.float().transpose(-1, -2))         # (B, H_kv, G*w, n)
    logits = logits.view(B, H_kv, G, w, n)
    # causal inside the window: row i (position n-w+i) must not see the window keys after it;
    # only the last w columns can be in the future, so only they are masked
    future = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., n - w:].masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(B, H, w, n)


# ------------------------------------------------------------ (6) value Gram matrices M

def value_gram_matrices(o_proj_weight, n_heads, head_dim, n_kv_heads):
    """M_{hh'} = W_h^T W_{h'} for every pair of query heads in a GQA group, step (6).

    o_proj_weight: (d, H*D) as nn.Linear stores it; head h writes through columns
    h*D:(h+1)*D. Returns M: (H_kv, G, G, D, D) float32 with M[g, a, b] = M_{hh'} for
    h = g*G + a, h' = g*G + b, so that u_{h,j} . u_{h',j} = v_j^T M[g, a, b] v_j.
    """
    d, HD = o_proj_weight.shape
    if HD != n_heads * head_dim:
        raise ValueError(f"o_proj_weight has {HD} input columns, expected n_heads*head_dim = "
                         f"{n_heads}*{head_dim} = {n_heads * head_dim}")
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    G = n_heads // n_kv_heads
    W = o_proj_weight.float().reshape(d, n_kv_heads, G, head_dim)      # W[:, g, a, :] = W_h
    return torch.einsum("xgad,xgbe->gabde", W, W).contiguous()      # sum over the d model dims


# ---------------------------------------------------------------- (5) the two G x G Grams

def attention_column_gram(attn, n_kv_heads):
    """Gram of attention columns within each GQA group, first factor of step (5).

    attn: (B, H, w, n). Returns (B, H_kv, G, G, n): [b, g, a, a', j] = a_{h,j} . a_{h',j}.
    """
    B, H, w, n = attn.shape
    G = H // n_kv_heads
    P = attn.reshape(B, n_kv_heads, G, w, n)
    out = P.new_empty(B, n_kv_heads, G, G, n)
    for a in range(G):
        for c in range(a, G):                                   # symmetric in (h, h')
            out[:, :, a, c] = (P[:, :, a] * P[:, :, c]).sum(2)  # dot over the w window rows
            out[:, :, c, a] = out[:, :, a, c]
    return out


def projected_value_gram(values, M):
    """Gram of projected values within each GQA group, second factor of step (5), via (6).

    values: (B, H_kv, n, D); M: (H_kv, G, G, D, D).
    Returns (B, H_kv, G, G, n) float32: [b, g, a, a', j] = v_j^T M_{hh'} v_j = u_{h,j} . u_{h',j}.
    Only pairs a <= a' are computed: M_{h'h} = M_{hh'}^T gives the same number.
    """
    B, H_kv, n, D = values.shape
    G = M.shape[1]
    V = values.float().transpose(0, 1).reshape(H_kv, B * n, D)        # one batch per KV head
    out = V.new_empty(B, H_kv, G, G, n)
    for a in range(G):
        for c in range(a, G):
            VM = torch.bmm(V, M[:, a, c])                                # v_j^T M_{hh'}, (H_kv, B*n, D)
            vMv = torch.linalg.vecdot(VM, V).view(H_kv, B, n).transpose(0, 1)
            out[:, :, a, c] = out[:, :, c, a] = vMv
    return out


def centering_correction(attn, values, M):
    """The renormalisation terms of step (9): C_{hh'} - (a.a')(v^T M v), shape (B, H_kv, G, G, n).

    attn: (B, H, w, n); values: (B, H_kv, n, D); M: (H_kv, G, G, D, D).
    Returns  -R_{hh'} - R_{h'h} + sum_t p_{h,t} p_{h',t} obar_{h,t}^T M_{hh'} obar_{h',t}.
    """
    B, H, w, n = attn.shape
    H_kv, G = M.shape[0], M.shape[1]
    P = attn.reshape(B, H_kv, G, w, n)
    V = values.float()
    obar = torch.einsum("bgatn,bgnd->bgatd", P, V)              # (B, H_kv, G, w, D) head outputs
    R = V.new_zeros(B, H_kv, G, G, n)
    K = V.new_zeros(B, H_kv, G, G, n)
    for c in range(G):                                           # c plays h'
        z = torch.einsum("gade,bgte->bgatd", M[:, :, c], obar[:, :, c])   # M_{hh'} obar_{h',t}
        r = torch.einsum("bgatd,bgnd->bgatn", z, V)                      # v_j^T M_{hh'} obar_{h',t}
        k = torch.einsum("bgatd,bgatd->bgat", obar, z)                    # obar_{h,t}^T M_{hh'} obar_{h',t}
        PP = P * P[:, :, c:c + 1]                                         # p_{h,t,j} p_{h',t,j}
        R[:, :, :, c] = (PP * r).sum(3)
        K[:, :, :, c] = (PP * k.unsqueeze(-1)).sum(3)
    return K - R - R.transpose(2, 3)


# ------------------------------------------------------------------ (4)-(5) the score

def group_norm(C, group="exact"):
    """Turn per-pair terms C (B, H_kv, G, G, n) into scores (B, H_kv, n), steps (4)-(5).

    group="exact": sqrt(sum_{h,h'} C_{hh'}) = ||T_{g,j}||_F.
    group="sum":   sum_h sqrt(C_{hh}) = sum_h ||a_h|| ||u_h||, an upper bound.
    Tiny negative values from rounding are clamped to 0 before the square root.
    """
    _check_group(group)
    if group == "exact":
        return C.sum(dim=(2, 3)).clamp_min(0).sqrt()
    return torch.diagonal(C, dim1=2, dim2=3).clamp_min(0).sqrt().sum(-1)


def laprox_scores(queries, keys, values, o_proj_weight, *, group="exact", center=False):
    """LaProx score s_{g,j} = ||T_{g,j}||_F of every KV entry of one layer (PyTorch path).

    queries: (B, H, w, D) post-RoPE window queries; keys, values: (B, H_kv, n, D);
    o_proj_weight: (d, H*D). group in {"exact", "sum"}; center=True is the research
    variant of step (9). Returns (B, H_kv, n) float32 (higher = more important).
    """
    B, H, H_kv, G, w, n, D = check_qkv(queries, keys, values, o_proj_weight)
    _check_group(group)
    A = window_attention(queries, keys)                         # (1)  (B, H, w, n)
    M = value_gram_matrices(o_proj_weight, H, D, H_kv)          # (6)  (H_kv, G, G, D, D)
    C = attention_column_gram(A, H_kv) * projected_value_gram(values, M)   # (5) per pair
    if center:
        C = C + centering_correction(A, values, M)              # (9)
    return group_norm(C, group)                                 # (4)-(5)


def laprox_scores_auto(queries, keys, values, o_proj_weight, *, group="exact", center=False,
                       use_triton=None):
    """laprox_scores on the best available path; same arguments and result.

    use_triton=None: the Triton kernel (kernels.py) when the tensors are on CUDA, center=False,
    triton is installed and the head dim suits the kernel; the PyTorch path otherwise. True
    forces the kernel (on a CPU it then needs TRITON_INTERPRET=1 set before triton is
    imported); False forces PyTorch.
    """
    if use_triton is None:
        use_triton = keys.is_cuda and not center
        if use_triton:
            from kernels import kernel_fits, triton_available   # lazy: triton is optional on a CPU
            use_triton = triton_available() and kernel_fits(keys.shape[-1])
    if use_triton:
        if center:
            raise ValueError("center=True is only implemented in the PyTorch path; pass use_triton=False")
        from kernels import laprox_scores_triton
        return laprox_scores_triton(queries, keys, values, o_proj_weight, group=group)
    return laprox_scores(queries, keys, values, o_proj_weight, group=group, center=center)


# ---------------------------------------------------------- (4) what the bound bounds

def eviction_error(queries, keys, values, o_proj_weight, keep):
    """||Y - Y_S||_F of step (4): how far the layer's window output moves when only the entries
    in `keep` stay (no renormalisation), i.e. the norm of the sum of the evicted terms T_{g,j}.

    queries: (B, H, w, D); keys, values: (B, H_kv, n, D); o_proj_weight: (d, H*D);
    keep: (B, H_kv, n) bool. Returns (B,) float32. Used to compare kept sets of different
    methods by what LaProx minimises a bound of.
    """
    B, H, H_kv, G, w, n, D = check_qkv(queries, keys, values, o_proj_weight)
    A = window_attention(queries, keys)                                     # (B, H, w, n)
    evicted = (~keep).float().repeat_interleave(G, dim=1).unsqueeze(2)      # (B, H, 1, n)
    V = values.float().repeat_interleave(G, dim=1)                          # (B, H, n, D)
    heads = torch.matmul(A * evicted, V)                                    # (B, H, w, D)
    dY = heads.transpose(1, 2).reshape(B, w, H * D) @ o_proj_weight.float().T   # (B, w, d)
    return dY.flatten(1).norm(dim=1)


# ------------------------------------------------------------- (7) across-layer scaling

def normalize_scores(scores_per_layer, resid_norm, out_norm, mode="residual"):
    """Make scores of different layers comparable, step (7).

    scores_per_layer: list over L layers of (B, H_kv, n) tensors.
    resid_norm, out_norm: (L,) ||x_l + Y_l||_F and ||Y_l||_F over the window rows.
    mode: "residual" divides layer l by resid_norm[l], "output" by out_norm[l],
    "none" returns the scores unchanged. Returns a new list of float32 tensors.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")
    L = len(scores_per_layer)
    if mode == "none":
        return [s.float() for s in scores_per_layer]
    norms = resid_norm if mode == "residual" else out_norm
    norms = torch.as_tensor(norms, dtype=torch.float32).reshape(-1)
    if norms.numel() != L:
        raise ValueError(f"{mode} norms have {norms.numel()} entries but there are {L} layers of scores")
    if not (torch.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError(f"{mode} norms must be finite and > 0 to divide by, got {norms.tolist()}")
    return [s.float() / norms[l].to(s.device) for l, s in enumerate(scores_per_layer)]


# ------------------------------------------------------------------- the Prefill scorer

def laprox_scorer(prefill, *, group="exact", center=False, normalize="residual", use_triton=None):
    """LaProx scores for every layer of a Prefill (cache.Prefill).

    prefill: has keys, values (per layer (1, H_kv, n, D)), queries (per layer (1, H, w, D)),
    o_proj (per layer (d, H*D)), resid_norm and out_norm ((L,) float32).
    Returns a list over layers of (1, H_kv, n) float32 scores (higher = keep), normalised
    by `normalize` (step (7)). Triton on CUDA, PyTorch otherwise (see laprox_scores_auto).
    """
    _check_group(group)
    if normalize not in NORMALIZE_MODES:  # checked again by normalize_scores, but before the work
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    scores = [laprox_scores_auto(q, k, v, o, group=group, center=center, use_triton=use_triton)
              for q, k, v, o in zip(prefill.queries, prefill.keys, prefill.values, prefill.o_proj)]
    return normalize_scores(scores, prefill.resid_norm, prefill.out_norm, normalize)
