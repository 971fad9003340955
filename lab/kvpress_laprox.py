"""LaProx inside NVIDIA kvpress: `LaProxPress`, a press that drops exactly what our reference drops.

Pinned to kvpress 0.5.5 and transformers 5.2.0 (requirements-test.txt). Only users of kvpress import
this module; the core (model.py, cache.py, laprox.py, methods.py, ...) never imports kvpress or
transformers. How to run kvpress's evaluate.py with it, and what it cannot do: docs/kvpress.md.

    from transformers import pipeline
    from lab.kvpress_laprox import LaProxPress

    pipe = pipeline("kv-press-text-generation", model="Qwen/Qwen3-8B", device="cuda", dtype="auto")
    press = LaProxPress(compression_ratio=0.9)          # or LaProxPress.from_spec("laprox:floor=0.2", 0.9)
    answer = pipe(context, question=question, press=press)["answer"]

What it does. kvpress calls a press's hook after every attention layer's forward. Model-wide
selection needs every layer's scores before it cuts, so, as kvpress's own KVzipPress does, the
hooks only record and the cut is made when the `with press(model):` block of the prefill exits:
  1. per layer, during the prefill (forward_hook, residual_hook): the cached (post-RoPE) keys and
     the values, the post-RoPE queries of the last w = window_size prompt tokens, o_proj's weight,
     and the squared norms of the window rows of the attention output Y_l and of the residual
     stream x_l + Y_l: exactly the fields of our cache.Prefill;
  2. after the prefill (select): that Prefill goes through our own methods.score and
     methods.select for "laprox" with this press's flags (the same functions, hence the same
     scores, pooling, normalisation and model-wide top-k as `methods.compress`);
  3. the complement of the kept set becomes each layer's `masked_key_indices`, which kvpress's
     attention patch reads at every later forward (the question and each decoded token): a masked
     key is overwritten by a key whose attention weight underflows to zero.

Budget. compression_ratio r is kvpress's fraction REMOVED. On a context of n tokens the press keeps
    k = kvpress.utils.compute_n_kept(n, r) = max(1, int(n * (1 - r)))
entries per KV head on average, L * H_kv * k in all, chosen model-wide; the window's w entries of
every head (and the first `sinks`, 0 by default) are always among them and count toward k, as in
our reference. That is our budget=k, an int (tokens per head). kvpress truncates in floating point
(r = 0.9, n = 1000: int(99.99999999999997) = 99), while our float budget 1 - r rounds
(round(0.1 * 1000) = 100), so pass k, not 1 - r, to compare (kept_per_head). r = 0 keeps everything;
an r that leaves a head fewer than its w (+ sinks) forced entries is a ValueError, not a clamp.

What kvpress cannot express, and what this press therefore does not do:
  * it masks, it does not evict: the masked keys and values stay in the DynamicCache, so no memory
    is freed, and attention still reads them (at a weight that underflows to 0, not one removed);
  * the masks are set when the `with` block exits: tokens generated INSIDE it see the whole cache
    (kvpress's pipeline decodes after the block, as it does for KVzipPress);
  * one sequence (batch size 1), one prefill forward from an empty cache; not "eager" attention
    (kvpress patches only the attention functions transformers registers: sdpa, flash);
  * it is not a ScorerPress, so kvpress's wrappers (AdaKVPress, ComposedPress, DecodingPress,
    KeyRerotationPress, ...) do not take it: it selects over the whole model itself;
  * kvpress's `query_aware` evaluation puts the question at the end of the context, before the chat
    template's closing tokens: close to our `aware` protocol, not identical (its window ends at the
    question, ours after the assistant header). Without it, kvpress is our `agnostic` protocol.
The window, pooling over the candidates only, the normalisation, the floor, the sinks and the
layer / head ablations are all expressible (the cut is ours, made after the prefill), and the press
takes every flag of "laprox" in methods.METHODS under the same name.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import rotate_half

from kvpress import BasePress
from kvpress.presses.base_press import is_prefilling
from kvpress.utils import compute_n_kept, extract_keys_and_values, get_prerope_query_states

import methods
from cache import Prefill, check_int, n_forced


# ----------------------------------------------------------------------------- the budget

def check_compression_ratio(compression_ratio) -> None:
    """kvpress's compression_ratio: a finite number in [0, 1) (the fraction of entries removed)."""
    r = compression_ratio
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (math.isfinite(r) and 0 <= r < 1):
        raise ValueError(f"compression_ratio is the fraction of KV entries removed, a number in [0, 1); "
                         f"got {compression_ratio!r}")


def kept_per_head(compression_ratio: float, n: int, window: int = 32, sinks: int = 0) -> int:
    """k, the entries each KV head keeps on average under kvpress's compression_ratio on an n-token
    context: compute_n_kept(n, r) = max(1, int(n * (1 - r))), kvpress's truncation. Our budget=k
    (an int) keeps the same entries. window, sinks: the forced entries of every head (n_forced);
    a ratio that leaves fewer is refused. Returns n for r = 0 (kvpress: no compression)."""
    check_compression_ratio(compression_ratio)
    check_int("n", n, 1), check_int("window", window, 1), check_int("sinks", sinks)
    if compression_ratio == 0:
        return n
    k = compute_n_kept(n, compression_ratio)
    forced = n_forced(n, window, sinks)
    if k < forced:
        raise ValueError(f"compression_ratio={compression_ratio} keeps int({n} * {1 - compression_ratio:g}) = {k} "
                         f"entries per head, fewer than the {forced} ({window} window + {sinks} sink tokens) that "
                         f"every head keeps; use a compression_ratio of at most {largest_ratio(n, forced):.4f} "
                         f"or a smaller window_size")
    return k


def largest_ratio(n: int, kept: int) -> float:
    """The largest compression_ratio, to 4 decimals, whose compute_n_kept(n, r) is at least `kept` (<= n)."""
    r = math.floor((1 - kept / n) * 1e4 + 0.5) / 1e4      # the nearest; compute_n_kept's float truncation decides
    while r > 0 and compute_n_kept(n, r) < kept:
        r = round(r - 1e-4, 4)
    return max(r, 0.0)


# ----------------------------------------------------------------------------- what the hooks read

def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers whose self_attn kvpress hooks (BasePress.__call__ finds them the same way)."""
    language_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return language_model.layers


def window_queries(module: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                   window: int) -> Tensor:
    """Post-RoPE queries of the last `window` prompt tokens, as the layer computed them.

    module: the layer's self_attn. hidden_states: (1, n, d), its input (after input_layernorm).
    position_embeddings: (cos, sin), each (1, n, D), the layer's RoPE tables.
    Returns (1, H, w, D): q_proj (and Qwen3's q_norm: kvpress.utils.get_prerope_query_states), then RoPE.
    """
    q = get_prerope_query_states(module, hidden_states[:, -window:])        # (1, H, w, D)
    cos, sin = (t[:, -window:].unsqueeze(1) for t in position_embeddings)    # (1, 1, w, D)
    return q * cos + rotate_half(q) * sin


def row_square_norms(x: Tensor) -> Tensor:
    """x: (1, w, d) -> (w,) float32 on the CPU, the squared norm of each row (cache.Prefill's *_rows)."""
    return x[0].float().pow(2).sum(-1).cpu()


def masked_key_indices(kept: list[Tensor], n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """What kvpress's attention patch masks: the complement of one layer's kept set.

    kept: list over H_kv heads of sorted int64 indices into the n context tokens (methods.select).
    Returns (batch, head, seq) int64 index tensors of every masked entry, on `device`, batch all 0.
    """
    mask = torch.ones(len(kept), n, dtype=torch.bool, device=device)            # (H_kv, n): True = masked
    for g, idx in enumerate(kept):
        mask[g, idx.to(device)] = False
    heads, seqs = mask.nonzero(as_tuple=True)
    return torch.zeros_like(heads), heads, seqs


# ----------------------------------------------------------------------------- the press

@dataclass
class LaProxPress(BasePress):
    """LaProx (arXiv 2605.07234) for kvpress, scored and selected by this repository's own
    methods.score / methods.select ("laprox"), model-wide.

    compression_ratio: fraction of the context's KV entries removed, in [0, 1); keeps
        kept_per_head(compression_ratio, n) entries per head on average (module docstring, Budget).
    window_size: w, the observation window (the last w context tokens), >= 1; always kept.
    group, normalize, pool, pooling, selection, floor, sinks, center, use_triton: the flags of
        "laprox" in methods.METHODS, same names, same defaults (the paper's method), checked by
        methods.check_flags; e.g. LaProxPress(0.9, group="exact", normalize="residual", pooling="max")
        is this repository's previous default.
    keep_scores: keep the scores the selection read in `last_scores` (per layer (1, H_kv, n)
        float32, pooled and normalised: methods.method_scores), for tests and analysis; they cost
        L * H_kv * n floats, so off by default.
    """

    compression_ratio: float = 0.0
    window_size: int = 32
    group: str = "sum"
    normalize: str = "mass"
    pool: int = 7
    pooling: str = "avg"
    selection: str = "model"
    floor: float = 0.0
    sinks: int = 0
    center: bool = False
    use_triton: bool | None = None
    keep_scores: bool = False

    def __post_init__(self):
        check_compression_ratio(self.compression_ratio)
        check_int("window_size", self.window_size, 1)
        methods.check_flags("laprox", self.flags)
        self.last_scores: list[Tensor] | None = None
        self._layers: dict[int, dict] = {}   # layer index -> what its hooks recorded during the prefill

    @classmethod
    def from_spec(cls, spec: str, compression_ratio: float = 0.0, window_size: int = 32) -> "LaProxPress":
        """A press from a method spec as the eval scripts take it, e.g. "laprox:floor=0.2:pooling=max"."""
        from lab.harness import parse_method   # the eval scripts' spec reader
        name, flags = parse_method(spec)
        if name != "laprox":
            raise ValueError(f"LaProxPress runs the method 'laprox', not {name!r}; write e.g. 'laprox:floor=0.2'")
        return cls(compression_ratio, window_size, **flags)

    @property
    def flags(self) -> dict:
        """This press's "laprox" flags, as methods.select takes them."""
        return {name: getattr(self, name) for name in methods.flag_defaults("laprox")}

    # ---- during the prefill: record ----

    def residual_hook(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of a decoder layer: keep the window rows of its input x_l (1, n, d), the
        residual stream the attention output is added to (for normalize="residual")."""
        x = args[0] if args else kwargs["hidden_states"]
        self._layers.setdefault(layer.self_attn.layer_idx, {})["x"] = x[:, -self.window_size:]

    def forward_hook(self, module: nn.Module, input: list[Tensor], kwargs: dict, output: list):
        """After a layer's attention in the prefill: record its fields of cache.Prefill; the cache is
        left as it is (the selection needs every layer: it runs when the prefill's `with` exits)."""
        hidden_states = kwargs["hidden_states"]                           # (1, n, d)
        n = hidden_states.shape[1]
        if not is_prefilling(kwargs["cache_position"], n):
            return output
        if hidden_states.shape[0] != 1:
            raise ValueError(f"LaProxPress compresses one sequence at a time (batch size 1), got a batch of "
                             f"{hidden_states.shape[0]}")
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)   # (1, H_kv, n, D)
        w = min(self.window_size, n)
        rec = self._layers.setdefault(module.layer_idx, {})
        y = output[0][:, -w:]                                             # (1, w, d): attention output, after o_proj
        rec.update(keys=keys, values=values, o_proj=module.o_proj.weight, out_rows=row_square_norms(y),
                   queries=window_queries(module, hidden_states, kwargs["position_embeddings"], w),
                   resid_rows=row_square_norms(rec.pop("x")[:, -w:] + y))
        return output

    # ---- after the prefill: select ----

    def prefill(self, n_layers: int) -> Prefill:
        """The recorded layers as our cache.Prefill (no logits, no H2O statistics: LaProx reads neither)."""
        if sorted(self._layers) != list(range(n_layers)) or any("keys" not in r for r in self._layers.values()):
            seen = sum("keys" in r for r in self._layers.values())
            raise ValueError(f"LaProxPress saw the prefill of {seen} of the model's {n_layers} layers; it needs one "
                             f"prefill forward of the whole context over every layer inside `with press(model):`")
        layers = [self._layers[l] for l in range(n_layers)]
        resid, out = (torch.stack([r[name] for r in layers]) for name in ("resid_rows", "out_rows"))   # (L, w)
        return Prefill(keys=[r["keys"] for r in layers], values=[r["values"] for r in layers],
                       queries=[r["queries"] for r in layers], o_proj=[r["o_proj"] for r in layers],
                       resid_norm=resid.sum(1).sqrt(), out_norm=out.sum(1).sqrt(), h2o=None, logits=None,
                       window=layers[0]["queries"].shape[2], resid_rows=resid, out_rows=out)

    def select(self, model: PreTrainedModel) -> None:
        """Score the recorded prefill, cut it model-wide and set every layer's masked_key_indices."""
        attentions = [layer.self_attn for layer in decoder_layers(model)]
        if self.compression_ratio == 0:
            for attn in attentions:
                attn.masked_key_indices = None
            return
        prefill = self.prefill(len(attentions))
        k = kept_per_head(self.compression_ratio, prefill.n, prefill.window, self.sinks)
        scored = methods.score(prefill, "laprox", **self.flags)
        kept = methods.select(prefill, "laprox", k, scored, **self.flags)
        for attn, layer_kept, keys in zip(attentions, kept, prefill.keys):
            attn.masked_key_indices = masked_key_indices(layer_kept, prefill.n, keys.device)
        self.last_scores = scored.scores if self.keep_scores else None

    @contextmanager
    def __call__(self, model: PreTrainedModel):
        """kvpress's context manager around the prefill: BasePress's hooks on every self_attn (here
        they record), a pre-hook on every decoder layer (the residual stream), and, when the block
        exits, the model-wide selection (select)."""
        check_compression_ratio(self.compression_ratio)  # evaluate.py sets it after construction
        if model.config._attn_implementation == "eager":
            raise ValueError("LaProxPress needs attn_implementation 'sdpa' or 'flash_attention_2': kvpress masks "
                             "entries by patching those attention functions, and eager attention is not patched")
        self._layers, self.last_scores = {}, None
        hooks = [layer.register_forward_pre_hook(self.residual_hook, with_kwargs=True)
                 for layer in decoder_layers(model)]
        try:
            with super().__call__(model):
                yield
            self.select(model)
        finally:
            for hook in hooks:
                hook.remove()
            self._layers = {}   # the recorded keys and values are the cache's: do not hold them past the prefill
