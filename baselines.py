"""The scorers of the prior KV-cache eviction methods LaProx is compared against.

Each scorer maps a cache.Prefill to per-layer scores, (1, H_kv, n) float32, higher = keep. The
baselines' own selection rules follow their scorers: PyramidKV's schedule (select_pyramid) and
CriticalKV's two-stage rule (select_criticalkv); the shared rules (uniform, AdaKV's layer-wise
top-k with its safeguard, model-wide) live in cache.py, and the registry that pairs scorers with
rules, their flags and defaults in methods.py (METHODS). Conventions shared by the
scorers: B = 1; H query heads, H_kv KV heads, G = H // H_kv, query head h reads KV head h // G;
query-head scores are reduced to KV heads by the mean over the group; w = prefill.window.
The window attention (softmax of the w window queries over the prompt, causal inside the
window, float32) is computed in one place, laprox.window_attention.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

import laprox
from cache import (Prefill, adakv_mask, check_int, check_k, check_number, forced_mask, mask_to_kept, n_forced, safeguard,
                   stack_scores, top_indices, uniform_mask)


def group_mean(x: Tensor, n_kv_heads: int) -> Tensor:
    """Average query-head scores over each GQA group: (1, H, n) -> (1, H_kv, n)."""
    B, H, n = x.shape
    if H % n_kv_heads:
        raise ValueError(f"H={H} query heads is not a multiple of H_kv={n_kv_heads} KV heads")
    return x.reshape(B, n_kv_heads, H // n_kv_heads, n).mean(dim=2)


def random_scorer(prefill: Prefill, *, seed: int = 0) -> list[Tensor]:
    """Uniform random scores, a sanity floor: top-k of i.i.d. uniforms is a uniform random subset.
    seed: torch generator seed (same seed, same kept set). Returns per layer (1, H_kv, n)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(prefill.n_layers, prefill.n_kv_heads, prefill.n, generator=gen)  # on the CPU: same on any device
    s = s.to(prefill.keys[0].device)
    return [s[l:l + 1] for l in range(prefill.n_layers)]


def recency_scorer(prefill: Prefill) -> list[Tensor]:
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"):
    score = token position, so a top-k keeps the most recent tokens; the attention sinks (first 4
    tokens) come from the rule's `sinks` flag. Returns per layer (1, H_kv, n)."""
    s = torch.arange(prefill.n, dtype=torch.float32, device=prefill.keys[0].device)
    s = s.expand(1, prefill.n_kv_heads, prefill.n)
    return [s.clone() for _ in range(prefill.n_layers)]


def h2o_scorer(prefill: Prefill) -> list[Tensor]:
    """H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"):
    attention accumulated over all prompt queries. prefill.h2o[l]: (1, H, n) column sums of the full
    causal prefill attention, each divided by the n - j queries that see key j. Group mean ->
    per layer (1, H_kv, n)."""
    if prefill.h2o is None:
        raise ValueError("h2o needs the accumulated prefill attention; the prefill was made without it. "
                         "Prefill with model.prefill(input_ids, window=..., h2o=True).")
    return [group_mean(a.float(), prefill.n_kv_heads) for a in prefill.h2o]


def tova_scorer(prefill: Prefill) -> list[Tensor]:
    """TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): attention of the last prompt
    query, averaged over all H query heads of the layer, one choice shared by every KV head.
    attention (1, H, w, n) -> row w-1 (1, H, n) -> mean over H -> per layer (1, H_kv, n)."""
    out = []
    for q, k in zip(prefill.queries, prefill.keys):
        last = laprox.window_attention(q, k)[:, :, -1, :]  # (1, H, n)
        out.append(last.mean(dim=1, keepdim=True).expand(1, prefill.n_kv_heads, prefill.n).contiguous())
    return out


def knorm_scorer(prefill: Prefill) -> list[Tensor]:
    """K-norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"): minus the L2 norm of the key, so low-norm keys are kept.
    keys (1, H_kv, n, D) -> per layer (1, H_kv, n)."""
    return [-k.float().norm(dim=-1) for k in prefill.keys]


def snapkv_scorer(prefill: Prefill) -> list[Tensor]:
    """SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"):
    attention of the w window queries, summed over the window, then the group mean.
    attention (1, H, w, n) -> sum over w (1, H, n) -> per layer (1, H_kv, n).
    Its pooling is the registry's `pool` and `pooling` flags: by default average pooling, kernel 7,
    over the candidates (the LaProx paper's Appendix A, for every pooled method; SnapKV's and
    AdaKV's own code and kvpress also average-pool, kernel 5 in kvpress, each query head's window
    mean before the group mean); pooling=max is KVCache-Factory's SnapKV. PyramidKV, AdaKV and
    CriticalKV read this same score."""
    return [group_mean(laprox.window_attention(q, k).sum(dim=2), prefill.n_kv_heads)
            for q, k in zip(prefill.queries, prefill.keys)]


def projected_value_l1(prefill: Prefill) -> list[Tensor]:
    """CriticalKV's value weight (Feng et al. 2025): ||v_j W_O^h||_1, the L1 norm of value j of KV
    head g(h) projected into model space through the o_proj rows of query head h, then the mean over
    the GQA group. values (1, H_kv, n, D), o_proj (d, H*D) -> per layer (1, H_kv, n).
    One query head at a time, so memory is (n, d), not (H, n, d)."""
    H, G, D = prefill.n_heads, prefill.n_heads // prefill.n_kv_heads, prefill.head_dim
    out = []
    for v, wo in zip(prefill.values, prefill.o_proj):
        norms = torch.stack([(v[0, h // G].float() @ wo[:, h * D:(h + 1) * D].float().T).abs().sum(-1)
                             for h in range(H)])  # (H, n)
        out.append(group_mean(norms[None], prefill.n_kv_heads))
    return out


# ----------------------------------------------------------------------------- the baselines' own rules

def pyramid_budgets(free: int, n_layers: int, room: int, beta: float = 20) -> list[int]:
    """PyramidKV's per-layer budgets (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression
    based on Pyramidal Information Funneling"), for the entries beyond the forced ones.

    free: entries per head a uniform rule would choose (k - window - sinks). room: n - window - sinks,
    the most a head can choose. As in the reference code (KVCache-Factory, pyramidkv_utils.py,
    PyramidKVCluster.update_kv):
        min = free / beta,  max = 2 * free - min;   if max >= room: max = room, min = 2 * free - max
        budget(l) = max - l * (max - min) / (L - 1),  l = 0 (first layer, largest) .. L - 1.
    The reference code floors min and the step, which makes the layers sum to slightly more than
    L * free; here the schedule is exact (rational arithmetic) and rounded by largest remainder
    (ties to the shallower layer), so the layers sum to exactly L * free and each layer stays in [0, room].
    Returns a list of L ints.
    """
    check_number("pyramid beta", beta, 1)
    if not 0 <= free <= room or n_layers < 1:
        raise ValueError(f"need 0 <= free <= room and n_layers >= 1; got free={free}, room={room}, n_layers={n_layers}")
    if n_layers == 1:
        return [free]
    lo = Fraction(free) / Fraction(beta)
    hi = 2 * free - lo
    if hi >= room:
        hi = Fraction(room)
        lo = 2 * free - hi
    step = (hi - lo) / (n_layers - 1)
    exact = [hi - l * step for l in range(n_layers)]
    out = [math.floor(x) for x in exact]
    extra = n_layers * free - sum(out)  # = sum of the fractional parts, an int < n_layers
    by_remainder = sorted(range(n_layers), key=lambda l: (-(exact[l] - out[l]), l))
    for l in by_remainder[:extra]:
        out[l] += 1
    return out


def select_pyramid(scores: list[Tensor], k: int, window: int, *, sinks: int = 0, beta: float = 20) -> list[list[Tensor]]:
    """PyramidKV (Cai et al. 2024): per-head top-k with a per-layer budget that falls linearly with
    depth (see pyramid_budgets), averaging k; layer l's heads each keep the forced tokens + budget(l).

    scores: per layer (1, H_kv, n). Returns per layer a list over H_kv heads of sorted int64 indices.
    Total kept: exactly L * H_kv * k.
    """
    s = stack_scores(scores)
    L, _, n = s.shape
    check_k(k, n, window, sinks)
    f = n_forced(n, window, sinks)
    forced = forced_mask(n, window, sinks, s.device)
    budgets = pyramid_budgets(k - f, L, n - f, beta)
    return [mask_to_kept(uniform_mask(s[l:l + 1], f + b, forced))[0] for l, b in enumerate(budgets)]


def select_criticalkv(scores: list[Tensor], k: int, window: int, *, weights: list[Tensor], sinks: int = 0,
                      alpha: float = 0.2, eps: float = 1e-4, first_stage: float = 0.5) -> list[list[Tensor]]:
    """CriticalKV with AdaKV allocation (Feng et al. 2025, "Identify Critical KV Cache in LLM
    Inference from an Output Perturbation Perspective"; the authors' CriticalAdaKVPress, in
    github.com/FFY0/AdaKV-in-NVIDIA-kvpress and NVIDIA/kvpress, presses/criticalkv_press.py).

    scores: per layer (1, H_kv, n), SnapKV scores a: window attention SUMMED over the `window`
    queries (pooled). weights: per layer (1, H_kv, n), ||v_j W_O^h||_1 averaged over the GQA group
    (baselines.projected_value_l1). f = n_forced(n, window, sinks) forced entries per head.
    Per layer:
      1. allocation: AdaKV on a (safeguard alpha) gives each head g a count c_g (layer total H_kv * k).
      2. stage 1: head g keeps its forced entries and its top max(safe, floor(first_stage * (c_g - f)))
         other entries by a, safe = floor(alpha * (k - f)) (cache.safeguard).
      3. stage 2: head g fills up to c_g entries by (a / window + eps) * weights.
    Stage 2 uses the window MEAN a / window, as the authors' SnapKV score is a mean: eps = 1e-4 is
    calibrated against it (with the sum, eps would weigh `window` times less). Allocation, safeguard
    and stage 1 only rank a within a layer, where sum and mean give the same order.
    Where this differs from CriticalAdaKVPress, which counts the observation window inside every
    budget (its SnapKV gives the window the top score): its safeguard is int(alpha * k) entries
    including the window (ours: floor(alpha * (k - f)) beyond the forced ones, AdaKV's own code);
    its stage 1 keeps int(first_stage * c_g) entries including the window, and at least its
    safeguard (ours: f + max(safe, floor(first_stage * (c_g - f)))).
    Returns per layer a list over H_kv heads of sorted int64 indices; total L * H_kv * k.
    """
    check_number("alpha", alpha, 0, 1)
    check_number("first_stage", first_stage, 0, 1)
    check_number("eps", eps, 0)
    check_int("window", window, 1)  # the scores are sums over `window` queries
    s, wts = stack_scores(scores), stack_scores(weights)
    if wts.shape != s.shape:
        raise ValueError(f"weights {tuple(wts.shape)} and scores {tuple(s.shape)} must have the same (L, H_kv, n)")
    L, H, n = s.shape
    check_k(k, n, window, sinks)
    forced = forced_mask(n, window, sinks, s.device)
    f = int(forced.sum())
    counts = adakv_mask(s, k, forced, alpha).sum(-1)  # (L, H_kv), c_g
    safe = safeguard(k, f, alpha)
    stage2 = (s / window + eps) * wts
    mask = torch.zeros(L, H, n, dtype=torch.bool, device=s.device)
    key1 = s.masked_fill(forced, math.inf)
    order1 = torch.sort(key1, dim=-1, descending=True, stable=True).indices
    for l in range(L):
        for g in range(H):
            c = int(counts[l, g])
            sure = order1[l, g, : f + max(safe, int(first_stage * (c - f)))]  # forced + safeguard + stage 1
            key2 = stage2[l, g].clone()
            key2[sure] = math.inf
            mask[l, g, top_indices(key2, c)] = True
    return mask_to_kept(mask)
