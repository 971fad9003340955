"""The scorers of the prior KV-cache eviction methods LaProx is compared against.

Each scorer maps a cache.Prefill to per-layer scores, (1, H_kv, n) float32, higher = keep; the
selection rules live in cache.py and the registry that pairs scorers with rules, their flags and
defaults in methods.py (METHODS). Conventions shared by the
scorers: B = 1; H query heads, H_kv KV heads, G = H // H_kv, query head h reads KV head h // G;
query-head scores are reduced to KV heads by the mean over the group; w = prefill.window.
The window attention (softmax of the w window queries over the prompt, causal inside the
window, float32) is computed in one place, laprox.window_attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

import laprox
from cache import Prefill


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
