"""A normal (non-editable) install carries every subpackage and the shipped toy-world assets."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

# top-level source folder -> import name in the wheel
IMPORT_NAMES = {"dopsd_scale": "dopsd_scale", "kernels": "dopsd_kernels", "data_tools": "dopsd_data_tools"}


def _packages_in_tree() -> set[str]:
    found = set()
    for folder, name in IMPORT_NAMES.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tree (a build writes `build/` and egg-info beside the sources)."""
    src, out = tmp_path_factory.mktemp("src") / "repo", tmp_path_factory.mktemp("wheel")
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return next(out.glob("dopsd_scale-*.whl"))


def test_the_wheel_holds_every_package_and_the_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert _packages_in_tree() <= packages, _packages_in_tree() - packages
    assets = [n for n in names if "/toyworld/assets/" in n]
    assert any(n.endswith("classifier.safetensors") for n in assets)
    if (REPO / "dopsd_scale" / "toyworld" / "assets" / "base" / "toyworld.json").is_file():
        assert any(n.endswith("base/transformer/diffusion_pytorch_model.safetensors") for n in assets)
        assert any(n.endswith("base/tokenizer/tokenizer.json") for n in assets)


def test_an_installed_wheel_imports_everything_and_runs_the_cli(wheel, tmp_path):
    """Into a fresh venv (its dependencies visible from this one), run from outside the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # the dependencies come from the test's own environment; its editable install of this
    # project is not activated this way (only .pth files of the venv's own site dir are run)
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import importlib, dopsd_scale\n"
        f"names = {sorted(_packages_in_tree())!r}\n"
        "for n in names: importlib.import_module(n)\n"
        "from dopsd_scale.toyworld.classifier import load_classifier\n"
        "load_classifier()\n"
        "print(dopsd_scale.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert str(venv) in out.stdout  # the installed copy, not the checkout
    help_text = subprocess.run(
        [str(venv / "bin" / "dopsd"), "--help"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    ).stdout
    for command in ("train", "cache-features", "toyworld", "sample", "export"):
        assert command in help_text
