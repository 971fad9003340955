"""Greedy decoding from compressed caches: one cache at a time, or every case of a work unit as one batch.

An eval's decoding is data, a `Decoding` (how many tokens, which ids and strings stop, which ids
the first token may not be), so that one batch can honour each case's own rule:

    spec = Decoding(max_new_tokens=24, stop_ids=frozenset(tok.eos_ids), stop_strings=("\\n",))
    seq = Sequence.of(prefill, compress(prefill, "laprox", 0.05))  # a cache and where its sequence stands
    tokens = decode_case(model, seq, spec, tok.decode)                # the readable path: model.decode_greedy
    answers = decode_batch(model, seqs, [spec] * len(seqs), tok.decode)   # the same tokens, one forward per step
    text = answer_text(tok, tokens, spec)

Batched decoding (why: a step of a small model costs about the same for one sequence or dozens,
since reading the weights dominates). The B caches stay ragged: each (case, layer, KV head) keeps
its own entries at their own positions. A step reads, per layer, one (B, H_kv, S_l, D) buffer (S_l:
the longest head of that layer in the batch, plus room for the new tokens) whose rows hold each
head's entries first and finite padding after them, with a key mask so that padding is never
attended (a masked key's weight is exactly 0, and 0 x a finite value adds nothing). RoPE positions
are each case's own. A case that stops leaves the batch, and the buffers shrink to what the others need.
`batch_groups` bounds the memory: a batch's buffers never hold more entries than the unit's full
cache (L x H_kv x (n + new tokens)), so batching costs at most about one more full cache.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from cache import KVCache, Prefill, check_int
from model import answer_text as model_answer_text, decode_greedy


@dataclass(frozen=True)
class Decoding:
    """How one answer is decoded: greedy, at most max_new_tokens; stop after a token of stop_ids
    (it stays in the tokens) or once the text contains one of stop_strings (the text is cut there,
    answer_text); the first token may not be one of first_banned (LongBench samsum's min_length)."""
    max_new_tokens: int
    stop_ids: frozenset = frozenset()
    stop_strings: tuple = ()
    first_banned: frozenset = frozenset()

    def __post_init__(self):
        check_int("max_new_tokens", self.max_new_tokens, 1)
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be a tuple of non-empty strings, got {self.stop_strings!r}")

    def first_logits(self, logits: Tensor) -> Tensor:
        """logits: (1, vocab), the prefill's: a copy with first_banned at -inf (the caller's are kept)."""
        if not self.first_banned:
            return logits
        logits = logits.clone()
        logits[:, sorted(self.first_banned)] = float("-inf")
        return logits

    def done(self, tokens: list[int], detok=None) -> bool:
        """Whether decoding stops after `tokens`. detok(ids) -> text is needed for stop_strings."""
        if tokens[-1] in self.stop_ids or len(tokens) >= self.max_new_tokens:
            return True
        return bool(self.stop_strings) and any(s in detok(tokens) for s in self.stop_strings)


@dataclass
class Sequence:
    """A sequence ready to decode: its cache (what is stored) and where decoding stands.

    cache: the KV entries. pos: the position of the next token. logits: (1, vocab), the next token's
    logits; None once answered (the last token is never fed back, so a sequence answers once)."""
    cache: KVCache
    pos: int
    logits: Tensor | None

    @classmethod
    def of(cls, prefill: Prefill, cache: KVCache | None = None) -> "Sequence":
        """The sequence right after `prefill`, its entries in `cache` (a compression of it; default all)."""
        return cls(KVCache.from_prefill(prefill) if cache is None else cache, prefill.n, prefill.logits)

    def extend(self, model, ids: Tensor) -> None:
        """Prefill ids (1, t) onto the cache: they read only the entries it holds (the agnostic
        protocol's question, after its context was compressed)."""
        self.logits = model(ids, self.cache, self.pos)[:, -1]
        self.pos += ids.shape[1]

    def check_unanswered(self) -> None:
        """Refuse a second answer from the same cache (its last token was never fed back)."""
        if self.logits is None:
            raise ValueError("this sequence has been decoded from already (its last token was never fed back); "
                             "build a new one from the prefill (compress, Sequence.of) for another answer")

    def take_logits(self) -> Tensor:
        """The next token's logits, once (check_unanswered)."""
        self.check_unanswered()
        logits, self.logits = self.logits, None
        return logits


def answer_text(tok, tokens: list[int], spec: Decoding) -> str:
    """The answer's text, cut at spec's stop strings (model.answer_text, what model.generate returns)."""
    return model_answer_text(tok, tokens, spec.stop_strings)


def check_detok(specs: list[Decoding], detok) -> None:
    if detok is None and any(s.stop_strings for s in specs):
        raise ValueError("a Decoding with stop_strings needs detok (ids -> text, e.g. tok.decode) to test them")


def decode_case(model, seq: Sequence, spec: Decoding, detok=None) -> list[int]:
    """One sequence, one token at a time (model.decode_greedy), by spec's rule: the reference that
    decode_batch is tested against."""
    check_detok([spec], detok)
    stop = (lambda toks: spec.done(toks, detok)) if spec.stop_strings else None
    return decode_greedy(model, seq.cache, seq.pos, spec.first_logits(seq.take_logits()), spec.max_new_tokens,
                         stop_ids=spec.stop_ids, stop=stop)


# ----------------------------------------------------------------------------- a batch of ragged caches

class CacheBatch:
    """B ragged KVCaches as per-layer padded buffers that Model.forward decodes one token each
    (Model.forward(tokens (B, 1), batch, batch.pos)).

    k[l], v[l]: (B, H_kv, S_l, D) on layer l's device; row (b, g) holds lengths[b, l, g] entries, then
    finite padding. pos: (B, 1), each case's next position. room: new tokens each row can still take.
    update() has KVCache.update's interface, plus the key mask it returns with the buffers.
    """

    def __init__(self, caches: list[KVCache], pos: list[int], room: int):
        """caches: KVCaches of one model (their entries are copied: the caller may free them); pos: the
        next position of each. room: new tokens to make space for (a case decodes at most
        max_new_tokens - 1 of them)."""
        check_int("room", room, 0)
        if not caches:
            raise ValueError("a CacheBatch needs at least one cache")
        first = caches[0]
        self.n_layers, self.n_kv_heads, self.head_dim = first.n_layers, first.n_kv_heads, first.head_dim
        self.room = room
        self.pos = torch.tensor(pos).view(len(caches), 1)
        self.lengths = torch.stack([c.lengths for c in caches])  # (B, L, H_kv)
        self.k, self.v = [], []
        for l in range(self.n_layers):
            S = int(self.lengths[:, l].max()) + room
            ref = first.k[l]
            k = ref.new_zeros(len(caches), self.n_kv_heads, S, self.head_dim)
            v = ref.new_zeros(len(caches), self.n_kv_heads, S, self.head_dim)
            for b, c in enumerate(caches):  # every head at once: the cache's padded view of the layer
                kb, vb = c.read(l).padded()   # (1, H_kv, its longest head, D)
                k[b, :, :kb.shape[2]], v[b, :, :vb.shape[2]] = kb[0], vb[0]
            self.k.append(k); self.v.append(v)

    def __len__(self) -> int:
        return self.pos.shape[0]

    def key_mask(self, layer: int) -> Tensor:
        """(B, H_kv, 1, S_l) bool: True on the entries a row holds, False on its padding."""
        S = self.k[layer].shape[2]
        lengths = self.lengths[:, layer].to(self.k[layer].device)
        return (torch.arange(S, device=lengths.device) < lengths[..., None])[:, :, None]

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Append one new entry to every (case, head) of `layer`: k_new, v_new (B, H_kv, 1, D). Returns
        [(keys, values, key_mask)]: the whole padded layer, (B, H_kv, S_l, D) and (B, H_kv, 1, S_l)."""
        if k_new.shape[2] != 1:
            raise ValueError(f"a CacheBatch decodes one token per step, got {k_new.shape[2]}")
        if layer == 0:  # one step: every layer appends once
            if self.room < 1:
                raise ValueError("this CacheBatch has no room left: build it with room >= the tokens to decode")
            self.room -= 1
        lengths = self.lengths[:, layer].to(k_new.device)  # (B, H_kv): where each row's new entry goes
        b = torch.arange(len(self), device=k_new.device)[:, None]
        g = torch.arange(self.n_kv_heads, device=k_new.device)[None, :]
        self.k[layer][b, g, lengths] = k_new[:, :, 0]
        self.v[layer][b, g, lengths] = v_new[:, :, 0]
        self.lengths[:, layer] += 1
        return [(self.k[layer], self.v[layer], self.key_mask(layer))]

    def keep(self, rows: list[int]) -> None:
        """Keep only these batch rows (the cases still decoding), and shrink each layer's buffers to
        its longest remaining head plus the room left."""
        idx = torch.tensor(rows)
        self.pos, self.lengths = self.pos[idx], self.lengths[idx]
        for l in range(self.n_layers):
            S = int(self.lengths[:, l].max()) + self.room
            i = idx.to(self.k[l].device)
            self.k[l] = self.k[l].index_select(0, i)[:, :, :S].contiguous()
            self.v[l] = self.v[l].index_select(0, i)[:, :, :S].contiguous()

    def entries(self) -> int:
        """Entries the padded buffers hold (sum over layers of B x H_kv x S_l): their memory in rows of D."""
        return sum(k.shape[0] * k.shape[1] * k.shape[2] for k in self.k)


@torch.no_grad()
def decode_batch(model, seqs: list[Sequence], specs: list[Decoding], detok=None) -> list[list[int]]:
    """Greedy tokens for every sequence, one forward per step for all of them: the same tokens as
    decode_case on each (up to float rounding in near-ties), each case stopping by its own spec and
    then leaving the batch. Each sequence answers once, as in decode_case. Returns the tokens per case."""
    if len(seqs) != len(specs):
        raise ValueError(f"decode_batch needs one Decoding per sequence, got {len(specs)} for {len(seqs)}")
    check_detok(specs, detok)
    if not seqs:
        return []
    for seq in seqs:  # every sequence checked before any is used
        seq.check_unanswered()
    first = [s.first_logits(seq.take_logits()) for seq, s in zip(seqs, specs)]
    logits = torch.cat([x.to(first[0].device) for x in first])
    batch = CacheBatch([s.cache for s in seqs], [s.pos for s in seqs], room=max(s.max_new_tokens for s in specs) - 1)
    out: list[list[int]] = [[] for _ in seqs]
    alive = list(range(len(seqs)))  # the case of each batch row
    while True:
        tokens = logits.argmax(-1)  # (B,)
        for i, token in zip(alive, tokens.tolist()):
            out[i].append(token)
        still = [row for row, i in enumerate(alive) if not specs[i].done(out[i], detok)]
        if not still:
            return out
        if len(still) < len(alive):
            batch.keep(still)
            alive, tokens = [alive[row] for row in still], tokens[still]
        logits = model(tokens[:, None], batch, batch.pos)[:, -1]
        batch.pos += 1


def padded_entries(caches: list[KVCache], room: int) -> int:
    """Entries a CacheBatch of these caches would hold (see CacheBatch.entries), without building it."""
    longest = torch.stack([c.lengths for c in caches]).amax(0)  # (L, H_kv) -> per layer, its longest head
    return len(caches) * caches[0].n_kv_heads * int((longest.amax(1) + room).sum())


def batch_groups(caches: list[KVCache], room: int, limit: int) -> list[list[int]]:
    """Split cases into batches whose padded buffers hold at most `limit` entries each (a case that
    alone exceeds it decodes alone). Cases are taken from the largest (its padded size, per layer its
    longest head) down, so that a batch pads its cases to similar sizes. Returns the indices per batch."""
    check_int("limit", limit, 1)
    size = [padded_entries([c], room) for c in caches]
    groups: list[list[int]] = []
    for i in sorted(range(len(caches)), key=lambda i: -size[i]):
        if groups and padded_entries([caches[j] for j in groups[-1] + [i]], room) <= limit:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def decode_in_groups(model, seqs: list[Sequence], specs: list[Decoding], detok=None, limit: int | None = None):
    """decode_batch over batch_groups of the sequences' caches: yields (the group's case indices, their
    tokens) as each batch finishes. limit: entries a batch's buffers may hold; default, the largest
    case's full cache (L x H_kv x (its position + room)), so that batching costs at most one more of it."""
    room = max(s.max_new_tokens for s in specs) - 1
    if limit is None:
        limit = seqs[0].cache.n_layers * seqs[0].cache.n_kv_heads * (max(s.pos for s in seqs) + room)
    for group in batch_groups([s.cache for s in seqs], room, limit):
        yield group, decode_batch(model, [seqs[i] for i in group], [specs[i] for i in group], detok)
