"""The prior KV-cache eviction methods LaProx is compared against, and the registry of all methods.

Every method is a scorer plus a selection rule over the same prefill, so that two methods
differ only in what the method itself decides (the table in shared/baselines.md):

    scores = scorer(prefill, **score_flags)        # per layer (1, H_kv, n) float32, higher = keep
    scores = pool_scores(scores, pool)             # optional max pooling over tokens (cache.py)
    kept   = rule(scores, k, window, **select_flags)   # per layer, per KV head, sorted indices

cache.select / cache.compress run this pipeline from METHODS[name]. Conventions shared by the
scorers: B = 1; H query heads, H_kv KV heads, G = H // H_kv, query head h reads KV head h // G;
query-head scores are reduced to KV heads by the mean over the group; w = prefill.window.
The window attention (softmax of the w window queries over the prompt, causal inside the
window, float32) is computed in one place, laprox.window_attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

import laprox
from cache import select_adakv, select_criticalkv, select_pyramid, select_scope, select_uniform

if TYPE_CHECKING:
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
    (Its max pooling, kernel 7, is the registry's `pool` flag.)"""
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


@dataclass(frozen=True)
class Method:
    """One entry of METHODS.

    scorer: Prefill -> per layer (1, H_kv, n) scores (None: keep everything).
    rule: (scores, k, window, **select_flags[, weights]) -> kept indices (cache.py selection rules).
    score_flags, select_flags: the flags each accepts, with their defaults.
    pool: default max-pooling kernel (0 = off); a flag of every method.
    weights: Prefill -> per layer (1, H_kv, n), a second per-entry factor passed to the rule as
        `weights=` (CriticalKV's projected value norm); None for the others.
    """
    scorer: Callable | None
    rule: Callable | None
    score_flags: dict
    select_flags: dict
    pool: int = 0
    weights: Callable | None = None


METHODS: dict[str, Method] = {
    "full": Method(None, None, {}, {}),
    "random": Method(random_scorer, select_uniform, {"seed": 0}, {"sinks": 0}),
    "streamingllm": Method(recency_scorer, select_uniform, {}, {"sinks": 4}),
    "h2o": Method(h2o_scorer, select_uniform, {}, {"sinks": 0}),
    "tova": Method(tova_scorer, select_uniform, {}, {"sinks": 0}),
    "knorm": Method(knorm_scorer, select_uniform, {}, {"sinks": 0}),
    "snapkv": Method(snapkv_scorer, select_uniform, {}, {"sinks": 0}, pool=7),
    "pyramidkv": Method(snapkv_scorer, select_pyramid, {}, {"sinks": 0, "beta": 20}, pool=7),
    "adakv": Method(snapkv_scorer, select_adakv, {}, {"sinks": 0, "alpha": 0.2}, pool=7),
    "criticalkv": Method(snapkv_scorer, select_criticalkv, {},
                         {"sinks": 0, "alpha": 0.2, "eps": 1e-4, "first_stage": 0.5}, pool=7,
                         weights=projected_value_l1),
    "laprox": Method(laprox.laprox_scorer, select_scope, {"group": "exact", "center": False, "normalize": "residual", "use_triton": None},
                     {"selection": "model", "sinks": 0}, pool=7),
}
