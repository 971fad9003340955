"""explain.py: on a tiny model where one planted head holds the answer, the method fails, restoring
the planted head (or its layer) fixes it, and restoring any other unit does not."""
import torch

import explain
from cache import KVCache
from decode import Decoding, decode_batch
from methods import select
from model import decode_greedy, load_model
from test_model import BASE, make_checkpoint

PLANTED = (1, 0)  # (layer, KV head) that carries the answer


def planted_model(tmp_path):
    """A tiny random GQA model (3 layers, 4 query heads on 2 KV heads) whose attention output is,
    but for 1e-4 of it, the planted KV head's: every other head writes through a scaled-down o_proj."""
    _, folder = make_checkpoint(tmp_path, "llama-gqa", seed=5)
    model = load_model(str(folder))[0]
    G = model.config.n_heads // model.config.n_kv_heads
    D = model.config.head_dim
    with torch.no_grad():
        for l, block in enumerate(model.layers):
            w = block.attn.o_proj.weight
            for h in range(model.config.n_heads):
                if (l, h // G) != PLANTED:
                    w[:, h * D:(h + 1) * D] *= 1e-4
                else:
                    w[:, h * D:(h + 1) * D] *= 4.0
    return model


def test_explain_finds_the_planted_head(tmp_path):
    model = planted_model(tmp_path)
    ids = torch.randint(3, BASE["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prefill = model.prefill(ids, window=8)
        reference = str(decode_greedy(model, KVCache.from_prefill(prefill), prefill.n, prefill.logits, 8))  # alone
        answers = lambda seqs: [str(t) for t in decode_batch(model, seqs, [Decoding(8)] * len(seqs))]
        kept = select(prefill, "snapkv", 0.1)
        trials = explain.explain(prefill, kept, answers, lambda text: float(text == reference))
    rows = {t.unit: t for t in trials}
    assert rows["none"].score == 0.0 and rows["none"].restored == 0
    assert rows["none"].kept == 3 * 2 * 20
    l, g = PLANTED
    assert rows[f"layer {l}"].score == 1.0 and rows[f"layer {l}"].restored == 2 * (200 - 20)
    assert rows[f"layer {l} head {g}"].score == 1.0 and rows[f"layer {l} head {g}"].restored == 180
    others = [u for u in rows if u not in ("none", f"layer {l}", f"layer {l} head {g}")]
    assert others == [f"layer {x}" for x in (0, 2)] + [f"layer {l} head {1 - g}"]  # heads of the fixing layer only
    assert all(rows[u].score == 0.0 for u in others)


def test_restore_puts_back_one_unit():
    kept = [[torch.tensor([0, 5, 9]), torch.tensor([9])], [torch.tensor([2, 9]), torch.tensor([1, 9])]]
    new, added = explain.restore(kept, 10, layer=1, head=0)
    assert new[1][0].tolist() == list(range(10)) and added == 8 and new[0][0] is kept[0][0]
    new, added = explain.restore(kept, 10, span=range(4, 6))
    assert [i.tolist() for i in new[0]] == [[0, 4, 5, 9], [4, 5, 9]] and added == 1 + 2 + 2 + 2
