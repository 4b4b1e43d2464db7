"""Attention back-ends for the DiT: torch SDPA, our Triton kernels, or flash-attn.

`model.attention_backend: auto | sdpa | triton | flash_attn`. `auto` is `triton` on CUDA and
`sdpa` elsewhere. `triton` swaps the attention processors of the diffusers model for one that
runs the fused QK-RMSNorm + RoPE kernel and flash attention with per-sample key lengths (the
caption part of the joint sequence is variable, so padded keys must be masked exactly).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)
BACKENDS = ("auto", "sdpa", "triton", "flash_attn")


def resolve_backend(name: str, device: torch.device, supported: tuple[str, ...] = BACKENDS) -> str:
    """The back-end to install; `supported` is what the model family's attention can take (our
    Triton processor implements Z-Image's attention: FLUX.2 gets SDPA under `auto`)."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        triton = device.type == "cuda" and importlib.util.find_spec("triton") and "triton" in supported
        return "triton" if triton else "sdpa"
    if name not in supported:
        raise ValueError(
            f"model.attention_backend={name!r} is not available for this model (supported: {', '.join(supported)})"
        )
    if name == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "model.attention_backend=flash_attn but flash-attn is not installed "
            "(pip install 'dopsd-scale[flash]' on a CUDA machine), or use sdpa / triton"
        )
    return name


class TritonZImageAttnProcessor:
    """Z-Image's single-stream attention with our kernels (same math as ZSingleStreamAttnProcessor)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from dopsd_kernels import flash_attention_blhd, lengths_from_padding_mask, qk_norm_rope, rope_from_complex

        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if freqs_cis is not None and attn.norm_q is not None and attn.norm_k is not None:
            cos, sin = rope_from_complex(freqs_cis)
            q, k = qk_norm_rope(
                q,
                k,
                attn.norm_q.weight,
                attn.norm_k.weight,
                cos.to(q.dtype),
                sin.to(q.dtype),
                eps=attn.norm_q.eps,
                interleaved=True,
            )
        else:  # no rotary table: plain norms (the kernels need both)
            q = attn.norm_q(q) if attn.norm_q is not None else q
            k = attn.norm_k(k) if attn.norm_k is not None else k
        kv_lens = None
        if attention_mask is not None:
            mask = attention_mask.reshape(attention_mask.shape[0], -1) if attention_mask.ndim > 2 else attention_mask
            kv_lens = lengths_from_padding_mask(mask.bool())
        out = flash_attention_blhd(q, k.to(q.dtype), v.to(q.dtype), kv_lens=kv_lens)
        out = attn.to_out[0](out.flatten(2, 3).to(q.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def apply_attention_backend(model: nn.Module, backend: str) -> None:
    """Install `backend` (already resolved) on every attention layer of a diffusers DiT."""
    from diffusers.models.attention_processor import Attention

    if backend == "sdpa":
        return  # diffusers' default processors dispatch to torch SDPA
    if backend == "flash_attn":
        model.set_attention_backend("flash")
        return
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_processor(TritonZImageAttnProcessor())
    log.info("attention: Triton kernels on %d layer(s)", len(layers))
