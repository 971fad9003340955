"""memory.py against what the code really allocates: parameter counts of a built model, the bytes
of a real Prefill, the scorer's buffers; model.Config maps onto it; per-layer ranges add up."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lab import memory  # noqa: E402
from model import Model  # noqa: E402
from checkpoint import check_ranges, config_from_hf  # noqa: E402


def hf_config(s: memory.Shape, model_type="llama") -> dict:
    """A config.json dict with the shape's numbers (the fields checkpoint.config_from_hf reads)."""
    return {"model_type": model_type, "vocab_size": s.vocab_size, "hidden_size": s.dim,
            "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
            "num_key_value_heads": s.n_kv_heads, "head_dim": s.head_dim, "intermediate_size": s.hidden_dim,
            "tie_word_embeddings": s.tie_embeddings, "max_position_embeddings": s.context}


@pytest.mark.parametrize("name,model_type", [("llama-3.1-8b", "llama"), ("qwen3-8b", "qwen3"),
                                             ("qwen2.5-1.5b", "qwen2"), ("mistral-7b-v0.3", "mistral")])
def test_model_config_fields_map_onto_memory(name, model_type):
    """model.Config carries every field memory reads, under the same names, with the same values."""
    known = memory.KNOWN[name]
    cfg = config_from_hf(hf_config(known, model_type))
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                  "tie_embeddings", "qkv_bias", "qk_norm"):
        assert getattr(cfg, field) == getattr(known, field), field
    assert memory.model_memory(cfg, 4096, 2) == memory.model_memory(known, 4096, 2)


@pytest.mark.parametrize("model_type,tie", [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_weights_are_the_parameters_of_a_built_model(model_type, tie):
    """A small model of each family built by model.py: its parameter bytes are memory's weights."""
    s = memory.Shape(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96, vocab_size=300,
                     tie_embeddings=tie, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", context=512)
    model = Model(config_from_hf(hf_config(s, model_type)))
    if tie:
        model.lm_head.weight = model.embed.weight
    params = sum(p.numel() for p in model.parameters())          # a tied matrix is listed once
    assert memory.model_memory(s, 100, 4)["weights"] == params * 4
    per_layer = sum(p.numel() for p in model.layers[0].parameters()) * 2
    assert memory.layer_weight_bytes(s, 2) == per_layer


def test_kv_queries_and_scores_match_a_real_prefill(default_model):
    """The default model's prefill: keys, values and window queries take exactly memory's bytes,
    and LaProx's scores are (H_kv, n) float32 per layer."""
    import laprox
    model, _ = default_model
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
    r = subprocess.run([sys.executable, "-m", "lab.memory", "--model", "llama-3.1-8b", "--length", "131072",
                        "--dtype", "bfloat16"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "meta-llama/Llama-3.1-8B-Instruct" in r.stdout and "total" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lab.memory", "--model", "gpt-5"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode != 0 and "unknown model 'gpt-5'" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- placement over several devices

def brute_force_splits(n_layers, n_devices):
    """Every way to cut layers 0..n_layers-1 into n_devices contiguous (possibly empty) ranges."""
    import itertools
    for cuts in itertools.combinations_with_replacement(range(n_layers + 1), n_devices - 1):
        bounds = (0, *cuts, n_layers)
        yield [range(a, b) for a, b in zip(bounds, bounds[1:])]


def largest_fraction(ranges, device_bytes, caps):
    return max(device_bytes(d, r) / caps[d] for d, r in enumerate(ranges))


@pytest.mark.parametrize("seed", range(6))
def test_split_is_the_best_contiguous_split(seed):
    """Synthetic per-layer sizes, extras on the first and last device, uneven capacities: the plan's
    largest fraction of capacity is the minimum over every contiguous split (a brute-force loop)."""
    g = torch.Generator().manual_seed(seed)
    n_layers, n_devices = 3 + seed, 1 + seed % 4
    sizes = (torch.rand(n_layers, generator=g) * 10 + 1).tolist()
    first, last = (torch.rand(2, generator=g) * 8).tolist()
    caps = (torch.rand(n_devices, generator=g) * 3 + 1).tolist() if seed % 2 else None
    need = lambda d, r: sum(sizes[l] for l in r) + first * (d == 0) + last * (d == n_devices - 1)  # noqa: E731
    ranges = memory.split_layers(n_layers, n_devices, need, caps)
    check_ranges(ranges, n_layers, n_devices)            # contiguous, in order, covering
    c = caps or [1.0] * n_devices
    best = min(largest_fraction(rs, need, c) for rs in brute_force_splits(n_layers, n_devices))
    assert largest_fraction(ranges, need, c) == pytest.approx(best, rel=1e-12)
    assert memory.split_layers(n_layers, n_devices, need, caps) == ranges   # deterministic


def test_equal_layers_split_evenly_and_ties_go_to_even_loads():
    need = lambda d, r: len(r)  # noqa: E731
    assert memory.split_layers(8, 4, need) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert memory.split_layers(7, 2, need) == [range(0, 3), range(3, 7)]  # ties: the earlier boundary
    assert memory.split_layers(2, 3, need) == [range(0, 0), range(0, 1), range(1, 2)]   # more devices than layers
    assert memory.split_layers(6, 2, need, [1, 2]) == [range(0, 2), range(2, 6)]        # by capacity


@pytest.mark.parametrize("name,n,n_devices", [("llama-3.1-70b", 32768, 2), ("llama-3.1-70b", 131072, 4),
                                              ("qwen2.5-1.5b", 8192, 3), ("smollm2-135m", 4096, 2)])
def test_plan_of_real_configs_is_balanced_by_memory(name, n, n_devices):
    """Real shapes: the plan is the best contiguous split of model_memory's per-device totals (the
    embeddings on the first device, lm_head on the last, the gathered scores on layer 0's)."""
    s = memory.KNOWN[name]
    ranges = memory.plan_layers(s, n, 2, n_devices)
    check_ranges(ranges, s.n_layers, n_devices)
    total = lambda d, r: memory.model_memory(s, n, 2, layers=r, embed=d == 0, head=d == n_devices - 1)["total"]  # noqa
    got = max(total(d, r) for d, r in enumerate(ranges))
    if n_devices <= 3:
        assert got == min(max(total(d, r) for d, r in enumerate(rs)) for rs in brute_force_splits(s.n_layers, n_devices))
    per_layer = memory.layer_memory(s, n, 2)
    spread = max(total(d, r) for d, r in enumerate(ranges)) - min(total(d, r) for d, r in enumerate(ranges))
    assert spread <= sum(per_layer[k] for k in memory.PERSISTENT) + s.vocab_size * s.dim * 2  # a layer + an embedding
    if name == "llama-3.1-70b" and n_devices == 2:
        assert ranges == [range(0, 40), range(40, 80)]


def test_a_model_that_does_not_fit_is_refused_with_what_each_device_needs():
    s, gib80 = memory.KNOWN["llama-3.1-70b"], 80 * 2**30
    assert memory.plan_layers(s, 32768, 2, 2, capacities=[gib80] * 2) == [range(0, 40), range(40, 80)]
    with pytest.raises(ValueError, match=r"does not fit on 2 device\(s\) at 131072 tokens.*layers 0-39: .* of 80.0 "
                                         r"GiB.*use more devices"):
        memory.plan_layers(s, 131072, 2, 2, capacities=[gib80] * 2)
    assert len(memory.plan_layers(s, 131072, 2, 4, capacities=[gib80] * 4)) == 4


def test_the_gathering_device_holds_every_layers_scores():
    s, n = memory.KNOWN["llama-3.1-8b"], 32768
    per = memory.layer_memory(s, n, 2)
    first = memory.model_memory(s, n, 2, layers=range(0, 16), head=False)
    last = memory.model_memory(s, n, 2, layers=range(16, 32), embed=False)
    assert first["selection"] == 16 * per["scores"] + 2 * 32 * per["scores"]
    assert last["selection"] == 16 * per["scores"]
    assert memory.model_memory(s, n, 2)["selection"] == 3 * 32 * per["scores"]


@pytest.mark.parametrize("ranges", [[range(0, 2), range(3, 4)], [range(0, 2)], [range(1, 4), range(4, 4)],
                                    [range(0, 4, 2), range(4, 4)], [range(0, 3), range(3, 5)]])
def test_bad_layer_ranges_are_refused(ranges):
    with pytest.raises(ValueError, match="contiguous ranges"):
        check_ranges(ranges, 4, 2)


def test_cpu_devices_have_no_capacity_and_the_command_prints_the_split():
    assert memory.device_capacities(["cpu", "cpu"]) is None
    r = subprocess.run([sys.executable, "-m", "lab.memory", "--model", "llama-3.1-70b", "--length", "32768",
                        "--devices", "2", "--capacity", "80"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "device 0: layers  0-39" in r.stdout and "device 1: layers 40-79" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lab.memory", "--model", "llama-3.1-70b", "--length", "131072",
                        "--devices", "2", "--capacity", "80"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "does not fit" in r.stderr and "Traceback" not in r.stderr
