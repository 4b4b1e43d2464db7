"""Fused per-head RMSNorm (learnable weight) + rotary embedding for q and k, with backward.

Why fused: in Z-Image and Flux2 attention, q and k go through RMSNorm over the head dim and
then RoPE, which in eager torch is ~10 memory-bound kernels and several fp32 temporaries
per tensor. Here each of q and k is read once and written once (forward and backward).

Layouts:
- x: [B, L, H, D] (any strides with the last one 1, e.g. slices of a fused qkv).
- cos, sin: [B or 1, L, D/2] (or [L, D/2]); angle i rotates one pair of x.
- ``interleaved=True``: pairs (x[2i], x[2i+1]). Both Z-Image (complex ``freqs_cis``) and
  Flux2 (diffusers ``apply_rotary_emb`` with ``use_real_unbind_dim=-1``) use this layout;
  see ``rope_from_complex`` and ``rope_from_real`` to convert their tables.
- ``interleaved=False``: pairs (x[i], x[i + D/2]), the "rotate_half" layout.

Math is fp32 throughout with one rounding at the output (eager diffusers rounds after the
norm and again after the rope, so results differ by about one bf16 ulp). No gradient flows
to cos/sin (positions are data, not parameters).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._runtime import SUPPORTED_DTYPES, check_device, next_pow2, row_sum
from .reference import norm_rope_reference

_MAX_ROWS = 64  # rows (tokens x heads) per program: 64 x D/2 pairs, no register spills at D=128


@triton.jit
def _pair_columns(i, HALF, INTERLEAVED: tl.constexpr):
    """Column indices (a, b) of the pair rotated by angle i."""
    if INTERLEAVED:
        ca = 2 * i
        cb = 2 * i + 1
    else:
        ca = i
        cb = i + HALF
    return ca, cb


@triton.jit
def _row_offsets(rows, H, L, s_b, s_l, s_h):
    """Element offset of row (b, l, h) for rows numbered b*L*H + l*H + h, and (b, l)."""
    h = rows % H
    tok = rows // H
    l_pos = tok % L
    b = tok // L
    return b * s_b + l_pos * s_l + h * s_h, b, l_pos


@triton.jit
def _load_pair(ptr, row_off, ca, cb, mask):
    xa = tl.load(ptr + row_off[:, None] + ca[None, :], mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(ptr + row_off[:, None] + cb[None, :], mask=mask, other=0.0).to(tl.float32)
    return xa, xb


@triton.jit
def _load_weight_pair(W, ca, cb, col_ok, HAS_WEIGHT: tl.constexpr):
    if HAS_WEIGHT:
        wa = tl.load(W + ca, mask=col_ok, other=0.0).to(tl.float32)
        wb = tl.load(W + cb, mask=col_ok, other=0.0).to(tl.float32)
    else:
        wa = tl.where(col_ok, 1.0, 0.0)
        wb = tl.where(col_ok, 1.0, 0.0)
    return wa, wb


@triton.jit
def _row_tile(n_rows, HALF, INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows (int64), pair index i, valid columns and mask, and the pair columns."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    i = tl.arange(0, BLOCK_H)
    col_ok = i < HALF
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    ca, cb = _pair_columns(i, HALF, INTERLEAVED)
    return rows, i, col_ok, mask, ca, cb


@triton.jit
def _load_cos_sin(COS, SIN, b, l_pos, i, mask, sc_b, sc_l, ss_b, ss_l):
    """The rotation tables at each row's (batch, position), as fp32."""
    c = tl.load(COS + (b * sc_b + l_pos * sc_l)[:, None] + i[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + (b * ss_b + l_pos * ss_l)[:, None] + i[None, :], mask=mask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _norm_rope_fwd_kernel(
    X,
    W,
    COS,
    SIN,
    Y,
    n_rows,
    H,
    L,
    sx_b,
    sx_l,
    sx_h,
    sc_b,
    sc_l,
    ss_b,
    ss_l,
    eps,
    D,
    HALF,
    HAS_WEIGHT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows, i, col_ok, mask, ca, cb = _row_tile(n_rows, HALF, INTERLEAVED, BLOCK_R, BLOCK_H)
    x_off, b, l_pos = _row_offsets(rows, H, L, sx_b, sx_l, sx_h)
    xa, xb = _load_pair(X, x_off, ca, cb, mask)
    rstd = tl.math.rsqrt((row_sum(xa * xa, 1) + row_sum(xb * xb, 1)) / D + eps)
    wa, wb = _load_weight_pair(W, ca, cb, col_ok, HAS_WEIGHT)
    ua = xa * rstd[:, None] * wa[None, :]
    ub = xb * rstd[:, None] * wb[None, :]
    c, s = _load_cos_sin(COS, SIN, b, l_pos, i, mask, sc_b, sc_l, ss_b, ss_l)
    y_off = rows * D
    tl.store(Y + y_off[:, None] + ca[None, :], (ua * c - ub * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off[:, None] + cb[None, :], (ua * s + ub * c).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_bwd_kernel(
    X,
    W,
    COS,
    SIN,
    DY,
    DX,
    DW_PART,
    n_rows,
    H,
    L,
    sx_b,
    sx_l,
    sx_h,
    sc_b,
    sc_l,
    ss_b,
    ss_l,
    eps,
    D,
    HALF,
    HAS_WEIGHT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)  # row block: this program's slot of DW_PART
    rows, i, col_ok, mask, ca, cb = _row_tile(n_rows, HALF, INTERLEAVED, BLOCK_R, BLOCK_H)
    x_off, b, l_pos = _row_offsets(rows, H, L, sx_b, sx_l, sx_h)
    xa, xb = _load_pair(X, x_off, ca, cb, mask)
    rstd = tl.math.rsqrt((row_sum(xa * xa, 1) + row_sum(xb * xb, 1)) / D + eps)
    na = xa * rstd[:, None]
    nb = xb * rstd[:, None]
    c, s = _load_cos_sin(COS, SIN, b, l_pos, i, mask, sc_b, sc_l, ss_b, ss_l)
    dya, dyb = _load_pair(DY, rows * D, ca, cb, mask)
    # Undo the rotation (its transpose), giving the gradient w.r.t. the normed, weighted x.
    ga = dya * c + dyb * s
    gb = dyb * c - dya * s
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * D + ca, row_sum(ga * na, 0), mask=col_ok)
        tl.store(DW_PART + pid * D + cb, row_sum(gb * nb, 0), mask=col_ok)
    wa, wb = _load_weight_pair(W, ca, cb, col_ok, HAS_WEIGHT)
    dna = ga * wa[None, :]
    dnb = gb * wb[None, :]
    proj = (row_sum(dna * na, 1) + row_sum(dnb * nb, 1)) / D
    dxa = rstd[:, None] * (dna - na * proj[:, None])
    dxb = rstd[:, None] * (dnb - nb * proj[:, None])
    tl.store(DX + rows[:, None] * D + ca[None, :], dxa.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + rows[:, None] * D + cb[None, :], dxb.to(DX.dtype.element_ty), mask=mask)


def _launch_shape(x: torch.Tensor) -> tuple[int, int, int]:
    """(rows, BLOCK_R, BLOCK_H) for x [B, L, H, D]."""
    B, L, H, D = x.shape
    block_h = next_pow2(D // 2)
    block_r = min(_MAX_ROWS, next_pow2(B * L * H))
    return B * L * H, block_r, block_h


def _table_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of a [B or 1, L, D/2] table; batch stride 0 broadcasts."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def _args(x, cos, sin, eps):
    B, L, H, D = x.shape
    return (
        B * L * H,
        H,
        L,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        *_table_strides(cos),
        *_table_strides(sin),
        eps,
        D,
        D // 2,
    )


def _norm_rope_forward(x, weight, cos, sin, eps, interleaved):
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n_rows, block_r, block_h = _launch_shape(x)
    _norm_rope_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x,
        weight if weight is not None else x,
        cos,
        sin,
        y,
        *_args(x, cos, sin, eps),
        HAS_WEIGHT=weight is not None,
        INTERLEAVED=interleaved,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return y


def _norm_rope_backward(dy, x, weight, cos, sin, eps, interleaved):
    dy = dy.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n_rows, block_r, block_h = _launch_shape(x)
    n_prog = triton.cdiv(n_rows, block_r)
    D = x.shape[-1]
    dw_part = torch.empty((n_prog, D), device=x.device, dtype=torch.float32) if weight is not None else dx
    _norm_rope_bwd_kernel[(n_prog,)](
        x,
        weight if weight is not None else x,
        cos,
        sin,
        dy,
        dx,
        dw_part,
        *_args(x, cos, sin, eps),
        HAS_WEIGHT=weight is not None,
        INTERLEAVED=interleaved,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=4,
    )
    # Per-program partial sums reduced here: deterministic, no atomics.
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    return dx, dw


class NormRopeFunction(torch.autograd.Function):
    """Autograd for one tensor; saves only the inputs (rstd is recomputed, it is cheap)."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps, interleaved):
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps, ctx.interleaved = eps, interleaved
        return _norm_rope_forward(x, weight, cos, sin, eps, interleaved)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, cos, sin = ctx.saved_tensors
        dx, dw = _norm_rope_backward(dy, x, weight, cos, sin, ctx.eps, ctx.interleaved)
        if weight is not None and not ctx.needs_input_grad[1]:
            dw = None
        return dx, dw, None, None, None, None


def _prepare_table(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    B, L, _, D = x.shape
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != L or t.shape[2] != D // 2:
        raise ValueError(f"{name} must be [1 or {B}, {L}, {D // 2}] (or [{L}, {D // 2}]); got {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} is complex: convert with rope_from_complex first")
    t = t.to(x.device)
    return t if t.stride(-1) == 1 else t.contiguous()


def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    interleaved: bool = True,
) -> torch.Tensor:
    """RMSNorm over the head dim (times ``weight`` [D]) then RoPE, for x [B, L, H, D].

    Returns a contiguous tensor of x's shape and dtype. Differentiable in x and weight.
    """
    if x.dim() != 4 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be [B, L, H, D] in {SUPPORTED_DTYPES}; got {x.dtype} {tuple(x.shape)}")
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"head dim must be even for rotary embeddings; got {D}")
    if weight is not None and tuple(weight.shape) != (D,):
        raise ValueError(f"weight must have shape [{D}]; got {tuple(weight.shape)}")
    check_device(x)
    if x.numel() == 0:
        return norm_rope_reference(x, weight, cos, sin, eps, interleaved)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = _prepare_table(cos, x, "cos"), _prepare_table(sin, x, "sin")
    return NormRopeFunction.apply(x, weight, cos, sin, float(eps), bool(interleaved))


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    interleaved: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm_rope`` on q and on k with their own norm weights and shared cos/sin.

    For Flux2's double-stream blocks (text and image tokens normed with different weights,
    then concatenated, then rotated) call ``norm_rope`` per part with the matching slice
    of cos/sin and concatenate the results.
    """
    return (norm_rope(q, q_weight, cos, sin, eps, interleaved), norm_rope(k, k_weight, cos, sin, eps, interleaved))


def rope_from_complex(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-Image's complex ``freqs_cis`` [B, L, D/2] -> real (cos, sin), interleaved layout."""
    return freqs_cis.real.contiguous(), freqs_cis.imag.contiguous()


def rope_from_real(cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True):
    """diffusers' full-width real tables [..., L, D] -> half-width [..., L, D/2].

    Flux2 builds them with ``repeat_interleave_real=True`` (each angle repeated twice in a
    row: take even columns, interleaved=True); "rotate_half" tables are ``cat([c, c])``
    (take the first half, interleaved=False).
    """
    if interleaved:
        return cos[..., 0::2].contiguous(), sin[..., 0::2].contiguous()
    half = cos.shape[-1] // 2
    return cos[..., :half].contiguous(), sin[..., :half].contiguous()
