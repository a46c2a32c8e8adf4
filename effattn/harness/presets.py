"""Preset files: the TOML files a study ships as package data in its ``presets/`` folder, found
through importlib.resources (so that an installed wheel finds them as a checkout does), or any
.toml file a user names by path."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any


def preset_folder(package: str) -> Traversable:
    """The ``presets/`` folder of a study's package (``effattn.sweep``)."""
    return resources.files(package) / "presets"


def presets_in(package: str) -> list[str]:
    """The preset names a study's package ships."""
    folder = preset_folder(package)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def find_preset(name: str, package: str) -> Traversable:
    """A preset name of ``package`` (``tay``) or a path to a TOML file; ValueError listing the
    known ones."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    candidate = preset_folder(package) / f"{name}.toml"
    if candidate.is_file():
        return candidate
    known = ", ".join(presets_in(package)) or f"none found in {package}"
    raise ValueError(f"preset: unknown preset {name!r} (known: {known}; or a path to a .toml)")


def tuple_of(section: str, key: str, value: Any, kind: type) -> tuple:
    """A preset value (one or a list) as a tuple of ``kind``; ValueError naming section.key."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ValueError(f"{section}.{key}: expected {kind.__name__} values, got {v!r}")
    return tuple(values)
