"""Tests run on the CPU: Triton kernels go through its interpreter (set before anything
imports triton, which reads the variable once), and nothing touches the network."""
import contextlib
import io
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--qwen", action="store_true",
                     help="also run the tests marked qwen, which need the 1.5B's weights (requirements-qwen.txt; "
                          "~5 min, ~15 GB of RAM)")


def pytest_configure(config):
    config.addinivalue_line("markers", "qwen: needs Qwen2.5-Coder-1.5B's weights; skipped unless pytest gets --qwen")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--qwen"):
        skip = pytest.mark.skip(reason="needs the 1.5B's weights: run with --qwen")
        for item in items:
            if "qwen" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def one_line_error(capsys):
    """run(main, argv, words, cuda=False): a script's main(argv) on a user error must exit with code 2
    after printing exactly one stderr line 'script: error: ...' that contains `words`; returns that line.
    cuda=True: the error is CUDA's absence, so the case is skipped on a machine that has CUDA."""
    def run(main, argv, words, cuda=False):
        if cuda:
            import torch
            if torch.cuda.is_available():
                pytest.skip("this machine has CUDA")
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and words in err and err.count("\n") == 1 and ": error: " in err, err
        return err
    return run


@pytest.fixture(scope="session")
def default_model():
    """(model, tok) of the embedded default checkpoint, loaded once for the whole run: the tests
    that use it only read it (M, cached on its o_proj weights, is computed once too)."""
    from checkpoint import load_model
    return load_model()


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)   # GQA like the default; 4 layers: --devices can split them


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """(model, tok, folder) of a small random Llama (SMALL) with the default model's tokenizer, chat
    template and context length: the eval tests run their real prompts through it at a fraction of
    the default model's cost, as their rows compare two paths, not answers (the default model's
    own numbers are tested against transformers in test_checkpoint). Weights at unit scale
    (embeddings and an untied lm_head N(0, 1), each projection N(0, 1/fan_in), norms 1 + N(0, 0.2)),
    so logits spread over several units and no greedy token sits on a near-tie that float noise
    could flip; o_proj 3x that, so attention outweighs the token's own embedding and what a cache
    kept changes what is generated (at 1x, or tied, the model repeats one token whatever it kept)."""
    import json
    import shutil
    import torch
    from safetensors.torch import save_file
    from checkpoint import default_checkpoint_dir
    from checkpoint import load_model
    default = default_checkpoint_dir()
    folder = tmp_path_factory.mktemp("small") / "small-llama"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(default / name, folder / name)
    cfg = {**json.loads((default / "config.json").read_text()), **SMALL, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    d, f, D, H, H_kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
                                         "num_key_value_heads"))
    g = torch.Generator().manual_seed(0)
    linear = lambda rows, cols: torch.randn(rows, cols, generator=g) / cols ** 0.5  # noqa: E731
    norm = lambda: 1 + 0.2 * torch.randn(d, generator=g)  # noqa: E731
    weights = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], d, generator=g),
               "lm_head.weight": torch.randn(cfg["vocab_size"], d, generator=g), "model.norm.weight": norm()}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        weights.update({pre + "input_layernorm.weight": norm(), pre + "post_attention_layernorm.weight": norm(),
                        pre + "self_attn.q_proj.weight": linear(H * D, d), pre + "self_attn.k_proj.weight": linear(H_kv * D, d),
                        pre + "self_attn.v_proj.weight": linear(H_kv * D, d), pre + "self_attn.o_proj.weight": 3 * linear(d, H * D),
                        pre + "mlp.gate_proj.weight": linear(f, d), pre + "mlp.up_proj.weight": linear(f, d),
                        pre + "mlp.down_proj.weight": linear(d, f)})
    save_file(weights, str(folder / "model.safetensors"))
    model, tok = load_model(str(folder))
    return model, tok, folder


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block, as every torchrun rank of the tests runs
    (OMP_NUM_THREADS=1): rows compared across processes are made at the same thread count."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


NIAH_GRID = ["--lengths", "600", "--depths", "0,1", "--methods", "full,laprox,snapkv:pool=0", "--budget", "0.2",
             "--protocol", "aware,agnostic", "--max-new-tokens", "4"]


@pytest.fixture(scope="session")
def niah_small_run(small_model, tmp_path_factory):
    """(argv, rows made, results lines, printed) of a small NIAH grid in both protocols (2 cells of 600
    tokens; full, laprox, snapkv:pool=0 at 0.2) on small_model, on one thread: test_niah checks it,
    test_dist_evals compares torchrun's rows with it. argv ends with --out FOLDER. Read-only: a test
    that writes into its folder copies it first."""
    import eval_niah as E
    model, tok, folder = small_model
    out = tmp_path_factory.mktemp("niah") / "results" / "niah"  # not there yet: the run makes it
    argv = NIAH_GRID + ["--model", str(folder), "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), one_thread():
        rows = E.run(E.build_parser().parse_args(argv), model, tok)
    return argv, rows, (out / "results.jsonl").read_text().splitlines(), printed.getvalue()
