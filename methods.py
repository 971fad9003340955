"""The registry of eviction methods, and eviction by name: what the eval scripts call.

Every method is a scorer plus a selection rule over the same prefill, so that two methods
differ only in what the method itself decides (see the README's table of methods):

    scores = scorer(prefill, **score_flags)                  # per layer (1, H_kv, n) float32, higher = keep
    scores = pool_scores(scores, pool, window=w, mode=pooling)  # smoothing (cache.py), average by default
    scores = normalize_scores(scores, ..., normalize)        # LaProx only: make layers comparable (laprox.py)
    kept   = rule(scores, k, w, **select_flags)              # per layer, per KV head, sorted indices
    cache  = KVCache.from_prefill(prefill, kept)             # what decoding reads

w is the observation window (prefill.window). Pooling smooths only the candidates, the tokens
before the window; the window, always kept, is neither pooled nor spread into them. The first
three lines do not depend on the budget: `score` computes them once (a `Scored`), and every
budget and selection flag selects from it (cases with equal `score_key` share it).
The scorers live in laprox.py (ours) and baselines.py (prior work); the rules, the budget and
the cache in cache.py. METHODS is a plain dict: a new method is one scorer and one line here
(docs/add-a-method.md). Method specs as the eval scripts write them ("laprox:floor=0.2") are read
by lab/harness.py's parse_method.

Where the defaults come from: pooling (average, kernel 7, for SnapKV, PyramidKV, AdaKV,
CriticalKV and LaProx) and w = 32 follow the LaProx paper's Appendix A, so that our tables
reproduce its comparisons; the budget rules' constants (PyramidKV's beta = 20, AdaKV's
alpha = 0.2, CriticalKV's eps and first stage) follow each method's own paper and code;
StreamingLLM's 4 sinks its paper. Max pooling (KVCache-Factory's SnapKV) is pooling=max.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import baselines
import laprox
from baselines import select_criticalkv, select_pyramid
from cache import (POOLING_MODES, SCOPES, KVCache, Prefill, check_budget, check_int, check_number, check_pool_kernel,
                   pool_scores, resolve_budget, select_adakv, select_scope, select_uniform)


@dataclass(frozen=True)
class Method:
    """One entry of METHODS.

    scorer: Prefill -> per layer (1, H_kv, n) scores (None: keep everything).
    rule: (scores, k, window, **select_flags[, weights]) -> kept indices (cache.py selection rules).
    score_flags, select_flags: the flags each accepts, with their defaults; a value must have its
        default's type (check_flags).
    pool, pooling: default pooling kernel (0 = off) and mode ("avg" or "max"); flags of every
        method that scores.
    normalize: default of LaProx's across-layer normalisation (laprox.normalize_scores), applied
        after pooling; None for a method without that flag.
    weights: Prefill -> per layer (1, H_kv, n), a second per-entry factor passed to the rule as
        `weights=` (CriticalKV's projected value norm); None for the others.
    """
    scorer: Callable | None
    rule: Callable | None
    score_flags: dict
    select_flags: dict
    pool: int = 0
    pooling: str = "avg"
    normalize: str | None = None
    weights: Callable | None = None


METHODS: dict[str, Method] = {
    "full": Method(None, None, {}, {}),
    "random": Method(baselines.random_scorer, select_uniform, {"seed": 0}, {"sinks": 0}),
    "streamingllm": Method(baselines.recency_scorer, select_uniform, {}, {"sinks": 4}),
    "h2o": Method(baselines.h2o_scorer, select_uniform, {}, {"sinks": 0}),
    "tova": Method(baselines.tova_scorer, select_uniform, {}, {"sinks": 0}),
    "knorm": Method(baselines.knorm_scorer, select_uniform, {}, {"sinks": 0}),
    "snapkv": Method(baselines.snapkv_scorer, select_uniform, {}, {"sinks": 0}, pool=7),
    "pyramidkv": Method(baselines.snapkv_scorer, select_pyramid, {}, {"sinks": 0, "beta": 20.0}, pool=7),
    "adakv": Method(baselines.snapkv_scorer, select_adakv, {}, {"sinks": 0, "alpha": 0.2}, pool=7),
    "criticalkv": Method(baselines.snapkv_scorer, select_criticalkv, {},
                         {"sinks": 0, "alpha": 0.2, "eps": 1e-4, "first_stage": 0.5}, pool=7,
                         weights=baselines.projected_value_l1),
    "laprox": Method(laprox.laprox_scorer, select_scope, {"group": "sum", "center": False, "use_triton": None},
                     {"selection": "model", "sinks": 0, "floor": 0.0}, pool=7, normalize="mass"),
}


# What a flag's value may be beyond its type (which is its default's type, see check_flags): the
# checks the scorers and rules run themselves, made here before any work. One meaning per name.
FLAG_RANGES = {
    "pool": check_pool_kernel,
    "sinks": lambda v: check_int("sinks", v),
    "alpha": lambda v: check_number("alpha", v, 0, 1),
    "first_stage": lambda v: check_number("first_stage", v, 0, 1),
    "eps": lambda v: check_number("eps", v, 0),
    "beta": lambda v: check_number("beta", v, 1),
    "floor": lambda v: check_number("floor", v, 0, 1),
}
FLAG_CHOICES = {"selection": SCOPES, "group": laprox.GROUP_MODES, "normalize": laprox.NORMALIZE_MODES,
                "pooling": POOLING_MODES}


def get_method(method: str) -> Method:
    """METHODS[method], or a clear error listing the known names."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return METHODS[method]


def flag_defaults(method: str) -> dict:
    """Every flag `method` takes, with its default: scorer flags, selection flags, `pool` and
    `pooling` (which "full", having no scores, does not take) and `normalize` where it has one."""
    m = get_method(method)
    pooled = {"pool": m.pool, "pooling": m.pooling} if m.scorer is not None else {}
    normalized = {"normalize": m.normalize} if m.normalize is not None else {}
    return {**m.score_flags, **m.select_flags, **pooled, **normalized}


def resolved_flags(method: str, flags: dict) -> dict:
    """Every flag of `method` with its value in this run: `flags` over the defaults (checked). What a
    result row records, so that a row made under other defaults is never taken for this one."""
    check_flags(method, flags)
    defaults = flag_defaults(method)
    return {**defaults, **{key: float(v) if type(defaults[key]) is float else v for key, v in flags.items()}}


def type_name(default) -> str:
    """What a flag with this default accepts, in words."""
    if default is None:
        return "true, false or none"
    if isinstance(default, bool):
        return "a bool (true or false)"
    return {int: "an int", float: "a number"}.get(type(default), f"a {type(default).__name__}")


def check_flag_name(method: str, name: str, defaults: dict) -> None:
    if name == "window":
        raise ValueError("window is fixed by the prefill (its captured queries); prefill with window=... instead")
    if name not in defaults:
        raise ValueError(f"unknown flag {name!r} for method {method!r}; its flags (defaults): {defaults}")


def check_flags(method: str, flags: dict) -> None:
    """Refuse a flag `method` does not take, or a value its scorer or rule would refuse (or, worse,
    misread): every value must have its default's type (a bool exactly; an int, not a float, for an
    int; a number for a float; None, True or False where the default is None), be one of the
    choices where there are choices, and lie in the flag's range (FLAG_RANGES).
    Needs no prefill: the eval scripts check every --methods entry before loading a model."""
    defaults = flag_defaults(method)
    for name, value in flags.items():
        check_flag_name(method, name, defaults)
        default = defaults[name]
        if default is None:
            ok = value is None or isinstance(value, bool)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            wanted = numbers.Integral if isinstance(default, int) else numbers.Real
            ok = isinstance(value, wanted) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"method {method!r}, flag {name} takes {type_name(default)} (default {default!r}), "
                             f"got {value!r}")
        if name in FLAG_CHOICES and value not in FLAG_CHOICES[name]:
            raise ValueError(f"method {method!r}, flag {name} must be one of {', '.join(FLAG_CHOICES[name])}; "
                             f"got {value!r}")
        try:
            FLAG_RANGES.get(name, lambda v: None)(value)
        except ValueError as e:
            raise ValueError(f"method {method!r}, flag {name}: {e}") from None


def split_flags(method: str, flags: dict) -> tuple[dict, dict, dict]:
    """Route user flags to the scorer, the selection rule, or the steps between them (pool, pooling,
    normalize), after check_flags. Returns (score flags, select flags, those steps' flags), defaults
    filled in."""
    m = get_method(method)
    flags = resolved_flags(method, flags)
    score = {key: flags[key] for key in m.score_flags}
    select_ = {key: flags[key] for key in m.select_flags}
    steps = {key: flags[key] for key in ("pool", "pooling", "normalize") if key in flags}
    return score, select_, steps


@dataclass
class Scored:
    """What selection reads, whatever the budget: scores per layer (1, H_kv, n) float32 after
    pooling (and LaProx's normalisation); weights per layer (1, H_kv, n) or None (CriticalKV's)."""
    scores: list[Tensor]
    weights: list[Tensor] | None = None


def score_key(method: str, flags: dict) -> tuple:
    """Which cases can share one `score` of the same prefill: equal keys give equal Scored. The
    scorer, its flags and the pooling and normalisation flags (not the budget, not the selection
    flags), so that e.g. laprox and laprox:selection=head share their scores."""
    m = get_method(method)
    score, _, steps = split_flags(method, flags)
    return (m.scorer, m.weights, tuple(sorted(score.items())), tuple(sorted(steps.items())))


def method_scores(prefill: Prefill, method: str = "laprox", **flags) -> list[Tensor]:
    """The method's scores after pooling (and LaProx's normalisation): per layer (1, H_kv, n) float32,
    what the rule selects from. Flags as in select (the selection flags are accepted and ignored)."""
    m = get_method(method)
    if m.scorer is None:
        raise ValueError(f"method {method!r} keeps everything and has no scores")
    score_flags, _, steps = split_flags(method, flags)
    pooled = [pool_scores(s, steps["pool"], window=prefill.window, mode=steps["pooling"])
              for s in m.scorer(prefill, **score_flags)]
    if m.normalize is None:
        return pooled
    return laprox.normalize_scores(pooled, prefill.resid_norm, prefill.out_norm, steps["normalize"], prefill.window)


def score(prefill: Prefill, method: str = "laprox", **flags) -> Scored:
    """method_scores and, for CriticalKV, its weights: everything select needs but the budget."""
    m = get_method(method)
    return Scored(method_scores(prefill, method, **flags), None if m.weights is None else m.weights(prefill))


def select(prefill: Prefill, method: str = "laprox", budget: float | int = 0.05, scored: Scored | None = None,
           **flags) -> list[list[Tensor]]:
    """Which prompt tokens each (layer, KV head) keeps under `method` at `budget`.

    prefill: the full-attention prefill (window = prefill.window). method: a key of METHODS.
    budget: see cache.resolve_budget ("full" keeps everything whatever the budget, but the budget
    must still be one). scored: this prefill's score(prefill, method, **flags), to select several
    budgets from one scoring (None: computed here). flags: the method's flags (METHODS[m]: scorer
    flags, selection flags, `pool`, `pooling`, `normalize`), checked by check_flags.
    Returns per layer a list over H_kv heads of sorted int64 indices (cache.kept_counts gives the sizes).
    """
    m = get_method(method)
    _, select_flags, _ = split_flags(method, flags)
    n, window = prefill.n, prefill.window
    if m.scorer is None:  # full
        check_budget(budget)
        return [[torch.arange(n, device=prefill.keys[0].device) for _ in range(prefill.n_kv_heads)]
                for _ in range(prefill.n_layers)]
    k = resolve_budget(budget, n, window, sinks=select_flags.get("sinks", 0))  # before any scoring
    scored = scored or score(prefill, method, **flags)
    extra = {} if scored.weights is None else {"weights": scored.weights}
    return m.rule(scored.scores, k, window, **select_flags, **extra)


def budget_fits(method: str, budget: float | int, n: int, window: int, **flags) -> bool:
    """Whether `budget` leaves every head of `method` (with `flags`, e.g. sinks=8) at least its
    forced tokens on an n-token prompt, as select requires ("full" always fits). Evaluators use it
    to skip such cases for every method alike instead of failing mid-run. A budget that is no
    budget (-5, "abc") raises."""
    m = get_method(method)
    _, select_flags, _ = split_flags(method, flags)
    check_budget(budget)
    if m.scorer is None:
        return True
    try:
        resolve_budget(budget, n, min(window, n), sinks=select_flags.get("sinks", 0))
        return True
    except ValueError:
        return False


def compress(prefill: Prefill, method: str = "laprox", budget: float | int = 0.05, scored: Scored | None = None,
             **flags) -> KVCache:
    """Evict once after prefill: score, pool, select, and build the KVCache of what is kept.
    Arguments as in select. Report cache.kept_fraction(), the fraction actually achieved."""
    if get_method(method).scorer is None:  # full: nothing to select, but still check flags and budget
        split_flags(method, flags)
        check_budget(budget)
        return KVCache.from_prefill(prefill, kept=None)
    return KVCache.from_prefill(prefill, kept=select(prefill, method, budget, scored, **flags))
