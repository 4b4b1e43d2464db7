"""Shared launch-time facts and tiny Triton helpers used by every kernel in this package.

Why a separate module: the interpreter workaround (upcasting bf16 before ``tl.dot``), the
dot precision choice and the autotune config lists must be decided the same way in the
attention forward, the attention backward and the norm/rope kernels.

``TRITON_INTERPRET=1`` is read once, at import, and Triton reads it when a function is
decorated with ``@triton.jit``: it must be set before this package is imported. It need
not be set before triton itself is imported, because the kernels avoid triton's own
``@jit`` library functions (``tl.sum``, ``tl.max``, ``tl.zeros``): those are decorated
when triton is first imported, often by some other library, and the interpreter cannot
call them if that happened without the variable. ``row_sum``/``row_max`` below are the
replacements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""True when kernels run in the Triton interpreter (CPU tensors, numpy semantics)."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def block_for_head_dim(d: int) -> int:
    """Head dims are padded to a power of two inside kernels; ``tl.dot`` needs K >= 16."""
    return max(16, next_pow2(d))


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast ``tl.dot`` operands to fp32.

    The interpreter's ``tl.dot`` treats bf16 operands as raw uint16 bits and returns
    garbage, so bf16 is upcast there. On a GPU this is never needed (and would be slow).
    """
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get "tf32x3" products (three TF32 MMAs, about fp32 accuracy): callers
    asking for fp32 want fp32 accuracy, not TF32's 10-bit mantissa, and "ieee" (no tensor
    cores) compiles to kernels with huge register spills. Ignored for fp16/bf16."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check_device(t: torch.Tensor) -> None:
    """Fail early and clearly instead of Triton's "0 active drivers" on CPU."""
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "dopsd_kernels: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 "
            "before triton is first imported (or use the torch reference functions)."
        )


def configs(gpu: list[tuple[dict, int, int]], interpret: dict) -> list[triton.Config]:
    """Autotune list: the GPU candidates, or the single interpreter config.

    With one config the autotuner never benchmarks, which keeps interpreter runs cheap.
    Each GPU candidate is ``(meta, num_warps, num_stages)``.
    """
    if INTERPRET:
        return [triton.Config(dict(interpret), num_warps=4, num_stages=1)]
    return [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in gpu]


def prune_for_dtype(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """fp32 is a testing path: use only the last (smallest) config, which fits in shared
    memory with fp32 tiles, and skip a slow tuning sweep. Half precision tunes them all."""
    if named_args["Q"].dtype == torch.float32:
        return configs[-1:]
    return configs


# Triton's own combine functions: the interpreter recognizes them and reduces with numpy.
_SUM_COMBINE = tl.standard._sum_combine
_MAX_COMBINE = tl.standard._elementwise_max


@triton.jit
def row_sum(x, AXIS: tl.constexpr):
    """``tl.sum`` for fp32 tensors, usable whatever the triton import order (module doc)."""
    return tl.reduce(x, AXIS, _SUM_COMBINE)


@triton.jit
def row_max(x, AXIS: tl.constexpr):
    """``tl.max`` for fp32 tensors, usable whatever the triton import order (module doc)."""
    return tl.reduce(x, AXIS, _MAX_COMBINE)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; see ``upcast_dot_operands`` for UPCAST."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` as fp32 (a fresh accumulator)."""
    return mma(a, b, tl.full([a.shape[0], b.shape[1]], 0.0, tl.float32), UPCAST, PREC)


@triton.jit
def batch_head_lengths(KV_LENS, Q_LENS, H, L_Q, L_K, HAS_KV_LENS: tl.constexpr, HAS_Q_LENS: tl.constexpr):
    """(batch, head, query length, key length) of this program's (batch x head) grid column."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kv_len = L_K
    if HAS_KV_LENS:
        kv_len = tl.load(KV_LENS + b)
    q_len = L_Q
    if HAS_Q_LENS:
        q_len = tl.load(Q_LENS + b)
    return b, h, q_len, kv_len


@triton.jit
def load_rows(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Load a [rows, cols] tile, zero-filling rows >= n_rows and padded columns.

    The constexpr flags drop the masks on the hot path (full tiles, head dim already a
    power of two), which matters for GPU throughput.
    """
    if MASK_ROWS:
        if EVEN_COLS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    else:
        if EVEN_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    return x


@triton.jit
def store_rows(ptrs, x, rows, n_rows, cols, n_cols, EVEN_COLS: tl.constexpr):
    """Store a [rows, cols] tile, skipping rows >= n_rows and padded columns."""
    if EVEN_COLS:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
