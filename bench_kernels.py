"""Time the LaProx scorer: fused Triton kernel vs the readable PyTorch path.

    python bench_kernels.py                      # n = 4k .. 128k, H=32, H_kv=8, D=128, w=32
    python bench_kernels.py --ns 4096,16384 --dtype float32

One layer, batch 1, random inputs. On a GPU it prints, per n: the median time of each path,
their ratio, the peak memory each adds on top of its inputs, and the largest relative
difference between the two. On a CPU the Triton kernel cannot run (its interpreter would
take hours at these sizes), so only the PyTorch path is timed, at the sizes that fit in
--cpu-budget seconds; the sizes it skips are listed.
"""

import argparse
import os
import statistics
import threading
import time

import torch

import laprox


def make_inputs(n, H, H_kv, D, w, d, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, H, w, D, generator=gen)
    k = torch.randn(1, H_kv, n, D, generator=gen)
    v = torch.randn(1, H_kv, n, D, generator=gen)
    o = torch.randn(d, H * D, generator=gen) / (H * D) ** 0.5
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, o)]


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


def compare_on_gpu(n, dtype, shape, group="exact", repeats=5) -> dict:
    """One layer of `shape` (H, H_kv, D, w, d) with n keys on CUDA: median ms and peak MiB of the
    PyTorch and Triton paths, and their largest relative difference."""
    import kernels
    q, k, v, o = make_inputs(n, dtype=dtype, device="cuda", **shape)
    t_ref, m_ref = time_cuda(lambda: laprox.laprox_scores(q, k, v, o, group=group), repeats)
    t_tri, m_tri = time_cuda(lambda: kernels.laprox_scores_triton(q, k, v, o, group=group), repeats)
    ref = laprox.laprox_scores(q, k, v, o, group=group)
    got = kernels.laprox_scores_triton(q, k, v, o, group=group)
    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-6 * ref.abs().max())).max().item()
    del q, k, v, o, ref, got
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", default="4096,8192,16384,32768,65536,131072", help="comma-separated prompt lengths")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--model-dim", type=int, default=4096)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="input dtype (default bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--group", choices=["exact", "sum"], default="exact")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-budget", type=float, default=100.0, help="seconds the CPU run may take in all")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    ns = [int(x) for x in args.ns.split(",")]
    shape = dict(H=args.heads, H_kv=args.kv_heads, D=args.head_dim, w=args.window, d=args.model_dim)
    print(f"LaProx scorer benchmark: {device}, {dtype}, group={args.group}, "
          + ", ".join(f"{k}={v}" for k, v in shape.items()))

    if cuda:
        print(f"{'n':>8} {'torch ms':>10} {'triton ms':>10} {'speedup':>8} "
              f"{'torch MiB':>10} {'triton MiB':>11} {'max rel diff':>13}")
        for n in ns:
            r = compare_on_gpu(n, dtype, shape, args.group, args.repeats)
            print(f"{n:>8} {r['torch_ms']:>10.2f} {r['triton_ms']:>10.2f} {r['torch_ms'] / r['triton_ms']:>7.1f}x "
                  f"{r['torch_mib']:>10.0f} {r['triton_mib']:>11.0f} {r['max_rel_diff']:>13.2e}")
        return

    print("No GPU: the Triton kernel needs one (under TRITON_INTERPRET=1 it would take hours at these "
          "sizes), so only the PyTorch path is timed.")
    print(f"{'n':>8} {'torch ms':>10} {'torch MiB':>10}")
    t_start = time.perf_counter()
    last_ms = None
    for i, n in enumerate(ns):
        elapsed = time.perf_counter() - t_start
        # cost is linear in n: predict this size from the previous one
        predicted = 0.0 if last_ms is None else last_ms / 1e3 * n / ns[i - 1]
        if elapsed + predicted * (1 + 1) > args.cpu_budget:      # one timed run plus input creation
            print(f"skipped n = {', '.join(map(str, ns[i:]))}: about {predicted:.0f} s each would exceed "
                  f"--cpu-budget {args.cpu_budget:.0f} s (run on a GPU, or raise --cpu-budget)")
            break
        q, k, v, o = make_inputs(n, dtype=dtype, device=device, **shape)
        repeats = 1 if predicted > 5 else min(args.repeats, 3)
        last_ms, mem = time_cpu(lambda: laprox.laprox_scores(q, k, v, o, group=args.group), repeats)
        print(f"{n:>8} {last_ms:>10.0f} {mem:>10.0f}", flush=True)
        del q, k, v, o
    print(f"CPU run took {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
