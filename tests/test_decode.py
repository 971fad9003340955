"""decode.py: batched greedy decoding over ragged caches against the one-cache path (model.decode_greedy),
on tiny random models: the same tokens, the same logits at every step when teacher-forced, padding
that is never read, cases that leave the batch, and batches bounded by memory."""
import pytest
import torch

from lab import harness as Hn
from lab.decode import CacheBatch, Decoding, Sequence, batch_groups, decode_batch, decode_case, padded_entries
from methods import compress
from checkpoint import load_model
from test_model import BASE, make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: model}: GQA (G = 2) and Qwen3's q/k norms."""
    out = {}
    for seed, family in enumerate(["llama-gqa", "qwen3-qknorm"]):
        _, folder = make_checkpoint(tmp_path_factory.mktemp(family), family, seed=40 + seed)
        out[family] = load_model(str(folder))[0]
    return out


def random_ids(n, seed):
    return torch.randint(3, BASE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


# (prompt length, method, budget, protocol): very different lengths; laprox's model-wide selection
# leaves the heads of a layer uneven, snapkv keeps them even; agnostic adds a 7-token question.
RAGGED = [(300, "laprox", 0.1, "aware"), (40, "full", 1.0, "aware"), (220, "snapkv", 0.2, "agnostic"),
          (120, "laprox", 0.5, "agnostic"), (64, "streamingllm", 0.5, "aware"), (260, "full", 1.0, "agnostic")]


def ragged_seqs(model, seed=0) -> list[Sequence]:
    """Fresh compressed sequences of the RAGGED cases (each call builds them anew: one answers once)."""
    seqs = []
    with torch.no_grad():
        for i, (n, method, budget, protocol) in enumerate(RAGGED):
            ids = random_ids(n, seed + i)
            prefill = model.prefill(ids if protocol == "aware" else ids[:, :-7], window=8)
            seq = Sequence.of(prefill, compress(prefill, method, budget))
            if protocol == "agnostic":
                seq.extend(model, ids[:, -7:])
            seqs.append(seq)
    return seqs


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-qknorm"])
def test_batch_gives_the_tokens_of_one_at_a_time(tiny, family):
    model = tiny[family]
    spec = Decoding(10)
    alone = [decode_case(model, s, spec) for s in ragged_seqs(model)]
    seqs = ragged_seqs(model)
    caches = [s.cache for s in seqs]
    assert len({int(c.lengths.sum()) for c in caches}) == len(caches)  # truly ragged
    assert any(len(set(c.lengths[l].tolist())) > 1 for c in caches for l in range(c.n_layers))  # uneven heads
    assert decode_batch(model, seqs, [spec] * len(seqs)) == alone
    assert all(s.logits is None for s in seqs)  # each answered once
    with pytest.raises(ValueError, match="decoded from already"):
        decode_batch(model, seqs[:1], [spec])
    with pytest.raises(ValueError, match="decoded from already"):
        decode_case(model, seqs[0], spec)


def teacher_forced_logits(model, seq, tokens) -> list[torch.Tensor]:
    """The single path's (1, vocab) logits at each step when fed `tokens` (the first: the prefill's)."""
    out = [seq.logits]
    with torch.no_grad():
        for i, t in enumerate(tokens[:-1]):
            out.append(model(torch.tensor([[t]]), seq.cache, seq.pos + i)[:, -1])
    return out


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-qknorm"])
def test_teacher_forced_batch_logits_match_at_every_step_and_padding_is_never_read(tiny, family):
    """Both paths fed the single path's own tokens: max|dlogit| <= 1e-5 x max|logit| at every step.
    The batch's padding is filled with huge keys and values first: a key mask that leaked would
    let them dominate the softmax or the output."""
    model = tiny[family]
    steps = 8
    seqs = ragged_seqs(model, seed=7)
    tokens = [decode_case(model, s, Decoding(steps)) for s in ragged_seqs(model, seed=7)]
    want = [teacher_forced_logits(model, s, t) for s, t in zip(ragged_seqs(model, seed=7), tokens)]
    first = torch.cat([s.logits for s in seqs])
    batch = CacheBatch([s.cache for s in seqs], [s.pos for s in seqs], room=steps)
    g = torch.Generator().manual_seed(3)
    for l in range(batch.n_layers):
        pad = ~batch.key_mask(l)[:, :, 0]  # (B, H_kv, S)
        assert pad.any()
        batch.k[l][pad] = 1e4 * (1 + torch.rand(int(pad.sum()), batch.head_dim, generator=g))
        batch.v[l][pad] = 1e6 * (1 + torch.rand(int(pad.sum()), batch.head_dim, generator=g))
    got = [first]
    with torch.no_grad():
        for step in range(steps - 1):
            fed = torch.tensor([[t[step]] for t in tokens])
            got.append(model(fed, batch, batch.pos)[:, -1])
            batch.pos += 1
    for step, logits in enumerate(got):
        for b in range(len(seqs)):
            ref = want[b][step][0]
            assert (logits[b] - ref).abs().max() <= 1e-5 * ref.abs().max(), (step, RAGGED[b])


def test_each_case_stops_by_its_own_rule_and_leaves_the_batch(tiny):
    """One case stops at step 1 (its first token is a stop id), one runs to max_new_tokens, one stops
    at a stop string; the rest keep decoding. Tokens equal decode_case's by the same specs."""
    model = tiny["llama-gqa"]
    detok = lambda ids: " ".join(f"t{i}" for i in ids)
    probe = [decode_case(model, s, Decoding(12)) for s in ragged_seqs(model, seed=3)]
    specs = [Decoding(12, stop_ids=frozenset({probe[0][0]})),          # stops at step 1
             Decoding(12),                                             # runs to the end
             Decoding(5),                                              # its own, shorter limit
             Decoding(12, stop_strings=(f"t{probe[3][2]}",)),           # a stop string by step 3
             Decoding(12, stop_ids=frozenset({probe[4][4]})),
             Decoding(12, first_banned=frozenset({probe[5][0]}))]     # samsum's rule: a new first token
    alone = [decode_case(model, q, s, detok) for q, s in zip(ragged_seqs(model, seed=3), specs)]
    got = decode_batch(model, ragged_seqs(model, seed=3), specs, detok)
    assert got == alone
    assert len(got[0]) == 1 and len(got[1]) == 12 and len(got[2]) == 5 and len(got[3]) <= 3
    assert got[5][0] != probe[5][0]
    with pytest.raises(ValueError, match="needs detok"):
        decode_batch(model, ragged_seqs(model, seed=3)[:1], [specs[3]])


def test_leaving_cases_shrink_the_buffers_and_positions_stay_each_cases_own(tiny):
    model = tiny["llama-gqa"]
    seqs = ragged_seqs(model, seed=5)
    caches, pos = [s.cache for s in seqs], [s.pos for s in seqs]
    batch = CacheBatch(caches, [p + 1 for p in pos], room=4)
    assert batch.entries() == padded_entries(caches, 4)
    with torch.no_grad():
        model(torch.full((len(caches), 1), 5), batch, batch.pos)
    before = batch.entries()
    batch.keep([1, 4])  # the two short aware prompts
    assert batch.entries() < before / 3 and batch.pos[:, 0].tolist() == [pos[1] + 1, pos[4] + 1]
    for l in range(batch.n_layers):
        assert torch.equal(batch.lengths[:, l], torch.stack([caches[1].lengths[l], caches[4].lengths[l]]) + 1)
    with pytest.raises(ValueError, match="one token per step"):
        batch.update(0, torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16))


def test_batch_groups_respect_the_memory_limit(tiny):
    seqs = ragged_seqs(tiny["llama-gqa"], seed=9)
    caches = [s.cache for s in seqs]
    room = 6
    full = max(c.n_layers * c.n_kv_heads * (s.pos + room) for c, s in zip(caches, seqs))
    groups = batch_groups(caches, room, full)
    assert sorted(i for g in groups for i in g) == list(range(len(caches)))
    for g in groups:
        assert len(g) == 1 or padded_entries([caches[i] for i in g], room) <= full
    assert [5] in groups  # the largest full cache fills a batch alone
    assert len(groups) < len(caches)  # and the small ones share
    assert batch_groups(caches, room, 10 ** 9) == [sorted(range(len(caches)), key=lambda i: -padded_entries([caches[i]], room))]


def test_run_unit_rows_are_the_same_batched_or_one_at_a_time(tiny):
    """Every row field but the timings (and timing_shared) is equal between the two paths, over
    methods, budgets and both protocols."""
    class IdsTok:
        eos_ids = [2]

        def decode(self, ids):
            return " ".join(map(str, ids))
    model = tiny["qwen3-qknorm"]
    ids = random_ids(160, seed=11)
    cases = Hn.make_cases(Hn.parse_methods("full,laprox,laprox:selection=head,snapkv,streamingllm,h2o"),
                          [0.2, 0.5], list(Hn.PROTOCOLS))
    spec = Decoding(7, stop_ids=frozenset(IdsTok.eos_ids))
    rows = {}
    for batch in (False, True):
        results = list(Hn.run_unit(model, ids[0, :140].tolist(), ids[0, 140:].tolist(), cases, spec, IdsTok(),
                                   window=8, batch=batch))
        rows[batch] = [{k: v for k, v in r.row().items() if not k.endswith("_s") and k != "timing_shared"}
                       for r in results]
    assert len(rows[True]) == len(cases) and rows[True] == rows[False]
