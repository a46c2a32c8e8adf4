"""Transformer-XL (Tay class RC): the `xl` backend and its relative-position core (``relative``),
also used by effattn.nn.TransformerXLAttention."""
