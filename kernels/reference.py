"""Plain-torch references for every kernel in this package.

They define the semantics the kernels must match (tests compare against them in float64)
and are the fallback where Triton cannot run. They materialize full tensors, so they are
meant for small shapes, not for training.
"""

from __future__ import annotations

import math

import torch


def _length_mask(lens: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """[B, L] bool, True where position < lens[b] (all True without lens)."""
    positions = torch.arange(length, device=device)
    if lens is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return positions[None, :] < lens.to(device).long().clamp(0, length)[:, None]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    q_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for ``flash_attention`` on [B, H, L, D], computed in the inputs' dtype.

    Unlike the kernel it accepts any key-padding mask (not only prefixes). Rows without a
    valid key and query rows >= q_lens give zeros with zero gradients.
    """
    B, _, L_Q, D = q.shape
    L_K = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    keep = key_padding_mask if key_padding_mask is not None else _length_mask(kv_lens, B, L_K, q.device)
    keep = keep[:, None, None, :]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    # Rows without keys: make scores finite so softmax (and its gradient) stays NaN-free,
    # then the keep-mask zeroes the probabilities.
    scores = torch.where(keep.any(dim=-1, keepdim=True), scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1) * keep
    out = torch.matmul(probs, v)
    if q_lens is not None:
        out = out * _length_mask(q_lens, B, L_Q, q.device)[:, None, :, None]
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in x's dtype: ``x / sqrt(mean(x^2) + eps) * weight``."""
    out = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotary embedding of x [B, L, H, D] with cos/sin [B or 1, L, D/2].

    ``interleaved=True``: pairs (x[2i], x[2i+1]) are rotated by angle i. This is
    Z-Image's complex multiply (``view_as_complex(x.reshape(..., -1, 2)) * freqs_cis``) and
    Flux2's ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)``.
    ``interleaved=False``: pairs (x[i], x[i + D/2]), the "rotate_half" layout
    (diffusers ``use_real_unbind_dim=-2``).
    """
    cos = cos[:, :, None, :].to(x.dtype)
    sin = sin[:, :, None, :].to(x.dtype)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    interleaved: bool = True,
) -> torch.Tensor:
    """RMSNorm (learnable weight) then rotary embedding, as the DiT attention blocks do."""
    return rope_reference(rms_norm_reference(x, weight, eps), cos, sin, interleaved)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    interleaved: bool = True,
):
    """Reference for ``qk_norm_rope``: (norm_rope(q), norm_rope(k))."""
    return (
        norm_rope_reference(q, q_weight, cos, sin, eps, interleaved),
        norm_rope_reference(k, k_weight, cos, sin, eps, interleaved),
    )
