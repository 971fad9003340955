"""The Triton kernels (laprox_triton.py, optimisation 3 of laprox.py) against laprox.reference_scores in
float64, the dispatch to them, the launch planner and an offline compile for real GPUs.

The kernels run in Triton's interpreter: TRITON_INTERPRET must be in the environment before
triton is imported, hence the first lines. Shapes are tiny (the interpreter runs every program
one after the other in numpy) but cross every tile boundary: explicit plans with small blocks.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import laprox  # noqa: E402
from test_laprox import make_layer, reference64  # noqa: E402  reference64: checked against float64 loops

try:
    import triton  # noqa: E402,F401
except ImportError as err:  # pragma: no cover
    pytest.skip(f"triton is not importable ({err}); the kernel tests need it", allow_module_level=True)

import laprox_triton as kernels  # noqa: E402
from laprox_triton import Config, Plan  # noqa: E402

if not (kernels.INTERPRET or torch.cuda.is_available()):  # pragma: no cover
    pytest.skip("kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
                "run this file in a fresh process", allow_module_level=True)


def assert_rel_close(got, ref, rtol=1e-4):
    """Largest relative error over entries (|ref| floored at 1e-6 of its max) below rtol."""
    assert got.shape == ref.shape and got.dtype == torch.float32
    got, ref = got.double(), ref.double()
    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-6 * ref.abs().max())).max().item()
    assert rel <= rtol, f"max relative error {rel:.3e}"


def plan(stats=(4, 16, 4, 1), quad=(16, 16, 4, 1), gram=(4, 16, 4)):
    """An explicit small plan: stats (BLOCK_T, BLOCK_N, warps, stages), quad (BLOCK_N, BLOCK_E, warps,
    stages), gram (BLOCK_T, BLOCK_N, warps)."""
    return Plan(stats=(Config(stats[0], stats[1], 0, stats[2], stats[3], 0),),
                quad=(Config(0, quad[0], quad[1], quad[2], quad[3], 0),),
                gram=(Config(gram[0], gram[1], 0, gram[2], 1, 0),))


# ------------------------------------------------------------------ the kernels vs float64

CASES = [  # (B, H_kv, G, w, n, D, dtype, group, plan or None, keys_per_chunk)
    # G=3 (padded to 4), w=37: 10 row tiles of 4 (last partial), n=67: 5 key blocks of 16 (last partial),
    # 2 key chunks of 48 in the stats kernel, BLOCK_E 16 < D: 4 column blocks per pair
    (1, 2, 3, 37, 67, 64, torch.float32, "exact", plan(), 48),
    # G=7 (padded to 8): 2 window rows x 8 heads per tile, w=5 -> 3 tiles; D=96 (padded to 128); B=2
    (2, 1, 7, 5, 45, 96, torch.float32, "exact", plan((2, 16, 4, 1), (16, 32, 4, 1), (2, 16, 4)), None),
    # bfloat16: M in three bfloat16 pieces; BLOCK_E = D (the epilogue reuses v); G=5, w=20
    (1, 2, 5, 20, 70, 64, torch.bfloat16, "exact", plan((4, 32, 4, 2), (32, 64, 4, 2), (4, 32, 4)), 32),
    # float16 (3xTF32 route), MHA (G=1: 16 window rows per tile), group "sum" (diagonal pairs only)
    (1, 3, 1, 40, 53, 64, torch.float16, "sum", plan((16, 16, 4, 1), (16, 32, 4, 1), (16, 16, 4)), None),
    (1, 1, 6, 9, 41, 128, torch.float32, "sum", plan((2, 16, 4, 1), (16, 64, 4, 1), (2, 16, 4)), None),
    # the planner's own choice for this "device" (the interpreter plans against sm_80's limit)
    (1, 2, 4, 32, 131, 128, torch.bfloat16, "exact", None, None),
]


@pytest.mark.parametrize("B,H_kv,G,w,n,D,dtype,group,p,kpc", CASES)
def test_kernels_match_float64_across_tile_boundaries(B, H_kv, G, w, n, D, dtype, group, p, kpc):
    q, k, v, o = make_layer(seed=B * 1000 + G * 100 + n, B=B, H_kv=H_kv, G=G, w=w, n=n, D=D, dtype=dtype)
    M = laprox.value_gram_pairs(o, H_kv * G, D, H_kv)
    got = kernels.laprox_scores_triton(q, k, v, M, group=group, plan=p, keys_per_chunk=kpc)
    assert got.shape == (B, H_kv, n)
    assert_rel_close(got, reference64(q, k, v, o, group=group))


def test_kernels_compute_the_papers_score():
    """The Triton path (group "sum", the default) against the paper's score written literally,
    laprox.paper_scores, in float64: through the kernels directly and through the dispatch."""
    q, k, v, o = make_layer(seed=31, B=1, H_kv=2, G=3, w=9, n=50, D=64)
    paper = laprox.paper_scores(q.double(), k.double(), v.double(), o.double())
    M = laprox.value_gram_pairs(o, 6, 64, 2)
    assert_rel_close(kernels.laprox_scores_triton(q, k, v, M, plan=plan()), paper)
    assert_rel_close(laprox.laprox_scores_auto(q, k, v, o, use_triton=True), paper)


def test_noncontiguous_keys_and_values_as_the_model_stores_them():
    """model.py's keys and values are (B, n, H_kv, D) buffers seen transposed: read in place."""
    q, k, v, o = make_layer(seed=3, H_kv=2, G=2, w=8, n=30, D=64)
    k_t, v_t = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k_t.is_contiguous()
    M = laprox.value_gram_pairs(o, 4, 64, 2)
    assert_rel_close(kernels.laprox_scores_triton(q, k_t, v_t, M, plan=plan()), reference64(q, k, v, o))


def test_split_bfloat16_pieces_sum_to_m():
    M = torch.randn(3, 5, 16, 16, dtype=torch.float64) * torch.logspace(-3, 1, 16, dtype=torch.float64)
    pieces = kernels.split_bfloat16(M.float())
    assert pieces.shape == (3, 3, 5, 16, 16) and pieces.dtype == torch.bfloat16
    assert (pieces.double().sum(0) - M.float().double()).abs().max() <= 2 ** -24 * M.abs().max()
    assert (pieces[0].double() - M).abs().max() > 1e-4 * M.abs().max()     # one piece alone would not do


def test_dispatch_and_scorer_use_the_kernel_when_asked():
    from types import SimpleNamespace
    q, k, v, o = make_layer(seed=6, H_kv=1, G=3, w=8, n=30, D=64)
    ref = reference64(q, k, v, o)
    assert_rel_close(laprox.laprox_scores_auto(q, k, v, o, use_triton=True), ref)
    prefill = SimpleNamespace(queries=[q], keys=[k], values=[v], o_proj=[o],
                              resid_norm=torch.tensor([2.0]), out_norm=torch.tensor([1.0]))
    assert_rel_close(laprox.laprox_scorer(prefill, use_triton=True)[0], ref)  # the scorer returns raw scores: pooling and normalisation follow in methods


def test_falls_back_to_pytorch_with_one_logged_line_when_no_tiling_fits(caplog):
    q, k, v, o = make_layer(seed=7, H_kv=1, G=kernels.MAX_GROUP * 2, w=4, n=12, D=16)
    with caplog.at_level(logging.WARNING, logger="laprox"):
        for _ in range(2):
            got = laprox.laprox_scores_auto(q, k, v, o, use_triton=True)
    assert_rel_close(got, reference64(q, k, v, o))
    lines = [r.getMessage() for r in caplog.records if "Triton kernels do not fit" in r.getMessage()]
    assert len(lines) == 1 and f"G={kernels.MAX_GROUP * 2}" in lines[0]


def test_kernel_argument_checks():
    q, k, v, o = make_layer(seed=7, H_kv=1, G=2, w=8, n=20, D=64)
    M = laprox.value_gram_pairs(o, 2, 64, 1)
    with pytest.raises(ValueError, match="group"):
        kernels.laprox_scores_triton(q, k, v, M, group="max")
    with pytest.raises(ValueError, match="M must be float32"):
        kernels.laprox_scores_triton(q, k, v, laprox.value_gram_matrices(o, 2, 64, 1))
    with pytest.raises(ValueError, match="M must be float32"):
        kernels.laprox_scores_triton(q, k, v, M.double())
    with pytest.raises(ValueError, match="window"):
        kernels.laprox_scores_triton(q, k[:, :, :4], v[:, :, :4], M)
    with pytest.raises(ValueError, match="H a multiple of H_kv"):
        kernels.laprox_scores_triton(q[:, :1].repeat(1, 3, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), M)


# ------------------------------------------------------------------ planning and compiling

def test_plans_fit_each_target_and_tile_rows_for_tl_dot():
    for cap, limit in kernels.SMEM_LIMITS.items():
        for G in (1, 3, 4, 7, 8, 16):
            for w in (5, 16, 128):
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    p, why = kernels.plan_launch(G, w, 128, dtype, "exact", limit)
                    assert p is not None, why
                    for cfg in p.stats + p.quad + p.gram:
                        assert cfg.smem <= limit
                    for cfg in p.stats + p.gram:
                        assert cfg.block_t * kernels._next_pow2(G) >= 16
    p, why = kernels.plan_launch(4, 32, 128, torch.bfloat16, "exact", 4096)
    assert p is None and "4096 bytes" in why
    p, why = kernels.plan_launch(kernels.MAX_GROUP + 1, 32, 128, torch.bfloat16, "exact", kernels.SMEM_LIMITS[90])
    assert p is None and "GQA group" in why


def _compiler_tools_missing():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return not os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton
        return True


@pytest.mark.skipif(_compiler_tools_missing(), reason="triton's NVIDIA compiler tools (ptxas) are not installed")
def test_compile_check_every_target_launches_a_representative_subset():
    """Triton's own compiler, for sm_80/86/89/90, no GPU: every kernel of the plan for the tightest
    shapes fits in the target's shared memory and register file (in a fresh process: this one runs
    the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "lab.bench_kernels", "--compile-check", "--quick"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "0 kernels that would not launch" in r.stdout and "sm_86" in r.stdout and "sm_90" in r.stdout


# ------------------------------------------------------------------ decoding over a packed cache layer
# Budget: the 4 cases below take a few seconds in the interpreter (tiny shapes, at most 8 programs).

def packed_layer(lengths, D, spare, dtype, seed):
    """A cache.LayerEntries of random entries, lengths[g] per head and `spare` rows after each head
    filled with huge values (never to be read), for one new token (T = 1)."""
    from cache import LayerEntries
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    cap = lengths + spare
    starts = torch.cumsum(cap, 0) - cap
    k, v = torch.randn(int(cap.sum()), D, generator=g), torch.randn(int(cap.sum()), D, generator=g)
    for s, n, c in zip(starts.tolist(), lengths.tolist(), cap.tolist()):
        k[s + n: s + c], v[s + n: s + c] = 1e4, 1e6
    return LayerEntries(k.to(dtype), v.to(dtype), starts, lengths, int(lengths.max()), 1, False)


@pytest.mark.parametrize("lengths,G,D,spare,dtype,chunk", [
    ([70, 1, 33], 3, 16, 5, torch.float32, 32),    # a head past 2 splits and 2 blocks, a head of one entry
    ([5, 130], 4, 24, 0, torch.float32, None),      # D padded to 32; the default split
    ([40, 90, 17, 64], 2, 16, 3, torch.bfloat16, 64),
    ([200], 8, 64, 2, torch.bfloat16, 64),          # MHA-like single KV head, G = 8
])
def test_varlen_decode_matches_the_padded_readable_path(lengths, G, D, spare, dtype, chunk):
    """laprox_triton.varlen_decode against model.attention over LayerEntries.attention_inputs() (the CPU path,
    itself tested against float64 per-head attention in test_cache), float32 within 1e-5; bfloat16
    inputs against the same path on their float32 values, within bfloat16's rounding."""
    from model import attention
    e = packed_layer(lengths, D, spare, dtype, seed=len(lengths) * 10 + G)
    q = torch.randn(1, len(lengths) * G, 1, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = kernels.varlen_decode(q, e.keys, e.values, e.starts, e.lengths, e.longest, chunk=chunk, block_n=16)
    e32 = packed_layer(lengths, D, spare, torch.float32, seed=len(lengths) * 10 + G)
    e32.keys, e32.values = e.keys.float(), e.values.float()
    want = attention(q.float(), *e32.attention_inputs())
    assert got.shape == q.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bfloat16: p and the output rounded to 8 bits
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
