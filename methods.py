"""The registry of eviction methods, and eviction by name: what the eval scripts call.

Every method is a scorer plus a selection rule over the same prefill, so that two methods
differ only in what the method itself decides (the table in shared/baselines.md):

    scores = scorer(prefill, **score_flags)            # per layer (1, H_kv, n) float32, higher = keep
    scores = pool_scores(scores, pool)                 # optional max pooling over tokens (cache.py)
    kept   = rule(scores, k, window, **select_flags)   # per layer, per KV head, sorted indices
    cache  = KVCache.from_prefill(prefill, kept)       # what decoding reads

The scorers live in laprox.py (ours) and baselines.py (prior work); the rules, the budget and
the cache in cache.py. METHODS is a plain dict: a new method is one scorer and one line here
(README, "Add your own eviction method").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import baselines
import laprox
from cache import (KVCache, Prefill, pool_scores, resolve_budget, select_adakv, select_criticalkv, select_pyramid,
                   select_scope, select_uniform)


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
    "random": Method(baselines.random_scorer, select_uniform, {"seed": 0}, {"sinks": 0}),
    "streamingllm": Method(baselines.recency_scorer, select_uniform, {}, {"sinks": 4}),
    "h2o": Method(baselines.h2o_scorer, select_uniform, {}, {"sinks": 0}),
    "tova": Method(baselines.tova_scorer, select_uniform, {}, {"sinks": 0}),
    "knorm": Method(baselines.knorm_scorer, select_uniform, {}, {"sinks": 0}),
    "snapkv": Method(baselines.snapkv_scorer, select_uniform, {}, {"sinks": 0}, pool=7),
    "pyramidkv": Method(baselines.snapkv_scorer, select_pyramid, {}, {"sinks": 0, "beta": 20}, pool=7),
    "adakv": Method(baselines.snapkv_scorer, select_adakv, {}, {"sinks": 0, "alpha": 0.2}, pool=7),
    "criticalkv": Method(baselines.snapkv_scorer, select_criticalkv, {},
                         {"sinks": 0, "alpha": 0.2, "eps": 1e-4, "first_stage": 0.5}, pool=7,
                         weights=baselines.projected_value_l1),
    "laprox": Method(laprox.laprox_scorer, select_scope,
                     {"group": "exact", "center": False, "normalize": "residual", "use_triton": None},
                     {"selection": "model", "sinks": 0}, pool=7),
}


def get_method(method: str) -> Method:
    """METHODS[method], or a clear error listing the known names."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return METHODS[method]


def split_flags(method: str, flags: dict) -> tuple[dict, dict, int]:
    """Route user flags to the scorer, the selection rule, or the pooling kernel; unknown -> error.
    Returns (score flags, select flags, pool kernel), defaults filled in."""
    m = get_method(method)
    known = {**m.score_flags, **m.select_flags, "pool": m.pool}
    for name in flags:
        if name == "window":
            raise ValueError("window is fixed by the prefill (its captured queries); prefill with window=... instead")
        if name not in known:
            raise ValueError(f"unknown flag {name!r} for method {method!r}; its flags (defaults): {known}")
    score = {key: flags.get(key, v) for key, v in m.score_flags.items()}
    select_ = {key: flags.get(key, v) for key, v in m.select_flags.items()}
    return score, select_, flags.get("pool", m.pool)


def method_scores(prefill: Prefill, method: str = "laprox", **flags) -> list[Tensor]:
    """The method's scores after pooling: per layer (1, H_kv, n) float32, what the rule selects from.
    Flags as in select (the selection flags are accepted and ignored here)."""
    m = get_method(method)
    if m.scorer is None:
        raise ValueError(f"method {method!r} keeps everything and has no scores")
    score_flags, _, pool = split_flags(method, flags)
    return [pool_scores(s, pool, window=prefill.window) for s in m.scorer(prefill, **score_flags)]


def select(prefill: Prefill, method: str = "laprox", budget: float | int = 0.05, **flags) -> list[list[Tensor]]:
    """Which prompt tokens each (layer, KV head) keeps under `method` at `budget`.

    prefill: the full-attention prefill (window = prefill.window). method: a key of METHODS.
    budget: see cache.resolve_budget ("full" ignores it). flags: the method's flags (METHODS[m]:
    scorer flags, selection flags, `pool` kernel); an unknown flag is an error.
    Returns per layer a list over H_kv heads of sorted int64 indices (cache.kept_counts gives the sizes).
    """
    m = get_method(method)
    _, select_flags, _ = split_flags(method, flags)
    n, window = prefill.n, prefill.window
    if m.scorer is None:  # full
        return [[torch.arange(n, device=prefill.keys[0].device) for _ in range(prefill.n_kv_heads)]
                for _ in range(prefill.n_layers)]
    k = resolve_budget(budget, n, window, sinks=select_flags.get("sinks", 0))  # before any scoring
    scores = method_scores(prefill, method, **flags)
    extra = {} if m.weights is None else {"weights": m.weights(prefill)}
    return m.rule(scores, k, window, **select_flags, **extra)


def budget_fits(method: str, budget: float | int, n: int, window: int) -> bool:
    """Whether `budget` leaves every head of `method` at least its window + sinks on an n-token
    prompt, as select requires ("full" always fits). Evaluators use it to skip such cases for
    every method alike instead of failing mid-run."""
    m = get_method(method)
    if m.scorer is None:
        return True
    try:
        resolve_budget(budget, n, min(window, n), sinks=m.select_flags.get("sinks", 0))
        return True
    except ValueError:
        return False


def compress(prefill: Prefill, method: str = "laprox", budget: float | int = 0.05, **flags) -> KVCache:
    """Evict once after prefill: score, pool, select, and build the KVCache of what is kept.
    Arguments as in select. Report cache.kept_fraction(), the fraction actually achieved."""
    if get_method(method).scorer is None:  # full: nothing to select, but still reject unknown flags
        split_flags(method, flags)
        return KVCache.from_prefill(prefill, kept=None)
    return KVCache.from_prefill(prefill, kept=select(prefill, method, budget, **flags))
