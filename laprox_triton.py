"""Triton kernels for the LaProx score (docs/derivation.md, steps (1)-(6)).

Optimisation 3 of laprox.py: what laprox.reference_scores computes (group="exact" or "sum",
center=False), within float32 rounding (tests/test_kernels.py holds them to 1e-4 of it in float64),
without ever materialising the (B, H, w, n) window attention. Read laprox.py first: the step
numbers (1)-(6) below refer to docs/derivation.md. This module imports nothing of the project: the
caller passes the value Gram matrices M (laprox.value_gram_pairs, computed once per weight and kept
on it). laprox.laprox_scores_auto dispatches here on CUDA. The offline compile check of these
kernels for GPUs that are not here is the lab's: python -m lab.bench_kernels --compile-check.

Three kernels per layer, each parallel over (block of keys, batch x KV head):

  _softmax_stats          step (1). Online softmax over one chunk of keys: running max and sum of
                          exp for every window row of every query head of the group. A tiny torch
                          reduction merges the chunks into the log-sum-exp (lse) of each row.
  _value_quadratic_forms  step (6). q_p(j) = v_j^T M_p v_j for every key j and head pair p: one
                          GEMM per KV head, V_g (n x D) @ [M_p for all pairs] (D x P*D), computed
                          BLOCK_N keys x BLOCK_E columns at a time, with the row-wise dot against
                          v_j fused into the epilogue. Writes (B*H_kv, pairs, n) float32.
  _attention_gram_scores  steps (1), (5), (4). For one block of keys, recomputes the probabilities
                          p = exp(s - lse) of the window rows, one tile of rows at a time,
                          accumulates the G x G Gram of attention columns, multiplies it with the
                          value Gram from the previous kernel and writes the score.

Layout of M. M is (H_kv, P, D, D) float32 with P = G(G+1)/2: the head pairs a <= b of a group in
row-major order (0,0), (0,1), .., (0,G-1), (1,1), .., (G-1,G-1), so pair (a, b) sits at
p = a*G - a*(a-1)/2 + (b - a). M[g, p] = W_h^T W_h' for h = g*G + a, h' = g*G + b.

Tiles. A tile of window rows holds BLOCK_T window rows of all G query heads of the group,
interleaved (tile row r is window row t0 + r // G_PAD of head r % G_PAD), so that the G x G Gram
of every key can be formed inside the tile. G is padded to a power of two G_PAD <= 16 and the
head dim D to a power of two D_PAD >= 16; padded rows, columns, window rows past w and keys past
n are masked, so any G, w, n and D work. Block sizes are planned from the shared memory the
device lets one block use (plan_launch), at run time.

Precision. The score must agree with the float64 reference to 1e-4 relative, which plain TF32
(10-bit mantissa) does not. bfloat16 / float16 inputs go to the tensor cores as they are: the
products of two 16-bit numbers are exact in float32 and accumulate in float32. For the quadratic
forms, M (float32) is split into three bfloat16 pieces, M = M0 + M1 + M2 to about 2^-24, and
v^T M v is accumulated from three bfloat16 GEMMs, smallest piece first (bfloat16 inputs; float16
values are not bfloat16-exact, so they take the float32 route). float32 inputs use Triton's
3xTF32 (input_precision="tf32x3": each operand split into a TF32 high and low part, three TF32
products), which is float32-accurate. The softmax and all reductions run in float32.

A fourth kernel, at the end of the file, is not LaProx's: _varlen_decode, attention of one new token
over a packed cache.KVCache layer whose heads hold different numbers of entries (model.Attention.attend
dispatches there on CUDA).

Running on a CPU: set TRITON_INTERPRET=1 in the environment *before* triton is imported (i.e.
before importing this module); the kernels then run in Triton's interpreter (slow, for tests).
Without it, CPU tensors are refused with a clear error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError as _err:  # triton is optional: the PyTorch path in laprox.py needs none
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = _err

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_GROUP = 16          # query heads per KV head the kernels hold in one tile (G_PAD <= 16)
M_PIECES = 3            # bfloat16 pieces of M for bfloat16 inputs
SMEM_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}   # opt-in shared memory per block (bytes)


class KernelDoesNotFit(RuntimeError):
    """No tiling of the kernels fits this device or shape; the message says why."""


def triton_available() -> bool:
    """True if triton imported; the kernels then run on CUDA tensors (or any, under INTERPRET)."""
    return triton is not None


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ------------------------------------------------------------------------------ planning

@dataclass(frozen=True)
class Config:
    """Launch parameters of one kernel. block_t: window rows per tile (0 where unused); block_n:
    keys per program block; block_e: columns of M per GEMM tile (0 where unused); smem: the
    estimated shared memory in bytes (checked against Triton's compiler by
    `python -m lab.bench_kernels --compile-check`)."""
    block_t: int
    block_n: int
    block_e: int
    num_warps: int
    num_stages: int
    smem: int


@dataclass(frozen=True)
class Plan:
    """The three kernels' configs for one shape on one device; each tuple is best-first, every
    entry fits the device by estimate (the launch falls back to the next one if it does not)."""
    stats: tuple[Config, ...]
    quad: tuple[Config, ...]
    gram: tuple[Config, ...]


# Candidate block sizes, best first by expectation (not tuned on a GPU yet: bench_kernels.py
# --gpu-check times every candidate that fits); plan_launch keeps those that fit the device.
STATS_CANDIDATES = ((64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1))
GRAM_CANDIDATES = ((32, 64, 4), (32, 32, 4), (16, 32, 4), (16, 16, 4))           # (rows, block_n, warps)
QUAD_CANDIDATES = ((128, 0, 8, 2), (256, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2),
                   (64, 32, 4, 2), (128, 0, 8, 1), (64, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1))  # block_e 0: all of D
GRAM_REGISTER_PRODUCT = 16384   # most numbers the gram kernel's (BLOCK_T, G_PAD, G_PAD, BLOCK_N) product may hold
SMEM_SLACK = 1024               # bytes of shared memory the estimates keep in reserve (barriers, reductions)


def _logits_smem(rows, block_n, d_pad, dtype, num_stages):
    """Estimated shared memory of a (rows x D) @ (D x block_n) logits tile: the query tile, the key
    block once per pipeline stage, a (rows x block_n) float32 scratch for layout changes. float32
    inputs go through 3xTF32, which keeps a high and a low part of each operand."""
    tf32x3 = dtype == torch.float32
    item = 4 if tf32x3 else 2
    return (item * d_pad * (rows * (1 + tf32x3) + block_n * (max(1, num_stages) + tf32x3))
            + 4 * rows * block_n + SMEM_SLACK)


def _quad_smem(block_n, block_e, d_pad, dtype, num_stages):
    """Estimated shared memory of the quadratic-form GEMM (calibrated on Triton 3.9's allocation).
    bfloat16: the V block, and per pipeline stage the three M pieces' tiles plus the V columns of
    the epilogue when they are reloaded (without pipelining: one M tile and the epilogue's columns).
    float32 / float16 (3xTF32 on float32 V and M): high and low parts of the V block, and one M
    tile per stage plus one for its split."""
    if dtype == torch.bfloat16:
        v_block, m_tile, v_cols = block_n * d_pad * 2, d_pad * block_e * 2, block_n * block_e * 2
        if num_stages <= 1:
            return v_block + m_tile + v_cols + SMEM_SLACK
        return v_block + num_stages * (M_PIECES * m_tile + (v_cols if block_e < d_pad else 0)) + SMEM_SLACK
    return 2 * block_n * d_pad * 4 + (max(1, num_stages) + 1) * d_pad * block_e * 4 + SMEM_SLACK


def plan_launch(G: int, w: int, D: int, dtype: torch.dtype, group: str, smem_limit: int):
    """Block sizes for the three kernels from the shared memory one block may use on the device.

    G: query heads per KV head; w: window rows; D: head dim; dtype: the inputs' (bfloat16, float16
    or float32); group: "exact" or "sum"; smem_limit: bytes
    (device_smem_limit, or SMEM_LIMITS[capability] offline). Window rows are tiled BLOCK_T at a
    time with all G heads of the group in the tile (BLOCK_T * G_PAD >= 16 rows for tl.dot), keys
    BLOCK_N at a time; among the candidates above, those whose estimated shared memory fits are
    kept, best first. Returns (Plan, None), or (None, reason) when some kernel has none left.
    """
    if G > MAX_GROUP:
        return None, (f"a GQA group of G={G} query heads per KV head is more than the kernels hold in "
                      f"one tile ({MAX_GROUP})")
    g_pad, d_pad = _next_pow2(G), max(16, _next_pow2(D))

    def block_t(rows):
        return max(16 // g_pad, min(_next_pow2(w), max(1, rows // g_pad)))

    # 3xTF32 holds high and low parts of float32 operands: twice the warps keep the logits
    # kernels from spilling registers (measured with --compile-check)
    more_warps = 2 if dtype == torch.float32 else 1
    stats, gram, quad = [], [], []
    for rows, block_n, warps, stages in STATS_CANDIDATES:
        bt = block_t(rows)
        smem = _logits_smem(bt * g_pad, block_n, d_pad, dtype, stages)
        if smem <= smem_limit:
            stats.append(Config(bt, block_n, 0, warps * more_warps, stages, smem))
    for rows, block_n, warps in GRAM_CANDIDATES:
        bt = block_t(rows)
        product = bt * g_pad * (g_pad if group == "exact" else 1) * block_n
        smem = _logits_smem(bt * g_pad, block_n, d_pad, dtype, 1) + 4 * g_pad * g_pad * block_n
        if smem <= smem_limit and (product <= GRAM_REGISTER_PRODUCT or block_n == 16):
            gram.append(Config(bt, block_n, 0, warps * more_warps, 1, smem))
    for block_n, block_e, warps, stages in QUAD_CANDIDATES:
        block_e = min(block_e or d_pad, d_pad)
        smem = _quad_smem(block_n, block_e, d_pad, dtype, stages)
        if smem <= smem_limit:
            quad.append(Config(0, block_n, block_e, warps, stages, smem))
    if not (stats and gram and quad):
        return None, (f"no tiling for G={G}, D={D}, {dtype} inputs fits in {smem_limit} bytes of "
                      f"shared memory per block")
    return Plan(tuple(dict.fromkeys(stats)), tuple(dict.fromkeys(quad)), tuple(dict.fromkeys(gram))), None


def device_smem_limit(device) -> int:
    """Shared memory (bytes) one block may use on `device` (the opt-in maximum), read at run time;
    in the interpreter (a CPU) the sm_80 figure, which the tests plan against."""
    device = torch.device(device)
    if device.type != "cuda":
        return SMEM_LIMITS[80]
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if not limit:  # older torch: ask Triton's driver, which checks launches against the same number
        limit = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    return int(limit)


# ------------------------------------------------------------------------------ the kernels

if triton is not None:

    @triton.jit
    def _load_row_tile(Q, q_off, sq_h, sq_t, t0, G, w, D: tl.constexpr, D_PAD: tl.constexpr,
                       G_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
        """Queries of window rows t0 .. t0+BLOCK_T-1 of the G heads of one group, interleaved:
        tile row r is window row t0 + r // G_PAD of head r % G_PAD. Returns (q, t, a, row_ok)."""
        r = tl.arange(0, BLOCK_T * G_PAD)
        t = t0 + r // G_PAD
        a = r % G_PAD
        row_ok = (t < w) & (a < G)
        dd = tl.arange(0, D_PAD)
        ptr = Q + q_off + a.to(tl.int64)[:, None] * sq_h + t[:, None] * sq_t + dd[None, :]
        q = tl.load(ptr, mask=row_ok[:, None] & (dd < D)[None, :], other=0.0)
        return q, t, a, row_ok

    @triton.jit
    def _softmax_stats(Q, K, Mpart, Lpart, sq_b, sq_h, sq_t, sk_b, sk_h, sk_n,
                       H_kv, G, n, w, n_chunks, blocks_per_chunk, scale,
                       D: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """Running (max, sum of exp) of one tile of window rows over one chunk of keys, step (1)."""
        chunk = tl.program_id(0)
        t0 = tl.program_id(1) * BLOCK_T
        bg = tl.program_id(2)                                    # b * H_kv + g
        b = bg // H_kv
        g = bg % H_kv
        q, t, a, row_ok = _load_row_tile(Q, b.to(tl.int64) * sq_b + (g * G).to(tl.int64) * sq_h,
                                         sq_h, sq_t, t0, G, w, D, D_PAD, G_PAD, BLOCK_T)
        if UPCAST:
            q = q.to(tl.float32)
        last = n - w + t                                         # causal: the last key row t sees
        dd = tl.arange(0, D_PAD)
        k_base = K + b.to(tl.int64) * sk_b + g.to(tl.int64) * sk_h
        m_i = tl.full([BLOCK_T * G_PAD], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
        for i in range(blocks_per_chunk):
            j = (chunk * blocks_per_chunk + i) * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + j.to(tl.int64)[:, None] * sk_n + dd[None, :],
                        mask=(j < n)[:, None] & (dd < D)[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            vis = (j[None, :] <= last[:, None]) & (j < n)[None, :]
            s = tl.where(vis, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.where(vis, tl.exp(s - m_new[:, None]), 0.0)
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, axis=1)
            m_i = m_new
        out = ((bg.to(tl.int64) * G + a) * w + t) * n_chunks + chunk   # row (b, h, t) of (B, H, w)
        tl.store(Mpart + out, m_i, mask=row_ok)
        tl.store(Lpart + out, l_i, mask=row_ok)

    @triton.jit
    def _value_quadratic_forms(V, Mw, QV, sv_b, sv_h, sv_n, H_kv, G, n, n_pairs, m_pairs, piece_stride,
                               D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_E: tl.constexpr, PIECES: tl.constexpr, DIAGONAL: tl.constexpr,
                               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """v_j^T M_p v_j for BLOCK_N keys of one (batch, KV head), step (6): (BLOCK_N x D) @ (D x D)
        per pair and piece, BLOCK_E columns at a time, the dot against v_j fused in the epilogue.

        Mw: (PIECES, H_kv, m_pairs, D, D), piece_stride elements apart; PIECES = 1: float32 M,
        PIECES > 1: bfloat16 pieces of M, largest first. DIAGONAL: only the pairs (a, a) (group
        "sum"), n_pairs = G of them; else all n_pairs = m_pairs. QV: (B*H_kv, n_pairs, n).
        """
        blk = tl.program_id(0)
        bg = tl.program_id(1)
        b = bg // H_kv
        g = bg % H_kv
        j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = j < n
        dd = tl.arange(0, D_PAD)
        ee = tl.arange(0, BLOCK_E)
        v_rows = V + b.to(tl.int64) * sv_b + g.to(tl.int64) * sv_h + j.to(tl.int64)[:, None] * sv_n
        v = tl.load(v_rows + dd[None, :], mask=key_ok[:, None] & (dd < D)[None, :], other=0.0)
        if PIECES == 1 or UPCAST:
            v = v.to(tl.float32)
        N_E: tl.constexpr = D_PAD // BLOCK_E
        qf = tl.zeros([BLOCK_N], tl.float32)
        # one flat loop over (pair, column block), so that the M tiles of the next step are
        # prefetched (software pipelining) while this one multiplies
        for it in range(n_pairs * N_E):
            i = it // N_E
            e = (it % N_E) * BLOCK_E + ee
            p = i * G - i * (i - 1) // 2 if DIAGONAL else i                    # pair (i, i), or pair i
            m_ptr = Mw + (g.to(tl.int64) * m_pairs + p) * D * D + dd[:, None] * D + e[None, :]
            m_ok = (dd < D)[:, None] & (e < D)[None, :]
            vm = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
            for s in tl.static_range(PIECES):                                 # smallest piece first
                m = tl.load(m_ptr + (PIECES - 1 - s) * piece_stride, mask=m_ok, other=0.0)
                if UPCAST:
                    m = m.to(tl.float32)
                vm = tl.dot(v, m, vm, input_precision=PRECISION)              # v_j^T M_p, columns e
            if BLOCK_E == D_PAD:    # the whole row at once: v itself, no second load
                v_e = v
            else:
                v_e = tl.load(v_rows + e[None, :], mask=key_ok[:, None] & (e < D)[None, :], other=0.0)
            qf += tl.sum(vm * v_e.to(tl.float32), axis=1)
            last = (it % N_E) == N_E - 1                                      # pair i complete
            tl.store(QV + (bg.to(tl.int64) * n_pairs + i) * n + j, qf, mask=key_ok & last)
            qf = tl.where(last, 0.0, qf)

    @triton.jit
    def _attention_gram_scores(Q, K, LSE, QV, Out, sq_b, sq_h, sq_t, sk_b, sk_h, sk_n,
                               H_kv, G, n, w, n_pairs, scale,
                               D: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SUM: tl.constexpr,
                               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """Scores of BLOCK_N keys of one (batch, KV head): attention-column Gram x value Gram, steps (5), (4)."""
        blk = tl.program_id(0)
        bg = tl.program_id(1)
        b = bg // H_kv
        g = bg % H_kv
        j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = j < n
        dd = tl.arange(0, D_PAD)
        k_ptr = K + b.to(tl.int64) * sk_b + g.to(tl.int64) * sk_h + j.to(tl.int64)[:, None] * sk_n + dd[None, :]
        k = tl.load(k_ptr, mask=key_ok[:, None] & (dd < D)[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        q_off = b.to(tl.int64) * sq_b + (g * G).to(tl.int64) * sq_h
        ga = tl.arange(0, G_PAD)
        qv_base = QV + bg.to(tl.int64) * n_pairs * n
        if GROUP_SUM:   # only the diagonal: gram_v[a, j] = v_j^T M_aa v_j, stored as pair a
            gram_v = tl.load(qv_base + ga[:, None] * n + j[None, :],
                             mask=(ga < G)[:, None] & key_ok[None, :], other=0.0)
            gram_a = tl.zeros([G_PAD, BLOCK_N], tl.float32)
        else:           # gram_v[a, c, j] from pair (min(a, c), max(a, c))
            a3 = ga[:, None, None]
            c3 = ga[None, :, None]
            lo = tl.minimum(a3, c3)
            hi = tl.maximum(a3, c3)
            pair = lo * G - lo * (lo - 1) // 2 + (hi - lo)
            gram_v = tl.load(qv_base + pair * n + j[None, None, :],
                             mask=(a3 < G) & (c3 < G) & key_ok[None, None, :], other=0.0)
            gram_a = tl.zeros([G_PAD, G_PAD, BLOCK_N], tl.float32)
        for t0 in range(0, w, BLOCK_T):
            q, t, a, row_ok = _load_row_tile(Q, q_off, sq_h, sq_t, t0, G, w, D, D_PAD, G_PAD, BLOCK_T)
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(LSE + (bg.to(tl.int64) * G + a) * w + t, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            vis = row_ok[:, None] & (j[None, :] <= (n - w + t)[:, None]) & key_ok[None, :]
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)                     # step (1)
            p3 = tl.reshape(p, (BLOCK_T, G_PAD, BLOCK_N))                        # [window row, head, key]
            if GROUP_SUM:
                gram_a += tl.sum(p3 * p3, axis=0)                                # ||a_{h,j}||^2
            else:
                gram_a += tl.sum(p3[:, :, None, :] * p3[:, None, :, :], axis=0)  # a_{h,j} . a_{h',j}
        if GROUP_SUM:
            score = tl.sum(tl.sqrt(tl.maximum(gram_a * gram_v, 0.0)), axis=0)
        else:
            score = tl.sqrt(tl.maximum(tl.sum(tl.sum(gram_a * gram_v, axis=0), axis=0), 0.0))
        tl.store(Out + bg.to(tl.int64) * n + j, score, mask=key_ok)


# ------------------------------------------------------------------------------ host side

def _require_triton(tensor):
    if triton is None:
        raise ImportError(
            f"laprox_triton.laprox_scores_triton needs triton ({_TRITON_IMPORT_ERROR}); install triton, "
            f"or use the PyTorch path laprox.laprox_scores") from _TRITON_IMPORT_ERROR
    if not tensor.is_cuda and not INTERPRET:
        raise RuntimeError(
            "the Triton kernels need CUDA tensors; to run them on a CPU set TRITON_INTERPRET=1 in the "
            "environment before triton is imported (slow, for tests), or use laprox.laprox_scores")


def _check_inputs(queries, keys, values, M, group):
    """Shapes and dtypes; returns (B, H, H_kv, G, w, n, D)."""
    if group not in ("exact", "sum"):
        raise ValueError(f"group must be 'exact' or 'sum', got {group!r}")
    if queries.dim() != 4 or keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"expected queries (B, H, w, D) and keys, values (B, H_kv, n, D) of one shape, got "
                         f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    B, H, w, D = queries.shape
    _, H_kv, n, _ = keys.shape
    if keys.shape[0] != B or keys.shape[3] != D or H_kv < 1 or H % H_kv:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} disagree: need the same "
                         f"batch and head dim, and H a multiple of H_kv")
    if not 1 <= w <= n:
        raise ValueError(f"window w={w} must satisfy 1 <= w <= n={n}")
    G = H // H_kv
    P = G * (G + 1) // 2
    if M.shape != (H_kv, P, D, D) or M.dtype != torch.float32:
        raise ValueError(f"M must be float32 (H_kv, G(G+1)/2, D, D) = {(H_kv, P, D, D)} as laprox.value_gram_pairs "
                         f"returns it, got {M.dtype} {tuple(M.shape)}")
    for name, t in (("queries", queries), ("keys", keys), ("values", values), ("M", M)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != keys.device:
            raise ValueError(f"{name} is on {t.device} but keys are on {keys.device}")
    return B, H, H_kv, G, w, n, D


def split_bfloat16(M: torch.Tensor, pieces: int = M_PIECES) -> torch.Tensor:
    """M (float32, any shape) as `pieces` bfloat16 tensors, largest first, whose sum is M to about
    2^-8 per piece: (pieces, *M.shape). Each piece is the bfloat16 rounding of what is left."""
    out, rest = [], M.float()
    for _ in range(pieces):
        piece = rest.to(torch.bfloat16)
        out.append(piece)
        rest = rest - piece.float()
    return torch.stack(out)


def _first_that_fits(name, configs, launch):
    """launch(cfg) with the first config the device accepts (OutOfResources moves on to the next);
    returns what launch returns."""
    errors = []
    for cfg in configs:
        try:
            return launch(cfg)
        except triton.runtime.errors.OutOfResources as err:
            errors.append(f"{cfg}: {err}")
    raise KernelDoesNotFit(f"{name} ran out of resources with every planned config: " + "; ".join(errors))


def laprox_scores_triton(queries, keys, values, M, *, group="sum", plan=None, keys_per_chunk=None):
    """LaProx scores of one layer with the Triton kernels; the same result as laprox.laprox_scores.

    queries: (B, H, w, D) post-RoPE window queries; keys, values: (B, H_kv, n, D), any strides
    with a contiguous last dim; M: (H_kv, P, D, D) float32 value Gram matrices in the pair layout
    of the module docstring (laprox.value_gram_pairs); group: "exact" or "sum".
    plan: a Plan (default: plan_launch for this device); keys_per_chunk: keys one _softmax_stats
    program streams over (default: enough programs to fill the GPU).
    Returns (B, H_kv, n) float32. Raises KernelDoesNotFit when no tiling fits the device.
    """
    B, H, H_kv, G, w, n, D = _check_inputs(queries, keys, values, M, group)
    _require_triton(keys)
    dtype = queries.dtype if queries.dtype == keys.dtype == values.dtype else torch.float32
    q, k, v = (t.to(dtype) if t.stride(-1) == 1 else t.to(dtype).contiguous() for t in (queries, keys, values))
    if plan is None:
        plan, why = plan_launch(G, w, D, dtype, group, device_smem_limit(k.device))
        if plan is None:
            raise KernelDoesNotFit(why)
    G_PAD, D_PAD = _next_pow2(G), max(16, _next_pow2(D))
    precision = "tf32x3" if dtype == torch.float32 else "tf32"   # 16-bit operands: exact products anyway
    # Triton's interpreter multiplies bfloat16 blocks as raw integers: there, 16-bit operands are
    # upcast to float32 before tl.dot (exact, so the tests still check the same numbers)
    upcast = INTERPRET and dtype != torch.float32
    scale = 1.0 / math.sqrt(D)
    dev = k.device
    BHkv = B * H_kv
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1

    def stats(cfg):      # 1. (max, sum) of every window row per chunk of keys
        n_blocks, row_tiles = triton.cdiv(n, cfg.block_n), triton.cdiv(w, cfg.block_t)
        if keys_per_chunk is None:
            per = max(1, triton.cdiv(n_blocks * row_tiles * BHkv, 4 * sms))
        else:
            per = max(1, triton.cdiv(int(keys_per_chunk), cfg.block_n))
        n_chunks = triton.cdiv(n_blocks, per)
        m_part = torch.empty(B * H * w, n_chunks, device=dev, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        _softmax_stats[(n_chunks, row_tiles, BHkv)](
            q, k, m_part, l_part, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            H_kv, G, n, w, n_chunks, per, scale, D=D, D_PAD=D_PAD, G_PAD=G_PAD, BLOCK_T=cfg.block_t,
            BLOCK_N=cfg.block_n, PRECISION=precision, UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return m_part, l_part

    m_part, l_part = _first_that_fits("_softmax_stats", plan.stats, stats)
    m_max = m_part.amax(dim=1, keepdim=True)
    lse = (m_max.squeeze(1) + torch.log((l_part * torch.exp(m_part - m_max)).sum(1))).contiguous()  # (B*H*w,)
    del m_part, l_part

    # 2. value quadratic forms, one GEMM over the head pairs ("sum" needs the diagonal pairs only)
    n_pairs = G if group == "sum" else G * (G + 1) // 2
    if dtype == torch.bfloat16:
        Mw, quad_precision = split_bfloat16(M), "tf32"
    else:                # float32, and float16 values (upcast in the kernel): 3xTF32 on float32 M
        Mw, quad_precision = M.contiguous().unsqueeze(0), "tf32x3"
    qv = torch.empty(BHkv, n_pairs, n, device=dev, dtype=torch.float32)

    def quad(cfg):
        _value_quadratic_forms[(triton.cdiv(n, cfg.block_n), BHkv)](
            v, Mw, qv, v.stride(0), v.stride(1), v.stride(2), H_kv, G, n, n_pairs, M.shape[1], Mw[0].numel(),
            D=D, D_PAD=D_PAD, BLOCK_N=cfg.block_n, BLOCK_E=cfg.block_e, PIECES=Mw.shape[0],
            DIAGONAL=group == "sum", PRECISION=quad_precision, UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    _first_that_fits("_value_quadratic_forms", plan.quad, quad)
    del Mw

    # 3. attention-column Gram per key, combined with the value Gram into the score
    out = torch.empty(BHkv, n, device=dev, dtype=torch.float32)

    def gram(cfg):
        _attention_gram_scores[(triton.cdiv(n, cfg.block_n), BHkv)](
            q, k, lse, qv, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            H_kv, G, n, w, n_pairs, scale, D=D, D_PAD=D_PAD, G_PAD=G_PAD, BLOCK_T=cfg.block_t,
            BLOCK_N=cfg.block_n, GROUP_SUM=group == "sum", PRECISION=precision, UPCAST=upcast,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    _first_that_fits("_attention_gram_scores", plan.gram, gram)
    return out.view(B, H_kv, n)


# ------------------------------------------------------------------------------ decoding over a packed cache

# Attention of one new token over one layer of a cache.KVCache as it is stored: head g's entries are
# rows starts[g] : starts[g] + lengths[g] of packed (C, D) buffers, a different count per head (what
# model-wide selection leaves). What model.Attention.attend computes on the CPU with a key mask over
# the whole buffer (cache.LayerEntries.attention_inputs), here reading each head's rows only.
# Split-K ("flash decoding"): program (g, s) reads entries s * chunk .. of head g once for all G
# query heads of its group (a G_PAD x BLOCK_N tile of scores), keeps an online softmax in float32
# and writes its partial (max, sum, output); a few torch ops merge the splits. 16-bit keys and
# values go to tl.dot as they are (exact products, float32 accumulation; the probabilities are
# rounded to that dtype for p @ v, as flash attention does).

DECODE_BLOCK_N = 64      # entries per inner step of a program


if triton is not None:

    @triton.jit
    def _varlen_decode(Q, K, V, Starts, Lengths, Acc, Mx, Sm, sq_h, sk_n, sv_n, G, chunk, n_splits, scale,
                       D: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """Partial attention of the G query heads of KV head g over entries split * chunk .. of g."""
        g = tl.program_id(0)
        split = tl.program_id(1)
        start = tl.load(Starts + g)
        n = tl.load(Lengths + g)
        a = tl.arange(0, G_PAD)
        dd = tl.arange(0, D_PAD)
        d_ok = dd < D
        q = tl.load(Q + (g * G + a).to(tl.int64)[:, None] * sq_h + dd[None, :],
                    mask=(a < G)[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([G_PAD], -1.0e30, tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n)
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            ok = j < hi
            rows = (start + j).to(tl.int64)
            k = tl.load(K + rows[:, None] * sk_n + dd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + rows[:, None] * sv_n + dd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale        # (G_PAD, BLOCK_N)
            s = tl.where(ok[None, :], s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        row = (g * n_splits + split).to(tl.int64) * G_PAD + a                    # (g, split, a)
        tl.store(Mx + row, m_i)
        tl.store(Sm + row, l_i)
        tl.store(Acc + row[:, None] * D_PAD + dd[None, :], acc)


def varlen_decode(q, keys, values, starts, lengths, longest: int, *, chunk: int | None = None,
                  block_n: int = DECODE_BLOCK_N):
    """Attention of one new token over a packed cache layer (see the section comment); the result of
    model.attention(q, *cache.LayerEntries.attention_inputs()) within float rounding.

    q: (1, H, 1, D); keys, values: (C, D), contiguous rows; starts, lengths: (H_kv,) int64 on their
    device, head g's entries are rows starts[g] : starts[g] + lengths[g] (lengths >= 1); longest:
    max(lengths), a host int (the grid; nothing is read back). chunk: entries one program reads
    (default: enough programs to fill the GPU), a multiple of block_n. Returns (1, H, 1, D) in q's dtype.
    """
    _require_triton(keys)
    H_kv, (_, H, T, D) = starts.shape[0], q.shape
    if q.shape[0] != 1 or T != 1 or keys.dim() != 2 or keys.shape != values.shape or keys.shape[1] != D or H % H_kv:
        raise ValueError(f"varlen_decode takes q (1, H, 1, D) and keys, values (C, D) with H a multiple of H_kv; got "
                         f"q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}, H_kv {H_kv}")
    if lengths.shape != starts.shape:
        raise ValueError(f"starts and lengths must both be (H_kv,), got {tuple(starts.shape)}, {tuple(lengths.shape)}")
    dtype = keys.dtype if q.dtype == keys.dtype == values.dtype else torch.float32
    q, k, v = (t.to(dtype) if t.stride(-1) == 1 else t.to(dtype).contiguous() for t in (q, keys, values))
    G = H // H_kv
    G_PAD, D_PAD = max(16, _next_pow2(G)), max(16, _next_pow2(D))   # tl.dot's smallest tile is 16
    if chunk is None:
        sms = torch.cuda.get_device_properties(k.device).multi_processor_count if k.is_cuda else 1
        per = triton.cdiv(longest, max(1, 4 * sms // H_kv))
        chunk = block_n * triton.cdiv(per, block_n)
    n_splits = triton.cdiv(longest, chunk)
    dev = k.device
    m = torch.empty(H_kv, n_splits, G_PAD, device=dev, dtype=torch.float32)
    s = torch.empty_like(m)
    acc = torch.empty(H_kv, n_splits, G_PAD, D_PAD, device=dev, dtype=torch.float32)
    _varlen_decode[(H_kv, n_splits)](
        q, k, v, starts, lengths, acc, m, s, q.stride(1), k.stride(0), v.stride(0), G, chunk, n_splits,
        1.0 / math.sqrt(D), D=D, D_PAD=D_PAD, G_PAD=G_PAD, BLOCK_N=block_n,
        PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=INTERPRET and dtype != torch.float32)
    weight = torch.exp(m - m.amax(1, keepdim=True))                         # splits past a head's end weigh 0
    out = (acc * weight[..., None]).sum(1) / (s * weight).sum(1)[..., None]   # (H_kv, G_PAD, D_PAD)
    return out[:, :G, :D].reshape(1, H, 1, D).to(q.dtype)
