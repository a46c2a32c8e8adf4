"""The model family: a small pre-norm Transformer whose self-attention is the drop-in
:class:`effattn.MultiheadAttention`. Every backend gets the same model, the same weights at the
same seed; only the attention's backend (and, for causal-only or bidirectional-only backends,
its direction) changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from effattn.nn import MultiheadAttention


@dataclass(frozen=True)
class ModelConfig:
    """The shape of the model (the same for every backend of a run)."""

    d_model: int = 64  # E, width of the residual stream
    layers: int = 2  # encoder layers
    heads: int = 2  # attention heads H (head dim D = d_model / heads)
    ffn_mult: int = 2  # feed-forward width = ffn_mult * d_model

    def __post_init__(self) -> None:
        for name in ("d_model", "layers", "heads", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name}: expected a positive integer, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(
                f"model.heads: expected a divisor of d_model = {self.d_model}, got {self.heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


class QualityModel(nn.Module):
    """Token embedding (C channels summed) + learned positions -> ``layers`` pre-norm
    nn.TransformerEncoderLayer with an effattn.MultiheadAttention -> LayerNorm -> linear
    classifier, applied at the scored positions.

    forward(inputs (B, N, C) int64, scored (B, N) bool) -> logits (S, num_classes), S = the
    number of scored positions, in row-major order of ``scored``.
    """

    def __init__(
        self,
        num_tokens: int,
        num_classes: int,
        seq_len: int,
        config: ModelConfig,
        backend: str,
        options: dict[str, Any] | None = None,
        *,
        causal: bool = False,
    ) -> None:
        super().__init__()
        d = config.d_model
        self.causal = causal
        self.embed = nn.Embedding(num_tokens, d)
        self.position = nn.Embedding(seq_len, d)
        self.layers = nn.ModuleList()
        for _ in range(config.layers):
            layer = nn.TransformerEncoderLayer(
                d,
                config.heads,
                dim_feedforward=config.ffn_mult * d,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            layer.self_attn = MultiheadAttention(
                d, config.heads, batch_first=True, backend=backend, **(options or {})
            )
            self.layers.append(layer)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        # Small embeddings (GPT-2's 0.02): at nn.Embedding's N(0, 1), the random positions
        # would dominate the first attention scores and hold off content matching.
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, inputs: Tensor, scored: Tensor) -> Tensor:
        n = inputs.shape[1]
        x = self.embed(inputs).sum(dim=2)  # (B, N, C) -> (B, N, C, E) -> (B, N, E)
        x = x + self.position.weight[:n]  # (N, E) broadcast over B
        for layer in self.layers:
            x = layer(x, is_causal=self.causal)
        return self.head(self.norm(x[scored]))  # (B, N, E) -> (S, E) -> (S, classes)
