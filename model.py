"""A single-file Llama / Mistral / Qwen2 / Qwen3, the model only: checkpoint.load_model builds and
fills it, e.g. `print(generate(*load_model(), "The capital of France is", max_new_tokens=8))`.

The four families differ only in a few switches of one decoder: biases (Qwen2's q/k/v, attention
and MLP biases of some Llama / Qwen3), per-head q/k RMSNorm (Qwen3), a sliding window (Mistral),
RoPE scaling (Llama 3.1/3.2). Keys are cached after RoPE. `Model.prefill` runs full attention over
a prompt and keeps, per layer, what the eviction scorers need (see cache.Prefill); eviction: methods.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache import KVCache, LayerEntries, Prefill, attention_column_sums, check_int


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
    key_mask: (B, h_m, T, S) bool, a row per group of H / h_m query heads (h_m = h_kv, or more over
    one packed buffer, h_kv = 1: cache.LayerEntries.attention_inputs), or (B, h_kv, 1, S) for T = 1
    (decode.CacheBatch's padded caches): a query sees exactly the keys its row marks True. With a mask,
    and for one bf16 token (torch's CPU enable_gqa kernel is 7x slower there: bench.py --dtypes), the G
    query heads of a KV head are its G queries (row h * T + t is head h's t): its keys are read once."""
    T, S = q.shape[2], k.shape[2]
    if key_mask is not None or (T == 1 and q.dtype != torch.float32):
        B, H, _, D = q.shape
        h_kv = k.shape[1]
        if key_mask is not None and (T > 1 or key_mask.shape[1] != h_kv):  # one row per query head
            key_mask = key_mask[:, :, None].expand(-1, -1, H // key_mask.shape[1], -1, -1).reshape(B, h_kv, -1, S)
        y = F.scaled_dot_product_attention(q.reshape(B, h_kv, -1, D), k, v, attn_mask=key_mask)
        return y.view(B, H, T, D)
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

    def attend(self, q: Tensor, parts: LayerEntries | list[tuple]) -> Tensor:
        """q: (B, H, T, D) over parts, the keys and values it reads: a KVCache's layer, read in one pass
        whatever the per-head lengths (on CUDA, one new token over an uneven layer goes to
        laprox_triton.varlen_decode, which reads the packed buffers in place), or one (keys, values[,
        key_mask]) per group of KV heads, in head order (Block.forward) -> (B, T, d), after o_proj."""
        B, _, T, _ = q.shape
        if not isinstance(parts, LayerEntries):
            y = torch.cat([attention(qg, *part) for qg, part in zip(q.chunk(len(parts), 1), parts)], 1)
        elif q.is_cuda and T == 1 and not parts.even:
            import laprox_triton  # lazy: triton is optional on a CPU
            y = (laprox_triton.varlen_decode(q, parts.keys, parts.values, parts.starts, parts.lengths, parts.longest)
                 if laprox_triton.triton_available() else attention(q, *parts.attention_inputs()))
        else:
            y = attention(q, *parts.attention_inputs())
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Activations(NamedTuple):
    """What a block computed on the way, for Model.prefill: queries (B, H, T, D) after RoPE; kv, what
    attention read (Block.forward); attn_out (B, T, d) after o_proj; resid (B, T, d), x + attn_out."""
    queries: Tensor
    kv: list
    attn_out: Tensor
    resid: Tensor


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.dim, cfg.norm_eps), MLP(cfg)

    def forward(self, x: Tensor, positions: Tensor, inv_freq: Tensor, cache=None, layer: int = 0,
                past_kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Activations]:
        """x: (B, T, d) -> (B, T, d) and its Activations; positions: (T,) or (B, T). Attention reads the
        T new keys and values (B, H_kv, T, D): alone (a whole sequence), after past_kv (a prefill
        continued), or, with a cache, all that cache.update(layer, k, v) holds once it appended them:
        a KVCache's cache.LayerEntries (every head, whatever its length), or a decode.CacheBatch's
        [(keys, values, key_mask)], its caches padded into one batch."""
        q, k, v = self.attn.qkv(self.attn_norm(x), positions, inv_freq)
        if cache is not None:
            kv = cache.update(layer, k, v)
        else:
            kv = [(k, v) if past_kv is None else (torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2))]
        y = self.attn.attend(q, kv)
        h = x + y
        return h + self.mlp(self.mlp_norm(h)), Activations(q, kv, y, h)


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
        if (cache is None) != (pos is None):
            raise ValueError("pass a cache together with pos, the position of the first new token (the prompt's "
                             "length after a prefill), or neither for a whole sequence")
        if cache is None:  # a prompt enters; decoded tokens (with a cache) are the model's own: no sync per token
            self.check_ids(input_ids)
        pos = 0 if pos is None else pos
        B, T = input_ids.shape
        self.check_length((pos if isinstance(pos, int) else int(torch.as_tensor(pos).max())) + T)  # no read-back for an int
        x = self.embed(input_ids.to(self.embed.weight.device))
        positions = torch.as_tensor(pos, device=x.device) + torch.arange(T, device=x.device)  # (T,) | (B, T)
        for i, blk in enumerate(self.layers):
            x = x.to(blk.attn_norm.weight.device)  # moves only where two ranges of layers meet (checkpoint.place)
            x, _ = blk(x, positions.to(x.device), self.inv_freq(x.device), cache, i)
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
        check_int("window", window, 1), check_int("h2o_chunk", h2o_chunk, 1)
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
            past_kv = None if past is None else (past.keys[l], past.values[l])   # the new tokens read them too
            x, (q, [(k, v)], y, h) = blk(x, positions.to(x.device), self.inv_freq(x.device), past_kv=past_kv)
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
