"""Public flash-attention API: input checks, padding-mask conversion, autograd.

Semantics (non-causal, per sample b):
- keys/values at positions >= kv_lens[b] are ignored (as if absent);
- rows of a sample with kv_lens[b] == 0 output zeros and get zero gradients (never NaN);
- optional ``q_lens``: query rows >= q_lens[b] output zeros and get zero gradients, and
  their compute is skipped. Without ``q_lens``, padded query rows of a self-attention
  batch are computed like any other row: they attend to the valid keys and produce
  finite, meaningless values that callers should ignore (the usual DiT convention).

Lengths are the sync-free path. A boolean key-padding mask (True = keep) is accepted for
convenience, but it must be a prefix mask (all kept keys first): it is converted to
lengths, which costs one device-to-host sync for the check.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._runtime import SUPPORTED_DTYPES, check_device
from .attention_bwd import attention_backward
from .attention_fwd import attention_forward
from .reference import attention_reference

MAX_HEAD_DIM = 256


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper; saves q, k, v, out and the fp32 LSE (no [L, L] tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, kv_lens, q_lens, scale):
        out, lse = attention_forward(q, k, v, kv_lens, q_lens, scale)
        ctx.save_for_backward(q, k, v, out, lse, kv_lens, q_lens)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, kv_lens, q_lens = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, kv_lens, q_lens, ctx.scale)
        return dq, dk, dv, None, None, None


def lengths_from_padding_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Convert a [B, L] boolean keep-mask (True = keep) to int32 lengths [B].

    Raises ValueError if some row keeps a key after a dropped one (not a prefix mask),
    because the kernels only support "valid keys first, padding last".
    """
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise ValueError(
            "key_padding_mask must be a bool tensor [B, L_k] with True = keep; got "
            f"dtype={key_padding_mask.dtype}, shape={tuple(key_padding_mask.shape)}"
        )
    lens = key_padding_mask.sum(dim=1, dtype=torch.int32)
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    prefix = positions[None, :] < lens[:, None]
    bad = (prefix != key_padding_mask).any(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            "key_padding_mask must be a prefix mask (kept keys first, then padding); rows "
            f"{rows[:8]} have a kept key after a padded one. Reorder the sequence so padding "
            "comes last, or pass kv_lens."
        )
    return lens


def _normalize_lengths(lens: torch.Tensor | None, batch: int, limit: int, device, name: str):
    """int32 [B] on the inputs' device, clamped to [0, limit] (no host sync)."""
    if lens is None:
        return None
    if lens.dim() != 1 or lens.shape[0] != batch or lens.is_floating_point() or lens.is_complex():
        raise ValueError(
            f"{name} must be an integer tensor of shape [{batch}]; got dtype={lens.dtype}, shape={tuple(lens.shape)}"
        )
    return lens.to(device=device, dtype=torch.int32).clamp(0, limit).contiguous()


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, H, L, D]")
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or v.shape != k.shape or k.shape[3] != D:
        raise ValueError(
            f"incompatible shapes q={tuple(q.shape)}, k={tuple(k.shape)}, "
            f"v={tuple(v.shape)}: need equal B, H, D and k.shape == v.shape"
        )
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} > {MAX_HEAD_DIM} is not supported")
    check_device(q)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    q_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal attention ``softmax(q k^T * scale) v`` on [B, H, L, D] tensors.

    Args:
        q: [B, H, L_q, D]; k, v: [B, H, L_k, D]; fp32, fp16 or bf16; any strides with
            the last one 1 (others are copied). D <= 256, padded to a power of two inside.
        kv_lens: int [B], valid keys per sample (clamped to [0, L_k]).
        key_padding_mask: bool [B, L_k], True = keep; must be a prefix mask. Exclusive
            with kv_lens.
        scale: softmax scale, default 1/sqrt(D).
        q_lens: optional int [B]; query rows >= q_lens[b] give zeros (see module doc).

    Returns:
        [B, H, L_q, D] in q's dtype.
    """
    _check_qkv(q, k, v)
    if kv_lens is not None and key_padding_mask is not None:
        raise ValueError("pass either kv_lens or key_padding_mask, not both")
    B, _, L_Q, D = q.shape
    L_K = k.shape[2]
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, L_K):
            raise ValueError(f"key_padding_mask must have shape [{B}, {L_K}]; got {tuple(key_padding_mask.shape)}")
        kv_lens = lengths_from_padding_mask(key_padding_mask)
    kv_lens = _normalize_lengths(kv_lens, B, L_K, q.device, "kv_lens")
    q_lens = _normalize_lengths(q_lens, B, L_Q, q.device, "q_lens")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.numel() == 0 or L_K == 0:  # nothing to launch; the reference gives the same zeros
        return attention_reference(q, k, v, kv_lens=kv_lens, scale=scale, q_lens=q_lens)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return FlashAttentionFunction.apply(q, k, v, kv_lens, q_lens, scale)


def flash_attention_blhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``flash_attention`` for the [B, L, H, D] layout diffusers uses; returns [B, L, H, D].

    No copies: the kernels take strides, so the transposed views are passed as they are and
    the output (and the gradients) come back in the [B, L, H, D] memory layout.
    """
    out = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
    return out.transpose(1, 2)
