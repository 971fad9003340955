"""What eviction buys and what it costs, measured side by side in one process.

    python bench.py                       # default model, CPU: the figures quoted in docs/gpu.md
    python bench.py --device cuda         # the same on a GPU, plus Triton vs PyTorch scoring

1. load      the default model's load time: first conversion from the GGUF, then cached
2. overhead  per method, scoring + compression time relative to the prefill of the same prompt
3. decode    ms/token and KV bytes after a long prompt: the full cache, laprox (uneven heads) and
             snapkv (even heads), each through one attention pass per layer and through the per-head
             path it replaced (PerHeadCache); the ratios; on a CPU, also one token's attention over the
             compressed caches' layers, read as one masked pass, per head, and as a padded gather
4. shared    one prefill shared by every method (what eval_niah.py does) vs one prefill each
5. kernel    (cuda) Triton vs PyTorch LaProx scoring on a Llama-3.1-8B-shaped layer x 32 layers

    python bench.py --decode --decode-budgets 0.05     # only figure 3
    python bench.py --overhead --repeats 5             # only figure 2 (the analysis plan's claim 4)

    python bench.py --layers [--length 4000] [--budget 0.05]

looks inside the model instead: on a NIAH prompt, the fraction each layer keeps under LaProx's
model-wide selection, and, layer by layer, how far the window output moves (||Y - Y_S||_F,
laprox.eviction_error) with LaProx's kept set and with SnapKV's at the same budget.

    python bench.py --load --repeats 5

times warm loads of the model (median of --repeats) with and without the NaN / inf check of each
weight (checkpoint.refuse_non_finite), and prints what the check costs in ms and %.

    OMP_NUM_THREADS=1 python bench.py --dtypes --model qwen2.5-coder-1.5b --length 2000 [--budget 0.05]

compares float32 with bfloat16: prefill, LaProx's and SnapKV's scoring share of it, decode ms/token
over the full cache and at the budget, and one token's attention by the old path (enable_gqa, slow
in bf16 on a CPU) and model.attention's, in one run.

Timings are medians of --repeats runs; ratios are taken within this run, so a busy machine
slows both sides alike. The full figures go to --out as JSON; a compact table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cache import KVCache, kept_counts
from eval_niah import build_parser, decoding, build_prompt, haystack_ids, read_haystack
from lab.harness import (DEFAULT_METHODS, DTYPES, OneLineParser, check_device, clock, load_checkpoint, make_cases,
                     parse_list, parse_methods, run_main, run_unit)
from laprox import eviction_error
from methods import compress, select
from checkpoint import DEFAULT_MODEL
from checkpoint import load_model
from model import decode_greedy

OVERHEAD_METHODS = ("laprox", "snapkv", "adakv", "criticalkv", "pyramidkv", "streamingllm", "tova", "knorm",
                    "random", "h2o")
NIAH_METHODS = parse_methods(DEFAULT_METHODS)  # eval_niah.py's default methods, window and answer length
NIAH_NEW_TOKENS = build_parser().get_default("max_new_tokens")


def step(msg: str):
    """Progress: each figure takes seconds to minutes on a CPU."""
    print(f"[bench] {msg}", flush=True)


def timed(fn, device, repeats: int = 1):
    """(median seconds, last result) of fn() over `repeats` runs."""
    times, out = [], None
    for _ in range(repeats):
        t = clock(device)
        out = fn()
        times.append(clock(device) - t)
    return statistics.median(times), out


def niah_prompt(tok, hay: list[int], n: int) -> dict:
    """A NIAH prompt of n tokens (needle in the middle; eval_niah.build_prompt): realistic text for every figure."""
    return build_prompt(tok, hay, n, 0.5)


def prompt_ids(tok, hay: list[int], n: int, device) -> torch.Tensor:
    """The (1, n) ids of niah_prompt."""
    return torch.tensor([niah_prompt(tok, hay, n)["ids"]], device=device)


def bench_load(name) -> dict:
    """Load time of the default model: converting the GGUF into a fresh cache folder, then cached."""
    if name not in (None, DEFAULT_MODEL):
        t, _ = timed(lambda: load_model(name), "cpu")
        return {"cached_s": t}
    old = os.environ.get("LAPROX_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LAPROX_CACHE"] = tmp
        try:
            first, _ = timed(lambda: load_model(), "cpu")
            cached, _ = timed(lambda: load_model(), "cpu")
        finally:
            if old is None:
                del os.environ["LAPROX_CACHE"]
            else:
                os.environ["LAPROX_CACHE"] = old
    return {"first_s": first, "cached_s": cached}


def bench_finite_check(name, device, dtype, repeats: int) -> dict:
    """Median warm load time of `name` with and without the NaN / inf check of each weight
    (load_model's check_finite), the two alternating so that a busy machine slows both alike
    (the caller has loaded once)."""
    times = {"with_ms": [], "without_ms": []}
    for _ in range(repeats):
        for key, check in (("with_ms", True), ("without_ms", False)):
            load = lambda: load_checkpoint(name, device, dtype, check_finite=check)
            times[key].append(1000 * timed(load, device)[0])
    res = {k: statistics.median(v) for k, v in times.items()}
    res["cost_ms"] = res["with_ms"] - res["without_ms"]
    res["cost_pct"] = 100 * res["cost_ms"] / res["without_ms"]
    print(f"load, median of {repeats}: {res['with_ms']:.0f} ms with the finiteness check, {res['without_ms']:.0f} ms "
          f"without: {res['cost_ms']:+.1f} ms ({res['cost_pct']:+.1f}%)")
    return res


def bench_overhead(model, ids, budget, window, repeats, device) -> dict:
    """Prefill time of `ids` and, per method, compress time and its ratio to the prefill. H2O's
    score is accumulated during the prefill, so its cost is the extra prefill time plus compress."""
    t_prefill, prefill = timed(lambda: model.prefill(ids, window=window), device, repeats)
    t_h2o, prefill_h2o = timed(lambda: model.prefill(ids, window=window, h2o=True), device, 1)
    row = {"n": ids.shape[1], "prefill_s": t_prefill, "prefill_tok_s": ids.shape[1] / t_prefill}
    for m in OVERHEAD_METHODS:
        p, extra = (prefill_h2o, max(t_h2o - t_prefill, 0.0)) if m == "h2o" else (prefill, 0.0)
        t, _ = timed(lambda: compress(p, m, budget), device, repeats)
        row[m] = {"compress_s": t + extra, "ratio_to_prefill": (t + extra) / t_prefill}
    row["laprox_vs_snapkv"] = row["laprox"]["compress_s"] / row["snapkv"]["compress_s"]
    return row


class PerHeadCache(KVCache):
    """The decoding path before one attention pass per layer, rebuilt for timing only (bench_decode):
    appends head by head in a Python loop, and hands an uneven layer to attention as one (keys,
    values) pair per KV head, so that Model.forward runs H_kv attention calls for it (an even layer:
    one view, as before). Repacking is KVCache's (every `reserve` tokens)."""

    @classmethod
    def of(cls, cache: KVCache) -> "PerHeadCache":
        """The same entries (shared, not copied) behind the old path."""
        old = cls.__new__(cls)
        old.__dict__.update(vars(cache))
        return old

    def update(self, layer, k_new, v_new):
        T = k_new.shape[2]
        if self.spare[layer] < T:
            self._repack(layer, T + self.reserve)
        for g in range(self.n_kv_heads):
            a = int(self.starts[layer][g]) + int(self.prompt_lengths[layer, g]) + self.appended[layer]
            self.k[layer][a: a + T] = k_new[0, g]
            self.v[layer][a: a + T] = v_new[0, g]
        self.appended[layer] += T
        self.spare[layer] -= T
        if self.even[layer]:
            return [self.read(layer, T).padded()]
        return [tuple(t[None, None] for t in self.head(layer, g)) for g in range(self.n_kv_heads)]


DECODE_PATHS = {"one_pass": lambda cache: cache, "per_head": PerHeadCache.of}


def attention_over_layers(cache: KVCache, n_heads: int, dtype, repeats: int = 20) -> dict:
    """Where an uneven cache's decode time goes: one new token's attention over every layer of
    `cache`, in ms (median of `repeats`), read three ways, with random queries (1, H, 1, D):
    one_pass: the masked call over the packed buffer (LayerEntries.attention_inputs), H x C dot products
    a layer; per_head: one call per KV head on its own rows (G x n_g each, H x C / H_kv in all);
    padded: a gather to (H_kv, longest) with a key mask (LayerEntries.padded), H x longest."""
    from model import attention
    g = torch.Generator().manual_seed(0)
    layers = [cache.read(l, 1) for l in range(cache.n_layers)]
    q = [torch.randn(1, n_heads, 1, cache.head_dim, generator=g).to(dtype) for _ in layers]
    G = n_heads // cache.n_kv_heads

    def per_head():
        for l, qi in enumerate(q):
            for h in range(cache.n_kv_heads):
                k, v = cache.head(l, h)
                attention(qi[:, h * G:(h + 1) * G], k[None, None], v[None, None])

    def padded():
        for qi, p in zip(q, layers):
            k, v = p.padded()
            seen = torch.arange(k.shape[2]) < p.lengths[:, None]                    # (H_kv, longest)
            attention(qi, k, v, seen[None, :, None])

    paths = {"one_pass": lambda: [attention(qi, *p.attention_inputs()) for qi, p in zip(q, layers)],
             "per_head": per_head, "padded": padded}
    return {name: 1e3 * timed(fn, "cpu", repeats)[0] for name, fn in paths.items()}


@torch.no_grad()
def bench_decode(model, ids, budgets, window, new_tokens, repeats, device) -> dict:
    """Decode ms/token and KV bytes for `new_tokens` greedy steps after the prompt `ids`: the full
    cache, and laprox (uneven heads) and snapkv (even heads) at each budget, each through the one-pass
    path (KVCache) and the per-head path it replaced (PerHeadCache). The two paths decode side by
    side, step by step (the same token fed to both, which goes first alternating), so that a busy
    machine slows both alike; a path's ms/token is the median over its `repeats` x new_tokens steps
    (wall time; on the CPU also the process's CPU time, which other processes do not inflate)."""
    prefill = model.prefill(ids, window=window)
    out = {"n": ids.shape[1], "new_tokens": new_tokens, "threads": torch.get_num_threads()}
    configs = [("full", "full", None)] + [(f"{m}@{b}", m, b) for b in budgets for m in ("laprox", "snapkv")]
    for label, method, budget in configs:
        wall, cpu = {path: [] for path in DECODE_PATHS}, {path: [] for path in DECODE_PATHS}
        for _ in range(repeats):
            caches = {path: wrap(compress(prefill, method, budget) if budget else compress(prefill, "full"))
                      for path, wrap in DECODE_PATHS.items()}
            out.setdefault(label, {"kv_bytes": caches["one_pass"].nbytes()})
            logits = prefill.logits
            for step in range(new_tokens):
                token = logits.argmax(-1, keepdim=True)  # (1, 1): the one-pass path's greedy token
                for path in (list(DECODE_PATHS) if step % 2 == 0 else list(DECODE_PATHS)[::-1]):
                    t, c = clock(device), time.process_time()
                    step_logits = model(token, caches[path], prefill.n + step)[:, -1]
                    wall[path].append(clock(device) - t)
                    cpu[path].append(time.process_time() - c)
                    if path == "one_pass":
                        logits = step_logits
            if device == "cpu" and label != "full" and "attention_ms" not in out[label]:
                out[label]["attention_ms"] = attention_over_layers(caches["one_pass"], model.config.n_heads,
                                                                   prefill.keys[0].dtype)
            del caches
        r = out[label]
        for path in DECODE_PATHS:
            r[f"{path}_ms_per_token"] = 1000 * statistics.median(wall[path])
            if device == "cpu":
                r[f"{path}_cpu_ms_per_token"] = 1000 * statistics.median(cpu[path])
        r["tok_s"] = 1000 / r["one_pass_ms_per_token"]
        r["per_head_vs_one_pass"] = r["per_head_ms_per_token"] / r["one_pass_ms_per_token"]
    for label, _, budget in configs[1:]:
        r = out[label]
        r["bytes_ratio"] = r["kv_bytes"] / out["full"]["kv_bytes"]
        r["speedup"] = r["tok_s"] / out["full"]["tok_s"]
    return out


def decode_table(d: dict) -> list[str]:
    lines = [f"decode after {d['n']} tokens, {d['new_tokens']} new tokens, {d['threads']} thread(s): ms/token, "
             "one attention pass per layer vs the per-head path it replaced"]
    for label, r in d.items():
        if isinstance(r, dict):
            extra = (f"  {100 * r['bytes_ratio']:.1f}% of full's bytes, {r['speedup']:.2f}x full's speed"
                     if "speedup" in r else "")
            cpu = (f"  CPU time {r['one_pass_cpu_ms_per_token']:.2f} / {r['per_head_cpu_ms_per_token']:.2f} ms "
                   f"({r['per_head_cpu_ms_per_token'] / r['one_pass_cpu_ms_per_token']:.2f}x)"
                   if "one_pass_cpu_ms_per_token" in r else "")
            lines.append(f"  {label:12s} {r['one_pass_ms_per_token']:7.2f} ms  per head {r['per_head_ms_per_token']:7.2f} ms "
                         f"({r['per_head_vs_one_pass']:.2f}x){cpu}  {r['kv_bytes'] / 2**20:7.1f} MiB{extra}")
            if "attention_ms" in r:
                a = r["attention_ms"]
                lines.append(f"  {'':12s} of which one token's attention, all layers: one pass {a['one_pass']:.2f} ms, "
                             f"per head {a['per_head']:.2f} ms, padded gather {a['padded']:.2f} ms")
    return lines


def bench_shared_prefill(model, tok, prompt: dict, budget, window, device,
                         new_tokens: int = NIAH_NEW_TOKENS) -> dict:
    """One NIAH cell, every default method, run exactly as eval_niah.py runs it by default
    (harness.run_unit, protocol aware: one prefill, then per method compress and decode the answer
    with eval_niah.decoding, at most new_tokens tokens): one shared prefill vs a prefill per method.
    prompt: a niah_prompt."""
    cases = make_cases(NIAH_METHODS, [budget], ["aware"])
    spec = decoding(tok, new_tokens)
    unit = lambda cases: list(run_unit(model, prompt["context_ids"], prompt["question_ids"], cases, spec, tok,
                                       window=window))
    t_shared, _ = timed(lambda: unit(cases), device)
    t_separate, _ = timed(lambda: [unit([c]) for c in cases], device)
    return {"n": len(prompt["ids"]), "methods": len(cases), "shared_s": t_shared,
            "per_method_s": t_separate, "ratio": t_separate / t_shared}


def bench_attention_paths(model, n: int, budget: float, repeats: int = 50) -> dict:
    """One new token's attention over caches of this model's shape, summed over its layers, in ms:
    the old path (scaled_dot_product_attention with enable_gqa, what every dtype used) vs
    model.attention (bf16 / fp16: the G query heads of a KV head grouped as its G queries), over the
    full cache of n entries and over n * budget entries a head, in the model's dtype. Random q, k, v."""
    import torch.nn.functional as F
    from model import attention
    c, dtype = model.config, next(model.parameters()).dtype
    out = {}
    for label, S in (("full", n), (f"{budget:g}", max(1, round(n * budget)))):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, c.n_heads, 1, c.head_dim, generator=g).to(dtype)
        k, v = (torch.randn(1, c.n_kv_heads, S, c.head_dim, generator=g).to(dtype) for _ in range(2))
        old = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        new = lambda: attention(q, k, v)  # noqa: E731
        t_old, _ = timed(old, "cpu", repeats)
        t_new, _ = timed(new, "cpu", repeats)
        out[label] = {"entries": S, "old_ms": 1e3 * t_old * c.n_layers, "new_ms": 1e3 * t_new * c.n_layers}
    return out


def bench_dtypes(name, device, n: int, budget: float, window: int, new_tokens: int, repeats: int) -> dict:
    """Per dtype (float32, bfloat16; one model in memory at a time): the prefill of an n-token NIAH
    prompt, LaProx's and SnapKV's scoring + compression as a share of it, decode ms/token over the
    full cache and over laprox at `budget`, and bench_attention_paths."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        step(f"{dtype}: prefill, scoring, decode after {n} tokens")
        model, tok = load_checkpoint(name, device, dtype)
        ids = prompt_ids(tok, haystack_ids(tok, read_haystack(), n + 100), n, device)
        model.prefill(ids[:, :200], window=window)  # warm-up
        t_prefill, prefill = timed(lambda: model.prefill(ids, window=window), device, repeats)
        r = {"n": n, "prefill_s": t_prefill}
        for method in ("laprox", "snapkv"):
            t, _ = timed(lambda: compress(prefill, method, budget), device, repeats)
            r[f"{method}_share"] = t / t_prefill
        for label, method in (("full", "full"), (f"laprox@{budget:g}", "laprox")):
            def run():
                cache = compress(prefill, method, budget)
                t = clock(device)
                decode_greedy(model, cache, prefill.n, prefill.logits, new_tokens)
                return clock(device) - t
            r[f"decode_ms_{label}"] = 1e3 * statistics.median(run() for _ in range(repeats)) / new_tokens
        r["attention"] = bench_attention_paths(model, n, budget)
        out[dtype] = r
        del model, prefill
    return out


def dtypes_table(res: dict, budget: float) -> str:
    f32, bf16 = res["float32"], res["bfloat16"]
    lines = [f"after {f32['n']} tokens, {torch.get_num_threads()} thread(s): float32 | bfloat16 | ratio bf16/f32",
             f"prefill s: {f32['prefill_s']:.2f} | {bf16['prefill_s']:.2f} | {bf16['prefill_s'] / f32['prefill_s']:.2f}"]
    for key in ("laprox_share", "snapkv_share"):
        lines.append(f"{key} of the prefill: {f32[key]:.3f} | {bf16[key]:.3f}")
    for label in ("full", f"laprox@{budget:g}"):
        a, b = f32[f"decode_ms_{label}"], bf16[f"decode_ms_{label}"]
        lines.append(f"decode ms/token, {label}: {a:.1f} | {b:.1f} | {b / a:.2f}")
    for label, x in bf16["attention"].items():
        y = f32["attention"][label]
        lines.append(f"attention ms/token over {x['entries']} entries a head ({label}), all layers: float32 old "
                     f"{y['old_ms']:.1f}, new {y['new_ms']:.1f} | bfloat16 old {x['old_ms']:.1f}, new {x['new_ms']:.1f}")
    return "\n".join(lines)


RULER_TASKS = ("niah_single_1", "niah_multivalue", "vt", "cwe")  # answers of different lengths
STAGES = ("prefill_s", "compress_s", "question_s", "decode_s")


def bench_ruler(model, tok, length: int, window: int, device, tasks=RULER_TASKS,
                budgets=(0.01, 0.05, 0.2)) -> dict:
    """One RULER sample of each task at `length` tokens, every default method at every budget, both
    protocols (harness.run_unit, as eval_ruler.py runs them), decoded one case at a time and then as
    batches: the wall time of each path, their ratio, where each path's time goes (the rows' stage
    seconds; prefill_s counted once per unit) and which generated texts differ."""
    import eval_ruler as R
    from lab.decode import Decoding
    from lab.harness import PROTOCOLS
    cases = make_cases(NIAH_METHODS, list(budgets), list(PROTOCOLS))
    samples = [R.make_sample(tok, task, length, 0, 0, R.has_chat_template(tok)) for task in tasks]

    def run_all(batch: bool) -> list:
        out = []
        for s in samples:
            spec = Decoding(s["max_new_tokens"], stop_ids=frozenset(tok.eos_ids))
            out.append(list(run_unit(model, s["ids"][:s["n_context"]], s["ids"][s["n_context"]:], cases, spec, tok,
                                     window=window, batch=batch)))
        return out

    res = {"length": length, "tasks": list(tasks), "cases_per_sample": len(cases)}
    for label, batch in (("one_at_a_time", False), ("batched", True)):
        step(f"RULER, {len(tasks)} samples x {len(cases)} cases, decoded {label.replace('_', ' ')}")
        seconds, units = timed(lambda: run_all(batch), device)
        stages = {k: sum(getattr(r, k) for results in units for r in results if not r.skipped) for k in STAGES}
        stages["prefill_s"] = sum(max(r.prefill_s for r in results) for results in units)  # shared by the unit
        texts = {f"{task} {r.case.method} {r.case.budget:g} {r.case.protocol}": r.generated
                 for task, results in zip(tasks, units) for r in results}
        res[label] = {"wall_s": seconds, "stages_s": stages, "texts": texts}
    res["ratio"] = res["one_at_a_time"]["wall_s"] / res["batched"]["wall_s"]
    one, batched = res["one_at_a_time"]["texts"], res["batched"]["texts"]
    res["differ"] = [case for case in one if one[case] != batched[case]]
    return res


def ruler_table(r: dict) -> str:
    lines = [f"RULER at {r['length']} tokens, {len(r['tasks'])} tasks ({', '.join(r['tasks'])}), "
             f"{r['cases_per_sample']} cases each:"]
    for label in ("one_at_a_time", "batched"):
        x = r[label]
        lines.append(f"  {label.replace('_', ' '):14s} {x['wall_s']:8.1f} s   "
                     + "  ".join(f"{k[:-2]} {v:7.1f} s" for k, v in x["stages_s"].items()))
    lines.append(f"  one at a time / batched: {r['ratio']:.2f}x; generated texts that differ: {len(r['differ'])}"
                 + "".join(f"\n    {d}" for d in r["differ"]))
    return "\n".join(lines)


def bench_kernel(ns, repeats) -> list[dict]:
    """Triton vs PyTorch LaProx scoring for one Llama-3.1-8B-shaped layer (random bf16), x 32 layers."""
    from lab.bench_kernels import compare_on_gpu
    shape = dict(H=32, H_kv=8, D=128, w=32, d=4096)
    rows = []
    for n in ns:
        r = compare_on_gpu(n, torch.bfloat16, shape, repeats=repeats)
        rows.append({"n": n, "triton_model_ms": 32 * r["triton_ms"], "pytorch_model_ms": 32 * r["torch_ms"],
                     "speedup": r["torch_ms"] / r["triton_ms"], "max_rel_diff": r["max_rel_diff"]})
    return rows


def layer_errors(prefill, kept) -> torch.Tensor:
    """laprox.eviction_error of every layer for kept sets from methods.select: (L,) float32."""
    errs = []
    for l, (q, k, v, o) in enumerate(zip(prefill.queries, prefill.keys, prefill.values, prefill.o_proj)):
        keep = torch.zeros(1, k.shape[1], k.shape[2], dtype=torch.bool, device=k.device)
        for g, idx in enumerate(kept[l]):
            keep[0, g, idx] = True
        errs.append(eviction_error(q, k, v, o, keep)[0])
    return torch.stack(errs).cpu()


def compare_with_snapkv(prefill, budget=0.05):
    """Per layer ||Y - Y_S||_F for LaProx's and SnapKV's kept sets at the same budget, both
    unpooled; LaProx selects within each layer (selection="layer") so that both keep the
    same number of entries per layer. Returns (laprox_errors, snapkv_errors), each (L,)."""
    ours = select(prefill, "laprox", budget, pool=0, selection="layer")
    snap = select(prefill, "snapkv", budget, pool=0)
    return layer_errors(prefill, ours), layer_errors(prefill, snap)


def report_layers(model, tok, length: int, budget: float):
    """Print, on a NIAH prompt of `length` tokens, the per-layer kept fractions of LaProx's
    model-wide selection and LaProx vs SnapKV by ||Y - Y_S||_F (see compare_with_snapkv)."""
    ids = build_prompt(tok, haystack_ids(tok, read_haystack(), length + 100), length, 0.5)["ids"]
    with torch.no_grad():
        prefill = model.prefill(torch.tensor([ids], device=next(model.parameters()).device))
        fractions = kept_counts(select(prefill, "laprox", budget)).float() / prefill.n  # (L, H_kv)
        ours, snap = compare_with_snapkv(prefill, budget)
    print(f"n = {prefill.n}, budget {budget}: LaProx model-wide kept fraction per layer (mean over KV heads, "
          f"and per head)")
    print("layer  kept    heads")
    for l, row in enumerate(fractions):
        print(f"{l:5d}  {row.mean():.3f}  " + " ".join(f"{x:.3f}" for x in row))
    print(f"overall {fractions.mean():.4f}")
    won = int((ours < snap).sum())
    print(f"\n||Y - Y_S||_F per layer, same per-layer budget, unpooled: LaProx mean {ours.mean():.4f}, "
          f"SnapKV mean {snap.mean():.4f}; LaProx smaller on {won} of {len(ours)} layers")
    print("layer  laprox    snapkv")
    for l, (x, y) in enumerate(zip(ours, snap)):
        print(f"{l:5d}  {x:.4f}  {y:.4f}")


def table(res: dict, budget: float) -> str:
    lines = []
    if "load" in res:
        lines.append("load: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["load"].items()))
    lines.append(f"scoring + compression at budget {budget}, relative to the prefill:")
    lines.append("  n      prefill (tok/s)  " + " ".join(f"{m:>8s}" for m in OVERHEAD_METHODS) + "  laprox/snapkv")
    for r in res["overhead"]:
        lines.append(f"  {r['n']:<6d} {r['prefill_s']:6.1f}s ({r['prefill_tok_s']:4.0f})  "
                     + " ".join(f"{100 * r[m]['ratio_to_prefill']:7.2f}%" for m in OVERHEAD_METHODS)
                     + f"  {r['laprox_vs_snapkv']:.2f}x")
    if "decode" in res:
        lines += decode_table(res["decode"])
    if "shared" in res:
        s = res["shared"]
        lines.append(f"NIAH cell of {s['n']} tokens, {s['methods']} methods: shared prefill {s['shared_s']:.1f}s, "
                     f"a prefill per method {s['per_method_s']:.1f}s: {s['ratio']:.2f}x")
    for r in res.get("kernel", []):
        lines.append(f"kernel n={r['n']}: Triton {r['triton_model_ms']:.1f} ms, PyTorch {r['pytorch_model_ms']:.1f} ms "
                     f"(32 layers): {r['speedup']:.2f}x")
    return "\n".join(lines)


def build_bench_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder, hub id, smollm2-135m or qwen2.5-coder-1.5b "
                                                  "(default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="default: the model's (checkpoint.choose_dtype)")
    ap.add_argument("--lengths", default="2000,4000,7500", help="prompt lengths for the overhead figures")
    ap.add_argument("--decode-length", type=int, default=7500)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.05, help="budget of the overhead and shared-prefill figures")
    ap.add_argument("--decode-budgets", default="0.05,0.2")
    ap.add_argument("--niah-length", type=int, default=4000, help="the middle length of eval_niah.py's grid")
    ap.add_argument("--niah-new-tokens", type=int, default=NIAH_NEW_TOKENS,
                    help="the NIAH answers' length limit in the shared-prefill figure (eval_niah.py's)")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernel-lengths", default="32768,131072")
    ap.add_argument("--skip-load", action="store_true", help="do not time the first conversion")
    ap.add_argument("--out", default="results/bench.json")
    ap.add_argument("--layers", action="store_true", help="look inside the model instead (see the docstring)")
    ap.add_argument("--length", type=int, default=4000, help="prompt length of --layers and --ruler")
    ap.add_argument("--ruler", action="store_true", help="time RULER decoded one case at a time vs as batches: one "
                    f"sample of {', '.join(RULER_TASKS)}, every default method, 1/5/20%%, both protocols")
    ap.add_argument("--load", action="store_true", help="time loading with and without the NaN / inf check instead")
    ap.add_argument("--dtypes", action="store_true", help="float32 vs bfloat16 instead: prefill, LaProx's and SnapKV's "
                    "share of it, decode over the full cache and at --budget, and one token's attention by the old "
                    "path (enable_gqa) and the new, after a --length-token prompt")
    ap.add_argument("--decode", action="store_true", help="only the decode figure (3.), after --decode-length tokens")
    ap.add_argument("--overhead", action="store_true", help="only the overhead figures (2.) at --lengths: what the "
                    "analysis plan's claim 4 reads (python -m lab.claims)")
    return ap


def check_args(a) -> tuple[list[int], list[float], list[int]]:
    """Errors for bad arguments before anything is loaded or timed; returns the parsed
    (lengths, decode budgets, kernel lengths)."""
    lengths = parse_list(a.lengths, int, "lengths")
    decode_budgets = parse_list(a.decode_budgets, float, "decode-budgets")
    kernel_lengths = parse_list(a.kernel_lengths, int, "kernel-lengths")
    counts = {"lengths": min(lengths), "kernel-lengths": min(kernel_lengths), "decode-length": a.decode_length,
              "new-tokens": a.new_tokens, "niah-length": a.niah_length,
              "niah-new-tokens": a.niah_new_tokens, "window": a.window, "repeats": a.repeats,
              "length": a.length}
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name, b in [("budget", a.budget)] + [("decode-budgets", b) for b in decode_budgets]:
        if not 0 < b <= 1:  # a fraction, as in eval_niah.py
            raise ValueError(f"--{name} must be a fraction of the KV entries in (0, 1], got {b}")
    check_device(a.device)
    if Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a folder; pass the path of the JSON file to write")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # a path through a file fails now, not after the run
    return lengths, decode_budgets, kernel_lengths


def run(a) -> dict:
    """The figures of the docstring for parsed arguments `a` (see build_bench_parser)."""
    lengths, decode_budgets, kernel_lengths = check_args(a)
    if a.dtypes:
        res = bench_dtypes(a.model, a.device, a.length, a.budget, a.window, a.new_tokens, a.repeats)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(dtypes_table(res, a.budget))
        return res
    model, tok = load_checkpoint(a.model, a.device, a.dtype)
    if a.layers:
        report_layers(model, tok, a.length, a.budget)
        return {}
    if a.ruler:
        res = bench_ruler(model, tok, a.length, a.window, a.device)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(ruler_table(res))
        print(f"full figures: {a.out}")
        return res
    if a.load:  # the load above was the warm-up
        return bench_finite_check(a.model, a.device, a.dtype, a.repeats)
    res: dict = {"args": vars(a)}
    if a.decode:
        step(f"decode after {a.decode_length} tokens")
        hay = haystack_ids(tok, read_haystack(), a.decode_length + 100)
        res["decode"] = bench_decode(model, prompt_ids(tok, hay, a.decode_length, a.device), decode_budgets,
                                     a.window, a.new_tokens, a.repeats, a.device)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print("\n".join(decode_table(res["decode"])))
        return res
    if not a.skip_load and not a.overhead:
        step("load time (first conversion, then cached)")
        res["load"] = bench_load(a.model)
    hay = haystack_ids(tok, read_haystack(), max(lengths + [a.decode_length, a.niah_length]) + 100)
    model.prefill(prompt_ids(tok, hay, min(lengths), a.device), window=a.window)  # warm-up
    res["overhead"] = []
    for n in lengths:
        step(f"scoring overhead at {n} tokens")
        res["overhead"].append(bench_overhead(model, prompt_ids(tok, hay, n, a.device), a.budget, a.window,
                                              a.repeats, a.device))
    if a.overhead:
        return finish(res, a)
    step(f"decode after {a.decode_length} tokens")
    res["decode"] = bench_decode(model, prompt_ids(tok, hay, a.decode_length, a.device), decode_budgets, a.window,
                                 a.new_tokens, a.repeats, a.device)
    step(f"shared vs per-method prefill at {a.niah_length} tokens")
    res["shared"] = bench_shared_prefill(model, tok, niah_prompt(tok, hay, a.niah_length), a.budget, a.window,
                                         a.device, a.niah_new_tokens)
    if a.device.startswith("cuda"):
        step("Triton vs PyTorch scoring")
        res["kernel"] = bench_kernel(kernel_lengths, a.repeats)
    return finish(res, a)


def finish(res: dict, a) -> dict:
    """Write the figures to --out and print the table."""
    res["table"] = table(res, a.budget)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(res["table"])
    print(f"full figures: {a.out}")
    return res


def main(argv=None) -> dict:
    """The command line: a user error (bad argument, model, device, path) is one line and exit code 2."""
    return run_main(build_bench_parser(), run, argv, interrupted="interrupted")


if __name__ == "__main__":
    main()
