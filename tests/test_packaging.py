"""Packaging: every package folder is listed, the CLI starts cheaply, python -m lowmem works."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = {v: k for k, v in config["package-dir"].items()}  # folder -> package
    found = set()
    for top in ("core", "plugins"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join([mapping[rel[0]], *rel[1:]]))
    assert found == listed, f"missing from pyproject packages: {found - listed}; stale: {listed - found}"


def test_no_module_shadows_the_plugins_package():
    assert not (ROOT / "core" / "plugins.py").exists()


def test_help_and_listing_do_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from lowmem.cli import app; "
            "r = CliRunner().invoke(app, ['list-optimizers']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'galore_torch') "
            "if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"LOWMEM_LOAD_PLUGINS": "", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_python_dash_m_lowmem():
    out = subprocess.run([sys.executable, "-m", "lowmem", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "list-optimizers" in out.stdout
