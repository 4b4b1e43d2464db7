"""Flash attention vs the float64 torch reference: outputs and gradients, padding, layouts.

On CPU these run in the Triton interpreter (slow), so shapes are small but odd-sized, so
that every masked tail path of the kernels is taken. On a GPU the same tests run there, plus
bf16/fp16 checks whose tolerance is torch SDPA's own error in that dtype.
"""

import pytest
import torch

pytest.importorskip("triton")

from dopsd_kernels import (  # noqa: E402
    attention_reference,
    flash_attention,
    flash_attention_blhd,
    lengths_from_padding_mask,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(B, H, L_q, L_k, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, H, L_q, D), (B, H, L_k, D), (B, H, L_k, D))
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _run(fn, tensors, grad_out, **kwargs):
    """Output and input gradients of fn(*tensors, **kwargs) for a fixed upstream gradient."""
    out = fn(*tensors, **kwargs)
    grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype))
    return out, grads


def _reference(tensors, grad_out, **kwargs):
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    return _run(attention_reference, leaves, grad_out.double(), **kwargs)


def _assert_matches(ours, ref, tol):
    (out, grads), (ref_out, ref_grads) = ours, ref
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        torch.testing.assert_close(a.double(), b.to(a.device), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


# (B, H, L_q, L_k, D, kv_lens, q_lens, description)
CASES = [
    (2, 2, 37, 37, 16, [37, 20], None, "odd length, one padded sample"),
    (3, 1, 50, 50, 32, [0, 33, 50], None, "fully padded sample gives zeros"),
    (1, 2, 20, 45, 128, None, None, "cross attention, head dim 128"),
    (2, 1, 33, 33, 24, [33, 1], None, "head dim padded to 32, single key"),
    (2, 2, 40, 40, 16, [40, 25], [40, 25], "padded queries skipped with q_lens"),
    (2, 2, 100, 100, 64, [100, 71], [90, 71], "several tiles per program"),
    (2, 1, 21, 70, 32, [70, 45], None, "cross attention with padded keys"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_matches_float64_reference(case, device):
    B, H, L_q, L_k, D, kv, ql, _ = case
    tensors = _qkv(B, H, L_q, L_k, D, torch.float32, device)
    grad_out = torch.randn(B, H, L_q, D).to(device)
    kwargs = {}
    if kv is not None:
        kwargs["kv_lens"] = torch.tensor(kv, device=device)
    if ql is not None:
        kwargs["q_lens"] = torch.tensor(ql, device=device)
    ours = _run(flash_attention, tensors, grad_out, **kwargs)
    _assert_matches(ours, _reference(tensors, grad_out, **kwargs), tol=2e-4)


def test_fully_padded_rows_are_exact_zeros(device):
    tensors = _qkv(2, 1, 19, 19, 16, torch.float32, device, seed=1)
    out, (dq, dk, dv) = _run(
        flash_attention, tensors, torch.randn(2, 1, 19, 16).to(device), kv_lens=torch.tensor([0, 7], device=device)
    )
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
        assert t[0].abs().max() == 0
    assert dk[1, :, 7:].abs().max() == 0 and dv[1, :, 7:].abs().max() == 0


def test_prefix_key_padding_mask_equals_lengths(device):
    mask = torch.zeros(2, 21, dtype=torch.bool, device=device)
    mask[0, :21] = True
    mask[1, :9] = True
    assert lengths_from_padding_mask(mask).tolist() == [21, 9]
    tensors = _qkv(2, 1, 21, 21, 16, torch.float32, device, seed=2)
    grad_out = torch.randn(2, 1, 21, 16).to(device)
    ours = _run(flash_attention, tensors, grad_out, key_padding_mask=mask)
    _assert_matches(ours, _reference(tensors, grad_out, key_padding_mask=mask), tol=2e-4)


def test_non_prefix_mask_and_bad_arguments_raise(device):
    q = torch.randn(2, 1, 8, 16, device=device)
    holes = torch.ones(2, 8, dtype=torch.bool, device=device)
    holes[1, 3] = False
    with pytest.raises(ValueError, match="prefix mask"):
        flash_attention(q, q, q, key_padding_mask=holes)
    with pytest.raises(ValueError, match="not both"):
        flash_attention(q, q, q, kv_lens=torch.tensor([8, 8]), key_padding_mask=holes)
    with pytest.raises(ValueError, match="shape"):
        flash_attention(q, q, q, kv_lens=torch.tensor([8]))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q.double(), q)


def test_blhd_layout_matches_bhld(device):
    B, L, H, D = 2, 23, 3, 16
    gen = torch.Generator().manual_seed(3)
    blhd = [torch.randn(B, L, H, D, generator=gen).to(device).requires_grad_() for _ in range(3)]
    grad_out = torch.randn(B, L, H, D, generator=gen).to(device)
    kv = torch.tensor([23, 11], device=device)
    out, grads = _run(flash_attention_blhd, blhd, grad_out, kv_lens=kv)
    assert out.shape == (B, L, H, D) and out.is_contiguous()
    leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in blhd]
    ref_out, ref_grads = _run(flash_attention, leaves, grad_out.transpose(1, 2), kv_lens=kv)
    torch.testing.assert_close(out, ref_out.transpose(1, 2), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_slices_of_fused_qkv(device):
    """q, k, v as strided views of one [B, L, 3, H, D] projection, as models produce them."""
    B, L, H, D = 2, 19, 2, 16
    qkv = torch.randn(B, L, 3, H, D).to(device).requires_grad_()
    grad_out = torch.randn(B, L, H, D).to(device)
    kv = torch.tensor([19, 6], device=device)
    out = flash_attention_blhd(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], kv_lens=kv)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    leaf = qkv.detach().double().requires_grad_()
    ref = attention_reference(*(leaf[:, :, i].transpose(1, 2) for i in range(3)), kv_lens=kv).transpose(1, 2)
    (ref_grad,) = torch.autograd.grad(ref, leaf, grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-4, rtol=2e-4)


def test_empty_inputs(device):
    q = torch.randn(2, 1, 5, 16, device=device, requires_grad=True)
    k = torch.randn(2, 1, 0, 16, device=device)
    out = flash_attention(q, k, k)
    assert out.shape == q.shape and out.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_close(dtype, device):
    """Exercises the half-precision code path (and the interpreter's bf16 upcast) on CPU."""
    tensors = _qkv(1, 2, 37, 37, 32, dtype, device, seed=4)
    grad_out = torch.randn(1, 2, 37, 32).to(device)
    kv = torch.tensor([30], device=device)
    ours = _run(flash_attention, tensors, grad_out, kv_lens=kv)
    _assert_matches(ours, _reference(tensors, grad_out, kv_lens=kv), tol=3e-2)


def _max_err(actual, expected):
    return (actual.double() - expected).abs().max().item()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128], ids=["d64", "d128"])
def test_gpu_error_within_twice_sdpa(dtype, D):
    """Our low-precision error vs float64 is at most 2x torch SDPA's error in the same dtype."""
    B, H, L = 2, 4, 301
    kv = torch.tensor([301, 240], device="cuda")
    tensors = _qkv(B, H, L, L, D, dtype, "cuda", seed=5)
    grad_out = torch.randn(B, H, L, D).cuda()
    keep = (torch.arange(L, device="cuda")[None, :] < kv[:, None])[:, None, None, :]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    ours = _run(flash_attention, tensors, grad_out, kv_lens=kv)
    theirs = _run(sdpa, tensors, grad_out)
    ref_out, ref_grads = _reference(tensors, grad_out, kv_lens=kv)
    for name, a, t, r in zip(
        ("out", "dq", "dk", "dv"), (ours[0], *ours[1]), (theirs[0], *theirs[1]), (ref_out, *ref_grads)
    ):
        ours_err, torch_err = _max_err(a, r), _max_err(t, r)
        bound = 2 * torch_err + 1e-3 * r.abs().max().item()
        assert ours_err <= bound, f"{name}: ours {ours_err:.3e} > 2 x torch {torch_err:.3e} + eps"


@requires_cuda
def test_gpu_long_sequence_bf16_padded():
    """A DiT-like shape (multiple tiles per program, autotuned configs) stays accurate."""
    B, H, L, D = 2, 2, 1100, 128
    kv = torch.tensor([1100, 987], device="cuda")
    tensors = _qkv(B, H, L, L, D, torch.bfloat16, "cuda", seed=6)
    grad_out = torch.randn(B, H, L, D).cuda()
    ours = _run(flash_attention, tensors, grad_out, kv_lens=kv)
    _assert_matches(ours, _reference(tensors, grad_out, kv_lens=kv), tol=3e-2)
