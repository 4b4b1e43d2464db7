"""Benchmark: our Triton attention vs torch SDPA backends (and flash-attn), plus qk-norm-rope.

Run as ``python -m dopsd_kernels.bench`` or, on a bare GPU box with only torch + triton,
as ``python kernels/bench.py`` from the repository root. Prints tables; never asserts
(timing belongs in benchmarks, correctness in tests).

Workload: DiT self-attention, bf16, head dim 128, a padded batch where every sample has
5-20% padding. TFLOP/s counts useful work only (valid queries x valid keys, backward =
2.5 x forward), so a backend that computes the padding pays for it in time:
- ``triton``: our kernel with kv_lens (padded query rows still computed, as SDPA does);
- ``triton+q_lens``: also skips padded query rows;
- ``sdpa-<backend>``: torch SDPA with a boolean key mask; a backend that rejects masks
  runs the unmasked padded problem, marked "(no mask)";
- ``flash-attn varlen``: packed valid tokens, if flash-attn is installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import warnings

import torch

FULL_SHAPES = [(1, 24, 1024), (4, 24, 1024), (2, 24, 4096), (4, 24, 4096), (1, 30, 8192), (2, 30, 8192)]
QUICK_SHAPES = [(2, 24, 1024), (2, 24, 4096)]
HEAD_DIM = 128
MATH_LIMIT_BYTES = 16 << 30  # skip the math backend when its [B, H, L, L] fp32 scores exceed this


def _package():
    """The kernels package, whether run with -m (relative) or as a plain script."""
    if __package__:
        return importlib.import_module(__package__)
    folder = pathlib.Path(__file__).resolve().parent
    # Run as a file, Python put this folder on sys.path: its modules must not shadow others.
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != folder]
    spec = importlib.util.spec_from_file_location(
        "dopsd_kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dopsd_kernels"] = module
    spec.loader.exec_module(module)
    return module


def _lengths(batch: int, length: int, device) -> torch.Tensor:
    """Valid lengths with 5% .. 20% padding, spread over the batch."""
    pads = torch.linspace(0.05, 0.20, batch) if batch > 1 else torch.tensor([0.10])
    return ((1 - pads) * length).round().to(torch.int32).to(device)


def _time_ms(fn, grad_to_none=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none)


def _measure(forward, tensors):
    """(fwd ms, bwd ms, fwd+bwd ms, peak extra MiB) of forward(*tensors) -> output."""
    out = forward()
    grad = torch.randn_like(out)
    torch.autograd.backward(out, grad)  # warm-up, triggers autotuning
    fwd = _time_ms(forward)
    out = forward()
    bwd = _time_ms(lambda: torch.autograd.backward(out, grad, retain_graph=True), grad_to_none=tensors)
    both = _time_ms(lambda: torch.autograd.backward(forward(), grad), grad_to_none=tensors)
    out = None  # frees the retained graph
    for t in tensors:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.backward(forward(), grad)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in tensors:
        t.grad = None
    return fwd, bwd, both, peak


def _sdpa_runner(backend, q, k, v, keep):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def run(mask):
        with sdpa_kernel([backend]):
            return sdpa(q, k, v, attn_mask=mask)

    for mask, note in ((keep, ""), (None, " (no mask)")):
        try:
            with warnings.catch_warnings():  # torch explains at length why a backend declines
                warnings.simplefilter("ignore")
                torch.autograd.backward(run(mask), torch.ones_like(q))
            return (lambda: run(mask)), note
        except RuntimeError:
            continue
    return None, ""


def _flash_attn_runner(q, k, v, lens):
    """flash-attn varlen on the packed valid tokens, or None if not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None, None
    keep = torch.arange(q.shape[2], device=q.device)[None, :] < lens[:, None]
    packed = [t.detach().transpose(1, 2)[keep].contiguous().requires_grad_() for t in (q, k, v)]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum(lens, 0)
    max_len = int(lens.max())
    return (lambda: flash_attn_varlen_func(*packed, cu, cu, max_len, max_len)), packed


def bench_attention(kernels, shapes, lengths=_lengths) -> list[dict]:
    """Print the table; return its rows (`lengths(B, L, device)`: the valid lengths per sample)."""
    from torch.nn.attention import SDPBackend

    rows = []

    print(
        f"\nattention, bf16, head dim {HEAD_DIM}, non-causal, 5-20% padding per sample; "
        "TFLOP/s on valid tokens only (bwd = 2.5 x fwd)"
    )
    header = f"{'backend':<28}{'shape B,H,L':>16}{'fwd':>8}{'bwd':>8}{'fwd+bwd':>9}{'ms f+b':>9}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    for B, H, L in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(B, H, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(3)
        )
        lens = lengths(B, L, "cuda")
        keep = (torch.arange(L, device="cuda")[None, :] < lens[:, None])[:, None, None, :]
        fwd_flops = 4 * H * HEAD_DIM * float((lens.double() ** 2).sum())
        runners = [
            ("triton", lambda: kernels.flash_attention(q, k, v, kv_lens=lens), (q, k, v)),
            ("triton+q_lens", lambda: kernels.flash_attention(q, k, v, kv_lens=lens, q_lens=lens), (q, k, v)),
        ]
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        ):
            name = f"sdpa-{backend.name.lower().replace('_attention', '')}"
            if backend == SDPBackend.MATH and B * H * L * L * 4 > MATH_LIMIT_BYTES:
                print(f"{name:<28}{f'{B},{H},{L}':>16}  skipped (scores too large)")
                rows.append({"backend": name, "shape": [B, H, L], "note": "skipped (scores too large)"})
                continue
            fn, note = _sdpa_runner(backend, q, k, v, keep)
            if fn is None:
                print(f"{name:<28}{f'{B},{H},{L}':>16}  not available")
                rows.append({"backend": name, "shape": [B, H, L], "note": "not available"})
                continue
            runners.append((name + note, fn, (q, k, v)))
        fa, packed = _flash_attn_runner(q, k, v, lens)
        if fa is not None:
            runners.append(("flash-attn varlen", fa, packed))
        for name, fn, tensors in runners:
            fwd, bwd, both, peak = _measure(fn, tensors)
            tf = lambda flops, ms: flops / ms / 1e9  # noqa: E731
            print(
                f"{name:<28}{f'{B},{H},{L}':>16}{tf(fwd_flops, fwd):>8.0f}{tf(2.5 * fwd_flops, bwd):>8.0f}"
                f"{tf(3.5 * fwd_flops, both):>9.0f}{both:>9.2f}{peak:>10.0f}"
            )
            rows.append(
                {
                    "backend": name,
                    "shape": [B, H, L],
                    "valid_lengths": lens.tolist(),
                    "fwd_tflops": tf(fwd_flops, fwd),
                    "bwd_tflops": tf(2.5 * fwd_flops, bwd),
                    "fwd_bwd_tflops": tf(3.5 * fwd_flops, both),
                    "fwd_bwd_ms": both,
                    "peak_mib": peak,
                }
            )
        print()
    return rows


def _eager_norm_rope(reference, x, weight, cos, sin):
    """What diffusers does in eager mode: upcast to fp32, norm, rope, cast back."""
    return reference.norm_rope_reference(x.float(), weight.float(), cos, sin, 1e-6).to(x.dtype)


def bench_norm_rope(kernels, shapes) -> None:
    reference = kernels.reference
    print(
        "qk-norm-rope (one tensor), bf16, interleaved; GB/s of compulsory traffic "
        "(fwd: read x + write y; fwd+bwd adds read x, dy + write dx)"
    )
    header = f"{'impl':<12}{'shape B,L,H,D':>20}{'fwd GB/s':>10}{'f+b GB/s':>10}{'fwd ms':>9}{'f+b ms':>9}"
    print(header)
    print("-" * len(header))
    for B, L, H in shapes:
        x = torch.randn(B, L, H, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.rand(HEAD_DIM, device="cuda", requires_grad=True)
        angles = torch.rand(1, L, HEAD_DIM // 2, device="cuda") * 6.28
        cos, sin = angles.cos(), angles.sin()
        grad = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        impls = [
            ("triton", lambda: kernels.norm_rope(x, weight, cos, sin, 1e-6)),
            ("torch eager", lambda: _eager_norm_rope(reference, x, weight, cos, sin)),
        ]
        for name, fn in impls:
            torch.autograd.backward(fn(), grad)
            fwd = _time_ms(fn)
            both = _time_ms(lambda: torch.autograd.backward(fn(), grad), grad_to_none=[x, weight])
            print(
                f"{name:<12}{f'{B},{L},{H},{HEAD_DIM}':>20}{2 * nbytes / fwd / 1e6:>10.0f}"
                f"{5 * nbytes / both / 1e6:>10.0f}{fwd:>9.3f}{both:>9.3f}"
            )
    print()


def cpu_smoke(kernels) -> None:
    """Tiny interpreter run: checks that the bench's code paths work without a GPU."""
    q, k, v = (torch.randn(2, 2, 70, 32, requires_grad=True) for _ in range(3))
    lens = torch.tensor([70, 51])
    out = kernels.flash_attention(q, k, v, kv_lens=lens)
    out.sum().backward()
    ref = kernels.attention_reference(q.detach(), k.detach(), v.detach(), kv_lens=lens)
    print(f"cpu smoke (interpreter): attention max |err| = {(out - ref).abs().max().item():.2e}")
    x = torch.randn(1, 9, 2, 32, requires_grad=True)
    angles = torch.rand(1, 9, 16)
    y = kernels.norm_rope(x, torch.ones(32), angles.cos(), angles.sin())
    y.sum().backward()
    ref = kernels.norm_rope_reference(x.detach(), torch.ones(32), angles.cos(), angles.sin())
    print(f"cpu smoke (interpreter): norm-rope max |err| = {(y - ref).abs().max().item():.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="without CUDA: run a tiny shape in the Triton interpreter"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        if not args.cpu_smoke:
            print(
                "dopsd_kernels.bench: no CUDA device; nothing to benchmark "
                "(use --cpu-smoke for a tiny interpreter run)."
            )
            return 0
        if __package__ and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            # Under -m the package (and triton) was imported before main(): too late to
            # switch the interpreter on in this process, so run again with it set.
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.call([sys.executable, "-m", f"{__package__}.bench", *sys.argv[1:]], env=env)
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        cpu_smoke(_package())
        return 0
    kernels = _package()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bench_attention(kernels, QUICK_SHAPES if args.quick else FULL_SHAPES)
    norm_shapes = [(2, 4096, 24)] if args.quick else [(2, 4096, 24), (1, 8192, 30), (4, 4096, 24)]
    bench_norm_rope(kernels, norm_shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
