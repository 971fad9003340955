"""Fused Triton kernel for the LaProx score (spec section 6).

Computes exactly what laprox.laprox_scores computes (group="exact" or "sum", center=False),
without ever materialising the (B, H, w, n) window attention. Read laprox.py first: the
step numbers (1)-(6) below refer to its docstring.

Two passes over the keys, both parallel over (key block, batch x KV head):

  pass 1  For every window row of every query head in the GQA group, stream over the key
          blocks of one chunk of keys with the online softmax (running max m, running sum
          l of exp(s - m)). Each program writes the (m, l) of its chunk; a tiny torch
          reduction merges the chunks into the log-sum-exp lse of every row.
          (Splitting the keys into chunks keeps the GPU busy when B x H_kv is small.)
  pass 2  Each program takes one block of BLOCK_N keys, recomputes the logits of all
          G x w window rows, p = exp(s - lse) (step (1), causal mask included), and
          forms in registers, per key j:
             gram_a[h, h', j] = a_{h,j} . a_{h',j}          (G x G, attention columns)
             gram_v[h, h', j] = v_j^T M_{hh'} v_j           (G x G, step (6))
          with M (H_kv, G, G, D, D) precomputed in torch (laprox.value_gram_matrices).
          Score: sqrt(sum gram_a * gram_v) (exact) or sum_h sqrt(gram_a[hh] gram_v[hh]) (sum).

Tiles. The G query heads of a group and the w window rows are stacked into
ROWS = G_PAD x W_PAD rows (row r = head r // W_PAD, window row r % W_PAD), padded to powers
of two (W_PAD >= 16 for tl.dot) and masked, so any G (1, 2, 3, 4, 7, ...) and any small w
work. D must be a power of two (64 and 128 in practice). n needs no padding: the last
key block is masked.

The loops over heads and head pairs inside pass 2 are runtime loops, not unrolled, so
compilation takes seconds for any G. Block sizes and warps come from launch_config.

Precision: float32 throughout (inputs of any float dtype are upcast when loaded);
tl.dot uses input_precision="ieee" by default so the result matches the PyTorch path to
about 1e-6 relative; "tf32" is faster on GPUs if that accuracy is not needed.

Running on a CPU: set TRITON_INTERPRET=1 in the environment *before* triton is imported
(i.e. before importing this module); the kernel then runs in Triton's interpreter (slow,
for tests). Without it, CPU tensors are refused with a clear error.
"""

from __future__ import annotations

import math
import os

import torch

from laprox import _check_group, check_qkv, value_gram_matrices

try:
    import triton
    import triton.language as tl
except ImportError as _err:  # triton is optional: the PyTorch path in laprox.py needs none
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = _err

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available():
    """True if triton imported; the kernel then runs on CUDA tensors (or any, when INTERPRET)."""
    return triton is not None


def kernel_fits(head_dim: int) -> bool:
    """The kernel tiles the head dim: it must be a power of two >= 16 (64 and 128 in practice)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:

    @triton.jit
    def _load_group_queries(Q, bg, w, G: tl.constexpr, D: tl.constexpr,
                            G_PAD: tl.constexpr, W_PAD: tl.constexpr):
        """Queries of the G heads of KV group bg, stacked: (G_PAD * W_PAD, D) float32."""
        r = tl.arange(0, G_PAD * W_PAD)
        a = r // W_PAD                                   # head within the group
        t = r % W_PAD                                    # window row
        ok = (a < G) & (t < w)
        dd = tl.arange(0, D)
        head = bg.to(tl.int64) * G + a                   # (b*H_kv + g)*G + a = b*H + h
        ptr = Q + (head * w + t)[:, None] * D + dd[None, :]
        return tl.load(ptr, mask=ok[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _laprox_pass1(Q, K, Mpart, Lpart, n, w, n_chunks, blocks_per_prog, scale,
                      G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """Online-softmax (max, sum) of every window row over one chunk of keys."""
        chunk = tl.program_id(0)
        bg = tl.program_id(1)                            # b * H_kv + g
        ROWS: tl.constexpr = G_PAD * W_PAD
        r = tl.arange(0, ROWS)
        last = n - w + (r % W_PAD)                       # last key each row may see (causal)
        q = _load_group_queries(Q, bg, w, G, D, G_PAD, W_PAD)
        dd = tl.arange(0, D)
        jj = tl.arange(0, BLOCK_N)
        k_base = K + bg.to(tl.int64) * n * D
        m_i = tl.full([ROWS], -1.0e30, tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        for i in range(blocks_per_prog):
            j = (chunk * blocks_per_prog + i) * BLOCK_N + jj
            k = tl.load(k_base + j[:, None] * D + dd[None, :], mask=(j < n)[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scale
            vis = (j[None, :] <= last[:, None]) & (j < n)[None, :]
            s = tl.where(vis, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.where(vis, tl.exp(s - m_new[:, None]), 0.0)
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, axis=1)
            m_i = m_new
        out = (bg.to(tl.int64) * ROWS + r) * n_chunks + chunk
        tl.store(Mpart + out, m_i)
        tl.store(Lpart + out, l_i)

    @triton.jit
    def _quad_form(v, V_base, M_pair, j, key_ok, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
        """v_j^T M v_j for the BLOCK_N keys of the block: (BLOCK_N,). M taken BLOCK_E columns at a time."""
        dd = tl.arange(0, D)
        ee = tl.arange(0, BLOCK_E)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for e0 in range(0, D, BLOCK_E):
            m = tl.load(M_pair + dd[:, None] * D + (e0 + ee)[None, :])                 # (D, BLOCK_E)
            vm = tl.dot(v, m, input_precision=PRECISION)                               # (BLOCK_N, BLOCK_E)
            v_e = tl.load(V_base + j[:, None] * D + (e0 + ee)[None, :], mask=key_ok[:, None], other=0.0)
            acc += tl.sum(vm * v_e.to(tl.float32), axis=1)
        return acc

    @triton.jit
    def _laprox_pass2(Q, K, V, Mg, LSE, Out, n, w, H_kv, scale,
                      G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_SUM: tl.constexpr,
                      PRECISION: tl.constexpr):
        """Scores of one block of BLOCK_N keys of one (batch, KV head)."""
        blk = tl.program_id(0)
        bg = tl.program_id(1)                            # b * H_kv + g
        g = bg % H_kv
        ROWS: tl.constexpr = G_PAD * W_PAD
        r = tl.arange(0, ROWS)
        row_ok = ((r // W_PAD) < G) & ((r % W_PAD) < w)
        last = n - w + (r % W_PAD)
        dd = tl.arange(0, D)
        j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = j < n

        # step (1): probabilities of all G*w window rows on this key block
        q = _load_group_queries(Q, bg, w, G, D, G_PAD, W_PAD)
        lse = tl.load(LSE + bg.to(tl.int64) * ROWS + r)
        kv_off = bg.to(tl.int64) * n * D
        k = tl.load(K + kv_off + j[:, None] * D + dd[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scale
        vis = row_ok[:, None] & (j[None, :] <= last[:, None]) & key_ok[None, :]
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)                 # (ROWS, BLOCK_N)
        P3 = tl.reshape(p, (G_PAD, W_PAD, BLOCK_N))                      # [head, row, key]

        ga = tl.arange(0, G_PAD)
        sel_a = ga[:, None, None]                                        # first G index
        sel_c = ga[None, :, None]                                        # second G index

        # step (5), first factor: gram_a[h, h', j] = a_{h,j} . a_{h',j}
        gram_a = tl.zeros((G_PAD, G_PAD, BLOCK_N), tl.float32)
        for x in range(G):
            p_x = tl.sum(tl.where(sel_a == x, P3, 0.0), axis=0)         # (W_PAD, BLOCK_N) head x
            row = tl.sum(P3 * p_x[None, :, :], axis=1)                   # (G_PAD, BLOCK_N)
            gram_a = tl.where(sel_a == x, row[None, :, :], gram_a)

        # step (6): gram_v[h, h', j] = v_j^T M_{hh'} v_j, symmetric
        v = tl.load(V + kv_off + j[:, None] * D + dd[None, :], mask=key_ok[:, None], other=0.0).to(tl.float32)
        gram_v = tl.zeros((G_PAD, G_PAD, BLOCK_N), tl.float32)
        M_g = Mg + g.to(tl.int64) * (G * G * D * D)
        for x in range(G):
            # group="sum" needs the diagonal only; "exact" the pairs x <= y (mirrored)
            for y in range(x, x + 1 if GROUP_SUM else G):
                qf = _quad_form(v, V + kv_off, M_g + (x * G + y) * D * D, j, key_ok,
                                D, BLOCK_N, BLOCK_E, PRECISION)
                pair = ((sel_a == x) & (sel_c == y)) | ((sel_a == y) & (sel_c == x))
                gram_v = tl.where(pair, qf[None, None, :], gram_v)

        # steps (4)-(5): combine the two Grams
        if GROUP_SUM:
            diag = sel_a == sel_c
            term = tl.where(diag, tl.sqrt(tl.maximum(gram_a * gram_v, 0.0)), 0.0)
            score = tl.sum(tl.sum(term, axis=0), axis=0)
        else:
            score = tl.sqrt(tl.maximum(tl.sum(tl.sum(gram_a * gram_v, axis=0), axis=0), 0.0))
        tl.store(Out + bg.to(tl.int64) * n + j, score, mask=key_ok)


def _next_pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


def launch_config(G_PAD, W_PAD):
    """(BLOCK_N of pass 1, BLOCK_N of pass 2, num_warps) for a tile of G_PAD x W_PAD rows.

    Chosen from ptxas resource usage for sm_90 (D = 128, float32 dots): these settings
    compile without register spills for G_PAD = 1, 2, 4, 8 at W_PAD = 32; larger blocks or
    4 warps spill. Not tuned by timing (no GPU was available when this was written).
    """
    rows = G_PAD * W_PAD
    block_n1 = 32 if rows <= 128 else 16
    block_n2 = 32 if rows == 64 else 16
    return block_n1, block_n2, 8


def _require_triton(tensor):
    if triton is None:
        raise ImportError(
            f"kernels.laprox_scores_triton needs triton ({_TRITON_IMPORT_ERROR}); install triton, "
            f"or use the PyTorch path laprox.laprox_scores") from _TRITON_IMPORT_ERROR
    if not tensor.is_cuda and not INTERPRET:
        raise RuntimeError(
            "the Triton kernel needs CUDA tensors; to run it on a CPU set TRITON_INTERPRET=1 in the "
            "environment before triton is imported (slow, for tests), or use laprox.laprox_scores")


def laprox_scores_triton(queries, keys, values, o_proj_weight, *, group="exact", center=False,
                         block_n=None, keys_per_program=None, precision="ieee"):
    """LaProx scores of one layer with the fused kernel; same result as laprox.laprox_scores.

    queries: (B, H, w, D) post-RoPE window queries; keys, values: (B, H_kv, n, D);
    o_proj_weight: (d, H*D). group in {"exact", "sum"}. Returns (B, H_kv, n) float32.
    center=True is not implemented in the kernel (use laprox.laprox_scores).
    block_n: keys per block in both passes (power of two >= 16; default: launch_config).
    keys_per_program: keys one pass-1 program streams over (default: enough programs to
    fill the GPU). precision: tl.dot input precision, "ieee" (default) or "tf32".
    """
    if center:
        raise NotImplementedError("center=True is not implemented in the Triton kernel; "
                                  "use laprox.laprox_scores(..., center=True)")
    _check_group(group)
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    _require_triton(keys)
    B, H, H_kv, G, w, n, D = check_qkv(queries, keys, values, o_proj_weight)
    if not kernel_fits(D):
        raise ValueError(f"the kernel needs a power-of-two head dim >= 16 (64 and 128 are typical), got D={D}")
    for name, t in (("queries", queries), ("keys", keys), ("values", values)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != keys.device:
            raise ValueError(f"{name} is on {t.device} but keys are on {keys.device}")

    G_PAD, W_PAD = _next_pow2(G), max(16, _next_pow2(w))
    BLOCK_N1, BLOCK_N2, num_warps = launch_config(G_PAD, W_PAD)
    if block_n is not None:
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
        BLOCK_N1 = BLOCK_N2 = block_n
    ROWS = G_PAD * W_PAD
    BLOCK_E = min(D, 64)

    q, k, v = queries.contiguous(), keys.contiguous(), values.contiguous()
    M = value_gram_matrices(o_proj_weight.to(keys.device), H, D, H_kv).contiguous()  # (H_kv, G, G, D, D)
    scale = 1.0 / math.sqrt(D)

    # pass 1: per-chunk (max, sum), then merge the chunks into lse (B*H_kv, ROWS)
    n_blocks1 = triton.cdiv(n, BLOCK_N1)
    if keys_per_program is None:
        target = 4 * (torch.cuda.get_device_properties(k.device).multi_processor_count if k.is_cuda else 1)
        blocks_per_prog = max(1, triton.cdiv(n_blocks1 * B * H_kv, target))
    else:
        blocks_per_prog = max(1, triton.cdiv(int(keys_per_program), BLOCK_N1))
    n_chunks = triton.cdiv(n_blocks1, blocks_per_prog)
    Mpart = torch.empty(B * H_kv, ROWS, n_chunks, device=k.device, dtype=torch.float32)
    Lpart = torch.empty_like(Mpart)
    _laprox_pass1[(n_chunks, B * H_kv)](
        q, k, Mpart, Lpart, n, w, n_chunks, blocks_per_prog, scale,
        G=G, D=D, G_PAD=G_PAD, W_PAD=W_PAD, BLOCK_N=BLOCK_N1, PRECISION=precision, num_warps=num_warps)
    m = Mpart.amax(dim=-1, keepdim=True)
    lse = (m.squeeze(-1) + torch.log((Lpart * torch.exp(Mpart - m)).sum(-1))).contiguous()

    # pass 2: scores block by block
    out = torch.empty(B * H_kv, n, device=k.device, dtype=torch.float32)
    _laprox_pass2[(triton.cdiv(n, BLOCK_N2), B * H_kv)](
        q, k, v, M, lse, out, n, w, H_kv, scale,
        G=G, D=D, G_PAD=G_PAD, W_PAD=W_PAD, BLOCK_N=BLOCK_N2, BLOCK_E=BLOCK_E,
        GROUP_SUM=(group == "sum"), PRECISION=precision, num_warps=num_warps)
    return out.view(B, H_kv, n)
