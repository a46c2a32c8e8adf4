"""Modules to drop into a model: effattn backends behind torch.nn interfaces."""

from effattn.nn.multihead import MultiheadAttention, replace_attention
from effattn.nn.transformer_xl import TransformerXLAttention

__all__ = ["MultiheadAttention", "TransformerXLAttention", "replace_attention"]
