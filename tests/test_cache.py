"""KVCache: decoding over uneven, evicted heads equals full attention with the evicted entries
masked out (a naive float64 reference written here), and memory shrinks for real."""
import math

import pytest
import torch

from cache import KVCache
from test_model import BASE, make_checkpoint
from checkpoint import load_model


def random_kept(n, n_layers, n_kv, window, gen):
    """Uneven random kept sets: per (layer, head) a random count and subset, window always kept."""
    kept = []
    for _ in range(n_layers):
        layer = []
        for _ in range(n_kv):
            k = int(torch.randint(1, n - window, (1,), generator=gen))
            body = torch.randperm(n - window, generator=gen)[:k]
            layer.append(torch.cat([body, torch.arange(n - window, n)]).sort().values)
        kept.append(layer)
    return kept


@torch.no_grad()
def masked_reference_step(model, x_ids, pos, prompt_kv, kept, new_kv):
    """One decode step with naive float64 attention over (kept prompt entries + generated ones).

    prompt_kv: per layer (k, v) of the full prefill (1, H_kv, n, D); kept: per layer per head
    indices; new_kv: per layer list of (k, v) of generated tokens so far (appended here)."""
    cfg = model.config
    G = cfg.n_heads // cfg.n_kv_heads
    x = model.embed(x_ids)
    positions = torch.tensor([pos])
    for l, blk in enumerate(model.layers):
        q, k, v = blk.attn.qkv(blk.attn_norm(x), positions, model.inv_freq("cpu"))
        new_kv[l].append((k, v))
        heads = []
        for h in range(cfg.n_heads):
            g = h // G
            keys = torch.cat([prompt_kv[l][0][0, g, kept[l][g]]] + [kk[0, g] for kk, _ in new_kv[l]]).double()
            vals = torch.cat([prompt_kv[l][1][0, g, kept[l][g]]] + [vv[0, g] for _, vv in new_kv[l]]).double()
            p = (q[0, h, 0].double() @ keys.T / math.sqrt(cfg.head_dim)).softmax(-1)
            heads.append(p @ vals)
        y = torch.cat(heads).float()[None, None]
        x = x + blk.attn.o_proj(y)
        x = x + blk.mlp(blk.mlp_norm(x))
    return model.lm_head(model.norm(x))[:, -1].float()


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias"])
def test_decode_over_evicted_cache_equals_masked_full_attention(tmp_path, family):
    _, folder = make_checkpoint(tmp_path, family, seed=11)
    model, _ = load_model(str(folder))
    gen = torch.Generator().manual_seed(12)
    n, w = 50, 6
    ids = torch.randint(0, BASE["vocab_size"], (1, n), generator=gen)
    prefill = model.prefill(ids, window=w)
    kept = random_kept(n, model.config.n_layers, model.config.n_kv_heads, w, gen)
    cache = KVCache.from_prefill(prefill, kept)
    assert not all(bool((l == cache.lengths[0, 0]).all()) for l in cache.lengths)  # really uneven
    prompt_kv = list(zip(prefill.keys, prefill.values))
    new_kv = [[] for _ in model.layers]
    token = int(prefill.logits.argmax())
    for step in range(70):  # past the 64-row reserve, so the repacking path runs too
        ours = model(torch.tensor([[token]]), cache, n + step)[:, -1]
        ref = masked_reference_step(model, torch.tensor([[token]]), n + step, prompt_kv, kept, new_kv)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
        token = int(torch.randint(0, BASE["vocab_size"], (1,), generator=gen))  # fresh inputs each step
    assert torch.equal(cache.lengths, torch.tensor([[len(i) + 70 for i in layer] for layer in kept]))


def test_memory_is_freed_and_counted(tmp_path):
    _, folder = make_checkpoint(tmp_path, "llama-gqa", seed=13)
    model, _ = load_model(str(folder))
    gen = torch.Generator().manual_seed(14)
    ids = torch.randint(0, BASE["vocab_size"], (1, 200), generator=gen)
    prefill = model.prefill(ids, window=8)
    full = KVCache.from_prefill(prefill)
    kept = random_kept(200, 3, 2, 8, gen)
    small = KVCache.from_prefill(prefill, kept)
    entries = sum(len(i) for layer in kept for i in layer)
    D, elt = model.config.head_dim, 4
    assert full.nbytes() == 2 * 3 * 2 * 200 * D * elt
    assert small.nbytes() == 2 * entries * D * elt  # exactly what was kept: packed, no padding
    assert small.kept_fraction() == pytest.approx(entries / (3 * 2 * 200))
    assert full.kept_fraction() == 1.0
    # the kept entries are the prefill's own keys, in order
    for l in range(3):
        for g in range(2):
            k, v = small.head(l, g)
            assert torch.equal(k, prefill.keys[l][0, g, kept[l][g]])
            assert torch.equal(v, prefill.values[l][0, g, kept[l][g]])


def test_default_model_memory_at_5_percent_and_full_decodes_as_no_eviction(default_model):
    """On the default model at 2k tokens: budget 0.05 holds at most 7% of the full cache's bytes
    (packed storage: no padding), and budget 1.0 / method full decode the same greedy tokens as no
    eviction (that those are a plain forward's is test_model's prefill-then-decode test)."""
    from methods import compress
    from eval_niah import build_prompt, haystack_ids, read_haystack
    from model import decode_greedy
    model, tok = default_model
    ids = torch.tensor([build_prompt(tok, haystack_ids(tok, read_haystack(), 2100), 2000, 0.5)["ids"]])
    with torch.no_grad():
        prefill = model.prefill(ids)
        full = compress(prefill, "full")
        print()
        for method in ("laprox", "snapkv", "adakv", "pyramidkv", "criticalkv"):
            small = compress(prefill, method, 0.05)
            ratio = small.nbytes() / full.nbytes()
            print(f"2k tokens, {method} at 0.05: {small.nbytes() / 2**20:.1f} MiB of {full.nbytes() / 2**20:.1f} MiB "
                  f"= {100 * ratio:.2f}% (+ {small.lengths.numel() * 8} bytes of per-head lengths)")
            assert ratio <= 0.07 and abs(small.kept_fraction() - 0.05) < 1e-3
        reference = decode_greedy(model, KVCache.from_prefill(prefill), prefill.n, prefill.logits, 12)
        for cache in (compress(prefill, "laprox", 1.0), compress(prefill, "snapkv", 1.0), full):
            assert cache.kept_fraction() == 1.0
            assert decode_greedy(model, cache, prefill.n, prefill.logits, 12) == reference


# ---------------------------------------------------------------- one pass per layer, no host waits

def tiny_model(n_kv_heads, seed=0):
    """A random 2-layer Llama with H_kv KV heads of G = 2 query heads each."""
    from model import Config, Model
    torch.manual_seed(seed)
    cfg = Config(model_type="llama", vocab_size=50, dim=32, n_layers=2, n_heads=2 * n_kv_heads,
                 n_kv_heads=n_kv_heads, head_dim=8, hidden_dim=48, max_position=512)
    return Model(cfg).eval()


def uneven_cache(model, n, gen):
    """A KVCache of random entries, a different random count per (layer, KV head) (1 .. n)."""
    c = model.config
    lengths = torch.randint(1, n + 1, (c.n_layers, c.n_kv_heads), generator=gen)
    lengths[:, 0] = n  # one head kept everything: the padded view's worst case
    keys = [[torch.randn(int(m), c.head_dim, generator=gen) for m in row] for row in lengths]
    values = [[torch.randn(int(m), c.head_dim, generator=gen) for m in row] for row in lengths]
    return KVCache(keys, values, prompt_len=n, reserve=4)


class AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched while active, and records those that read a number back to the host."""
    def __init__(self):
        super().__init__()
        self.count, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_a_decode_step_does_not_grow_with_the_kv_heads_and_never_reads_back():
    """One decode step over uneven caches, tiny models with H_kv = 1, 2, 4, 8: the aten ops of
    Model.forward do not grow with H_kv (H_kv = 1 is an even layer: no padded view, fewer ops), and
    none reads a number back (aten._local_scalar_dense, aten.is_nonzero). Every step is counted:
    steps 0 and 5 repack (a fresh cache has no spare rows; then the reserve of 4 runs out), the
    others append in place. Greedy's argmax read-back is decode_greedy's, outside Model.forward."""
    counts = {}
    for h_kv in (1, 2, 4, 8):
        model = tiny_model(h_kv)
        gen = torch.Generator().manual_seed(h_kv)
        cache = uneven_cache(model, 30, gen)
        assert h_kv == 1 or not any(cache.even)
        per_step = []
        for step in range(6):  # appends in place, and repacks at steps 0 and 5 (reserve 4)
            with AtenOps() as ops:
                model(torch.randint(0, 50, (1, 1), generator=gen), cache, 30 + step)
            assert ops.syncs == [], (h_kv, step, ops.syncs)
            per_step.append(ops.count)
        counts[h_kv] = per_step
    assert counts[2] == counts[4] == counts[8], counts
    assert all(a <= b for a, b in zip(counts[1], counts[2])), counts
    assert counts[2][0] > counts[2][1]  # the repack is in the counted steps


@torch.no_grad()
@pytest.mark.parametrize("n_kv_heads", [1, 3])
def test_extending_by_t_tokens_equals_t_single_steps(n_kv_heads):
    """The agnostic protocol's question, T tokens prefilled onto an uneven cache in one pass per layer,
    gives the logits of feeding them one at a time (each step checked against float64 above)."""
    model = tiny_model(n_kv_heads, seed=5)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 50, (1, 7), generator=gen)
    one_pass, stepwise = (uneven_cache(model, 40, torch.Generator().manual_seed(7)) for _ in range(2))
    got = model(ids, one_pass, 40)[0]                                                   # (7, vocab)
    want = torch.cat([model(ids[:, t:t + 1], stepwise, 40 + t)[0] for t in range(7)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(one_pass.lengths, stepwise.lengths)
    for l in range(2):
        for g in range(n_kv_heads):
            torch.testing.assert_close(one_pass.head(l, g)[0], stepwise.head(l, g)[0])
