"""Compile every kernel launch for a GPU architecture on a machine without one: registers, spills.

Triton lowers a kernel to PTX and ptxas assembles it with no device present. This module
records the launches the kernels' own launchers make at one shape (tensors on the meta device:
nothing is allocated), compiles every autotune candidate of each for the target architecture
with the signature, constexprs and 16-byte alignment hints the runtime would derive, and reports
registers per thread and spill bytes per candidate. It uses the installed triton, so the triton
of a GPU machine can be checked before that machine is used:

    python -m dopsd_kernels.compile_check [--arch 90] [--dtype bf16] [--head-dim 128]

Run it without TRITON_INTERPRET: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import triton

from . import attention_bwd, attention_fwd
from ._runtime import INTERPRET

# the package exports a function of the same name, so import the module by its full name
norm_rope_module = importlib.import_module(f"{__package__}.qk_norm_rope")

KERNELS = {
    "attention_fwd": (attention_fwd, "_attn_fwd_kernel"),
    "attention_bwd_delta": (attention_bwd, "_delta_kernel"),
    "attention_bwd_dkdv": (attention_bwd, "_dkdv_kernel"),
    "attention_bwd_dq": (attention_bwd, "_dq_kernel"),
    "norm_rope_fwd": (norm_rope_module, "_norm_rope_fwd_kernel"),
    "norm_rope_bwd": (norm_rope_module, "_norm_rope_bwd_kernel"),
}
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
OPTIONS = ("num_warps", "num_stages")


@dataclass
class Launch:
    """One recorded kernel launch: the kernel's name, its arguments by name, its candidates."""

    name: str
    fn: triton.JITFunction
    args: dict
    configs: list[triton.Config]


class _Recorder:
    """Stands in for a kernel object: `kernel[grid](*args, **kwargs)` records instead of running."""

    def __init__(self, name: str, kernel, launches: list[Launch]):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
        fn = self.kernel if isinstance(self.kernel, triton.JITFunction) else self.kernel.fn  # an Autotuner
        named = {**dict(zip(fn.arg_names, args)), **{k: v for k, v in kwargs.items() if k not in OPTIONS}}
        configs = getattr(self.kernel, "configs", None)
        if configs is None:
            options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
            configs = [triton.Config({}, **{"num_warps": 4, "num_stages": 3, **options})]
        elif getattr(self.kernel, "early_config_prune", None):
            configs = self.kernel.early_config_prune(configs, named)
        self.launches.append(Launch(self.name, fn, named, list(configs)))


def record_launches(dtype: torch.dtype, head_dim: int, tokens: int, heads: int) -> list[Launch]:
    """The launches of one attention forward + backward and one norm-rope forward + backward
    (joint attention over `tokens` padded tokens, per-sample key and query lengths)."""
    launches: list[Launch] = []
    meta = dict(device="meta", dtype=dtype)
    q, k, v = (torch.empty(1, heads, tokens, head_dim, **meta) for _ in range(3))
    lens = torch.empty(1, device="meta", dtype=torch.int32)
    x = torch.empty(1, tokens, heads, head_dim, **meta)
    table = torch.empty(1, tokens, head_dim // 2, device="meta", dtype=torch.float32)
    weight = torch.empty(head_dim, **meta)
    with ExitStack() as stack:
        for name, (module, attr) in KERNELS.items():
            recorder = _Recorder(name, getattr(module, attr), launches)
            stack.enter_context(mock.patch.object(module, attr, recorder))
        out, lse = attention_fwd.attention_forward(q, k, v, lens, lens, head_dim**-0.5)
        attention_bwd.attention_backward(out, q, k, v, out, lse, lens, lens, head_dim**-0.5)
        norm_rope_module._norm_rope_forward(x, weight, table, table, 1e-6, True)
        norm_rope_module._norm_rope_backward(x, x, weight, table, table, 1e-6, True)
    return launches


def source(launch: Launch, config: triton.Config):
    """What the runtime would compile for this launch and candidate (an `ASTSource`)."""
    values = {**launch.args, **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(launch.fn.params):
        value = values[param.name]
        if param.is_constexpr or (type(value) is int and value == 1):  # the runtime specialises 1
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh torch allocations are aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    return triton.compiler.ASTSource(launch.fn, signature, constexprs, attrs)


def compile_candidate(launch: Launch, config: triton.Config, arch: int) -> dict:
    """Compile one candidate for `arch`; {registers, spill_bytes, seconds} or {error}."""
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    start = time.perf_counter()
    try:
        compiled = triton.compile(source(launch, config), target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # a compile failure is the finding, not a crash of the check
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return {**ptxas_usage(compiled.asm["ptx"], arch), "seconds": round(time.perf_counter() - start, 1)}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes, as `ptxas -v` reports them for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={target}", str(path), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    if done.returncode or registers is None:
        return {"error": f"ptxas: {done.stderr.strip()[-200:]}"}
    return {"registers": int(registers.group(1)), "spill_bytes": int(spills.group(1)) if spills else 0}


def check(arch: int, dtype: torch.dtype, head_dim: int, tokens: int, heads: int, only: str = "") -> list[dict]:
    """One row per (kernel, candidate)."""
    rows = []
    for launch in record_launches(dtype, head_dim, tokens, heads):
        if only and launch.name != only:
            continue
        for config in launch.configs:
            blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            result = compile_candidate(launch, config, arch)
            rows.append(
                {"kernel": launch.name, "blocks": blocks, "warps": config.num_warps, "stages": config.num_stages}
                | result
            )
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel | blocks | warps | stages | registers | spill bytes | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tail = f"{r['error']} | - | -" if "error" in r else f"{r['registers']} | {r['spill_bytes']} | {r['seconds']}"
        lines.append(f"| {r['kernel']} | {r['blocks']} | {r['warps']} | {r['stages']} | {tail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dopsd_kernels.compile_check", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4352, help="padded sequence length (Z-Image at 1024^2)")
    p.add_argument("--heads", type=int, default=30)
    p.add_argument("--only", choices=sorted(KERNELS), default="", help="one kernel")
    args = p.parse_args(argv)
    if INTERPRET:
        p.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    dtype = next(t for t, name in DTYPES.items() if name == args.dtype)
    rows = check(args.arch, dtype, args.head_dim, args.tokens, args.heads, args.only)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, head dim {args.head_dim}")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
