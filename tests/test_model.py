"""model.py against transformers (the independent reference) on tiny random checkpoints."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cache import KVCache
from checkpoint import check_config, config_from_hf
from model import decode_greedy, generate
from checkpoint import load_model

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
    # biases: Llama's attention_bias covers q, k, v and o_proj, its mlp_bias the MLP; Qwen3's
    # attention_bias q, k, v and o; Mistral's modeling file has none and ignores the field
    "llama-attention-mlp-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "qwen3-attention-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, attention_bias=True)),
    "mistral-attention-bias-ignored": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None,
                                                                                  attention_bias=True)),
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
    prefill = model.prefill(prompt)
    assert decode_greedy(model, KVCache.from_prefill(prefill), 12, prefill.logits, 20) == want


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-qknorm"])
def test_prefill_then_decode_equals_full_forward(tmp_path, family):
    _, folder = make_checkpoint(tmp_path, family, seed=3)
    model, _ = load_model(str(folder))
    ids = torch.randint(0, BASE["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        prefill = model.prefill(ids[:, :20], window=8)
        cache = KVCache.from_prefill(prefill)
        steps = [prefill.logits] + [model(ids[:, t:t + 1], cache, t)[:, -1] for t in range(20, 29)]
        chunk = model(ids[:, 29:30], cache, 29)  # and one more through the same path
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 19:29], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk, full[:, 29:30], atol=1e-5, rtol=1e-5)


def test_multi_token_extend_is_causal(tmp_path):
    _, folder = make_checkpoint(tmp_path, "llama-gqa", seed=5)
    model, _ = load_model(str(folder))
    ids = torch.randint(0, BASE["vocab_size"], (1, 25), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.from_prefill(model.prefill(ids[:, :15]))
        ext = model(ids[:, 15:], cache, 15)
    torch.testing.assert_close(ext, full[:, 15:], atol=1e-5, rtol=1e-5)
    assert cache.lengths.eq(25).all()


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
        check_config(dict(BASE, model_type="gpt2"))


def test_bias_fields_reach_the_right_projections(tmp_path):
    """The biases the checkpoints of test_logits_and_greedy_match_transformers carry, per family."""
    cfg = lambda mt, **kw: config_from_hf(dict(BASE, model_type=mt, **kw))  # noqa: E731
    biases = lambda c: (c.qkv_bias, c.o_bias, c.mlp_bias)  # noqa: E731
    assert biases(cfg("llama", attention_bias=True, mlp_bias=True)) == (True, True, True)
    assert biases(cfg("qwen3", attention_bias=True, mlp_bias=True)) == (True, True, False)
    assert biases(cfg("qwen2")) == (True, False, False)
    assert biases(cfg("mistral", attention_bias=True, mlp_bias=True)) == (False, False, False)


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
REFUSED_CONFIGS = {  # config.json fields this reference would get wrong: (extra fields, words of the error)
    "hidden_act gelu": (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "rope_scaling without a type": (dict(rope_scaling=dict(factor=2.0)), "named by rope_type"),
    "rope type yarn": (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "'yarn'"),
    "partial_rotary_factor": (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    "partial_rotary_factor in rope": (dict(rope_scaling=dict(rope_type="linear", factor=2.0, partial_rotary_factor=0.25)),
                                      "partial_rotary_factor=0.25"),
    "linear without factor": (dict(rope_scaling=dict(rope_type="linear")), "factor, got None"),
    "linear factor a string": (dict(rope_scaling=dict(type="linear", factor="2")), "factor, got '2'"),
    "llama3 without low_freq_factor": (dict(rope_scaling=dict(LLAMA3, low_freq_factor=None)), "low_freq_factor"),
    "llama3 without high_freq_factor": (dict(rope_scaling={k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}),
                                        "high_freq_factor, got None"),
    "llama3 high <= low": (dict(rope_scaling=dict(LLAMA3, high_freq_factor=1.0)), "high_freq_factor > low_freq_factor"),
    "quantized": (dict(quantization_config=dict(quant_method="awq", bits=4)), "quantization_config="),
    "llama3 original_max_position_embeddings null": (
        dict(rope_scaling=dict(LLAMA3, original_max_position_embeddings=None)),
        "original_max_position_embeddings, got None: the context length the model was pretrained with"),
    "llama3 without original_max_position_embeddings or max_position_embeddings": (
        dict(rope_scaling=dict(LLAMA3), max_position_embeddings=None),
        "original_max_position_embeddings, got None: the context length the model was pretrained with"),
}


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS))
def test_config_fields_that_would_be_ignored_are_refused(case):
    extra, words = REFUSED_CONFIGS[case]
    with pytest.raises(ValueError) as err:
        check_config(dict(BASE, model_type="llama", **extra))
    assert words in str(err.value)
    fine = dict(BASE, model_type="llama", hidden_act="swish", partial_rotary_factor=1.0)  # both SiLU, whole head
    check_config(fine)
    config_from_hf(fine)


def test_llama3_scaling_defaults_its_pretraining_length_as_transformers_does():
    """Without original_max_position_embeddings, transformers takes max_position_embeddings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from model import rope_frequencies
    ours = config_from_hf(dict(BASE, model_type="llama", rope_scaling=dict(LLAMA3)))
    ref_cfg = transformers.LlamaConfig(**BASE, rope_scaling=dict(LLAMA3))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](ref_cfg, "cpu")
    assert ours.rope_scaling["original_max_position_embeddings"] == BASE["max_position_embeddings"]
    torch.testing.assert_close(rope_frequencies(ours), ref.float(), rtol=1e-6, atol=0)


# config.json with both fields: transformers 5.2 takes a non-empty rope_scaling whole and drops rope_parameters
# (PreTrainedConfig.convert_rope_params_to_dict); what the dropped field says otherwise is refused, naming both
DROPPED_ROPE = {  # (rope_parameters, rope_scaling, the key=value transformers drops)
    "llama3 beside linear": (dict(LLAMA3, original_max_position_embeddings=64), dict(type="linear", factor=4.0),
                             "rope_type='llama3'"),
    "rope_theta beside linear": (dict(rope_type="default", rope_theta=5e5), dict(type="linear", factor=4.0),
                                 "rope_theta=500000.0"),
}


@pytest.mark.parametrize("case", list(DROPPED_ROPE))
def test_rope_parameters_that_transformers_drops_are_refused(case):
    params, scaling, dropped = DROPPED_ROPE[case]
    key, value = dropped.split("=")
    ref = transformers.LlamaConfig(**BASE, rope_parameters=dict(params), rope_scaling=dict(scaling)).rope_parameters
    assert repr(ref.get(key)) != value and ref["factor"] == scaling["factor"]  # transformers: rope_scaling, whole
    with pytest.raises(ValueError) as err:
        check_config(dict(BASE, model_type="llama", rope_parameters=params, rope_scaling=scaling))
    msg = str(err.value)
    assert f"drops rope_parameters' {dropped}" in msg and f"rope_scaling={scaling}" in msg, msg


def test_rope_scaling_beside_default_rope_parameters_is_read_as_transformers_does(tmp_path):
    """The issue's case: rope_parameters says default, rope_scaling says linear x4; transformers
    scales (and takes the top-level rope_theta, as rope_scaling has none)."""
    _, folder = make_checkpoint(tmp_path, "llama-gqa", seed=14)
    _config(folder, rope_parameters=dict(rope_type="default"), rope_scaling=dict(type="linear", factor=4.0),
            rope_theta=2000.0)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["rope_theta"] == 2000.0
    model, _ = load_model(str(folder))
    ids = torch.randint(0, BASE["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def _damage_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _index_outside(folder):
    """An index whose shard is a real checkpoint's weights, one folder up: it used to load."""
    other = folder.parent / "other"
    other.mkdir()
    (folder / "model.safetensors").rename(other / "model.safetensors")
    _damage_index(folder, {"model.embed_tokens.weight": "../other/model.safetensors"})


def _bigger_tokenizer(folder):
    from tokenizers import Tokenizer, models
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(BASE["vocab_size"] + 100)}, unk_token="w0"))
    (folder / "tokenizer.json").write_text(tk.to_str())


def _weight(folder, name="model.layers.1.mlp.up_proj.weight", dtype=None, value=None):
    """Rewrite one tensor of model.safetensors: stored as `dtype` (random ints for an integer
    dtype), or with one random element set to `value` (nan, inf)."""
    from safetensors.torch import load_file, save_file
    sd = load_file(folder / "model.safetensors")
    t = sd[name]
    if value is not None:
        t.view(-1)[torch.randint(0, t.numel(), ())] = value
    elif dtype.is_floating_point:
        sd[name] = t.to(dtype)
    else:
        sd[name] = torch.randint(-100, 100, t.shape, dtype=dtype)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def _config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(cfg))


BAD_FOLDERS = {  # damage to a saved checkpoint: (damage, words of the error, which also names the file)
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{\"vocab_size\": 300,"), "not valid JSON"),
    "config.json empty": (lambda f: (f / "config.json").write_text(""), "not valid JSON"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "not an object"),
    "config.json missing": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "config without vocab_size": (lambda f: _config(f, vocab_size=None), "vocab_size=None"),
    "config vocab_size a string": (lambda f: _config(f, vocab_size="300"), "vocab_size='300'"),
    "config heads not a multiple": (lambda f: _config(f, num_key_value_heads=3), "multiple"),
    "index without weight_map": (lambda f: (f / "model.safetensors.index.json").write_text("{}"), "no weight_map"),
    "index a list": (lambda f: (f / "model.safetensors.index.json").write_text("[]"), "not an object"),
    "index shard outside the folder": (_index_outside, "'../other/model.safetensors'"),
    "index shard absolute": (lambda f: _damage_index(f, {"x": str(f / "model.safetensors")}), "inside"),
    "index shard missing": (lambda f: _damage_index(f, {"x": "model-00001-of-00002.safetensors"}), "is missing"),
    "no safetensors": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
                          "damaged or incomplete"),
    "weights not safetensors": (lambda f: (f / "model.safetensors").write_text("not tensors"), "damaged or incomplete"),
    "tokenizer.json missing": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "tokenizer.json damaged": (lambda f: (f / "tokenizer.json").write_text("{\"model\": 3}"), "not a readable tokenizer"),
    "tokenizer larger than vocab_size": (_bigger_tokenizer, "400 tokens but config.json's vocab_size is 300"),
    "generation_config.json not JSON": (lambda f: (f / "generation_config.json").write_text("{"), "not valid JSON"),
    "int8 weight": (lambda f: _weight(f, dtype=torch.int8),
                    "tensor 'model.layers.1.mlp.up_proj.weight' is stored as I8, expected a float dtype"),
    "int32 weight": (lambda f: _weight(f, dtype=torch.int32), "is stored as I32"),
    "fp8 weight": (lambda f: _weight(f, dtype=torch.float8_e4m3fn), "is stored as F8_E4M3"),
    "NaN in a weight": (lambda f: _weight(f, value=float("nan")),
                        "tensor 'model.layers.1.mlp.up_proj.weight' holds NaN or inf"),
    "inf in a weight": (lambda f: _weight(f, "model.norm.weight", value=-float("inf")),
                        "tensor 'model.norm.weight' holds NaN or inf"),
}


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("saved"), "llama-gqa", seed=11)[1]


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_load_errors_name_the_file_and_the_fix(saved_checkpoint, tmp_path, case):
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_checkpoint, folder)
    damage, words = BAD_FOLDERS[case]
    damage(folder)
    with pytest.raises((ValueError, OSError)) as err:
        load_model(str(folder))
    msg = str(err.value)
    assert words in msg and str(folder) in msg and "\n" not in msg, msg
    assert any(fix in msg for fix in ("download", "refused", "different models", "convert")), msg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tok) of a small random Llama."""
    return load_model(str(make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama-gqa", seed=13)[1]))


BAD_INPUTS = {  # (call on (model, tok), words of the error)
    "prefill of zero tokens": (lambda m, t: m.prefill(torch.zeros(1, 0, dtype=torch.long)), "T >= 1"),
    "generate on an empty prompt": (lambda m, t: generate(m, t, ""), "empty prompt"),
    "forward of zero tokens": (lambda m, t: m(torch.zeros(1, 0, dtype=torch.long)), "T >= 1"),
    "a cache without pos": (lambda m, t: m(torch.tensor([[3]]), KVCache.from_prefill(m.prefill(torch.tensor([[3, 4]])))),
                            "together with pos"),
    "float token ids": (lambda m, t: m.prefill(torch.rand(1, 8) * 100), "integer token ids"),
    "token id = vocab_size": (lambda m, t: m.prefill(torch.tensor([[3, 300, 5]])), "token id 300 is outside"),
    "negative token id": (lambda m, t: m(torch.tensor([[3, -1]])), "token id -1 is outside"),
    "window 2.5": (lambda m, t: m.prefill(torch.tensor([[3, 4, 5]]), window=2.5), "window must be an int"),
    "window 0": (lambda m, t: m.prefill(torch.tensor([[3, 4, 5]]), window=0), "window must be an int >= 1"),
    "h2o_chunk 0": (lambda m, t: m.prefill(torch.tensor([[3, 4, 5]]), h2o=True, h2o_chunk=0), "h2o_chunk"),
    "max_new_tokens -1": (lambda m, t: generate(m, t, "t1 t2", max_new_tokens=-1), "max_new_tokens"),
    "max_new_tokens 2.5": (lambda m, t: generate(m, t, "t1 t2", max_new_tokens=2.5), "max_new_tokens"),
    "decode 0 tokens": (lambda m, t: decode_greedy(m, KVCache.from_prefill(m.prefill(torch.tensor([[3, 4]]))), 2,
                                                   torch.rand(1, 300), 0), "max_new_tokens"),
    "generate with a cache but no prefill": (
        lambda m, t: generate(m, t, cache=KVCache.from_prefill(m.prefill(torch.tensor([[3, 4]])))), "prefill="),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_refused_clearly(tiny, case):
    call, words = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=words):
        call(*tiny)


def test_generate_checks_before_the_prefill(tiny):
    model, tok = tiny
    prefill = model.prefill(torch.tensor([[3, 4, 5]]))
    cache = KVCache.from_prefill(prefill)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, cache=cache, prefill=prefill, max_new_tokens=-1)
    assert generate(model, tok, cache=cache, prefill=prefill, max_new_tokens=2) is not None  # the cache still answers


@pytest.mark.parametrize("device, dtype, words", [
    ("cuda", torch.float32, "not available"), ("cuda:7", torch.float32, "not available"),
    ("bogus", torch.float32, "not available"), ("cpu", "float32", "torch.dtype"), ("cpu", torch.int64, "torch.dtype")])
def test_unavailable_device_or_bad_dtype_fails_before_loading(device, dtype, words):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=words):
        load_model("./this/folder/is/never/read", device=device, dtype=dtype)


def test_integer_weights_are_refused_before_any_tensor_is_read(saved_checkpoint, tmp_path, monkeypatch):
    """The int8 tensor sits in the second of two shards: the headers of both are read first."""
    import shutil
    import safetensors
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_checkpoint, folder)
    _weight(folder, "model.norm.weight", dtype=torch.int8)
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if k != "model.norm.weight"},
              "model-00002-of-00002.safetensors": {"model.norm.weight": sd["model.norm.weight"]}}
    for file, part in shards.items():
        save_file(part, folder / file, metadata={"format": "pt"})
    _damage_index(folder, {k: file for file, part in shards.items() for k in part})
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match="'model.norm.weight' is stored as I8.*GPTQ, AWQ, FP8"):
        load_model(str(folder))


def test_weights_too_large_for_the_dtype_are_refused(saved_checkpoint, tmp_path):
    """1e6 is finite in float32 (the file) but inf in float16: named as an overflow, not as damage."""
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_checkpoint, folder)
    _weight(folder, value=1e6)
    load_model(str(folder), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"up_proj.weight': values up to 1e\+06 overflow torch.float16"):
        load_model(str(folder), dtype=torch.float16)


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
    from lab.decode import Decoding, Sequence, decode_case
    seq = Sequence.of(model.prefill(torch.randint(0, BASE["vocab_size"], (1, 16))))
    decode_case(model, seq, Decoding(3))
    with pytest.raises(ValueError, match="decoded from already"):
        decode_case(model, seq, Decoding(3))
    with pytest.raises(ValueError, match="not a fresh compression"):  # generate's guard: decoding appended to it
        generate(model, None, cache=seq.cache, prefill=model.prefill(torch.randint(0, BASE["vocab_size"], (1, 16))))
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_model("./no_such/checkpoint")


def test_refused_config_names_the_file_when_loading(saved_checkpoint, tmp_path):
    """checkpoint.read_config runs check_config: load_model's error names config.json."""
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_checkpoint, folder)
    _config(folder, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'") as err:
        load_model(str(folder))
    assert str(folder / "config.json") in str(err.value)


# ----------------------------------------------------------------------------- a model over several devices

def assert_close(got, want, name="", tol=1e-5):
    """got == want within tol * max|want| (two computations of the same numbers, never bit for bit)."""
    assert got.shape == want.shape, name
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(want.double().abs().max().item(), 1e-30), (name, err)


def kept_lists(kept):
    return [[i.tolist() for i in layer] for layer in kept]


@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha-tied"])
def test_placement_over_cpu_cpu_is_the_single_device_model(tmp_path, family):
    """Layers on two "devices" that are both the CPU, as memory.plan_layers splits them: the code that
    moves activations, positions, RoPE tables, scores and kept indices between devices runs. The logits
    and every Prefill field (with and without past) equal the one-device model's within float tolerance
    (the placed copy may take other BLAS paths), and the kept sets and greedy tokens are identical."""
    import copy
    from lab import memory
    from checkpoint import place
    from methods import METHODS, compress, select
    _, folder = make_checkpoint(tmp_path, family, seed=14)
    one, _ = load_model(str(folder))
    ranges = memory.plan_layers(one.config, 64, 4, 2)
    assert ranges == [range(0, 2), range(2, 3)]  # 3 layers; the embeddings weigh on the first device
    two = place(copy.deepcopy(one), ["cpu", "cpu"], ranges)
    assert (two.lm_head.weight is two.embed.weight) == (family == "llama-mha-tied")
    ids = torch.randint(3, BASE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        assert_close(two(ids), one(ids))
        a, b = one.prefill(ids, window=8, h2o=True), two.prefill(ids, window=8, h2o=True)
        ca, cb = (m.prefill(ids[:, 30:], window=8, h2o=True, past=m.prefill(ids[:, :30], window=8, h2o=True))
                  for m in (one, two))
    for got, want in ((b, a), (cb, ca)):
        for name in ("keys", "values", "queries", "h2o", "o_proj"):
            for x, y in zip(getattr(got, name), getattr(want, name)):
                assert_close(x, y, name)
        for name in ("resid_norm", "out_norm", "resid_rows", "out_rows", "logits"):
            assert_close(getattr(got, name), getattr(want, name), name)
    for method in METHODS:
        assert kept_lists(select(b, method, 12)) == kept_lists(select(a, method, 12)), method
    assert decode_greedy(two, compress(b, "laprox", 12), b.n, b.logits, 8) == \
        decode_greedy(one, compress(a, "laprox", 12), a.n, a.logits, 8)


def test_load_model_on_devices_places_each_weight(tmp_path):
    from checkpoint import device_map
    _, folder = make_checkpoint(tmp_path, "qwen2-bias", seed=16)  # tied embeddings
    one, _ = load_model(str(folder))
    two, _ = load_model(str(folder), devices=["cpu", "cpu"])  # equal numbers of layers
    ids = torch.randint(3, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        assert_close(two(ids), one(ids))
    where = device_map(["cpu", "meta", "cuda:1"], [range(0, 1), range(1, 1), range(1, 3)], 3)  # names -> devices
    assert [str(where(n)) for n in ("embed.weight", "layers.0.attn.q_proj.bias", "layers.1.mlp.up_proj.weight",
                                    "layers.2.attn_norm.weight", "norm.weight", "lm_head.weight")] == \
        ["cpu", "cpu", "cuda:1", "cuda:1", "cuda:1", "cuda:1"]
    with pytest.raises(ValueError, match="contiguous ranges"):
        device_map(["cpu", "cpu"], [range(0, 2)], 3)
    with pytest.raises(ValueError, match="not both"):
        load_model(str(folder), device="cuda", devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="not both"):
        load_model(str(folder), devices="cpu,cpu")
