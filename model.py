"""A single-file Llama / Mistral / Qwen2 / Qwen3 that reads Hugging Face checkpoints directly.

    model, tok = load_model()                          # embedded SmolLM2-135M-Instruct, offline
    model, tok = load_model("/path/to/checkpoint")     # a local folder in the Hugging Face layout
    model, tok = load_model("Qwen/Qwen3-0.6B")         # a hub id (needs the network)
    print(generate(model, tok, "The capital of France is", max_new_tokens=8))

The four families differ only in a few switches of one decoder: biases (Qwen2's q/k/v, attention
and MLP biases of some Llama / Qwen3), per-head q/k RMSNorm (Qwen3), a sliding window (Mistral),
RoPE scaling (Llama 3.1/3.2). Keys are cached after RoPE. `Model.prefill` runs full attention over
a prompt and keeps, per layer, what the eviction scorers need (see cache.Prefill); eviction: methods.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache import KVCache, Prefill, check_int
from checkpoint import (check_weight_dtypes, read_config, read_json, read_tokenizer, resolve_checkpoint, rope_parameters,
                        weight_files)


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    model_type: str
    vocab_size: int
    dim: int                  # d, the residual stream width
    n_layers: int
    n_heads: int              # H query heads
    n_kv_heads: int           # H_kv key/value heads (GQA: H_kv < H)
    head_dim: int             # D
    hidden_dim: int           # MLP width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "llama3" | "linear", ...}
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False    # Qwen2; Llama and Qwen3 with attention_bias
    o_bias: bool = False      # Llama and Qwen3 with attention_bias
    mlp_bias: bool = False    # Llama with mlp_bias
    qk_norm: bool = False     # Qwen3
    sliding_window: int | None = None  # Mistral
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, cfg: dict) -> "Config":
        """A config.json dict, read as transformers reads it (checkpoint.read_config has refused, by
        check_config, what would be misread)."""
        mt, heads = cfg["model_type"], cfg["num_attention_heads"]
        rope, rope_type = rope_parameters(cfg)
        window = cfg.get("sliding_window")
        if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None  # Qwen configs carry a window they do not use
        eos, bias = cfg.get("eos_token_id"), bool(cfg.get("attention_bias", False))  # see the bias fields
        return cls(
            model_type=mt, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"], n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope["rope_theta"]), rope_scaling=rope if rope_type != "default" else None,
            max_position=cfg.get("max_position_embeddings") or 4096, tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias={"qwen2": True, "mistral": False}.get(mt, bias), o_bias=bias and mt in ("llama", "qwen3"),
            mlp_bias=mt == "llama" and bool(cfg.get("mlp_bias", False)), qk_norm=mt == "qwen3",
            sliding_window=window, bos_id=cfg.get("bos_token_id"),
            eos_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        )


# ----------------------------------------------------------------------------- RoPE

def rope_frequencies(cfg: Config) -> Tensor:
    """Inverse frequencies (D/2,) float32, with Llama-3 or linear scaling when configured."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor = s["factor"]
    if s.get("rope_type", s.get("type")) == "linear":
        return inv_freq / factor
    # llama3: leave high frequencies alone, divide low ones by `factor`, blend in between.
    old_len, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate x: (B, h, T, D) at positions (T,), or (B, T) when each sequence has its own (a batch of
    caches, decode.CacheBatch); rotate-half layout (as HF checkpoints store q/k)."""
    angles = positions[..., None].float() * inv_freq                 # (T, D/2) or (B, T, D/2)
    if angles.ndim == 3:
        angles = angles[:, None]                                     # (B, 1, T, D/2): every head alike
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)    # (..., T, D)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


# ----------------------------------------------------------------------------- the network

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Causal attention of the T newest positions. q: (1|B, h_q, T, D); k, v: (B, h_kv, S, D)
    with S >= T, the last T keys being the queries' own: query t sees keys 0 .. S - T + t.
    key_mask: (B, h_kv, 1, S) bool, for one new token per sequence over padded caches
    (decode.CacheBatch): a query sees exactly the keys its row marks True."""
    T, S = q.shape[2], k.shape[2]
    if key_mask is not None:  # T = 1: the G query heads of a KV head become its G queries, so that the
        B, H, _, D = q.shape    # padded keys are read once per KV head, never copied G times
        y = F.scaled_dot_product_attention(q.view(B, k.shape[1], -1, D), k, v, attn_mask=key_mask)
        return y.view(B, H, 1, D)
    if T == 1 and q.dtype != torch.float32:  # one new token, grouped as above: torch's bf16/fp16 CPU kernel with
        B, H, _, D = q.shape                   # enable_gqa is 7x slower here (bench.py --dtypes); float32 keeps
        y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, D), k, v)  # its path, and its bits
        return y.view(B, H, 1, D)
    if T == 1 or T == S:  # a new token, or a whole prompt: no mask tensor (n x n would be 16 GiB at 128k)
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, Hkv * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, cfg.norm_eps), RMSNorm(D, cfg.norm_eps)
        self.cfg = cfg

    def qkv(self, x: Tensor, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, d) -> q (B, H, T, D), k and v (B, H_kv, T, D); q and k after RoPE."""
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend(self, q: Tensor, parts: list[tuple]) -> Tensor:
        """q: (B, H, T, D) over parts, the keys and values it reads: one (keys, values[, key_mask]) per
        group of KV heads, in head order (see Block.forward) -> the attention output (B, T, d), after o_proj."""
        B, _, T, _ = q.shape
        y = torch.cat([attention(qg, *part) for qg, part in zip(q.chunk(len(parts), 1), parts)], 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Seen(NamedTuple):
    """What a block computed on the way, for Model.prefill to keep: q (B, H, T, D) after RoPE; parts,
    the (keys, values[, key_mask]) attention read (see Block.forward); y (B, T, d), the attention
    output after o_proj; h (B, T, d), the residual stream after adding it (what the MLP norm reads)."""
    q: Tensor
    parts: list
    y: Tensor
    h: Tensor


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.dim, cfg.norm_eps), MLP(cfg)

    def forward(self, x: Tensor, positions: Tensor, inv_freq: Tensor, keys=None) -> tuple[Tensor, Seen]:
        """x: (B, T, d) -> (B, T, d), and what was Seen on the way. positions: (T,) or (B, T).
        keys(k, v) -> what attention reads, given the T new keys and values (B, H_kv, T, D): a list of
        (keys, values[, key_mask]) per group of KV heads. A KVCache's update(layer, ...) appends them
        and returns every entry it holds (per head when eviction left heads uneven; a
        decode.CacheBatch, one padded batch with a key mask); a prefill with a past puts its keys
        first. None: the T tokens alone, a whole sequence."""
        q, k, v = self.attn.qkv(self.attn_norm(x), positions, inv_freq)
        parts = [(k, v)] if keys is None else keys(k, v)
        y = self.attn.attend(q, parts)
        h = x + y
        return h + self.mlp(self.mlp_norm(h)), Seen(q, parts, y, h)


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._inv_freq: dict[torch.device, Tensor] = {}

    def inv_freq(self, device) -> Tensor:
        """RoPE's (D/2,) inverse frequencies on `device`: one copy per device that holds layers."""
        device = torch.device(device)
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_frequencies(self.config).to(device)
        return self._inv_freq[device]

    def place(self, devices: list, ranges: list[range]) -> "Model":
        """Put layers ranges[i] on devices[i] (contiguous, in order: check_ranges), the embeddings on
        devices[0], the final norm and lm_head on devices[-1]. Activations then move only where two ranges
        meet; a layer's KV cache and Prefill tensors stay on its device (load_model(devices=...))."""
        device_of = device_map(devices, ranges, self.config.n_layers)
        for name, p in list(self.named_parameters()):  # a tied lm_head is listed once, as embed.weight
            set_parameter(self, name, p.to(device_of(name)))
        return self.tie()

    def tie(self) -> "Model":
        """A tied lm_head is the embedding matrix, or a copy of it when the final norm is on another device."""
        if self.config.tie_embeddings:
            w, head = self.embed.weight, self.norm.weight.device
            self.lm_head.weight = w if w.device == head else nn.Parameter(w.detach().to(head), requires_grad=False)
        return self

    def check_ids(self, input_ids: Tensor):
        """input_ids: (B, T) must be T >= 1 integer token ids of this model's vocabulary."""
        if input_ids.ndim != 2 or not input_ids.numel() or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be (B, T) integer token ids with T >= 1 (an empty prompt has nothing "
                             f"to attend to); got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.config.vocab_size}) "
                             "of this model: ids from another tokenizer?")

    def check_length(self, n: int):
        c = self.config
        if n > c.max_position:
            raise ValueError(f"context of {n} tokens is longer than the model allows ({c.max_position}); "
                             "shorten the prompt or use a model with a longer context")
        if c.sliding_window is not None and n > c.sliding_window:
            raise ValueError(f"context of {n} tokens exceeds the sliding window ({c.sliding_window}) of this "
                             "checkpoint, which this reference does not implement; use a shorter prompt")

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, pos: int | Tensor | None = None) -> Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab) float32. Without a cache the T tokens are a
        whole sequence (positions 0..T-1). With one (B = 1) they continue its sequence from position
        `pos` (the caller's: a cache stores entries, not where decoding stands) and are appended to it;
        with a decode.CacheBatch (T = 1) each row continues its own sequence from its own pos, (B, 1)."""
        self.check_ids(input_ids)
        if (cache is None) != (pos is None):
            raise ValueError("pass a cache together with pos, the position of the first new token (the prompt's "
                             "length after a prefill), or neither for a whole sequence")
        pos = 0 if pos is None else pos
        B, T = input_ids.shape
        self.check_length(int(torch.as_tensor(pos).max()) + T)
        x = self.embed(input_ids.to(self.embed.weight.device))
        positions = torch.as_tensor(pos, device=x.device) + torch.arange(T, device=x.device)  # (T,) | (B, T)
        for i, blk in enumerate(self.layers):
            x = x.to(blk.attn_norm.weight.device)  # moves only where two ranges of layers meet (place)
            keys = None if cache is None else (lambda k, v, i=i: cache.update(i, k, v))
            x, _ = blk(x, positions.to(x.device), self.inv_freq(x.device), keys)
        return self.lm_head(self.norm(x.to(self.norm.weight.device))).float()

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, window: int = 32, h2o: bool = False, h2o_chunk: int = 512,
                past: Prefill | None = None) -> Prefill:
        """Full-attention forward over a prompt that keeps what eviction scorers need.

        input_ids: (1, t). window: w, the last w prompt tokens whose queries stand in for
        future ones (clamped to n). h2o: also accumulate, per layer, the attention each key
        receives from all n queries (H2O's score), `h2o_chunk` queries at a time so that no
        n x n matrix is ever held. past: the Prefill of the c tokens before input_ids (window >= w,
        h2o if asked now); the result is then the Prefill of all n = c + t tokens, as one call on
        them gives (harness.py: a context prefilled once, then its question). Without past, n = t.
        """
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"prefill takes one sequence, input_ids of shape (1, n); got {tuple(input_ids.shape)}")
        for name, value in (("window", window), ("h2o_chunk", h2o_chunk)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.check_ids(input_ids)
        c, t = (0 if past is None else past.n), input_ids.shape[1]
        if past is not None and (past.resid_rows is None or past.window < min(window, c) or (h2o and past.h2o is None)):
            raise ValueError("past must come from model.prefill, with a window >= this one's (and h2o=True for h2o)")
        n = c + t
        self.check_length(n)
        w = min(window, n)
        keys, values, queries, o_proj, resid, out, cols = [], [], [], [], [], [], []
        x = self.embed(input_ids.to(self.embed.weight.device))
        positions = torch.arange(c, n, device=x.device)
        for l, blk in enumerate(self.layers):
            x = x.to(blk.attn_norm.weight.device)  # as in forward; the past of layer l is on its device
            with_past = None if past is None else (  # the new tokens read the past keys too
                lambda k, v, l=l: [(torch.cat([past.keys[l], k], 2), torch.cat([past.values[l], v], 2))])
            x, (q, [(k, v)], y, h) = blk(x, positions.to(x.device), self.inv_freq(x.device), with_past)
            keys.append(k); values.append(v); o_proj.append(blk.attn.o_proj.weight)
            # the window may start in the past
            queries.append((q if past is None else torch.cat([past.queries[l], q[:, :, -w:]], 2))[:, :, -w:].clone())
            out.append(y[0, -w:].float().pow(2).sum(-1)); resid.append(h[0, -w:].float().pow(2).sum(-1))
            if h2o:  # column sums of the past (its means times their query counts) and of the new queries
                prior = 0 if past is None else F.pad(past.h2o[l] * torch.arange(c, 0, -1, device=q.device), (0, t))
                cols.append((attention_column_sums(q, k, h2o_chunk) + prior) / torch.arange(n, 0, -1, device=q.device))
        logits = self.lm_head(self.norm(x[:, -1:].to(self.norm.weight.device))).float()[:, 0]
        resid, out = (torch.stack([r.cpu() for r in rows]) for rows in (resid, out))  # (L, min(w, t)) squared norms
        if past is not None:
            resid, out = torch.cat([past.resid_rows, resid], 1)[:, -w:], torch.cat([past.out_rows, out], 1)[:, -w:]
        return Prefill(keys=keys, values=values, queries=queries, o_proj=o_proj, resid_norm=resid.sum(1).sqrt(),
                       out_norm=out.sum(1).sqrt(), h2o=cols if h2o else None, logits=logits, window=w,
                       resid_rows=resid, out_rows=out)


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


# ----------------------------------------------------------------------------- generation

@torch.no_grad()
def decode_greedy(model: Model, cache: KVCache, pos: int, logits: Tensor, max_new_tokens: int, stop_ids=(),
                  stop=None) -> list[int]:
    """Greedy tokens continuing a sequence whose entries are in `cache` (the new ones appended to it).
    pos: the position of the next token (the prompt's length n after a prefill); logits: (1, vocab),
    the next token's (the prefill's). Stops after a token in stop_ids, or when stop(tokens so far) is
    true. The last token is not fed back, so the cache then holds one entry fewer than the tokens:
    compress the prefill again for another answer (decode.Sequence keeps track of this)."""
    check_int("max_new_tokens", max_new_tokens, 1)
    out = []
    for t in range(max_new_tokens):
        token = int(logits[0].argmax())
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens or (stop is not None and stop(out)):
            break
        logits = model(torch.tensor([[token]], device=logits.device), cache, pos + t)[:, -1]
    return out


def generate(model: Model, tok: "Tokenizer", prompt: str | None = None, *, cache: KVCache | None = None,
             prefill: Prefill | None = None, max_new_tokens: int = 64, stop_strings: tuple[str, ...] = ()) -> str:
    """Greedy continuation of `prompt` (raw text: apply tok.apply_chat_template first for a chat), or
    from a cache made of `prefill` (compress(prefill, ...)): the prefill says where the sequence stands
    (its n tokens, its next-token logits). Stops at the model's end-of-turn / eos tokens or as soon as
    the text contains one of `stop_strings`; returns the new text without them."""
    if (prompt is None) == (cache is None) or (cache is None) != (prefill is None):
        raise ValueError("pass prompt=, or cache= with the prefill= it was made from")
    check_int("max_new_tokens", max_new_tokens, 1)  # before the prefill
    if cache is None:
        ids = torch.tensor([tok.encode(prompt)], device=next(model.parameters()).device)
        prefill = model.prefill(ids)
        cache = KVCache.from_prefill(prefill)
    if cache.prompt_len != prefill.n or not bool((cache.lengths == cache.prompt_lengths).all()):
        raise ValueError(f"this cache is not a fresh compression of the {prefill.n}-token prefill (it holds entries "
                         "of another prompt, or decoding appended to it); compress the prefill again")
    stop = (lambda toks: any(s in tok.decode(toks) for s in stop_strings)) if stop_strings else None
    tokens = decode_greedy(model, cache, prefill.n, prefill.logits, max_new_tokens, stop_ids=set(tok.eos_ids), stop=stop)
    return answer_text(tok, tokens, stop_strings)


def answer_text(tok, tokens: list[int], stop_strings: tuple[str, ...] = ()) -> str:
    """The text of generated tokens: a final end-of-sequence token dropped, special tokens skipped, and
    the text cut at the first of stop_strings."""
    if tokens and tokens[-1] in tok.eos_ids:
        tokens = tokens[:-1]
    text = tok.decode(tokens)
    for s in stop_strings:
        text = text.split(s)[0]
    return text


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """tokenizer.json through the `tokenizers` library, plus the checkpoint's chat template."""

    def __init__(self, folder: Path, cfg: Config):
        self.tk = read_tokenizer(folder, cfg.vocab_size)
        tc, gen = read_json(folder / "tokenizer_config.json"), read_json(folder / "generation_config.json")
        self.chat_template = tc.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        if (folder / "chat_template.jinja").exists():
            self.chat_template = (folder / "chat_template.jinja").read_text()
        self.bos_token, self.eos_token = [t.get("content") if isinstance(t, dict) else t  # AddedToken dicts too
                                          for t in (tc.get("bos_token"), tc.get("eos_token"))]
        eos = gen.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.eos_token and self.tk.token_to_id(self.eos_token) is not None:
            eos.append(self.tk.token_to_id(self.eos_token))
        self.eos_ids = sorted(set(eos + cfg.eos_ids))
        self.bos_id = gen.get("bos_token_id", cfg.bos_id)
        # Some checkpoints (Llama 2, Mistral) add bos in the tokenizer config, not in tokenizer.json.
        self.add_bos = bool(tc.get("add_bos_token", False)) and self.bos_id is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens the checkpoint's bos (if any) comes first,
        unless the text already starts with it (as a rendered chat template often does)."""
        ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        if len(ids) > 1 and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's own chat template (jinja2, as transformers does)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template; pass plain text to the model instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(msg)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


# ----------------------------------------------------------------------------- loading

def load_model(name_or_path: str | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               devices: list[str] | None = None, layers: list[range] | None = None, check_finite: bool = True):
    """Load a checkpoint into (Model, Tokenizer), weights straight into `dtype` on `device`; or over
    devices=["cuda:0", "cuda:1", ...], the range of layers layers[i] on devices[i] (default: equal
    numbers of layers; the evals' --devices balance them by memory with memory.plan_layers).
    check_finite=False skips the NaN / inf check of each weight (only bench.py --load, to time it)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    if devices is not None and (device != "cpu" or not devices or isinstance(devices, str)):
        raise ValueError(f"pass device= or a non-empty list devices=, not both; got {device!r} and {devices!r}")
    for d in devices or [device]:
        try:  # a device this machine lacks fails here, not after the checkpoint is read
            torch.empty(0, device=d)
        except (RuntimeError, AssertionError, TypeError) as e:  # no CUDA build: AssertionError
            raise ValueError(f"device {d!r} is not available here ({e}); use device cpu") from None
    folder = resolve_checkpoint(name_or_path)
    cfg = Config.from_hf(read_config(folder))  # read_config's errors name the file
    if devices is None:
        layers = [range(cfg.n_layers)]
    elif layers is None:
        layers = even_ranges(cfg.n_layers, len(devices))
    with torch.device("meta"):  # no memory yet: each weight is created once, from the file
        model = Model(cfg)
    load_weights(model, folder, device_map(devices or [device], layers, cfg.n_layers), dtype, check_finite)
    return model.eval(), Tokenizer(folder, cfg)


def load_config(name_or_path: str | None = None) -> Config:
    """The Config of a checkpoint (what load_model builds), without reading its weights."""
    return Config.from_hf(read_config(resolve_checkpoint(name_or_path)))


def even_ranges(n_layers: int, n_devices: int) -> list[range]:
    """n_layers split into n_devices contiguous ranges whose sizes differ by at most one."""
    cuts = [round(i * n_layers / n_devices) for i in range(n_devices + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def check_ranges(ranges: list[range], n_layers: int, n_devices: int) -> None:
    """ranges: one range of layers per device, contiguous and in order, covering 0 .. n_layers - 1
    (a range may be empty). ValueError otherwise."""
    ok = (len(ranges) == n_devices >= 1 and all(isinstance(r, range) and r.step == 1 and r.start <= r.stop
                                                for r in ranges)
          and ranges[0].start == 0 and ranges[-1].stop == n_layers and all(a.stop == b.start for a, b in zip(ranges, ranges[1:])))
    if not ok:
        raise ValueError(f"layer ranges {ranges} must be {n_devices} contiguous ranges, in order, covering the "
                         f"{n_layers} layers (e.g. from memory.plan_layers)")


def hf_to_ours(name: str) -> str:
    """Hugging Face tensor name -> ours (model.layers.3.self_attn.q_proj.weight -> layers.3.attn.q_proj.weight)."""
    name = name.removeprefix("model.")
    for a, b in (("embed_tokens", "embed"), ("self_attn", "attn"),
                 ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
        name = name.replace(a, b)
    return name


def device_map(devices: list, ranges: list[range], n_layers: int):
    """Where each weight goes when layers ranges[i] are on devices[i]: a function of our tensor name
    (layers.3.attn.q_proj.weight) -> torch.device; embeddings on the first device, the rest on the last."""
    check_ranges(ranges, n_layers, len(devices))
    layer = {l: torch.device(d) for d, r in zip(devices, ranges) for l in r}
    return lambda name: layer[int(name.split(".")[1])] if name.startswith("layers.") else \
        torch.device(devices[0] if name.startswith("embed.") else devices[-1])


def set_parameter(model: Model, name: str, t: Tensor):  # name: ours, e.g. layers.3.attn.q_proj.weight
    module_name, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(module_name), attr, nn.Parameter(t, requires_grad=False))


def refuse_non_finite(w: Tensor, stored: Tensor, where: str) -> None:
    """Refuse a weight holding NaN or inf: the model would run with every logit non-finite. w is the
    weight as loaded (cast to the model's dtype), so a value too large for that dtype is caught too;
    `stored`, the tensor as read from the file, is only looked at to say which of the two it is.
    Checked on w's min and max, which a NaN or inf anywhere reaches (NaN propagates): on a CPU this
    adds a fifth of what torch.isfinite(w).all() adds to a load (bench.py --load)."""
    if bool(torch.isfinite(torch.stack(torch.aminmax(w))).all()):
        return
    if bool(torch.isfinite(stored).all()):
        raise ValueError(f"{where}: values up to {stored.abs().max().item():.3g} overflow {w.dtype} into inf; "
                         f"load with dtype=torch.bfloat16 or torch.float32")
    raise ValueError(f"{where} holds NaN or inf values: the weights are damaged (or saved after training "
                     f"diverged); download the checkpoint again")


def load_weights(model: Model, folder: Path, device_of, dtype, check_finite: bool = True):
    """Read model.safetensors (or the shards of model.safetensors.index.json) one tensor at a time
    into the meta-initialised model, each onto its device (device_of(name)), so no second copy of
    the weights is ever held. Non-float tensors are refused from the headers before any is read,
    NaN / inf as each is read (refuse_non_finite, unless check_finite=False)."""
    from safetensors import safe_open
    files = weight_files(folder)  # checked: inside the folder, present
    check_weight_dtypes(folder, files)
    expected = dict(model.named_parameters())
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
    loaded = set()
    for file in files:
        try:
            f = safe_open(str(folder / file), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError: truncated, or not a safetensors file
            raise ValueError(f"{folder / file} is damaged or incomplete ({e}); download it again") from None
        with f:
            for hf_name in f.keys():
                name = hf_to_ours(hf_name)
                if name not in expected:
                    if "rotary_emb" in name or (name == "lm_head.weight" and model.config.tie_embeddings):
                        continue  # recomputed / tied: not needed
                    raise ValueError(f"unexpected tensor {hf_name!r} in {file}: does config.json match the weights?")
                t = f.get_tensor(hf_name)
                if t.shape != expected[name].shape:
                    raise ValueError(f"tensor {hf_name!r} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}")
                w = t.to(device=device_of(name), dtype=dtype)
                if check_finite:
                    refuse_non_finite(w, t, f"{folder / file}: tensor {hf_name!r}")
                set_parameter(model, name, w)
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"checkpoint {folder} is missing {len(missing)} tensors: {', '.join(missing[:10])}"
                         + (" ..." if len(missing) > 10 else ""))
    model.tie()
