"""bench.py at a tiny size: every figure is in the JSON (no timing assertions)."""
import json

import bench


def test_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--lengths", "300,400", "--decode-length", "300", "--niah-length", "300", "--new-tokens", "3",
                "--budget", "0.2", "--decode-budgets", "0.2,0.5", "--window", "8", "--repeats", "1",
                "--skip-load", "--out", str(out)])
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
    assert res["shared"]["ratio"] > 0 and res["shared"]["methods"] == 7
    assert "kernel" not in res and "decode after 300 tokens" in res["table"]


def test_load_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("LAPROX_CACHE", str(tmp_path))
    load = bench.bench_load(None)
    assert load["first_s"] > 0 and load["cached_s"] > 0
