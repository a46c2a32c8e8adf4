"""A drop-in for torch.nn.MultiheadAttention whose attention is any effattn backend.

Same constructor, parameters, state_dict, forward signature and return value as
``nn.MultiheadAttention``, so it can replace ``layer.self_attn`` in nn.TransformerEncoderLayer or
nn.TransformerDecoderLayer. Masks follow nn.MultiheadAttention's conventions here:
``key_padding_mask`` True = padding (ignored), ``attn_mask`` True = not allowed. Note that the
functional ``effattn.attention`` follows SDPA's instead (True = takes part).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effattn.backend import Backend
from effattn.reference import pattern_probabilities
from effattn.registry import get_backend


def _keep_off_fused_fast_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. nn.TransformerEncoderLayer skips its fused inference path (which
    would compute attention itself, bypassing our backend) when any submodule has hooks."""


class MultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention computed by an effattn backend.

    Args: those of nn.MultiheadAttention, plus ``backend`` (a registered name or a Backend) and
    the backend's options. ``dropout`` is accepted for compatibility but effattn backends do not
    drop attention probabilities: a module in training mode with dropout > 0 warns once.

    Supported masks: ``key_padding_mask`` (B, S) bool (True = padding) or float (0 / -inf), and
    ``attn_mask`` only when it is the causal mask (or ``is_causal=True``): effattn backends take
    causality and key padding, not arbitrary (L, S) masks.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str | Backend = "full",
        **options: Any,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self.backend = get_backend(backend, **options)
        self._warned_dropout = False
        self.register_forward_pre_hook(_keep_off_fused_fast_path)

    @classmethod
    def from_torch(
        cls, mha: nn.MultiheadAttention, backend: str | Backend = "full", **options: Any
    ) -> MultiheadAttention:
        """A copy of ``mha`` (same configuration and weights) computed by ``backend``."""
        ref = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=ref.device,
            dtype=ref.dtype,
            backend=backend,
            **options,
        )
        new.load_state_dict(mha.state_dict())
        new.train(mha.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """query: (L, B, E) or (B, L, E) with batch_first, or unbatched (L, E); key, value likewise
        with S positions. Returns (attn_output of query's layout, weights (B, L, S) averaged over
        heads or (B, H, L, S), or None when need_weights=False)."""
        if any(t.is_nested for t in (query, key, value)):
            raise ValueError(
                "query: nested tensors are not supported; nn.TransformerEncoder makes them on its "
                "inference fast path: build the model with enable_nested_tensor=False or use "
                "effattn.nn.replace_attention(model, ...), which turns it off"
            )
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query: expected (L, E), (L, B, E) or (B, L, E), got shape {tuple(query.shape)}"
            )
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # Now (B, L, E) and (B, S, E).
        self._warn_about_dropout()
        keep = _keep_from_padding(key_padding_mask, key.shape[0], key.shape[1])
        q, k, v = self._project(query, key, value)  # (B, H, L, Dh), (B, H, S, Dh) twice
        k, v, keep = self._append_extra_keys(k, v, keep)
        causal = self._causal_from(attn_mask, is_causal)

        out = self.backend(q, k, v, causal=causal, key_padding_mask=keep)
        batch, heads, q_len, head_dim = out.shape
        out = out.transpose(1, 2).reshape(
            batch, q_len, heads * head_dim
        )  # (B, H, L, Dh) -> (B, L, E)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (B, L, E) -> (L, B, E)

        weights = None
        if need_weights:
            weights = self._weights(q, k, v, causal, keep, average_attn_weights)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    # -- pieces of forward -----------------------------------------------------------------
    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, E), (B, S, kdim), (B, S, vdim) -> q (B, H, L, Dh), k and v (B, H, S, Dh)."""
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if self.bias_k is not None:
            batch = k.shape[0]
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)  # (B, S+1, E)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)

        def split_heads(t: Tensor) -> Tensor:
            batch, length, _ = t.shape
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        return split_heads(q), split_heads(k), split_heads(v)

    def _append_extra_keys(
        self, k: Tensor, v: Tensor, keep: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Account for add_bias_kv (already appended in _project) and add_zero_attn in the mask."""
        extra = int(self.bias_k is not None)
        if self.add_zero_attn:
            zeros = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])  # (B, H, 1, Dh)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            extra += 1
        if keep is not None and extra:
            keep = F.pad(keep, (0, extra), value=True)  # the appended keys always take part
        return k, v, keep

    def _causal_from(self, attn_mask: Tensor | None, is_causal: bool) -> bool:
        causal = is_causal or (attn_mask is not None and _is_causal_mask(attn_mask))
        if attn_mask is not None and not causal:
            raise ValueError(
                "attn_mask: effattn backends take a causal mask and key padding only, got a "
                f"{tuple(attn_mask.shape)} mask that is not causal; pass key_padding_mask for "
                "padding, or is_causal=True"
            )
        if causal and (self.bias_k is not None or self.add_zero_attn):
            raise ValueError(
                "attn_mask: a causal mask with add_bias_kv or add_zero_attn is not supported "
                "(the appended keys would break the causal alignment)"
            )
        return causal

    def _weights(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        keep: Tensor | None,
        average: bool,
    ) -> Tensor:
        """The backend's attention probabilities, from its pattern: (B, L, S) or (B, H, L, S)."""
        try:
            pattern = self.backend.pattern(q, k, v, causal=causal, key_padding_mask=keep)
        except NotImplementedError as err:
            raise ValueError(
                f"need_weights: backend {self.backend.name!r} cannot show its attention weights "
                "(it defines no pattern()); pass need_weights=False"
            ) from err
        probs = pattern_probabilities(q, k, pattern, q.shape[-1] ** -0.5).to(q.dtype)
        return probs.mean(dim=1) if average else probs

    def _warn_about_dropout(self) -> None:
        if self.training and self.dropout > 0 and not self._warned_dropout:
            warnings.warn(
                f"effattn.MultiheadAttention: dropout={self.dropout} is not applied to the "
                "attention probabilities (effattn backends have no attention dropout)",
                stacklevel=3,
            )
            self._warned_dropout = True


def _keep_from_padding(mask: Tensor | None, batch: int, kv_len: int) -> Tensor | None:
    """nn.MultiheadAttention's key_padding_mask (True / -inf = padding) -> keep (B, S) bool."""
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, kv_len):
        raise ValueError(
            f"key_padding_mask: expected shape (B, S) = {(batch, kv_len)}, got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return ~mask
    if mask.is_floating_point():
        if not bool(((mask == 0) | (mask == float("-inf"))).all()):
            raise ValueError(
                "key_padding_mask: a float mask must hold only 0 (keep) and -inf (padding); "
                "pass a bool mask (True = padding) instead"
            )
        return mask == 0
    raise TypeError(f"key_padding_mask: expected a bool or float tensor, got {mask.dtype}")


def _is_causal_mask(mask: Tensor) -> bool:
    """True if ``mask`` is nn.Transformer's square causal mask (bool True or float -inf above the
    diagonal, nothing else)."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    future = torch.ones_like(mask, dtype=torch.bool).triu(diagonal=1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, future))
    blocked = mask == float("-inf")
    return bool(torch.equal(blocked, future) and (mask[~future] == 0).all())


def replace_attention(
    model: nn.Module, backend: str | Backend = "full", **options: Any
) -> nn.Module:
    """Swap every nn.MultiheadAttention in ``model`` for an effattn one with the same weights,
    and turn off nn.TransformerEncoder's nested-tensor fast path (which bypasses self_attn).
    Returns ``model``, changed in place."""
    for name, child in model.named_children():
        if isinstance(child, nn.MultiheadAttention) and not isinstance(child, MultiheadAttention):
            setattr(model, name, MultiheadAttention.from_torch(child, backend, **options))
        else:
            replace_attention(child, backend, **options)
    if isinstance(model, nn.TransformerEncoder):
        model.use_nested_tensor = False
    return model
