"""Test setup for dopsd_kernels.

Without CUDA the kernels run in the Triton interpreter, which must be switched on before
dopsd_kernels is imported (its @triton.jit functions are decorated then), hence the
environment variable is set here, at collection time. Triton itself may already have been
imported by the project's root conftest: the kernels avoid triton's own @jit helpers so
that this order does not matter (see dopsd_kernels/_runtime.py).
If the package is not installed (a bare GPU box with only torch + triton), the repo's
``kernels/`` folder is loaded under its import name ``dopsd_kernels``.
"""

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _load_from_repo() -> None:
    """Import ``<repo>/kernels`` as ``dopsd_kernels`` when it is not installed."""
    if importlib.util.find_spec("dopsd_kernels") is not None:
        return
    folder = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "dopsd_kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dopsd_kernels"] = module
    spec.loader.exec_module(module)


if HAS_TRITON:
    _load_from_repo()


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU if there is one, else the CPU interpreter."""
    return DEVICE
