"""The layout promised by the design: kernels/ is the subpackage effattn.kernels, not `kernels`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_kernels_import_as_a_subpackage_only(tmp_path):
    done = _run(
        "import importlib.util, effattn.kernels;"
        "print(effattn.kernels.__name__);"
        "print(importlib.util.find_spec('kernels') is None)",
        cwd=tmp_path,  # away from the repository root, as an installed user would be
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["effattn.kernels", "True"]


def test_import_needs_no_optional_dependency(tmp_path):
    done = _run(
        "import sys, effattn; effattn.list_backends();"
        "print(sorted(m for m in ('triton', 'matplotlib', 'transformers') if m in sys.modules))",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_package_directory_is_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    mapping = config["package-dir"]
    on_disk = set()
    for package_name, directory in mapping.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / directory)
            on_disk.add(".".join([package_name, *relative.parts]))
    assert on_disk <= declared, f"undeclared packages: {sorted(on_disk - declared)}"
