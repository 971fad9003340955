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


# ---- KVCache (storage) : the lead writes this section ----
