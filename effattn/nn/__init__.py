"""Modules to drop into a model: effattn backends behind torch.nn interfaces."""

from effattn.nn.multihead import MultiheadAttention, replace_attention

__all__ = ["MultiheadAttention", "replace_attention"]
