"""memory.py against what the code really allocates: parameter counts of a built model, the bytes
of a real Prefill, the scorer's buffers; model.Config maps onto it; per-layer ranges add up."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import memory  # noqa: E402
from model import Config, Model  # noqa: E402


def hf_config(s: memory.Shape, model_type="llama") -> dict:
    """A config.json dict with the shape's numbers (the fields model.Config.from_hf reads)."""
    return {"model_type": model_type, "vocab_size": s.vocab_size, "hidden_size": s.dim,
            "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
            "num_key_value_heads": s.n_kv_heads, "head_dim": s.head_dim, "intermediate_size": s.hidden_dim,
            "tie_word_embeddings": s.tie_embeddings, "max_position_embeddings": s.context}


@pytest.mark.parametrize("name,model_type", [("llama-3.1-8b", "llama"), ("qwen3-8b", "qwen3"),
                                             ("qwen2.5-1.5b", "qwen2"), ("mistral-7b-v0.3", "mistral")])
def test_model_config_fields_map_onto_memory(name, model_type):
    """model.Config carries every field memory reads, under the same names, with the same values."""
    known = memory.KNOWN[name]
    cfg = Config.from_hf(hf_config(known, model_type))
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                  "tie_embeddings", "qkv_bias", "qk_norm"):
        assert getattr(cfg, field) == getattr(known, field), field
    assert memory.model_memory(cfg, 4096, 2) == memory.model_memory(known, 4096, 2)


@pytest.mark.parametrize("model_type,tie", [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_weights_are_the_parameters_of_a_built_model(model_type, tie):
    """A small model of each family built by model.py: its parameter bytes are memory's weights."""
    s = memory.Shape(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96, vocab_size=300,
                     tie_embeddings=tie, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", context=512)
    model = Model(Config.from_hf(hf_config(s, model_type)))
    if tie:
        model.lm_head.weight = model.embed.weight
    params = sum(p.numel() for p in model.parameters())          # a tied matrix is listed once
    assert memory.model_memory(s, 100, 4)["weights"] == params * 4
    per_layer = sum(p.numel() for p in model.layers[0].parameters()) * 2
    assert memory.layer_weight_bytes(s, 2) == per_layer


def test_kv_queries_and_scores_match_a_real_prefill():
    """The default model's prefill: keys, values and window queries take exactly memory's bytes,
    and LaProx's scores are (H_kv, n) float32 per layer."""
    from model import load_model
    import laprox
    model, _ = load_model()
    s = memory.KNOWN["smollm2-135m"]
    ids = torch.randint(0, s.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill = model.prefill(ids, window=16)
    m = memory.model_memory(model.config, 200, 4, window=16)
    assert m["kv"] == sum(k.nbytes + v.nbytes for k, v in zip(prefill.keys, prefill.values))
    assert m["queries"] == sum(q.nbytes for q in prefill.queries)
    assert m["scores"] == sum(x.nbytes for x in laprox.laprox_scorer(prefill))
    assert m["weights"] == sum(p.nbytes for p in model.parameters())
    G = s.n_heads // s.n_kv_heads
    M = laprox.value_gram_pairs(prefill.o_proj[0], s.n_heads, s.head_dim, s.n_kv_heads)
    assert memory.layer_memory(s, 200, 4)["gram_cache"] == M.nbytes == s.n_kv_heads * G * (G + 1) // 2 * 64 * 64 * 4


def test_activation_is_the_mlp_intermediates_for_real_models():
    s = memory.KNOWN["llama-3.1-8b"]
    n = 131072
    layer = memory.layer_memory(s, n, 2)
    assert layer["activation"] == n * 2 * (2 * s.dim + 3 * s.hidden_dim)   # three (n, F) + two (n, d), bf16
    assert layer["kv"] == 2 * 8 * n * 128 * 2


def test_layer_ranges_add_up_for_placement_on_several_gpus():
    """Two devices holding layers [0, 16) (+ embeddings) and [16, 32) (+ head) hold what one does."""
    s = memory.KNOWN["llama-3.1-8b"]
    whole = memory.model_memory(s, 32768, 2)
    first = memory.model_memory(s, 32768, 2, layers=range(0, 16), head=False)
    last = memory.model_memory(s, 32768, 2, layers=range(16, 32), embed=False)
    for part in memory.PERSISTENT:
        assert first[part] + last[part] == whole[part], part
    assert first["activation"] == last["activation"] == whole["activation"]
    assert max(first["total"], last["total"]) < whole["total"]
    tied = memory.KNOWN["qwen2.5-1.5b"]          # a tied lm_head on the last device needs its own copy
    emb = tied.vocab_size * tied.dim * 2
    assert memory.model_memory(tied, 100, 2, layers=range(28, 28), embed=False)["weights"] == emb + tied.dim * 2


def test_bad_arguments_are_refused():
    s = memory.KNOWN["llama-3.1-8b"]
    with pytest.raises(ValueError, match="prompt length"):
        memory.layer_memory(s, 0, 2)
    with pytest.raises(ValueError, match="itemsize"):
        memory.layer_memory(s, 10, 3)
    with pytest.raises(ValueError, match="path"):
        memory.layer_memory(s, 10, 2, path="cuda")


def test_command_prints_the_breakdown_and_refuses_unknown_models():
    r = subprocess.run([sys.executable, str(ROOT / "memory.py"), "--model", "llama-3.1-8b", "--length", "131072",
                        "--dtype", "bfloat16"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "meta-llama/Llama-3.1-8B-Instruct" in r.stdout and "total" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "memory.py"), "--model", "gpt-5"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode != 0 and "unknown model 'gpt-5'" in r.stderr and "Traceback" not in r.stderr
