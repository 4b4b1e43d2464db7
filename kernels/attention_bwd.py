"""Flash-attention backward kernels (FA2 scheme, no atomics, deterministic).

Three launches, because each output is then owned by exactly one program:
1. ``_delta_kernel``: delta_i = rowsum(dO_i * O_i) (fp32), the softmax-Jacobian term.
2. ``_dkdv_kernel``: one program per key tile; it loops over the query tiles and
   accumulates dK and dV in registers. Key tiles past kv_len write zeros.
3. ``_dq_kernel``: one program per query tile; it loops over the key tiles of its sample
   and accumulates dQ.

Probabilities are recomputed from the fp32 base-2 LSE saved by the forward, so the backward
needs no [L, L] buffer. Masked query rows (>= q_len) are loaded as zeros (q, dO, lse, delta),
which makes their contribution exactly zero without extra selects; masked key columns
(>= kv_len, only in the last key tile) are zeroed explicitly because their scores are finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import (
    batch_head_lengths,
    block_for_head_dim,
    configs,
    dot,
    dot_precision,
    load_rows,
    mma,
    next_pow2,
    prune_for_dtype,
    row_sum,
    store_rows,
    upcast_dot_operands,
)
from .attention_fwd import LOG2E

# Candidates that compile without register spills for head dim 128 on sm_90 (bf16).
# dK/dV keep two [BLOCK_N, D] fp32 accumulators live, hence the narrow query tiles.
_DKDV_CONFIGS = configs(
    gpu=[
        ({"BLOCK_M": 32, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 32, "BLOCK_N": 128}, 8, 4),
        ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 16, "BLOCK_N": 32}, 4, 2),  # fallback that fits fp32 / head dim 256
    ],
    interpret={"BLOCK_M": 32, "BLOCK_N": 32},
)
_DQ_CONFIGS = configs(
    gpu=[
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 4),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 2),  # fallback that fits fp32 / head dim 256
    ],
    interpret={"BLOCK_M": 32, "BLOCK_N": 32},
)
_DELTA_BLOCK_M = 64


@triton.jit
def _delta_kernel(
    O,
    DO,
    DELTA,
    so_b,
    so_h,
    so_l,
    sdo_b,
    sdo_h,
    sdo_l,
    H,
    L_Q,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(
        O + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :], offs_m, L_Q, offs_d, D, True, EVEN_D
    )
    do = load_rows(
        DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_d[None, :], offs_m, L_Q, offs_d, D, True, EVEN_D
    )
    delta = row_sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * L_Q + offs_m, delta, mask=offs_m < L_Q)


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptrs,
    delta_ptrs,
    queries,
    q_len,
    keys,
    kv_len,
    offs_d,
    D,
    qk_scale,
    MASK_M: tl.constexpr,
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Add one query tile's contribution to the dK, dV accumulators (all transposed math)."""
    q = load_rows(q_ptrs, queries, q_len, offs_d, D, MASK_M, EVEN_D)
    do = load_rows(do_ptrs, queries, q_len, offs_d, D, MASK_M, EVEN_D)
    if MASK_M:
        lse = tl.load(lse_ptrs, mask=queries < q_len, other=0.0)
        delta = tl.load(delta_ptrs, mask=queries < q_len, other=0.0)
    else:
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    s_t = dot(k, tl.trans(q), UPCAST, PREC)
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
    if MASK_N:
        p_t = tl.where((keys < kv_len)[:, None], p_t, 0.0)
    dv = mma(p_t.to(do.dtype), do, dv, UPCAST, PREC)
    dp_t = dot(v, tl.trans(do), UPCAST, PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = mma(ds_t.to(q.dtype), q, dk, UPCAST, PREC)
    return dk, dv


@triton.jit
def _dkdv_loop(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptrs,
    delta_ptrs,
    offs_m,
    q_len,
    m_end,
    keys,
    kv_len,
    offs_d,
    D,
    sq_l,
    sdo_l,
    qk_scale,
    BLOCK_M: tl.constexpr,
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Visit query tiles [0, m_end): full tiles unmasked, then the partial last one."""
    m_full = (m_end // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_tile(
            dk,
            dv,
            k,
            v,
            q_ptrs + start_m * sq_l,
            do_ptrs + start_m * sdo_l,
            lse_ptrs + start_m,
            delta_ptrs + start_m,
            start_m + offs_m,
            q_len,
            keys,
            kv_len,
            offs_d,
            D,
            qk_scale,
            False,
            MASK_N,
            EVEN_D,
            UPCAST,
            PREC,
        )
    if m_full < m_end:
        dk, dv = _dkdv_tile(
            dk,
            dv,
            k,
            v,
            q_ptrs + m_full * sq_l,
            do_ptrs + m_full * sdo_l,
            lse_ptrs + m_full,
            delta_ptrs + m_full,
            m_full + offs_m,
            q_len,
            keys,
            kv_len,
            offs_d,
            D,
            qk_scale,
            True,
            MASK_N,
            EVEN_D,
            UPCAST,
            PREC,
        )
    return dk, dv


@triton.autotune(
    configs=_DKDV_CONFIGS,
    key=["LQ_BUCKET", "LK_BUCKET", "BLOCK_D"],
    prune_configs_by={"early_config_prune": prune_for_dtype},
)
@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KV_LENS,
    Q_LENS,
    sq_b,
    sq_h,
    sq_l,
    sk_b,
    sk_h,
    sk_l,
    sv_b,
    sv_h,
    sv_l,
    sdo_b,
    sdo_h,
    sdo_l,
    sdk_b,
    sdk_h,
    sdk_l,
    sdv_b,
    sdv_h,
    sdv_l,
    H,
    L_Q,
    L_K,
    D,
    qk_scale,
    scale,
    LQ_BUCKET,
    LK_BUCKET,
    HAS_KV_LENS: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)  # rows of LSE / DELTA
    b, h, q_len, kv_len = batch_head_lengths(KV_LENS, Q_LENS, H, L_Q, L_K, HAS_KV_LENS, HAS_Q_LENS)

    keys = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(
        K + b * sk_b + h * sk_h + keys[:, None] * sk_l + offs_d[None, :], keys, kv_len, offs_d, D, True, EVEN_D
    )
    v = load_rows(
        V + b * sv_b + h * sv_h + keys[:, None] * sv_l + offs_d[None, :], keys, kv_len, offs_d, D, True, EVEN_D
    )
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :]
    do_ptrs = DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_d[None, :]
    lse_ptrs = LSE + bh.to(tl.int64) * L_Q + offs_m
    delta_ptrs = DELTA + bh.to(tl.int64) * L_Q + offs_m

    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    # Key tiles wholly past kv_len visit no query and write zero gradients.
    m_end = tl.where(start_n < kv_len, q_len, 0)
    if start_n + BLOCK_N <= kv_len:
        dk, dv = _dkdv_loop(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptrs,
            delta_ptrs,
            offs_m,
            q_len,
            m_end,
            keys,
            kv_len,
            offs_d,
            D,
            sq_l,
            sdo_l,
            qk_scale,
            BLOCK_M,
            False,
            EVEN_D,
            UPCAST,
            PREC,
        )
    else:
        dk, dv = _dkdv_loop(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptrs,
            delta_ptrs,
            offs_m,
            q_len,
            m_end,
            keys,
            kv_len,
            offs_d,
            D,
            sq_l,
            sdo_l,
            qk_scale,
            BLOCK_M,
            True,
            EVEN_D,
            UPCAST,
            PREC,
        )

    dk_ptrs = DK + b * sdk_b + h * sdk_h + keys[:, None] * sdk_l + offs_d[None, :]
    dv_ptrs = DV + b * sdv_b + h * sdv_h + keys[:, None] * sdv_l + offs_d[None, :]
    store_rows(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), keys, L_K, offs_d, D, EVEN_D)
    store_rows(dv_ptrs, dv.to(DV.dtype.element_ty), keys, L_K, offs_d, D, EVEN_D)


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
    k_ptrs,
    v_ptrs,
    keys,
    kv_len,
    offs_d,
    D,
    qk_scale,
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Add one key tile's contribution to the dQ accumulator."""
    k = load_rows(k_ptrs, keys, kv_len, offs_d, D, MASK_N, EVEN_D)
    v = load_rows(v_ptrs, keys, kv_len, offs_d, D, MASK_N, EVEN_D)
    s = dot(q, tl.trans(k), UPCAST, PREC)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where((keys < kv_len)[None, :], p, 0.0)
    dp = dot(do, tl.trans(v), UPCAST, PREC)
    ds = p * (dp - delta[:, None])
    return mma(ds.to(k.dtype), k, dq, UPCAST, PREC)


@triton.autotune(
    configs=_DQ_CONFIGS,
    key=["LQ_BUCKET", "LK_BUCKET", "BLOCK_D"],
    prune_configs_by={"early_config_prune": prune_for_dtype},
)
@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    KV_LENS,
    Q_LENS,
    sq_b,
    sq_h,
    sq_l,
    sk_b,
    sk_h,
    sk_l,
    sv_b,
    sv_h,
    sv_l,
    sdo_b,
    sdo_h,
    sdo_l,
    sdq_b,
    sdq_h,
    sdq_l,
    H,
    L_Q,
    L_K,
    D,
    qk_scale,
    scale,
    LQ_BUCKET,
    LK_BUCKET,
    HAS_KV_LENS: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)  # rows of LSE / DELTA
    b, h, q_len, kv_len = batch_head_lengths(KV_LENS, Q_LENS, H, L_Q, L_K, HAS_KV_LENS, HAS_Q_LENS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(
        Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :], offs_m, q_len, offs_d, D, True, EVEN_D
    )
    do = load_rows(
        DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_d[None, :], offs_m, q_len, offs_d, D, True, EVEN_D
    )
    lse = tl.load(LSE + bh.to(tl.int64) * L_Q + offs_m, mask=offs_m < q_len, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * L_Q + offs_m, mask=offs_m < q_len, other=0.0)
    k_ptrs = K + b * sk_b + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :]
    v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_l + offs_d[None, :]

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    n_end = tl.where(pid_m * BLOCK_M < q_len, kv_len, 0)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
            k_ptrs + start_n * sk_l,
            v_ptrs + start_n * sv_l,
            start_n + offs_n,
            kv_len,
            offs_d,
            D,
            qk_scale,
            False,
            EVEN_D,
            UPCAST,
            PREC,
        )
    if n_full < n_end:
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
            k_ptrs + n_full * sk_l,
            v_ptrs + n_full * sv_l,
            n_full + offs_n,
            kv_len,
            offs_d,
            D,
            qk_scale,
            True,
            EVEN_D,
            UPCAST,
            PREC,
        )

    dq_ptrs = DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_l + offs_d[None, :]
    store_rows(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), offs_m, L_Q, offs_d, D, EVEN_D)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_lens: torch.Tensor | None,
    q_lens: torch.Tensor | None,
    scale: float,
):
    """Gradients (dq, dk, dv) for ``attention_forward``, laid out like q, k, v where possible."""
    B, H, L_Q, D = q.shape
    L_K = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    BLOCK_D = block_for_head_dim(D)
    even_d = BLOCK_D == D

    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(L_Q, _DELTA_BLOCK_M), B * H)](
        out,
        do,
        delta,
        *_strides(out),
        *_strides(do),
        H,
        L_Q,
        D,
        BLOCK_M=_DELTA_BLOCK_M,
        BLOCK_D=BLOCK_D,
        EVEN_D=even_d,
    )

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv_arg = kv_lens if kv_lens is not None else q
    q_arg = q_lens if q_lens is not None else q
    in_strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    sizes = (H, L_Q, L_K, D, scale * LOG2E, scale, next_pow2(L_Q), next_pow2(L_K))
    flags = dict(
        HAS_KV_LENS=kv_lens is not None,
        HAS_Q_LENS=q_lens is not None,
        BLOCK_D=BLOCK_D,
        EVEN_D=even_d,
        UPCAST=upcast_dot_operands(q.dtype),
        PREC=dot_precision(q.dtype),
    )
    _dkdv_kernel[lambda meta: (triton.cdiv(L_K, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, kv_arg, q_arg, *in_strides, *_strides(dk), *_strides(dv), *sizes, **flags
    )
    _dq_kernel[lambda meta: (triton.cdiv(L_Q, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, kv_arg, q_arg, *in_strides, *_strides(dq), *sizes, **flags
    )
    return dq, dk, dv
