"""The LaProx score's Triton kernels: do they fit every GPU, are they right, are they faster?

    python -m lab.bench_kernels                  # CPU: the PyTorch path at the Llama-3.1-8B shape, and the
                                             #   interpreted kernels' agreement at a small n
    python -m lab.bench_kernels --compile-check  # no GPU needed: compile every kernel for sm_80/86/89/90
                                             #   (--quick: a subset; exit status 1 if one would not launch)
    python -m lab.bench_kernels --gpu-check --out DIR   # on a GPU: correctness of every kernel config,
                                             #   timing and memory table, candidate sweep (~4 min)

The shape is one Llama-3.1-8B layer (H 32, H_kv 8, D 128, w 32, d 4096), batch 1, random inputs,
at n = 8k, 32k and 128k. On a GPU each path is timed (median of --repeats, CUDA events) with the
peak memory it allocates on top of its inputs; M is computed once per weight before timing, as
in a real run (laprox.value_gram_pairs), and is not counted for either path.
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback

import torch

import laprox

LLAMA_8B = dict(H=32, H_kv=8, D=128, w=32, d=4096)
REAL_MODELS = {   # (H, H_kv, D) of the models in issue 12
    "Llama-3.1-8B": (32, 8, 128), "Llama-3.1-70B": (64, 8, 128), "Mistral-7B": (32, 8, 128),
    "Qwen2.5-7B": (28, 4, 128), "Qwen2.5-14B": (40, 8, 128), "Qwen3-8B": (32, 8, 128),
    "Qwen2.5-1.5B": (12, 2, 128), "SmolLM2-135M": (9, 3, 64),
}
QUICK_MODELS = ("Llama-3.1-8B", "Qwen2.5-7B", "SmolLM2-135M")   # G 4, 7 (padded to 8), 3 with D 64
WINDOWS = (16, 32, 64, 128)
TARGETS = (80, 86, 89, 90)
KERNELS = ("stats", "quad", "gram")


def make_inputs(n, H, H_kv, D, w, d, dtype, device, seed=0):
    """Random queries (1, H, w, D), keys and values (1, H_kv, n, D), o_proj (d, H*D)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, H, w, D, generator=gen) * 1.5
    k = torch.randn(1, H_kv, n, D, generator=gen)
    v = torch.randn(1, H_kv, n, D, generator=gen) + 0.2
    o = torch.randn(d, H * D, generator=gen) / (H * D) ** 0.5
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, o)]


def max_rel_diff(got, ref):
    """Largest |got - ref| / |ref| over entries, |ref| floored at 1e-6 of its max."""
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).abs() / ref.abs().clamp_min(1e-6 * ref.abs().max())).max().item()


# ------------------------------------------------------------------------------ timing

def time_cuda(fn, repeats):
    """Median milliseconds of fn() and the peak CUDA memory it allocates (MiB)."""
    fn()                                                     # warm-up (and Triton compile)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        del out
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def compare_on_gpu(n, dtype, shape, group="exact", repeats=5, device="cuda") -> dict:
    """One layer of `shape` (H, H_kv, D, w, d) with n keys on CUDA: median ms and peak MiB of the
    PyTorch and Triton paths, and their largest relative difference. M is computed (and cached)
    before either is timed."""
    import laprox_triton as kernels
    q, k, v, o = make_inputs(n, dtype=dtype, device=device, **shape)
    M = laprox.value_gram_pairs(o, shape["H"], shape["D"], shape["H_kv"])
    t_ref, m_ref = time_cuda(lambda: laprox.laprox_scores(q, k, v, o, group=group), repeats)
    t_tri, m_tri = time_cuda(lambda: kernels.laprox_scores_triton(q, k, v, M, group=group), repeats)
    rel = max_rel_diff(kernels.laprox_scores_triton(q, k, v, M, group=group),
                       laprox.laprox_scores(q, k, v, o, group=group))
    del q, k, v, o, M
    torch.cuda.empty_cache()
    return {"torch_ms": t_ref, "triton_ms": t_tri, "torch_mib": m_ref, "triton_mib": m_tri, "max_rel_diff": rel}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_cpu(fn, repeats):
    """Median milliseconds of fn() and the peak resident memory it adds (MiB, sampled every 2 ms)."""
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    done.set()
    sampler.join()
    return statistics.median(times), (peak[0] - base) / 2**20


# ------------------------------------------------------------------------------ compile check

def _kernel_signature(name: str, dtype: torch.dtype):
    """(jit function, {arg: Triton type}) of one kernel for inputs of `dtype`, as a launch would
    specialise it (pointers and strides 16-divisible)."""
    import laprox_triton as kernels
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    m_ptr = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    fn = {"stats": kernels._softmax_stats, "quad": kernels._value_quadratic_forms,
          "gram": kernels._attention_gram_scores}[name]
    types = {"Q": ptr, "K": ptr, "V": ptr, "Mw": m_ptr, "Mpart": "*fp32", "Lpart": "*fp32",
             "LSE": "*fp32", "QV": "*fp32", "Out": "*fp32", "scale": "fp32"}
    return fn, {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32") for p in fn.params}


def compile_offline(name: str, cfg, G: int, D: int, dtype: torch.dtype, group: str, capability: int) -> dict:
    """Compile kernel `name` ("stats", "quad" or "gram") with config `cfg` for an NVIDIA GPU of
    compute capability `capability` (80, 86, 89, 90) with Triton's own compiler, no GPU needed.
    cfg: a kernels.Config; G, D, dtype, group as kernels.plan_launch takes them.

    Returns {"shared": bytes of shared memory, "registers": per thread, "spill_stores": bytes,
    "spill_loads": bytes, "threads": per block}; registers and spills come from ptxas -v on the PTX.
    """
    import re
    import subprocess
    import tempfile
    import triton
    import laprox_triton as kernels
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    fn, sig = _kernel_signature(name, dtype)
    g_pad, d_pad = kernels._next_pow2(G), max(16, kernels._next_pow2(D))
    precision = "tf32x3" if dtype == torch.float32 else "tf32"
    const = {"D": D, "D_PAD": d_pad, "UPCAST": False}
    if name == "quad":
        const.update(BLOCK_N=cfg.block_n, BLOCK_E=cfg.block_e, PIECES=kernels.M_PIECES if dtype == torch.bfloat16 else 1,
                     DIAGONAL=group == "sum", PRECISION="tf32" if dtype == torch.bfloat16 else "tf32x3")
    else:
        const.update(G_PAD=g_pad, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, PRECISION=precision)
        if name == "gram":
            const["GROUP_SUM"] = group == "sum"
    divisible = [i for i, a in enumerate(fn.arg_names)
                 if sig[a].startswith("*") or a.startswith(("sq_", "sk_", "sv_")) or a == "piece_stride"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    src = ASTSource(fn, sig, const, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    arch = sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", ptx, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"shared": int(compiled.metadata.shared), "registers": int(regs.group(1)) if regs else 0,
            "spill_stores": int(spills.group(1)) if spills else 0, "spill_loads": int(spills.group(2)) if spills else 0,
            "threads": 32 * cfg.num_warps}


def compile_table(shapes=None, windows=WINDOWS, targets=TARGETS, dtype=torch.bfloat16, group="exact", log=print,
                  workers=None):
    """For every (target, model shape, w): the plan plan_launch makes with that target's shared
    memory limit, each kernel of it compiled offline (compile_offline; identical kernels are
    compiled once, `workers` processes at a time, default one per core: a compile is one thread).
    Returns a list of rows {target, model, w, kernel, config, shared, registers, spill_stores,
    spill_loads, threads, launches}; launches: shared memory within the target's opt-in limit and
    registers x threads within 64K."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    import laprox_triton as kernels
    shapes = REAL_MODELS if shapes is None else shapes
    cells, todo = [], {}   # cells: (cap, model, w, plan or why); todo: unique kernel -> compile_offline args
    for cap in targets:
        for model, (H, H_kv, D) in shapes.items():
            G = H // H_kv
            for w in windows:
                plan, why = kernels.plan_launch(G, w, D, dtype, group, kernels.SMEM_LIMITS[cap])
                cells.append((cap, model, w, G, D, plan, why))
                for name in KERNELS if plan is not None else ():
                    cfg = getattr(plan, name)[0]
                    todo.setdefault((cap, name, cfg, kernels._next_pow2(G), D), (name, cfg, G, D, dtype, group, cap))
    # spawn, not fork: the parent has torch's threads running
    with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(compile_offline, *args) for key, args in todo.items()}
        compiled = {}
        for key, future in futures.items():
            compiled[key] = future.result()
            log(f"  compiled {key[1]} {key[2]} for sm_{key[0]} (G={key[3]}, D={key[4]})")
    rows = []
    for cap, model, w, G, D, plan, why in cells:
        if plan is None:
            rows.append(dict(target=cap, model=model, w=w, kernel="-", config=None, launches=False, why=why))
            continue
        for name in KERNELS:
            cfg = getattr(plan, name)[0]
            r = compiled[(cap, name, cfg, kernels._next_pow2(G), D)]
            fits = r["shared"] <= kernels.SMEM_LIMITS[cap] and r["registers"] * r["threads"] <= 65536
            rows.append(dict(target=cap, model=model, w=w, kernel=name, config=cfg, launches=fits, **r))
    return rows


def print_compile_table(rows, dtype):
    """One line per (target, model, w): each kernel's config (BLOCK_T,BLOCK_N,BLOCK_E/warps/stages),
    shared memory (bytes), registers per thread and spill stores (bytes); then the worst per target."""
    import triton
    import laprox_triton as kernels
    print(f"triton {triton.__version__}, {dtype} inputs, group=exact; opt-in shared memory per block: "
          + ", ".join(f"sm_{c} {kernels.SMEM_LIMITS[c]} B" for c in TARGETS))
    print(f"{'target':6s} {'model':13s} {'w':>3s}  " + "  ".join(f"{k + ': config':24s} {'smem':>6s} {'regs':>4s} {'spill':>5s}"
                                                              for k in KERNELS) + "  launches")
    lines = {}
    for r in rows:
        lines.setdefault((r["target"], r["model"], r["w"]), []).append(r)
    for (cap, model, w), rs in lines.items():
        if rs[0]["config"] is None:
            print(f"sm_{cap:<3d} {model:13s} {w:3d}  no plan: {rs[0]['why']}")
            continue
        cells = []
        for r in rs:
            c = r["config"]
            cfg = f"{c.block_t},{c.block_n},{c.block_e}/{c.num_warps}/{c.num_stages}"
            cells.append(f"{cfg:24s} {r['shared']:6d} {r['registers']:4d} {r['spill_stores']:5d}")
        print(f"sm_{cap:<3d} {model:13s} {w:3d}  " + "  ".join(cells) + f"  {'yes' if all(r['launches'] for r in rs) else 'NO'}")
    print("worst per target over all shapes and windows:")
    for cap in TARGETS:
        mine = [r for r in rows if r["target"] == cap and r["config"] is not None]
        if mine:
            print(f"  sm_{cap}: shared memory {max(r['shared'] for r in mine)} B of {kernels.SMEM_LIMITS[cap]}, "
                  f"registers {max(r['registers'] for r in mine)}, spill stores {max(r['spill_stores'] for r in mine)} B, "
                  f"{sum(not r['launches'] for r in rows if r['target'] == cap)} kernels that would not launch")


# ------------------------------------------------------------------------------ GPU check

CHECK_CASES = [  # (label, B, H, H_kv, D, w, n, dtype, group, every candidate?)
    ("llama-8b", 1, 32, 8, 128, 32, 1000, torch.bfloat16, "exact", True),
    ("llama-8b", 1, 32, 8, 128, 32, 1000, torch.float32, "exact", False),
    ("llama-8b sum", 1, 32, 8, 128, 32, 1000, torch.bfloat16, "sum", False),
    ("qwen2.5-7b w=128", 1, 28, 4, 128, 128, 777, torch.bfloat16, "exact", False),
    ("qwen2.5-14b w=64", 1, 40, 8, 128, 64, 555, torch.bfloat16, "exact", False),
    ("llama-70b w=128", 1, 64, 8, 128, 128, 600, torch.bfloat16, "exact", False),
    ("qwen2.5-1.5b", 1, 12, 2, 128, 16, 999, torch.bfloat16, "exact", False),
    ("smollm2 fp32", 1, 9, 3, 64, 32, 1234, torch.float32, "exact", False),
    ("G=7 w=5 B=2 fp16", 2, 7, 1, 128, 5, 301, torch.float16, "exact", False),
    ("G=3 D=96 w=37", 1, 6, 2, 96, 37, 413, torch.bfloat16, "sum", False),
    ("MHA G=1", 1, 4, 4, 64, 20, 250, torch.float32, "exact", False),
]


def gpu_check(out_dir, repeats, time_limit, device="cuda", cases=CHECK_CASES, timing_ns=(8192, 32768, 131072),
              sweep_n=32768, probe_ns=(8192, 32768)):
    """Everything one GPU session should measure, in one run: each step prints its result or its
    error and goes on; the steps left when time_limit seconds have passed are skipped. (device and
    the sizes are parameters only so that the script itself can be dry-run small.)"""
    import triton
    import laprox_triton as kernels
    t_start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "smem_limit": kernels.device_smem_limit(device), "correctness": [], "timing": [], "sweep": [],
              "attention_probe": []}
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}, "
          f"shared memory per block {report['smem_limit']} B", flush=True)

    def time_left():
        return time_limit - (time.perf_counter() - t_start)

    def save():
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
                json.dump(report, f, indent=1, default=str)

    # 1. correctness: every candidate of every kernel on the Llama shape, the default plan elsewhere
    print("\n1. correctness vs the PyTorch path on the CPU (float32; which agrees with float64 to 1e-4):", flush=True)
    for label, B, H, H_kv, D, w, n, dtype, group, every in cases:
        if time_left() < 0.4 * time_limit:
            print(f"  skipped {label}: time", flush=True)
            continue
        try:
            gen = torch.Generator().manual_seed(n)
            q = torch.randn(B, H, w, D, generator=gen) * 1.5
            k = torch.randn(B, H_kv, n, D, generator=gen)
            v = torch.randn(B, H_kv, n, D, generator=gen) + 0.2
            o = torch.randn(512, H * D, generator=gen) / (H * D) ** 0.5
            q, k, v = (t.to(dtype) for t in (q, k, v))
            ref = laprox.laprox_scores(q, k, v, o, group=group)
            qc, kc, vc, oc = (t.to(device) for t in (q, k, v, o))
            M = laprox.value_gram_pairs(oc, H, D, H_kv)
            plan, _ = kernels.plan_launch(H // H_kv, w, D, dtype, group, report["smem_limit"])
            variants = [("default", plan)]
            if every:
                for name in KERNELS:
                    for i, cfg in enumerate(getattr(plan, name)[1:], 1):
                        variants.append((f"{name}[{i}]", kernels.Plan(**{x: (cfg,) if x == name else getattr(plan, x)[:1]
                                                                         for x in KERNELS})))
            for tag, p in variants:
                try:
                    got = kernels.laprox_scores_triton(qc, kc, vc, M, group=group, plan=p)
                    rel = max_rel_diff(got, ref)
                    ok = rel < 1e-4
                    cfgs = {x: getattr(p, x)[0].__dict__ for x in KERNELS}
                    report["correctness"].append(dict(case=label, variant=tag, rel=rel, ok=ok, configs=cfgs))
                    print(f"  {'ok  ' if ok else 'FAIL'} {label:18s} {str(dtype)[6:]:9s} {group:5s} {tag:9s} "
                          f"max rel diff {rel:.2e}", flush=True)
                except Exception as err:   # noqa: BLE001 - report and go on
                    report["correctness"].append(dict(case=label, variant=tag, error=repr(err)))
                    print(f"  ERR  {label} {tag}: {err!r}", flush=True)
            auto = laprox.laprox_scores_auto(qc, kc, vc, oc, group=group)
            print(f"       laprox_scores_auto on CUDA: max rel diff {max_rel_diff(auto, ref):.2e}", flush=True)
        except Exception as err:   # noqa: BLE001
            report["correctness"].append(dict(case=label, error=repr(err)))
            print(f"  ERR  {label}: {err!r}\n{traceback.format_exc(limit=3)}", flush=True)
    save()

    # 2. the timing table: PyTorch path vs kernels, Llama-3.1-8B layer, bfloat16
    print(f"\n2. one Llama-3.1-8B layer ({LLAMA_8B}), bfloat16, median of {repeats}:", flush=True)
    print(f"{'n':>8} {'torch ms':>10} {'triton ms':>10} {'speedup':>8} {'torch MiB':>10} {'triton MiB':>11} "
          f"{'memory':>7} {'max rel diff':>13}", flush=True)
    for n in timing_ns:
        if time_left() < 0.25 * time_limit:
            print(f"{n:>8} skipped: time", flush=True)
            continue
        try:
            r = compare_on_gpu(n, torch.bfloat16, LLAMA_8B, repeats=repeats, device=device)
            r["n"] = n
            report["timing"].append(r)
            print(f"{n:>8} {r['torch_ms']:>10.2f} {r['triton_ms']:>10.2f} {r['torch_ms'] / r['triton_ms']:>7.2f}x "
                  f"{r['torch_mib']:>10.0f} {r['triton_mib']:>11.0f} {r['triton_mib'] / max(r['torch_mib'], 1e-9):>6.1%} "
                  f"{r['max_rel_diff']:>13.2e}", flush=True)
        except Exception as err:   # noqa: BLE001
            report["timing"].append(dict(n=n, error=repr(err)))
            print(f"{n:>8} ERR {err!r}", flush=True)
        torch.cuda.empty_cache()
    save()

    # 3. every candidate config of each kernel at n = 32k, the others at their default (for tuning)
    print(f"\n3. candidate sweep at n = {sweep_n}, Llama-3.1-8B layer, bfloat16 (ms of the whole score):", flush=True)
    try:
        q, k, v, o = make_inputs(sweep_n, dtype=torch.bfloat16, device=device, **LLAMA_8B)
        H, H_kv, D, w = (LLAMA_8B[x] for x in ("H", "H_kv", "D", "w"))
        M = laprox.value_gram_pairs(o, H, D, H_kv)
        plan, _ = kernels.plan_launch(H // H_kv, w, D, torch.bfloat16, "exact", report["smem_limit"])
        for name in KERNELS:
            for i, cfg in enumerate(getattr(plan, name)):
                if time_left() < 0.1 * time_limit:
                    print("  skipped the rest: time", flush=True)
                    break
                p = kernels.Plan(**{x: (cfg,) if x == name else getattr(plan, x)[:1] for x in KERNELS})
                try:
                    ms, mib = time_cuda(lambda: kernels.laprox_scores_triton(q, k, v, M, plan=p), repeats)
                    report["sweep"].append(dict(kernel=name, index=i, config=cfg.__dict__, ms=ms, mib=mib))
                    print(f"  {name}[{i}] {cfg}: {ms:.3f} ms", flush=True)
                except Exception as err:   # noqa: BLE001
                    report["sweep"].append(dict(kernel=name, index=i, config=cfg.__dict__, error=repr(err)))
                    print(f"  {name}[{i}] {cfg}: ERR {err!r}", flush=True)
        del q, k, v, o, M
    except Exception as err:   # noqa: BLE001
        print(f"  ERR {err!r}", flush=True)
    torch.cuda.empty_cache()
    save()

    # 4. model.attention during prefill (T == S): memory and time at 8k and 32k, vs is_causal=True
    print("\n4. prefill attention, 32 query / 8 KV heads, D 128, bfloat16: model.attention vs "
          "F.scaled_dot_product_attention(is_causal=True):", flush=True)
    try:
        import torch.nn.functional as F
        from model import attention
        for n in probe_ns:
            if time_left() < 0.02 * time_limit:
                break
            q = torch.randn(1, 32, n, 128, device=device, dtype=torch.bfloat16)
            kv = torch.randn(1, 8, n, 128, device=device, dtype=torch.bfloat16)
            for label, fn in (("model.attention", lambda: attention(q, kv, kv)),
                              ("is_causal=True", lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True,
                                                                                        enable_gqa=True))):
                try:
                    ms, mib = time_cuda(fn, 3)
                    report["attention_probe"].append(dict(n=n, path=label, ms=ms, mib=mib))
                    print(f"  n={n:6d} {label:16s} {ms:9.2f} ms {mib:9.0f} MiB", flush=True)
                except Exception as err:   # noqa: BLE001
                    report["attention_probe"].append(dict(n=n, path=label, error=repr(err)[:300]))
                    print(f"  n={n:6d} {label:16s} ERR {repr(err)[:200]}", flush=True)
                torch.cuda.empty_cache()
            del q, kv
    except Exception as err:   # noqa: BLE001
        print(f"  ERR {err!r}", flush=True)
    save()
    bad = [c for c in report["correctness"] if not c.get("ok")]
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; {len(report['correctness']) - len(bad)} correct, "
          f"{len(bad)} failed or errored" + (f"; report in {out_dir}/gpu_check.json" if out_dir else ""))


# ------------------------------------------------------------------------------ CPU

def cpu_figures(ns, repeats, budget, group):
    """The PyTorch path at the Llama shape for the sizes that fit in `budget` seconds, and the
    interpreted kernels' agreement with it at a small n."""
    print(f"PyTorch path, one Llama-3.1-8B layer ({LLAMA_8B}), float32, CPU ({torch.get_num_threads()} threads):")
    print(f"{'n':>8} {'torch ms':>10} {'torch MiB':>10}")
    t_start, last = time.perf_counter(), None
    for i, n in enumerate(ns):
        elapsed = time.perf_counter() - t_start
        predicted = 0.0 if last is None else last / 1e3 * n / ns[i - 1]   # cost is linear in n
        if elapsed + 2 * predicted > budget:                               # one timed run plus input creation
            print(f"skipped n = {', '.join(map(str, ns[i:]))}: about {predicted:.0f} s each would exceed "
                  f"--cpu-budget {budget:.0f} s")
            break
        q, k, v, o = make_inputs(n, dtype=torch.float32, device="cpu", **LLAMA_8B)
        laprox.value_gram_pairs(o, 32, 128, 8)                             # M once, as in a real run
        last, mem = time_cpu(lambda: laprox.laprox_scores(q, k, v, o, group=group), 1 if predicted > 5 else repeats)
        print(f"{n:>8} {last:>10.0f} {mem:>10.0f}", flush=True)
        del q, k, v, o
    # the kernels in Triton's interpreter (it must be set before triton is imported)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("(triton was imported before TRITON_INTERPRET=1 could be set: no interpreted check)")
        return
    os.environ["TRITON_INTERPRET"] = "1"
    import laprox_triton as kernels
    if not kernels.triton_available():
        print("(triton is not installed: no interpreted check)")
        return
    n, shape = 300, dict(LLAMA_8B, H=8, H_kv=2)
    q, k, v, o = make_inputs(n, dtype=torch.float32, device="cpu", **shape)
    t0 = time.perf_counter()
    got = kernels.laprox_scores_triton(q, k, v, laprox.value_gram_pairs(o, 8, 128, 2), group=group)
    print(f"Triton kernels in the interpreter, two KV heads of that layer (G 4, D 128, w 32), n = {n}: max rel diff "
          f"{max_rel_diff(got, laprox.laprox_scores(q, k, v, o, group=group)):.2e} vs the PyTorch path "
          f"({time.perf_counter() - t0:.0f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-check", action="store_true", help="compile every kernel for sm_80/86/89/90 (no GPU)")
    p.add_argument("--gpu-check", action="store_true", help="correctness, timing and sweep on a GPU")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default $OUT)")
    p.add_argument("--time-limit", type=float, default=270.0, help="seconds the GPU check may take")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="inputs of the compile check")
    p.add_argument("--quick", action="store_true", help=f"compile check of a representative subset: "
                   f"{', '.join(QUICK_MODELS)} at w = 128, every target")
    p.add_argument("--ns", default="8192,32768,131072", help="comma-separated prompt lengths (CPU run)")
    p.add_argument("--group", choices=["exact", "sum"], default="exact")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-budget", type=float, default=100.0, help="seconds the CPU timing may take in all")
    a = p.parse_args()
    try:
        ns = [int(x) for x in a.ns.split(",")]
    except ValueError:
        raise SystemExit(f"error: --ns must be comma-separated integers, got {a.ns!r}")
    if a.compile_check:
        try:
            import triton  # noqa: F401
            from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        except ImportError as err:
            raise SystemExit(f"error: the compile check needs triton with its NVIDIA backend ({err})")
        dtype = getattr(torch, a.dtype)
        if a.quick:
            rows = compile_table({m: REAL_MODELS[m] for m in QUICK_MODELS}, windows=(128,), dtype=dtype)
        else:
            rows = compile_table(dtype=dtype)
        print_compile_table(rows, a.dtype)
        if not all(r["launches"] for r in rows):
            raise SystemExit(1)
        return
    if a.gpu_check:
        if not torch.cuda.is_available():
            raise SystemExit("error: --gpu-check needs a CUDA GPU; on a CPU run without it")
        gpu_check(a.out, a.repeats, a.time_limit)
        return
    if torch.cuda.is_available():
        print(f"{'n':>8} {'torch ms':>10} {'triton ms':>10} {'speedup':>8} {'torch MiB':>10} {'triton MiB':>11} "
              f"{'max rel diff':>13}")
        for n in ns:
            r = compare_on_gpu(n, torch.bfloat16, LLAMA_8B, a.group, a.repeats)
            print(f"{n:>8} {r['torch_ms']:>10.2f} {r['triton_ms']:>10.2f} {r['torch_ms'] / r['triton_ms']:>7.2f}x "
                  f"{r['torch_mib']:>10.0f} {r['triton_mib']:>11.0f} {r['max_rel_diff']:>13.2e}")
        return
    cpu_figures(ns, a.repeats, a.cpu_budget, a.group)


if __name__ == "__main__":
    main()
