"""effattn: efficient-attention backends behind one interface, and the suite that measures them.

>>> import torch, effattn
>>> q = k = v = torch.randn(1, 8, 1024, 64)           # (B, H, N, D)
>>> out = effattn.attention(q, k, v, backend="sdpa", causal=True)
"""

from effattn.api import attention
from effattn.backend import Backend, Pattern
from effattn.nn import MultiheadAttention
from effattn.registry import backend_class, get_backend, list_backends, register_backend

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "MultiheadAttention",
    "Pattern",
    "__version__",
    "attention",
    "backend_class",
    "get_backend",
    "list_backends",
    "register_backend",
]
