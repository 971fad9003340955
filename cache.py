"""The KV cache that eviction really shrinks, and the selection machinery every method shares.

Batch size is 1 throughout: after eviction each (layer, KV head) keeps a different set of
prompt tokens, so two sequences would not share a shape. Evaluations run one prompt at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
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

class KVCache:
    """Keys and values of one sequence, a different number of entries per (layer, KV head).

    Layout, per layer: one packed buffer `k[l]`, `v[l]` of shape (C_l, D) that holds the
    heads one after another; head g owns rows offsets[l][g] : offsets[l][g] + capacity[l][g]
    and uses the first lengths[l, g] of them. Packed rather than padded to the layer's
    longest head so that the memory held is the sum of what the heads keep (model-wide
    selection gives uneven heads; padding would hand the savings back). Each head has a
    spare capacity (`reserve` rows) so that decoding appends in place; when it runs out the
    layer is repacked with more room. A fresh cache has no spare rows, so `nbytes` right after
    eviction is exactly what was kept. When all heads of a layer hold the same number of entries the
    buffer is exactly a (H_kv, capacity, D) tensor, and attention reads it as one batch.

    Kept entries keep their original positions: keys were cached after RoPE, and new
    tokens get positions from `pos` on.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], pos: int, reserve: int = 64):
        """keys, values: per layer, a list over KV heads of (n_g, D) tensors to start from.
        pos: position of the next token (the prompt length after a prefill); the model
        advances it after each forward."""
        self.n_layers, self.n_kv_heads = len(keys), len(keys[0])
        self.head_dim = keys[0][0].shape[-1]
        self.reserve, self.pos = reserve, pos
        self.lengths = torch.tensor([[k.shape[0] for k in layer] for layer in keys], dtype=torch.long)
        self.prompt_lengths = self.lengths.clone()  # entries of the prompt kept (for kept_fraction)
        self.prompt_len = pos
        self.last_logits: Tensor | None = None  # (1, vocab), the prefill's next-token logits
        self.k, self.v, self.offsets, self.capacity = [], [], [], []
        for layer_k, layer_v in zip(keys, values):
            self._pack(layer_k, layer_v, extra=0)  # room for decoding is made on the first append

    @classmethod
    def from_prefill(cls, prefill: Prefill, kept: list[list[Tensor]] | None = None) -> "KVCache":
        """Build the cache from a prefill. kept: per layer, a list over KV heads of sorted
        int64 indices of the prompt tokens to keep; None keeps everything."""
        keys, values = [], []
        for l, (k, v) in enumerate(zip(prefill.keys, prefill.values)):  # (1, H_kv, n, D)
            idx = [None] * k.shape[1] if kept is None else kept[l]
            keys.append([k[0, g] if i is None else k[0, g, i] for g, i in enumerate(idx)])
            values.append([v[0, g] if i is None else v[0, g, i] for g, i in enumerate(idx)])
        cache = cls(keys, values, pos=prefill.n)
        cache.last_logits = prefill.logits
        return cache

    def _pack(self, layer_k: list[Tensor], layer_v: list[Tensor], extra: int, layer: int | None = None):
        """(Re)build one layer's packed buffers from per-head (n_g, D) tensors, with `extra`
        free rows per head."""
        lens = [k.shape[0] for k in layer_k]
        cap = torch.tensor(lens) + extra
        offsets = torch.cumsum(cap, 0) - cap
        ref = layer_k[0]
        kbuf = ref.new_empty(int(cap.sum()), self.head_dim)
        vbuf = ref.new_empty(int(cap.sum()), self.head_dim)
        for g, (kg, vg) in enumerate(zip(layer_k, layer_v)):
            kbuf[offsets[g]: offsets[g] + lens[g]] = kg
            vbuf[offsets[g]: offsets[g] + lens[g]] = vg
        if layer is None:
            self.k.append(kbuf); self.v.append(vbuf); self.offsets.append(offsets); self.capacity.append(cap)
        else:
            self.k[layer], self.v[layer], self.offsets[layer], self.capacity[layer] = kbuf, vbuf, offsets, cap

    def head(self, layer: int, g: int) -> tuple[Tensor, Tensor]:
        """The entries of (layer, KV head g): keys, values (n_g, D), views into the buffer."""
        a, n = int(self.offsets[layer][g]), int(self.lengths[layer, g])
        return self.k[layer][a: a + n], self.v[layer][a: a + n]

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Append T new entries to every head of `layer` and return what attention reads.

        k_new, v_new: (1, H_kv, T, D). Returns a list of (keys, values) pairs of shape
        (1, h, S, D): one pair covering all H_kv heads when they hold the same number of
        entries S, else one pair per head (h = 1), in head order.
        """
        T = k_new.shape[2]
        lens = self.lengths[layer]
        if bool((lens + T > self.capacity[layer]).any()):  # out of room: repack with more
            heads = [self.head(layer, g) for g in range(self.n_kv_heads)]
            self._pack([k for k, _ in heads], [v for _, v in heads], extra=T + self.reserve, layer=layer)
        for g in range(self.n_kv_heads):
            a = int(self.offsets[layer][g] + lens[g])
            self.k[layer][a: a + T] = k_new[0, g]
            self.v[layer][a: a + T] = v_new[0, g]
        self.lengths[layer] += T
        return self.read(layer)

    def read(self, layer: int) -> list[tuple[Tensor, Tensor]]:
        """See `update`: the layer as one (1, H_kv, S, D) batch when its heads are even, else per head."""
        lens, cap = self.lengths[layer], self.capacity[layer]
        if bool((lens == lens[0]).all()) and bool((cap == cap[0]).all()):
            S, C = int(lens[0]), int(cap[0])
            k = self.k[layer].view(self.n_kv_heads, C, self.head_dim)[None, :, :S]
            v = self.v[layer].view(self.n_kv_heads, C, self.head_dim)[None, :, :S]
            return [(k, v)]
        return [tuple(t[None, None] for t in self.head(layer, g)) for g in range(self.n_kv_heads)]

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (spare decode capacity included)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def kept_fraction(self) -> float:
        """Prompt entries kept / prompt entries in the full cache (L x H_kv x n)."""
        return float(self.prompt_lengths.sum()) / (self.n_layers * self.n_kv_heads * self.prompt_len)
