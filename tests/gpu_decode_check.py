"""A GPU measure of decoding from uneven caches (not collected by pytest; torch and triton only: a
random model of Llama-3.1-8B's shape in bfloat16, nothing downloaded).

    python tests/gpu_decode_check.py --out DIR        # one H100 / H200, about 5 minutes

For prompts of 32,000 and 128,000 random tokens: one prefill (its peak memory against
lab/memory.py's estimate), the kept sets of laprox and snapkv at 5%, the caches built from it, then
the Prefill freed; then decode ms/token (CUDA events, median over the steps after a warm-up) for the
full cache, laprox at 5% through the one-pass path (laprox_triton.varlen_decode) and through the
per-head path it replaced (bench.PerHeadCache), and snapkv at 5%. The memory bandwidth is measured
here (a large device-to-device copy), and each row is set against its bytes bound, (weights + kept
KV bytes) / bandwidth, the weights being all but the embedding (one row of it is read). No CUDA
graphs. Targets (issue 34): laprox at 5% faster than the full cache at 32,000 tokens, and within
1.2x of snapkv at 5%. The time per token includes the step's launches (a host-bound step shows).

Writes DIR/gpu_decode_check.json and DIR/gpu_decode_check.md (the table for docs/gpu.md, with the
device's name); prints the table.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import PerHeadCache  # noqa: E402
from cache import KVCache  # noqa: E402
from lab import memory  # noqa: E402
from methods import select  # noqa: E402
from model import Config, Model  # noqa: E402

LLAMA_8B = Config(model_type="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                  head_dim=128, hidden_dim=14336, norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  max_position=131072)


TINY = Config(model_type="llama", vocab_size=1000, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
              hidden_dim=128, max_position=4096)   # --tiny: the script's own smoke test on a CPU


def random_model(cfg: Config, device: str) -> Model:
    """Random bfloat16 weights made on `device` (nn.Linear's and nn.Embedding's own initialisation)."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return Model(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)


class Timer:
    """Start / stop marks of the device's timeline: CUDA events (no sync between steps), or the host clock."""
    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def ms(self) -> list[float]:
        """ms between marks 0-1, 2-3, ..."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks[::2], self.marks[1::2])]
        return [1000 * (b - a) for a, b in zip(self.marks[::2], self.marks[1::2])]


def bandwidth(device: str, size: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy of `size` bytes (read + write), median of 5."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(6):
        timer.mark(); dst.copy_(src); timer.mark()
    return 2 * size / (statistics.median(timer.ms()[1:]) / 1000)


@torch.no_grad()
def decode_ms(model, cache, pos: int, logits, steps: int, device: str, warmup: int = 4) -> float:
    """Median ms of one greedy step (argmax on the device, no read-back) over `steps` steps."""
    token = logits.argmax(-1, keepdim=True)                     # (1, 1)
    timer = Timer(device)
    for t in range(warmup + steps):
        timer.mark()
        token = model(token, cache, pos + t)[:, -1].argmax(-1, keepdim=True)
        timer.mark()
    return statistics.median(timer.ms()[warmup:])


@torch.no_grad()
def one_length(model, n: int, steps: int, bw: float, device: str) -> dict:
    cfg = model.config
    cuda = device == "cuda"
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t = time.perf_counter()
    prefill = model.prefill(ids, window=32)
    kept = {m: select(prefill, m, 0.05) for m in ("laprox", "snapkv")}  # LaProx through the Triton kernels
    if cuda:
        torch.cuda.synchronize()
    row = {"n": n, "prefill_and_select_s": time.perf_counter() - t,
           "prefill_peak_bytes": (torch.cuda.max_memory_allocated() - base if cuda else float("nan"))
           + sum(p.nbytes for p in model.parameters()),
           "estimate_bytes": memory.model_memory(cfg, n, 2)["total"]}
    caches = {m: KVCache.from_prefill(prefill, k) for m, k in kept.items()}
    caches["full"] = KVCache.from_prefill(prefill)
    logits = prefill.logits
    del prefill, kept                                   # freed before decoding
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    weights = sum(p.nbytes for p in model.parameters()) - model.embed.weight.nbytes  # read every token: all but the embedding
    row["uneven_layers"] = sum(not e for e in caches["laprox"].even)
    runs = [("full", caches["full"]), ("laprox@0.05 one pass", caches["laprox"]),
            ("laprox@0.05 per head", PerHeadCache.of(caches["laprox"])), ("snapkv@0.05", caches["snapkv"])]
    for label, cache in runs:
        kv = sum(int(l) for l in cache.lengths.sum(1)) * 2 * cfg.head_dim * 2   # kept entries x (k + v) x bf16
        ms = decode_ms(model, cache, n, logits, steps, device)
        row[label] = {"ms_per_token": ms, "kv_bytes": kv, "bound_ms": 1000 * (weights + kv) / bw,
                      "of_bound": ms / (1000 * (weights + kv) / bw)}
    row["laprox_vs_full"] = row["laprox@0.05 one pass"]["ms_per_token"] / row["full"]["ms_per_token"]
    row["laprox_vs_snapkv"] = row["laprox@0.05 one pass"]["ms_per_token"] / row["snapkv@0.05"]["ms_per_token"]
    row["old_vs_new"] = row["laprox@0.05 per head"]["ms_per_token"] / row["laprox@0.05 one pass"]["ms_per_token"]
    del caches, runs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def table(res: dict) -> str:
    lines = [f"Decode on {res['device']}, {res['model']}, random bfloat16 weights, bandwidth "
             f"{res['bandwidth_gb_s']:.0f} GB/s (measured), no CUDA graphs:", "",
             "| prompt | cache | ms/token | bytes bound (ms) | x bound |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        for label in ("full", "laprox@0.05 one pass", "laprox@0.05 per head", "snapkv@0.05"):
            x = r[label]
            lines.append(f"| {r['n']} | {label} | {x['ms_per_token']:.2f} | {x['bound_ms']:.2f} | {x['of_bound']:.2f} |")
    lines.append("")
    for r in res["rows"]:
        lines.append(f"n = {r['n']}: laprox/full {r['laprox_vs_full']:.2f}x (target < 1 at 32,000), laprox/snapkv "
                     f"{r['laprox_vs_snapkv']:.2f}x (target <= 1.2), per-head/one-pass {r['old_vs_new']:.2f}x; "
                     f"{r['uneven_layers']} uneven layers; prefill peak {r['prefill_peak_bytes'] / 2**30:.1f} GiB, "
                     f"memory.py's estimate {r['estimate_bytes'] / 2**30:.1f} GiB")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="32000,128000")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a smoke test of this script: "
                    "--device cpu --tiny --lengths 1000,1500 --steps 3)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_decode_check: error: needs a CUDA device (--device cpu --tiny: a smoke test)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = bandwidth(a.device, 2 << 30 if a.device == "cuda" else 64 << 20)
    model = random_model(TINY if a.tiny else LLAMA_8B, a.device)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    res = {"device": name, "model": "a tiny model" if a.tiny else "Llama-3.1-8B's shape", "bandwidth_gb_s": bw / 1e9,
           "rows": []}
    for n in (int(x) for x in a.lengths.split(",")):
        res["rows"].append(one_length(model, n, a.steps, bw, a.device))
        (out / "gpu_decode_check.json").write_text(json.dumps(res, indent=2))  # a cut-off run keeps its rows
        print(table(res), flush=True)
    (out / "gpu_decode_check.md").write_text(table(res) + "\n")


if __name__ == "__main__":
    main()
