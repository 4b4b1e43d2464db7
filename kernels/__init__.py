"""dopsd_kernels: Triton kernels for DiT training (depends on torch and triton only).

- ``flash_attention`` / ``flash_attention_blhd``: non-causal flash attention, forward and
  backward, with per-sample key lengths (padding masks) and head dims up to 256.
- ``qk_norm_rope`` / ``norm_rope``: fused per-head RMSNorm + rotary embedding, with backward.
- ``reference``: plain torch versions of both, defining the semantics.

On CPU the kernels only run under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported); that is for tests, not for speed.
"""

from .attention import FlashAttentionFunction, flash_attention, flash_attention_blhd, lengths_from_padding_mask
from .qk_norm_rope import NormRopeFunction, norm_rope, qk_norm_rope, rope_from_complex, rope_from_real
from .reference import attention_reference, norm_rope_reference, qk_norm_rope_reference

__all__ = [
    "FlashAttentionFunction",
    "NormRopeFunction",
    "attention_reference",
    "flash_attention",
    "flash_attention_blhd",
    "lengths_from_padding_mask",
    "norm_rope",
    "norm_rope_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "rope_from_complex",
    "rope_from_real",
]
