"""The Triton kernel (kernels.py) against the PyTorch path (laprox.py), in Triton's interpreter.

TRITON_INTERPRET must be in the environment before triton is imported, hence the first lines.
Shapes are tiny: the interpreter runs every program one after the other in numpy.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import laprox  # noqa: E402

try:
    import triton  # noqa: E402,F401
except ImportError as err:  # pragma: no cover
    pytest.skip(f"triton is not importable ({err}); the kernel tests need it", allow_module_level=True)

import kernels  # noqa: E402

if not (kernels.INTERPRET or torch.cuda.is_available()):  # pragma: no cover
    pytest.skip("kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
                "run this file in a fresh process", allow_module_level=True)


def make_layer(seed, B=1, H_kv=2, G=1, w=32, n=67, D=64, d=40, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    H = H_kv * G
    q = torch.randn(B, H, w, D, generator=gen) * 1.5
    k = torch.randn(B, H_kv, n, D, generator=gen)
    v = torch.randn(B, H_kv, n, D, generator=gen) + 0.2
    o = torch.randn(d, H * D, generator=gen) / math.sqrt(H * D)
    return q.to(dtype), k.to(dtype), v.to(dtype), o


def assert_rel_close(got, ref, rtol=1e-4):
    assert got.shape == ref.shape and got.dtype == torch.float32
    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-6 * ref.abs().max())).max().item()
    assert rel <= rtol, f"max relative error {rel:.3e}"


CASES = [  # (B, H_kv, G, w, n, D, block_n, keys_per_program, group)
    (1, 2, 1, 32, 67, 64, None, None, "exact"),     # MHA, n not a multiple of the block
    (1, 1, 2, 32, 50, 128, 16, 32, "exact"),        # several pass-1 chunks to merge
    (2, 1, 3, 8, 37, 64, 16, None, "exact"),        # G=3 (padded to 4), small w (padded to 16), B=2
    (1, 1, 4, 16, 45, 64, 32, None, "exact"),
    (1, 1, 7, 5, 29, 128, 16, 16, "exact"),         # G=7 (padded to 8), w=5, D=128
    (1, 2, 3, 32, 41, 128, None, None, "sum"),
    (1, 1, 7, 8, 33, 64, 16, None, "sum"),
]


@pytest.mark.parametrize("B,H_kv,G,w,n,D,block_n,kpp,group", CASES)
def test_triton_matches_pytorch(B, H_kv, G, w, n, D, block_n, kpp, group):
    q, k, v, o = make_layer(seed=B * 1000 + G * 100 + n, B=B, H_kv=H_kv, G=G, w=w, n=n, D=D)
    got = kernels.laprox_scores_triton(q, k, v, o, group=group, block_n=block_n, keys_per_program=kpp)
    assert_rel_close(got, laprox.laprox_scores(q, k, v, o, group=group))


def test_bfloat16_inputs():
    q, k, v, o = make_layer(seed=5, H_kv=1, G=2, w=16, n=40, D=64, dtype=torch.bfloat16)
    got = kernels.laprox_scores_triton(q, k, v, o)
    assert_rel_close(got, laprox.laprox_scores(q, k, v, o))


def test_dispatch_and_scorer_use_the_kernel_when_asked():
    from types import SimpleNamespace
    q, k, v, o = make_layer(seed=6, H_kv=1, G=3, w=8, n=30, D=64)
    ref = laprox.laprox_scores(q, k, v, o)
    assert_rel_close(laprox.laprox_scores_auto(q, k, v, o, use_triton=True), ref)
    prefill = SimpleNamespace(queries=[q], keys=[k], values=[v], o_proj=[o],
                              resid_norm=torch.tensor([2.0]), out_norm=torch.tensor([1.0]))
    assert_rel_close(laprox.laprox_scorer(prefill, use_triton=True)[0], ref / 2.0)


def test_kernel_argument_checks():
    q, k, v, o = make_layer(seed=7, H_kv=1, G=2, w=8, n=20, D=64)
    with pytest.raises(NotImplementedError, match="center"):
        kernels.laprox_scores_triton(q, k, v, o, center=True)
    with pytest.raises(ValueError, match="group"):
        kernels.laprox_scores_triton(q, k, v, o, group="max")
    with pytest.raises(ValueError, match="block_n"):
        kernels.laprox_scores_triton(q, k, v, o, block_n=24)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        q2, k2, v2, o2 = make_layer(seed=8, H_kv=1, G=2, w=8, n=20, D=48)
        kernels.laprox_scores_triton(q2, k2, v2, o2)
    with pytest.raises(ValueError, match="multiple"):
        kernels.laprox_scores_triton(q[:, :1].repeat(1, 3, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1),
                                     o[:, :1].repeat(1, 3 * 64))
