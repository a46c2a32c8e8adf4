"""effattn: efficient-attention backends behind one interface, and the suite that measures them.

>>> import torch, effattn
>>> q = k = v = torch.randn(1, 8, 1024, 64)           # (B, H, N, D)
>>> out = effattn.attention(q, k, v, backend="sdpa", causal=True)
"""

from effattn.api import attention
from effattn.backend import Backend
from effattn.decoding import DecodeState, decode_state
from effattn.nn import MultiheadAttention, TransformerXLAttention
from effattn.patterns import Pattern
from effattn.registry import backend_class, get_backend, list_backends, register_backend

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "DecodeState",
    "MultiheadAttention",
    "Pattern",
    "TransformerXLAttention",
    "__version__",
    "attention",
    "backend_class",
    "decode_state",
    "get_backend",
    "list_backends",
    "register_backend",
]


def _map_source_kernels() -> None:
    """From a source tree used without an install (PYTHONPATH=.), map kernels/ to the subpackage
    effattn.kernels, as setuptools' package-dir mapping does in an installed package."""
    import importlib.util
    import sys
    from pathlib import Path

    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if "effattn.kernels" in sys.modules or not init.exists():
        return
    if importlib.util.find_spec("effattn.kernels") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "effattn.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["effattn.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what the import system does for a found subpackage


_map_source_kernels()
