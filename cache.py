"""The KV cache that eviction really shrinks, and the selection machinery every method shares.

A KVCache holds one sequence: after eviction each (layer, KV head) keeps a different set of
prompt tokens, so two sequences would not share a shape (decode.CacheBatch pads several into one
batch for decoding). A cache is what is stored, nothing more: where decoding stands (the next
position, the next token's logits) is the decoding's (model.decode_greedy, decode.Sequence).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Prefill:
    """What one full-attention prefill leaves behind for the scorers (batch size 1).

    keys, values: per layer (1, H_kv, n, D), post-RoPE keys and the values.
    queries: per layer (1, H, w, D), post-RoPE queries of the last w prompt tokens.
    o_proj: per layer (d, H*D), the output projection weight (as nn.Linear stores it).
    resid_norm: (L,) ||x_l + Y_l||_F on the w window rows (residual stream after the attention add).
    out_norm: (L,) ||Y_l||_F on the window rows (attention output after o_proj).
    h2o: per layer (1, H, n) column sums of the causal prefill attention over all queries,
        each divided by the number of queries that see the key (n - j); None unless asked for.
    logits: (1, vocab) next-token logits, so decoding can start without re-reading the prompt.
    window: w, the observation window (the prefill's `window`, clamped to n).
    resid_rows, out_rows: (L, w) the squared norms of each window row of x_l + Y_l and of Y_l
        (resid_norm**2 and out_norm**2 are their row sums): what a prefill that continues this one
        (Model.prefill(..., past=)) needs when its window starts before the new tokens. None when
        the Prefill was not made by Model.prefill (such a Prefill cannot be continued).
    """
    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor]
    o_proj: list[Tensor]
    resid_norm: Tensor
    out_norm: Tensor
    h2o: list[Tensor] | None
    logits: Tensor
    window: int
    resid_rows: Tensor | None = None
    out_rows: Tensor | None = None

    @property
    def n(self) -> int:
        return self.keys[0].shape[2]

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def n_kv_heads(self) -> int:
        return self.keys[0].shape[1]

    @property
    def n_heads(self) -> int:
        return self.queries[0].shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[3]


# ---- KVCache (storage) ----

class LayerEntries:
    """One layer of a KVCache as attention reads it after an append, without copying anything.

    keys, values: the packed buffers (C, D): head g's entries are rows starts[g] : starts[g] + lengths[g].
    starts, lengths: (H_kv,) int64 on the buffers' device (lengths count the T new entries, the last T
    of each head). longest: max(lengths) as a host int, so that no shape waits on the device. T: the
    new tokens, whose queries read the entries. even: True when every head holds `longest` entries and
    the buffer is exactly (H_kv, C / H_kv, D), so the layer reads as one view of it.
    """

    def __init__(self, keys: Tensor, values: Tensor, starts: Tensor, lengths: Tensor, longest: int, T: int,
                 even: bool):
        self.keys, self.values, self.starts, self.lengths = keys, values, starts, lengths
        self.longest, self.T, self.even = longest, T, even

    def attention_inputs(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The readable path: what model.attention reads in a single call for the whole layer.

        An even layer: keys, values (1, H_kv, S, D), a view of the buffer, and no mask (plain causal
        attention). An uneven layer: the packed buffers as they are, keys, values (1, 1, C, D), read by
        every query head, with key_mask (1, H_kv, T, C) bool, True where query t of KV head g's group
        may look: its own head's rows up to its causal end, starts[g] <= j <= starts[g] + lengths[g] - T + t.
        Nothing of the cache is copied; the transient is the mask, H_kv x T x C bools (model.attention
        widens it to H x T x C, torch's attention may make that float). Every query scores all C rows:
        H_kv times the dot products of attention head by head, for one call instead of H_kv; on this
        CPU at 5% that costs about what the per-head calls did (bench.py measures both), and less than
        gathering a padded copy (2 x H_kv x longest x D elements moved every step, up to a whole layer
        of the full cache). Rows outside a head get exactly 0 weight (spare rows are zeros, never
        uninitialised memory, so 0 x a row adds nothing).
        """
        H, D = self.starts.shape[0], self.keys.shape[1]
        if self.even:  # no mask
            k = self.keys.view(H, -1, D)[None, :, :self.longest]
            return k, self.values.view(H, -1, D)[None, :, :self.longest], None
        j = torch.arange(self.keys.shape[0], device=self.keys.device)
        first_new = self.starts + self.lengths - self.T                                  # (H_kv,)
        last_seen = first_new[:, None] + torch.arange(self.T, device=j.device)           # (H_kv, T)
        key_mask = (j >= self.starts[:, None, None]) & (j <= last_seen[..., None])        # (H_kv, T, C)
        return self.keys[None, None], self.values[None, None], key_mask[None]

    def padded(self) -> tuple[Tensor, Tensor]:
        """Every head's entries as one (1, H_kv, longest, D) batch of keys and values, a copy (a view
        when even): row g holds head g's lengths[g] entries, then repeats of its last one (finite
        padding for decode.CacheBatch, which masks it)."""
        H, D = self.starts.shape[0], self.keys.shape[1]
        if self.even:
            return self.keys.view(H, -1, D)[None, :, :self.longest], self.values.view(H, -1, D)[None, :, :self.longest]
        j = torch.arange(self.longest, device=self.keys.device)
        rows = self.starts[:, None] + torch.minimum(j, self.lengths[:, None] - 1)   # (H_kv, longest)
        return self.keys[rows][None], self.values[rows][None]


def attention_column_sums(q: Tensor, k: Tensor, chunk: int) -> Tensor:
    """The causal attention each key receives, summed over the queries q (1, H, t, D) of the last t
    of the S positions of k (1, H_kv, S, D) -> (1, H, S) float32, `chunk` queries at a time. H2O's
    score divides the sums over all queries by the S - j queries that see key j (Model.prefill)."""
    (_, H, t, D), S = q.shape, k.shape[2]
    kf = k.float().repeat_interleave(H // k.shape[1], dim=1)          # (1, H, S, D)
    total = torch.zeros(1, H, S, device=q.device)
    for a in range(0, t, chunk):
        see = S - t + min(a + chunk, t)  # queries a.. see keys 0..see-1 at most: the rest is never computed
        s = q[:, :, a:a + chunk].float() @ kf[:, :, :see].transpose(-1, -2) / math.sqrt(D)  # (1, H, chunk, see)
        causal = torch.arange(see, device=q.device)[None, :] <= torch.arange(S - t + a, see, device=q.device)[:, None]
        total[..., :see] += s.masked_fill(~causal, float("-inf")).softmax(-1).sum(2)
    return total


class KVCache:
    """Keys and values of one sequence, a different number of entries per (layer, KV head).

    Layout, per layer: one packed buffer `k[l]`, `v[l]` of shape (C_l, D) that holds the
    heads one after another; head g owns rows starts[l][g] : starts[l][g] + lengths[l, g] +
    spare[l]. Packed rather than padded to the layer's longest head so that the memory held is
    the sum of what the heads keep (model-wide selection gives uneven heads; padding would hand
    the savings back). Every head of a layer has the same number of spare rows (decoding appends
    one entry to every head), so that decoding appends in place; when they run out the layer is
    repacked with `reserve` more rows per head. A fresh cache has no spare rows, so `nbytes` right
    after eviction is exactly what was kept. When all heads of a layer hold the same number of
    entries the buffer is exactly a (H_kv, capacity, D) tensor, and attention reads it as one view.

    Where decoding stands is host bookkeeping (Python ints), so that a step never reads a number
    back from the device: every head of layer l holds its kept prompt entries plus appended[l].

    Kept entries keep their original positions: keys were cached after RoPE, and a new token
    gets the position its caller gives it (Model.forward's pos).
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], prompt_len: int, reserve: int = 64):
        """keys, values: per layer, a list over KV heads of (n_g, D) tensors to start from, kept
        from a prompt of prompt_len tokens (the denominator of kept_fraction)."""
        self.n_layers, self.n_kv_heads = len(keys), len(keys[0])
        self.head_dim = keys[0][0].shape[-1]
        self.reserve, self.prompt_len = reserve, prompt_len
        self.prompt_lengths = torch.tensor([[k.shape[0] for k in layer] for layer in keys], dtype=torch.long)
        self.appended = [0] * self.n_layers    # entries appended to every head of each layer
        self.spare = [0] * self.n_layers       # free rows of every head of each layer
        self.longest_prompt = self.prompt_lengths.amax(1).tolist()
        self.even = [len(set(row)) == 1 for row in self.prompt_lengths.tolist()]
        self.k = [torch.cat(layer) for layer in keys]  # room for decoding is made on the first append
        self.v = [torch.cat(layer) for layer in values]
        starts = torch.cumsum(self.prompt_lengths, 1) - self.prompt_lengths
        self.starts = [s.to(k.device) for s, k in zip(starts, self.k)]                   # (H_kv,) per layer
        self.kept = [n.to(k.device) for n, k in zip(self.prompt_lengths, self.k)]          # (H_kv,) per layer

    @classmethod
    def from_prefill(cls, prefill: Prefill, kept: list[list[Tensor]] | None = None) -> "KVCache":
        """Build the cache from a prefill. kept: per layer, a list over KV heads of sorted
        int64 indices of the prompt tokens to keep (on any device: a model-wide selection makes them
        where it gathered the scores; they move to their layer's device); None keeps everything."""
        keys, values = [], []
        for l, (k, v) in enumerate(zip(prefill.keys, prefill.values)):  # (1, H_kv, n, D)
            idx = [None] * k.shape[1] if kept is None else [i.to(k.device) for i in kept[l]]
            keys.append([k[0, g] if i is None else k[0, g, i] for g, i in enumerate(idx)])
            values.append([v[0, g] if i is None else v[0, g, i] for g, i in enumerate(idx)])
        return cls(keys, values, prompt_len=prefill.n)

    @property
    def lengths(self) -> Tensor:
        """(L, H_kv) int64 on the CPU: the entries each (layer, KV head) holds."""
        return self.prompt_lengths + torch.tensor(self.appended)[:, None]

    def _repack(self, layer: int, extra: int):
        """Give every head of `layer` `extra` spare rows (it has spare[layer] < extra): each head's
        rows, spare ones included, move to a new buffer, head g shifted by g x (extra - spare) rows."""
        shift = extra - self.spare[layer]
        k, v, starts = self.k[layer], self.v[layer], self.starts[layer]
        head = torch.bucketize(torch.arange(k.shape[0], device=k.device), starts, right=True) - 1  # (C,) head of row
        rows = torch.arange(k.shape[0], device=k.device) + shift * head
        size = k.shape[0] + shift * self.n_kv_heads
        self.k[layer] = k.new_zeros(size, self.head_dim).index_copy_(0, rows, k)  # spare rows: zeros (see
        self.v[layer] = v.new_zeros(size, self.head_dim).index_copy_(0, rows, v)  # attention_inputs)
        self.starts[layer] = starts + shift * torch.arange(self.n_kv_heads, device=starts.device)
        self.spare[layer] = extra

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> LayerEntries:
        """Append T new entries to every head of `layer` (one indexed copy for all heads) and return
        the layer as attention reads it. k_new, v_new: (1, H_kv, T, D)."""
        T = k_new.shape[2]
        if self.spare[layer] < T:  # out of room: repack with more
            self._repack(layer, T + self.reserve)
        lengths = self.kept[layer] + self.appended[layer]                                    # (H_kv,) before
        rows = (self.starts[layer] + lengths)[:, None] + torch.arange(T, device=lengths.device)  # (H_kv, T)
        self.k[layer].index_copy_(0, rows.flatten(), k_new[0].reshape(-1, self.head_dim))
        self.v[layer].index_copy_(0, rows.flatten(), v_new[0].reshape(-1, self.head_dim))
        self.appended[layer] += T
        self.spare[layer] -= T
        return self.read(layer, T)

    def read(self, layer: int, T: int = 0) -> LayerEntries:
        """The entries of `layer`, the last T of each head being the newest (see LayerEntries)."""
        a = self.appended[layer]
        return LayerEntries(self.k[layer], self.v[layer], self.starts[layer], self.kept[layer] + a,
                            self.longest_prompt[layer] + a, T, self.even[layer])

    def head(self, layer: int, g: int) -> tuple[Tensor, Tensor]:
        """The entries of (layer, KV head g): keys, values (n_g, D), views into the buffer (reads the
        head's start from the device: for inspection and tests, never on a decoding step)."""
        a, n = int(self.starts[layer][g]), int(self.prompt_lengths[layer, g]) + self.appended[layer]
        return self.k[layer][a: a + n], self.v[layer][a: a + n]

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (spare decode capacity included)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def kept_fraction(self) -> float:
        """Prompt entries kept / prompt entries in the full cache (L x H_kv x n)."""
        return float(self.prompt_lengths.sum()) / (self.n_layers * self.n_kv_heads * self.prompt_len)


# ---- SELECTION : scores + budget -> kept prompt indices per (layer, KV head) ----
#
# A scorer (baselines.py, laprox.py) gives, per layer, a (1, H_kv, n) float32 tensor: higher
# means keep. A selection rule turns those scores and a budget into, per layer, a list over
# KV heads of sorted int64 index tensors. Conventions shared by every rule:
#   * k = resolve_budget(budget, n, window) is the number of entries a head keeps ON AVERAGE;
#     the total kept by the model is always L * H_kv * k (pyramid, AdaKV and model-wide rules
#     move entries between heads and layers, they never change the total).
#   * The observation window (last `window` tokens) and the first `sinks` tokens are kept in
#     every head and count toward the budget ("forced" entries; on a prompt shorter than
#     window + sinks the two overlap, and all n tokens are forced: see n_forced). A budget smaller
#     than them is an error (see resolve_budget), so no head ever ends up with fewer.
#   * Ties are broken deterministically toward the lower flat index: the earlier token, then the
#     lower head, then the shallower layer (stable descending sort), so results are reproducible
#     and a naive loop can reproduce them exactly.


def check_int(name: str, x, low: int = 0) -> None:
    """A count: an int (not a bool) >= low, or a clear error naming it."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < low:
        raise ValueError(f"{name} must be an int >= {low}, got {x!r}")


def check_number(name: str, x, low: float, high: float = math.inf) -> None:
    """A real parameter: a finite number (not a bool) in [low, high], or a clear error naming it."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not (math.isfinite(x) and low <= x <= high):
        span = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a finite number {span}, got {x!r}")


def check_budget(budget) -> None:
    """A budget as resolve_budget reads it: a float in (0, 1] or an int >= 1 (see there)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a float in (0, 1] (fraction of the KV entries) or an int >= 1 "
                        f"(tokens per head), got {budget!r} of type {type(budget).__name__}")
    if isinstance(budget, numbers.Integral) and budget < 1:
        raise ValueError(f"int budget {budget} must be >= 1 token per head (use a float for a fraction)")
    if not isinstance(budget, numbers.Integral) and not 0.0 < float(budget) <= 1.0:  # also rejects nan
        raise ValueError(f"float budget {budget} must be in (0, 1] (a fraction of the KV entries); "
                         f"for tokens per head pass an int")


def n_forced(n: int, window: int, sinks: int) -> int:
    """How many tokens every head keeps whatever the scores: the first `sinks` and the last `window`,
    which overlap on a prompt shorter than window + sinks."""
    return min(n, window + sinks)


def resolve_budget(budget: float | int, n: int, window: int, *, sinks: int = 0) -> int:
    """Turn a budget into k, the number of entries each KV head keeps on average.

    budget: a float in (0, 1] is a fraction of the prompt's KV entries (0.05 keeps 5% of
        L x H_kv x n), giving k = round(budget * n); an int >= 1 is tokens per head directly.
    n: prompt length. window: observation-window length w. sinks: leading tokens always kept.
    Returns k with n_forced(n, window, sinks) <= k <= n; a budget of 1.0 (or n) always fits.

    A budget that would keep fewer than the forced tokens per head is an ERROR, not a clamp:
    the window is always kept and counts toward the budget, so such a budget cannot be honoured,
    and silently clamping would report every method at the same window-only cache.
    """
    check_budget(budget)
    check_int("n", n, 1), check_int("window", window), check_int("sinks", sinks)
    if isinstance(budget, numbers.Integral):
        k = int(budget)
        if k > n:
            raise ValueError(f"int budget {k} tokens per head exceeds the prompt length n={n}; "
                             f"use budget=1.0 (or method='full') to keep everything")
        what = f"budget={k} tokens per head"
    else:
        k = round(float(budget) * n)
        what = f"budget={budget} keeps round({budget} * {n}) = {k} tokens per head"
    floor = max(n_forced(n, window, sinks), 1)
    if k < floor:
        hint = " (did you mean 1.0, keep everything?)" if isinstance(budget, numbers.Integral) and k == 1 else ""
        fraction = min(1.0, math.ceil(round(floor / n * 1e4, 6)) / 1e4)  # rounded up: it does fit
        raise ValueError(f"{what}, fewer than the {floor} tokens ({window} window + {sinks} sink tokens) that every "
                         f"head always keeps{hint}. Raise the budget to at least {floor} tokens per head "
                         f"(fraction {fraction:.4f}), or prefill with a smaller window.")
    return k


POOLING_MODES = ("avg", "max")


def check_pool_kernel(kernel) -> None:
    """A pooling kernel: an int >= 0, odd when > 1 (0 or 1 = off)."""
    if isinstance(kernel, bool) or not isinstance(kernel, numbers.Integral) or kernel < 0:
        raise ValueError(f"pool kernel must be an int >= 0 (0 or 1 = off), got {kernel!r}")
    if kernel > 1 and kernel % 2 == 0:
        raise ValueError(f"pool kernel must be odd so the output stays centred on each token, got {kernel}; use {kernel + 1}")


def pool_scores(scores: Tensor, kernel: int, *, window: int = 0, mode: str = "avg") -> Tensor:
    """1-D pooling of scores over the token axis, stride 1, same length: score smoothing, so that a
    kept token brings its neighbours (a fact spans several tokens).

    scores: (..., n), e.g. (1, H_kv, n) for one layer; each row is pooled on its own.
    kernel: odd window size (7 for SnapKV, its followers and LaProx); 0 or 1 turns pooling off.
    window: only the candidates, the n - window tokens before the observation window (which is
        always kept), are pooled; the window's scores are left as they are and do not spread into
        the tokens before them, as in SnapKV, which pools only the prefix scores[..., :-window].
    mode: "avg" (the LaProx paper's Appendix A, for every pooled method):
        F.avg_pool1d(kernel_size=kernel, stride=1, padding=kernel // 2), zero padding counted, so
        out[j] = sum(scores[j - kernel//2 : j + kernel//2 + 1] within the candidates) / kernel;
        "max" (KVCache-Factory's SnapKV): out[j] = max of the same span.
    Returns (..., n) float32.
    """
    check_pool_kernel(kernel)
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {mode!r}")
    n = scores.shape[-1]
    if not 0 <= window <= n:
        raise ValueError(f"window {window} must be in [0, n={n}]")
    if kernel <= 1 or window == n:
        return scores
    prefix = scores[..., : n - window].reshape(-1, 1, n - window).float()
    pool = F.avg_pool1d if mode == "avg" else F.max_pool1d  # max pads with -inf, avg with counted zeros
    pooled = pool(prefix, kernel_size=kernel, stride=1, padding=kernel // 2)
    pooled = pooled.reshape(*scores.shape[:-1], n - window)
    return torch.cat([pooled, scores[..., n - window:].float()], dim=-1)


def stack_scores(scores: list[Tensor]) -> Tensor:
    """Check per-layer scores and stack them: list over L of (1, H_kv, n) -> (L, H_kv, n) float32, on
    the device of scores[0] (the layers of a model placed on several devices have their scores on
    their own devices: only these small tensors are gathered for a selection)."""
    if not isinstance(scores, (list, tuple)) or len(scores) == 0:
        raise ValueError("scores must be a non-empty list over layers of (1, H_kv, n) tensors")
    shape = scores[0].shape
    for l, s in enumerate(scores):
        if s.dim() != 3 or s.shape[0] != 1 or s.shape != shape:
            raise ValueError(f"scores[{l}] has shape {tuple(s.shape)}; every layer must be (1, H_kv, n) = {tuple(shape)}")
    s = torch.cat([t.to(scores[0].device, torch.float32) for t in scores], dim=0)
    if torch.isnan(s).any() or torch.isposinf(s).any():
        raise ValueError("scores contain NaN or +inf; a scorer must return finite values (or -inf for 'never keep')")
    return s


def forced_mask(n: int, window: int, sinks: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(n,) bool on `device`: True for the tokens every head keeps, the first `sinks` and the last
    `window` (n_forced(n, window, sinks) of them)."""
    check_int("window", window), check_int("sinks", sinks)
    if window > n:
        raise ValueError(f"window {window} must be <= n={n} (the window is the last `window` prompt tokens)")
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[:sinks] = True
    mask[n - window:] = True
    return mask


def check_k(k: int, n: int, window: int, sinks: int) -> None:
    f = n_forced(n, window, sinks)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not f <= k <= n:
        raise ValueError(f"k={k!r} tokens per head must be an int in [n_forced, n] = [{f}, {n}]; "
                         f"get it from resolve_budget(budget, n, window)")


def top_indices(key: Tensor, count: int) -> Tensor:
    """Indices of the `count` largest entries along the last axis, ties to the lower index.
    key: (..., m) -> (..., count) int64."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :count]


def mask_to_kept(mask: Tensor) -> list[list[Tensor]]:
    """(L, H_kv, n) bool -> per layer, a list over KV heads of sorted int64 index tensors."""
    return [[row.nonzero().squeeze(1) for row in layer] for layer in mask]


def uniform_mask(s: Tensor, k: int, forced: Tensor) -> Tensor:
    """Per-head top-k with forced entries first. s: (L, H_kv, n); forced: (n,) bool -> (L, H_kv, n) bool."""
    key = s.masked_fill(forced, math.inf)
    mask = torch.zeros_like(s, dtype=torch.bool)
    return mask.scatter_(-1, top_indices(key, k), True)


def select_uniform(scores: list[Tensor], k: int, window: int, *, sinks: int = 0) -> list[list[Tensor]]:
    """Per-head top-k (SnapKV's allocation): every (layer, KV head) keeps exactly k entries.

    scores: per layer (1, H_kv, n). k: entries per head, n_forced(n, window, sinks) <= k <= n.
    Returns per layer a list over H_kv heads of sorted int64 indices, each of length k.
    """
    s = stack_scores(scores)
    check_k(k, s.shape[-1], window, sinks)
    return mask_to_kept(uniform_mask(s, k, forced_mask(s.shape[-1], window, sinks, s.device)))


def safeguard(k: int, forced: int, alpha: float) -> int:
    """AdaKV's per-head floor beyond the forced entries: floor(alpha * (k - forced)), as in its code."""
    return int(alpha * (k - forced))


def _guarded_key(s: Tensor, k: int, forced: Tensor, alpha: float) -> Tensor:
    """The sort key of a selection with a per-head floor: s (L, H_kv, n) with every head's forced
    entries and then its top safeguard(k, forced, alpha) others set to +inf, so that any later top-k
    over heads takes them first. forced: (n,) bool."""
    f = int(forced.sum())
    key = s.masked_fill(forced, math.inf)
    if alpha > 0:
        key.scatter_(-1, top_indices(key, f + safeguard(k, f, alpha)), math.inf)
    return key


def adakv_mask(s: Tensor, k: int, forced: Tensor, alpha: float) -> Tensor:
    """AdaKV allocation (Feng et al. 2024): each head first keeps its forced entries and its top
    floor(alpha * (k - forced)) other entries (the safeguard), then the rest of the layer's
    H_kv * k entries go to the highest scores over all heads of the layer.
    s: (L, H_kv, n); forced: (n,) bool. Returns (L, H_kv, n) bool, H_kv * k True per layer."""
    L, H, n = s.shape
    flat = top_indices(_guarded_key(s, k, forced, alpha).reshape(L, H * n), H * k)
    return torch.zeros(L, H * n, dtype=torch.bool, device=s.device).scatter_(-1, flat, True).reshape(L, H, n)


def select_adakv(scores: list[Tensor], k: int, window: int, *, sinks: int = 0, alpha: float = 0.2) -> list[list[Tensor]]:
    """AdaKV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation"):
    one top-k across all KV heads of a layer, layer total H_kv * k, after a safeguard.

    Every head keeps its window + sinks, then its top floor(alpha * (k - window - sinks)) other
    entries (AdaKV's floor_alpha applies to the budget beyond the window, as in its code); the
    layer's remaining entries go to the highest scores of any head. alpha = 0 is plain layer-wise
    top-k; alpha = 1 is select_uniform.
    scores: per layer (1, H_kv, n). Returns per layer a list over H_kv heads of sorted int64 indices.
    """
    check_number("alpha", alpha, 0, 1)
    s = stack_scores(scores)
    check_k(k, s.shape[-1], window, sinks)
    return mask_to_kept(adakv_mask(s, k, forced_mask(s.shape[-1], window, sinks, s.device), alpha))


def select_model(scores: list[Tensor], k: int, window: int, *, sinks: int = 0, floor: float = 0.0) -> list[list[Tensor]]:
    """Model-wide selection (LaProx's Algorithm 2): one top-k over every (layer, KV head, token)
    entry of the model, total L * H_kv * k, after the forced entries of every head. Meaningful only
    when scores are comparable across layers (LaProx's normalised scores).

    floor: a per-head floor (ours; 0 = the paper): each head first keeps its top
        floor(floor * (k - forced)) candidates (cache.safeguard, AdaKV's safeguard), then the rest of
        the budget is one model-wide top-k. It guards a concentrated head (a few large scores, a tiny
        tail) against losing its tail to the global threshold. floor = 1 is select_uniform.
    scores: per layer (1, H_kv, n). Returns per layer a list over H_kv heads of sorted int64 indices.
    Without a floor a head may keep as few as its forced entries (window + sinks), or all n.
    """
    check_number("floor", floor, 0, 1)
    s = stack_scores(scores)
    L, H, n = s.shape
    check_k(k, n, window, sinks)
    key = _guarded_key(s, k, forced_mask(n, window, sinks, s.device), floor).reshape(-1)
    mask = torch.zeros(L * H * n, dtype=torch.bool, device=s.device).scatter_(0, top_indices(key, L * H * k), True)
    return mask_to_kept(mask.reshape(L, H, n))


SCOPES = ("model", "layer", "head")


def select_scope(scores: list[Tensor], k: int, window: int, *, selection: str = "model", sinks: int = 0,
                 floor: float = 0.0) -> list[list[Tensor]]:
    """LaProx's rule: the same scores selected model-wide (one top-k over the model, default, the
    paper's Algorithm 2), layer-wise (one top-k per layer: select_adakv with alpha = floor; the
    paper's Table 5 ablation) or per head (uniform per-head budget, select_uniform, which every
    floor leaves as it is; the paper's Table 6 ablation). scores: per layer (1, H_kv, n)."""
    if selection == "model":
        return select_model(scores, k, window, sinks=sinks, floor=floor)
    if selection == "layer":
        return select_adakv(scores, k, window, sinks=sinks, alpha=floor)
    if selection == "head":   # floor (checked by select_model and methods.check_flags) changes nothing here
        return select_uniform(scores, k, window, sinks=sinks)
    raise ValueError(f"selection must be one of {SCOPES}, got {selection!r}")


def kept_counts(kept: list[list[Tensor]]) -> Tensor:
    """(L, H_kv) int64: how many prompt entries each (layer, KV head) keeps."""
    return torch.tensor([[len(i) for i in layer] for layer in kept], dtype=torch.long)
