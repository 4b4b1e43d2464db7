"""Flash-attention forward kernel (non-causal, per-sample key and query lengths).

One program owns BLOCK_M query rows of one (batch, head) and streams the keys of that
sample in BLOCK_N tiles with an online softmax, so the [L, L] score matrix never exists.
Keys at positions >= kv_len[b] are excluded; only the last key tile needs a mask, so the
loop is split into unmasked full tiles and one masked tail tile.

Softmax runs in base 2 (``exp2``), with the scale folded into ``qk_scale = scale*log2(e)``.
The log-sum-exp is stored per query row in fp32, in that base-2 domain, for the backward.

Conventions every kernel in this package shares:
- rows with kv_len == 0 output zeros (and store lse = 0); they are never NaN;
- query rows >= q_len[b] output zeros and are ignored by the backward, which makes
  them constants of the function (zero gradient), consistent with the output.
"""

from __future__ import annotations

import math

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
    row_max,
    row_sum,
    store_rows,
    upcast_dot_operands,
)

LOG2E = math.log2(math.e)

_FWD_CONFIGS = configs(
    # Candidates that compile without register spills for head dim 128 on sm_90 (bf16).
    gpu=[
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 2),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2),  # fallback that fits fp32 / head dim 256
    ],
    interpret={"BLOCK_M": 32, "BLOCK_N": 32},
)


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
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
    """Fold one key/value tile into the running (acc, row max m_i, row sum l_i)."""
    k = load_rows(k_ptrs, keys, kv_len, offs_d, D, MASK_N, EVEN_D)
    v = load_rows(v_ptrs, keys, kv_len, offs_d, D, MASK_N, EVEN_D)
    s = dot(q, tl.trans(k), UPCAST, PREC)
    if MASK_N:
        s = tl.where((keys < kv_len)[None, :], s, float("-inf"))
    # Each visited tile holds at least one valid key, so m_new is finite.
    m_new = tl.maximum(m_i, row_max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + row_sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PREC)
    return acc, m_new, l_i


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=["LQ_BUCKET", "LK_BUCKET", "BLOCK_D"],
    prune_configs_by={"early_config_prune": prune_for_dtype},
)
@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
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
    so_b,
    so_h,
    so_l,
    H,
    L_Q,
    L_K,
    D,
    qk_scale,
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
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :]
    k_ptrs = K + b * sk_b + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :]
    v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_l + offs_d[None, :]
    q = load_rows(q_ptrs, offs_m, q_len, offs_d, D, True, EVEN_D)

    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    # Query tiles entirely past q_len skip the key loop and write zeros.
    n_end = tl.where(pid_m * BLOCK_M < q_len, kv_len, 0)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
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
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
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

    # l_i == 0 only when the row saw no key at all (kv_len == 0 or skipped tile).
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_Q_LENS:
        out = tl.where((offs_m < q_len)[:, None], out, 0.0)
    lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), 0.0)
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :]
    store_rows(o_ptrs, out.to(O.dtype.element_ty), offs_m, L_Q, offs_d, D, EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * L_Q + offs_m, lse, mask=offs_m < L_Q)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a [B, H, L, D] tensor whose last stride is 1."""
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None,
    q_lens: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated [B, H, L, D] inputs (last stride 1).

    Returns ``(out, lse)``: ``out`` has q's shape, dtype and strides; ``lse`` is fp32
    [B, H, L_q] in base 2 (``log2(sum_j 2^(s_ij * scale * log2 e))``).
    """
    B, H, L_Q, D = q.shape
    L_K = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L_Q), device=q.device, dtype=torch.float32)
    BLOCK_D = block_for_head_dim(D)
    grid = lambda meta: (triton.cdiv(L_Q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        kv_lens if kv_lens is not None else q,  # dummy pointer when absent
        q_lens if q_lens is not None else q,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        H,
        L_Q,
        L_K,
        D,
        scale * LOG2E,
        next_pow2(L_Q),
        next_pow2(L_K),
        HAS_KV_LENS=kv_lens is not None,
        HAS_Q_LENS=q_lens is not None,
        BLOCK_D=BLOCK_D,
        EVEN_D=BLOCK_D == D,
        UPCAST=upcast_dot_operands(q.dtype),
        PREC=dot_precision(q.dtype),
    )
    return out, lse
