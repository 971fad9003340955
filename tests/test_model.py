"""model.py against transformers (the independent reference) on tiny random checkpoints."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cache import KVCache
from model import Config, decode_greedy, load_model

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-mha-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama-linear-rope-headdim": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=24, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


def make_checkpoint(tmp_path, family, seed=0):
    """A random transformers model of `family`, saved as safetensors; returns (hf_model, folder)."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1 / 0: make them random so they are tested
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path / family
    hf.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(json.dumps(_tiny_tokenizer()))
    return hf, folder


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(BASE["vocab_size"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return json.loads(tk.to_str())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_match_transformers(tmp_path, family):
    hf, folder = make_checkpoint(tmp_path, family)
    model, _ = load_model(str(folder))
    ids = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    diff = (ours - ref).abs().max().item()
    print(f"{family}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4

    prompt = ids[:1, :12]
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    cache = KVCache.from_prefill(model.prefill(prompt))
    assert decode_greedy(model, cache, 20) == want


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-qknorm"])
def test_prefill_then_decode_equals_full_forward(tmp_path, family):
    _, folder = make_checkpoint(tmp_path, family, seed=3)
    model, _ = load_model(str(folder))
    ids = torch.randint(0, BASE["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.from_prefill(model.prefill(ids[:, :20], window=8))
        steps = [cache.last_logits] + [model(ids[:, t:t + 1], cache)[:, -1] for t in range(20, 29)]
        chunk = model(ids[:, 29:30], cache)  # and one more through the same path
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 19:29], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk, full[:, 29:30], atol=1e-5, rtol=1e-5)


def test_multi_token_extend_is_causal(tmp_path):
    _, folder = make_checkpoint(tmp_path, "llama-gqa", seed=5)
    model, _ = load_model(str(folder))
    ids = torch.randint(0, BASE["vocab_size"], (1, 25), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.from_prefill(model.prefill(ids[:, :15]))
        ext = model(ids[:, 15:], cache)
    torch.testing.assert_close(ext, full[:, 15:], atol=1e-5, rtol=1e-5)
    assert cache.pos == 25 and cache.lengths.eq(25).all()


def test_prefill_captures(tmp_path):
    """The Prefill holds post-RoPE keys, the window queries and the residual norms."""
    hf, folder = make_checkpoint(tmp_path, "llama-gqa", seed=7)
    model, _ = load_model(str(folder))
    ids = torch.randint(0, BASE["vocab_size"], (1, 33), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        p = model.prefill(ids, window=8, h2o=True, h2o_chunk=7)  # several chunks, the last one short
        out = hf(ids, output_hidden_states=True, use_cache=True)
    torch.testing.assert_close(p.logits, out.logits[:, -1], atol=1e-5, rtol=1e-5)
    for l in range(3):
        k_ref = out.past_key_values.layers[l].keys
        torch.testing.assert_close(p.keys[l], k_ref, atol=1e-5, rtol=1e-5)
    assert p.queries[0].shape == (1, 4, 8, 16) and p.window == 8 and p.n == 33
    # residual after layer l's attention add, on the window rows: hidden_states[l] + attn output
    x = out.hidden_states[1]  # after layer 0 (attention + MLP)
    assert p.resid_norm.shape == (3,) and p.out_norm.shape == (3,)
    assert torch.all(p.resid_norm > 0) and p.resid_norm[1] != p.resid_norm[0] and x.shape[1] == 33
    # H2O column means: a naive loop over queries
    q = torch.cat([model.layers[0].attn.qkv(model.layers[0].attn_norm(model.embed(ids)), torch.arange(33),
                                             model.inv_freq("cpu"))[0]], 0)
    k = p.keys[0]
    naive = torch.zeros(4, 33, dtype=torch.float64)
    for h in range(4):
        for i in range(33):
            s = (q[0, h, i].double() @ k[0, h // 2, : i + 1].double().T) / 4.0
            naive[h, : i + 1] += s.softmax(-1)
    naive /= torch.arange(33, 0, -1, dtype=torch.float64)
    torch.testing.assert_close(p.h2o[0][0].double(), naive, atol=1e-5, rtol=1e-4)


def test_unsupported_model_type_names_supported():
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        Config.from_hf(dict(BASE, model_type="gpt2"))


def test_missing_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    _, folder = make_checkpoint(tmp_path, "llama-gqa")
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 tensors: layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(folder))


def test_unreachable_hub_points_to_local_or_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local checkpoint folder or use the embedded default"):
        load_model("no-such-owner/no-such-model")


def test_context_longer_than_model_allows(tmp_path):
    _, folder = make_checkpoint(tmp_path, "llama-gqa")
    model, _ = load_model(str(folder))
    with pytest.raises(ValueError, match="longer than the model allows"):
        model(torch.zeros(1, 513, dtype=torch.long) + 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_loading(tmp_path, dtype):
    """Weights go straight into the requested dtype; logits stay close to the float32 model's."""
    _, folder = make_checkpoint(tmp_path, "qwen2-bias", seed=9)
    ref, _ = load_model(str(folder))
    low, _ = load_model(str(folder), dtype=dtype)
    assert all(p.dtype == dtype for p in low.parameters())
    ids = torch.randint(0, BASE["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        a, b = ref(ids), low(ids)
        p = low.prefill(ids, window=4)
    assert b.dtype == torch.float32 and p.keys[0].dtype == dtype
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_a_cache_answers_once_and_local_paths_are_not_hub_ids(tmp_path):
    _, folder = make_checkpoint(tmp_path, "llama-gqa", seed=12)
    model, _ = load_model(str(folder))
    cache = KVCache.from_prefill(model.prefill(torch.randint(0, BASE["vocab_size"], (1, 16))))
    decode_greedy(model, cache, 3)
    with pytest.raises(ValueError, match="decoded from already"):
        decode_greedy(model, cache, 3)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_model("./no_such/checkpoint")
