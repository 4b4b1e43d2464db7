"""The compile check builds a kernel for sm_90 on this machine, GPU or not (triton's bundled ptxas)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"


def _can_compile_for_cuda() -> bool:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        return False
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return pathlib.Path(get_ptxas(90).path).is_file()
    except Exception:  # no bundled ptxas on this platform
        return False


def _compile_check(tmp_path, interpret: bool, *args: str) -> subprocess.CompletedProcess:
    """`python -m dopsd_kernels.compile_check ARGS`, importable whether or not the package is installed."""
    (tmp_path / "dopsd_kernels").symlink_to(KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "dopsd_kernels.compile_check", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="triton's CUDA backend or its ptxas is missing")
def test_attention_forward_compiles_for_sm90_and_reports_registers(tmp_path):
    done = _compile_check(tmp_path, False, "--only", "attention_fwd", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| attention_fwd")]
    assert len(rows) == 1, done.stdout  # fp32 prunes the candidates to the last one
    kernel, blocks, warps, stages, registers, spills, seconds = (cell.strip() for cell in rows[0])
    assert blocks == "BLOCK_M=64 BLOCK_N=32" and warps == "4" and stages == "2"
    assert 0 < int(registers) <= 255 and int(spills) >= 0, done.stdout


def test_interpreted_kernels_are_refused(tmp_path):
    done = _compile_check(tmp_path, True)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr
