"""bench.py at a tiny size: every figure is in the JSON (no timing assertions)."""
import json
import os
from pathlib import Path

import pytest

import bench


def test_overhead_only(tmp_path, small_model, capsys):
    """--overhead: figure 2 alone, what lab/claims.py reads for claim 4 (and nothing else is timed)."""
    out = tmp_path / "bench.json"
    res = bench.main(["--overhead", "--lengths", "300", "--budget", "0.2", "--window", "8", "--repeats", "1",
                      "--model", str(small_model[2]), "--out", str(out)])
    assert json.loads(out.read_text()) == res and [r["n"] for r in res["overhead"]] == [300]
    assert "decode" not in res and "shared" not in res and "load" not in res
    assert res["overhead"][0]["laprox"]["ratio_to_prefill"] > 0 and "laprox/snapkv" in capsys.readouterr().out


def test_bench_writes_every_figure(tmp_path, small_model):
    """On conftest's small model (figures, not speeds, are checked)."""
    out = tmp_path / "bench.json"
    bench.main(["--lengths", "300,400", "--decode-length", "300", "--niah-length", "300", "--niah-new-tokens", "3", "--new-tokens", "3",
                "--budget", "0.2", "--decode-budgets", "0.2,0.5", "--window", "8", "--repeats", "1",
                "--skip-load", "--model", str(small_model[2]), "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["n"] for r in res["overhead"]] == [300, 400]
    for r in res["overhead"]:
        assert r["prefill_s"] > 0 and r["laprox_vs_snapkv"] > 0
        for m in bench.OVERHEAD_METHODS:
            assert r[m]["compress_s"] > 0 and r[m]["ratio_to_prefill"] > 0
    d = res["decode"]
    assert d["full"]["tok_s"] > 0
    for b in ("0.2", "0.5"):
        assert 0 < d[f"laprox@{b}"]["bytes_ratio"] < 1 and d[f"laprox@{b}"]["speedup"] > 0
        assert 0 < d[f"snapkv@{b}"]["bytes_ratio"] < 1
    for label in ("full", "laprox@0.2", "snapkv@0.5"):  # both decoding paths timed, each row
        assert d[label]["one_pass_ms_per_token"] > 0 and d[label]["per_head_ms_per_token"] > 0
    for label in ("laprox@0.2", "snapkv@0.5"):  # where a compressed step's attention goes, three ways
        assert sorted(d[label]["attention_ms"]) == ["one_pass", "padded", "per_head"]
        assert min(d[label]["attention_ms"].values()) > 0
    assert "attention_ms" not in d["full"]
    assert d["threads"] >= 1 and "thread(s)" in res["table"]
    assert res["shared"]["ratio"] > 0 and res["shared"]["methods"] == 7
    assert "kernel" not in res and "decode after 300 tokens" in res["table"]



def test_bench_dtypes_writes_every_figure(tmp_path, small_model):
    """--dtypes on conftest's small model: each dtype's prefill, scoring shares, decode over the
    full cache and at the budget, and the two attention paths (figures, not speeds)."""
    out = tmp_path / "dtypes.json"
    bench.main(["--dtypes", "--length", "300", "--budget", "0.2", "--window", "8", "--new-tokens", "3",
                "--repeats", "1", "--model", str(small_model[2]), "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res) == {"float32", "bfloat16"}
    for r in res.values():
        assert r["n"] == 300 and r["prefill_s"] > 0 and r["laprox_share"] > 0 and r["snapkv_share"] > 0
        assert r["decode_ms_full"] > 0 and r["decode_ms_laprox@0.2"] > 0 and r["attention"]

def test_load_figures(tmp_path, monkeypatch):
    """bench_load times a first load of the default model into a fresh, empty cache, then a cached
    one, and puts LAPROX_CACHE back. load_model is a stand-in that records what it finds: the
    conversion itself is test_checkpoint's (its first use, raced by two processes)."""
    monkeypatch.setenv("LAPROX_CACHE", str(tmp_path))
    seen = []

    def load_model():
        cache = Path(os.environ["LAPROX_CACHE"])
        seen.append((cache, sorted(p.name for p in cache.iterdir())))
        (cache / "smollm2-135m-instruct").mkdir(exist_ok=True)

    monkeypatch.setattr(bench, "load_model", load_model)
    load = bench.bench_load(None)
    assert load["first_s"] > 0 and load["cached_s"] > 0
    (first, before), (second, after) = seen
    assert first == second != tmp_path and before == [] and after == ["smollm2-135m-instruct"]
    assert os.environ["LAPROX_CACHE"] == str(tmp_path) and not first.exists()  # put back, fresh cache gone


def _bench_errors(tmp_path):
    afile = tmp_path / "a_file"  # made by the test
    out = ["--out", str(tmp_path / "bench.json")]
    return {  # argv: words of the error
        "no such device": (out + ["--device", "bogus"], "is not a device"),
        "cuda without cuda": (out + ["--device", "cuda"], "not available"),
        "layers, no such device": (out + ["--layers", "--device", "bogus"], "is not a device"),
        "offline hub id": (out + ["--model", "no-owner/no-such-model"], "could not download"),
        "layers, no such folder": (out + ["--layers", "--model", "./no/such/checkpoint"], "no checkpoint folder"),
        "out is a folder": (["--out", str(tmp_path)], "is a folder"),
        "out under a file": (["--out", str(afile / "bench.json")], "File exists"),
        "repeats 0": (out + ["--repeats", "0"], "--repeats must be >= 1"),
        "window 0": (out + ["--window", "0"], "--window must be >= 1"),
        "niah new tokens 0": (out + ["--niah-new-tokens", "0"], "--niah-new-tokens must be >= 1"),
        "lengths junk": (out + ["--lengths", "5,x"], "comma list of int"),
        "budget above 1": (out + ["--budget", "2"], "(0, 1]"),
        "decode budget above 1": (out + ["--decode-budgets", "0.2,1.5"], "(0, 1]"),
        "kernel lengths junk": (out + ["--kernel-lengths", "abc"], "comma list of int"),
    }


@pytest.mark.parametrize("case", list(_bench_errors(Path("."))))
def test_user_errors_are_one_line_and_exit_2(tmp_path, one_line_error, case):
    (tmp_path / "a_file").write_text("not a folder")
    argv, words = _bench_errors(tmp_path)[case]
    one_line_error(bench.main, argv, words, cuda=case == "cuda without cuda")
    assert not (tmp_path / "bench.json").exists()


def test_damaged_weights_are_a_one_line_error(tmp_path, one_line_error, capsys):
    """A checkpoint refused while its weights are read (here NaN) reaches the user as one line."""
    from test_model import _weight, make_checkpoint
    _, folder = make_checkpoint(tmp_path, "llama-gqa")
    _weight(folder, value=float("nan"))
    capsys.readouterr()  # the progress bar of saving it
    one_line_error(bench.main, ["--load", "--model", str(folder), "--out", str(tmp_path / "b.json")],
                   "'model.layers.1.mlp.up_proj.weight' holds NaN or inf")


def test_load_check_cost_is_measured(tmp_path, capsys):
    from test_model import make_checkpoint
    _, folder = make_checkpoint(tmp_path, "llama-gqa")
    res = bench.main(["--load", "--model", str(folder), "--repeats", "2", "--out", str(tmp_path / "b.json")])
    assert res["with_ms"] > 0 and res["without_ms"] > 0 and "finiteness check" in capsys.readouterr().out


def test_per_head_path_decodes_the_tokens_of_the_one_pass_path(small_model):
    """bench's PerHeadCache (the path before one pass per layer, kept for timing) decodes the same
    greedy tokens as KVCache over an uneven laprox cache, so the two timings compare like with like."""
    import torch
    from methods import compress
    from model import decode_greedy
    model = small_model[0]
    ids = torch.randint(3, 1000, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill = model.prefill(ids, window=8)
        new, old = compress(prefill, "laprox", 0.2), bench.PerHeadCache.of(compress(prefill, "laprox", 0.2))
        assert not all(new.even)
        assert decode_greedy(model, old, 300, prefill.logits, 8) == decode_greedy(model, new, 300, prefill.logits, 8)
