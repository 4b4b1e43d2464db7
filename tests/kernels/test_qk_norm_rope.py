"""Fused RMSNorm + RoPE vs the float64 torch reference (outputs, dx, dweight), both layouts.

The reference itself is checked against diffusers' rotary code when diffusers is installed,
so "matches the reference" means "matches what Z-Image and Flux2 compute".
"""

import pytest
import torch

pytest.importorskip("triton")

from dopsd_kernels import (  # noqa: E402
    norm_rope,
    norm_rope_reference,
    qk_norm_rope,
    qk_norm_rope_reference,
    rope_from_complex,
    rope_from_real,
)
from dopsd_kernels.reference import rope_reference  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tables(batch, L, half, seed=0):
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(batch, L, half, generator=gen) * 6.28
    return angles.cos(), angles.sin()


def _inputs(B, L, H, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=gen) * 3
    k = torch.randn(B, L, H, D, generator=gen) + 0.5
    wq = 1 + 0.3 * torch.randn(D, generator=gen)
    wk = 1 + 0.3 * torch.randn(D, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, wq, wk)]


def _grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


# (B, L, H, D, cos batch, description)
CASES = [
    (2, 37, 3, 16, 1, "odd length, shared tables"),
    (2, 5, 2, 128, 2, "head dim 128, per-sample tables"),
    (1, 11, 2, 24, 1, "half dim 12 padded to 16"),
]


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_matches_float64_reference(case, interleaved, device):
    B, L, H, D, cb, _ = case
    q, k, wq, wk = _inputs(B, L, H, D, torch.float32, device)
    cos, sin = (t.to(device) for t in _tables(cb, L, D // 2))
    gq, gk = torch.randn(2, B, L, H, D).to(device)
    out = qk_norm_rope(q, k, wq, wk, cos, sin, eps=1e-5, interleaved=interleaved)
    grads = _grads(out, (q, k, wq, wk), (gq, gk))

    leaves = [t.detach().double().requires_grad_() for t in (q, k, wq, wk)]
    ref = qk_norm_rope_reference(*leaves, cos.double(), sin.double(), eps=1e-5, interleaved=interleaved)
    ref_grads = _grads(ref, leaves, (gq.double(), gk.double()))
    names = ("q", "k", "dq", "dk", "dwq", "dwk")
    for name, a, b in zip(names, (*out, *grads), (*ref, *ref_grads)):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_strided_input_and_no_weight(device):
    """q sliced out of a fused qkv projection (row stride 3*H*D), RMSNorm without weight."""
    B, L, H, D = 2, 9, 2, 32
    qkv = torch.randn(B, L, 3, H, D).to(device).requires_grad_()
    x = qkv[:, :, 0]
    cos, sin = (t.to(device) for t in _tables(1, L, D // 2, seed=1))
    out = norm_rope(x, None, cos[0], sin[0], eps=1e-6)  # [L, D/2] tables are accepted too
    grad = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    leaf = x.detach().double().requires_grad_()
    ref = norm_rope_reference(leaf, None, cos.double(), sin.double(), eps=1e-6)
    (dref,) = torch.autograd.grad(ref, leaf, grad.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv[:, :, 0].double(), dref, atol=1e-5, rtol=1e-5)
    assert dqkv[:, :, 1:].abs().max() == 0


def test_bfloat16_close(device):
    q, k, wq, wk = _inputs(1, 13, 2, 64, torch.bfloat16, device, seed=2)
    cos, sin = (t.to(device) for t in _tables(1, 13, 32, seed=2))
    out = qk_norm_rope(q, k, wq, wk, cos, sin)
    ref = qk_norm_rope_reference(*(t.detach().double() for t in (q, k, wq, wk)), cos.double(), sin.double())
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, atol=3e-2, rtol=2e-2)


def test_bad_tables_raise(device):
    x = torch.randn(1, 4, 2, 8, device=device)
    with pytest.raises(ValueError, match="cos"):
        norm_rope(x, None, torch.randn(1, 5, 4), torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="complex"):
        z = torch.randn(1, 4, 4, dtype=torch.complex64)
        norm_rope(x, None, z, z)


def test_reference_matches_diffusers_rotary():
    """Our two layouts are exactly Z-Image's complex rope and Flux2's real rope."""
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed

    B, L, H, D = 2, 7, 3, 16
    x = torch.randn(B, L, H, D, dtype=torch.float64)
    pos = torch.arange(L, dtype=torch.float64) * 1.7
    # Flux2: real tables [L, D] repeated-interleaved, pairs unbound on the last dim.
    cos, sin = get_1d_rotary_pos_embed(D, pos, repeat_interleave_real=True, use_real=True, freqs_dtype=torch.float64)
    expected = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
    c, s = rope_from_real(cos, sin, interleaved=True)
    # diffusers computes in fp32 (its tables are fp32), hence the fp32-level tolerance.
    torch.testing.assert_close(rope_reference(x, c[None], s[None], interleaved=True), expected, atol=1e-6, rtol=1e-6)
    # rotate_half: tables cat([c, c]), halves unbound.
    cos2, sin2 = get_1d_rotary_pos_embed(D, pos, repeat_interleave_real=False, use_real=True, freqs_dtype=torch.float64)
    expected2 = apply_rotary_emb(x, (cos2, sin2), use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
    c2, s2 = rope_from_real(cos2, sin2, interleaved=False)
    torch.testing.assert_close(
        rope_reference(x, c2[None], s2[None], interleaved=False), expected2, atol=1e-6, rtol=1e-6
    )
    # Z-Image: complex freqs_cis [B, L, D/2], x viewed as complex pairs (its exact formula).
    freqs_cis = torch.polar(
        torch.ones(B, L, D // 2, dtype=torch.float64), torch.rand(B, L, D // 2, dtype=torch.float64) * 6
    )
    z_image = torch.view_as_real(torch.view_as_complex(x.reshape(B, L, H, -1, 2)) * freqs_cis.unsqueeze(2))
    c3, s3 = rope_from_complex(freqs_cis)
    torch.testing.assert_close(rope_reference(x, c3.double(), s3.double()), z_image.flatten(3))


def _eager_like_diffusers(q, k, wq, wk, cos, sin):
    """Eager torch as diffusers runs it in low precision: upcast, compute in fp32, cast back."""
    out = qk_norm_rope_reference(q.float(), k.float(), wq.float(), wk.float(), cos, sin)
    return tuple(t.to(q.dtype) for t in out)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_error_within_twice_eager_torch(dtype):
    """Our low-precision error vs float64 is at most 2x eager torch's error in that dtype."""
    B, L, H, D = 2, 333, 4, 128
    q, k, wq, wk = _inputs(B, L, H, D, dtype, "cuda", seed=3)
    cos, sin = (t.cuda() for t in _tables(1, L, D // 2, seed=3))
    grads_out = tuple(torch.randn(2, B, L, H, D).cuda().to(dtype))
    inputs = (q, k, wq, wk)
    ours = qk_norm_rope(*inputs, cos, sin)
    ours_g = _grads(ours, inputs, grads_out)
    eager = _eager_like_diffusers(*inputs, cos, sin)
    eager_g = _grads(eager, inputs, grads_out)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = qk_norm_rope_reference(*leaves, cos.double(), sin.double())
    ref_g = _grads(ref, leaves, tuple(g.double() for g in grads_out))
    for name, a, e, r in zip(
        ("q", "k", "dq", "dk", "dwq", "dwk"), (*ours, *ours_g), (*eager, *eager_g), (*ref, *ref_g)
    ):
        ours_err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        bound = 2 * eager_err + 1e-3 * r.abs().max().item()
        assert ours_err <= bound, f"{name}: ours {ours_err:.3e} > 2 x eager {eager_err:.3e} + eps"
