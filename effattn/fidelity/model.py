"""The pretrained encoder under an attention implementation: loading, embeddings, and the real
q, k, v of each layer (forward hooks).

The model is loaded as a user would load it: ``AutoModel.from_pretrained(folder,
attn_implementation=name)``, where ``name`` is transformers' own ``"sdpa"`` (the exact reference:
the model's own attention) or a name that effattn.integrations.huggingface registered for one
backend with options (:func:`register_setting`). Embeddings are the model card's: the mean of the
last hidden states over the tokens (all of them: the documents have no padding).

transformers is imported inside the functions that need it (the fidelity extra).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from effattn.registry import BackendSpec

REFERENCE = "sdpa"  # transformers' own attention implementation: the exact reference


def implementation_name(spec: BackendSpec) -> str:
    """The attn_implementation name of a backend with options: ``local:window=64`` ->
    ``effattn_local_window_64``."""
    return "effattn_" + re.sub(r"[^0-9A-Za-z]+", "_", spec.label).strip("_")


def register_setting(spec: BackendSpec) -> str:
    """Register ``spec`` (a backend and its options) with transformers through
    effattn.integrations.huggingface; returns its attn_implementation name."""
    from effattn.integrations import huggingface

    (name,) = huggingface.register(
        name=implementation_name(spec), backend=spec.name, **dict(spec.options)
    )
    return name


def load_model(folder: Path, attn_implementation: str, device: str = "cpu") -> nn.Module:
    """``AutoModel.from_pretrained(folder, attn_implementation=...)`` in eval mode (no dropout),
    float32, on ``device``; local files only."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        str(folder), attn_implementation=attn_implementation, local_files_only=True
    )
    return model.eval().to(device)


def load_tokenizer(folder: Path) -> Any:
    """The model's own tokenizer (tokenizer.json), local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The BERT-style self-attention modules of ``model`` in layer order: those with ``query``,
    ``key`` and ``value`` projections (nn.Linear) and ``attention_head_size``."""
    found = [
        module
        for module in model.modules()
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("query", "key", "value"))
        and hasattr(module, "attention_head_size")
    ]
    if not found:
        raise ValueError(
            f"model: expected BERT-style self-attention modules (query, key and value "
            f"projections), found none in {type(model).__name__}"
        )
    return found


@contextlib.contextmanager
def causal_attention(model: nn.Module, causal: bool) -> Iterator[None]:
    """Run every self-attention module of ``model`` causally (``is_causal``, which transformers'
    and effattn's attention calls read) or not, inside the block; restores the flags after."""
    modules = self_attention_modules(model)
    before = [getattr(module, "is_causal", False) for module in modules]
    try:
        for module in modules:
            module.is_causal = causal
        yield
    finally:
        for module, flag in zip(modules, before, strict=True):
            module.is_causal = flag


@torch.inference_mode()
def embed(model: nn.Module, ids: Tensor, batch_size: int) -> Tensor:
    """Sentence embeddings: the mean of the last hidden states over the tokens.

    ids: (count, N) token ids without padding. Returns (count, hidden) float32, not normalised
    (the cosine is taken later)."""
    device = next(model.parameters()).device
    out = []
    for chunk in ids.split(batch_size):
        hidden = model(input_ids=chunk.to(device)).last_hidden_state  # (b, N, hidden)
        out.append(hidden.mean(dim=1).float().cpu())  # (b, N, hidden) -> (b, hidden)
    return torch.cat(out)


@dataclass(frozen=True)
class LayerActivations:
    """One attention layer's real inputs and output in one forward pass."""

    q: Tensor  # (B, H, N, D): the query projection, split into heads
    k: Tensor  # (B, H, N, D)
    v: Tensor  # (B, H, N, D)
    out: Tensor  # (B, H, N, D): the attention output the model computed from them
    scale: float  # the layer's softmax scale (1/sqrt(D) for BERT)
    causal: bool  # whether the layer ran causally


class AttentionCapture:
    """Forward hooks that record each self-attention layer's q, k, v and output.

    >>> capture = AttentionCapture(model)
    >>> with capture:
    ...     model(input_ids=ids)
    >>> capture.layers[0].q.shape                      # (B, H, N, D)

    ``layers`` holds the last forward pass inside the block, one entry per layer.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = self_attention_modules(model)
        self.layers: list[LayerActivations] = []
        self._seen: list[dict[str, Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionCapture:
        self._seen = [{} for _ in self.modules]
        for index, module in enumerate(self.modules):
            for name in ("query", "key", "value"):
                hook = self._projection_hook(index, name, module.attention_head_size)
                self._handles.append(getattr(module, name).register_forward_hook(hook))
            self._handles.append(module.register_forward_hook(self._output_hook(index, module)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _projection_hook(self, index: int, name: str, head_dim: int):
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            self._seen[index][name] = _heads(output, head_dim)

        return hook

    def _output_hook(self, index: int, module: nn.Module):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            seen = self._seen[index]
            attn = output[0] if isinstance(output, tuple) else output  # (B, N, H*D)
            head_dim = module.attention_head_size
            scale = getattr(module, "scaling", None) or head_dim**-0.5
            activations = LayerActivations(
                q=seen["query"],
                k=seen["key"],
                v=seen["value"],
                out=_heads(attn, head_dim),
                scale=float(scale),
                causal=bool(getattr(module, "is_causal", False)),
            )
            if index == 0:
                self.layers = []
            self.layers.append(activations)

        return hook


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, N, H*D) -> (B, H, N, D), detached and contiguous."""
    batch, length, width = x.shape
    x = x.detach().view(batch, length, width // head_dim, head_dim)  # (B, N, H*D) -> (B, N, H, D)
    return x.transpose(1, 2).contiguous()  # (B, N, H, D) -> (B, H, N, D)
