"""The public Reformer LSH attentions beside our ``lsh``, called on shared-QK inputs q, v
(B, H, N, D) and returning (B, H, N, D):

- reformer-pytorch 1.4.4 ``LSHAttention(bucket_size, n_hashes)`` on (qk, v) of shape
  (B*H, N, D); its scale is 1/sqrt(D);
- HF transformers' ``LSHSelfAttention`` with its two input projections replaced (query_key by
  the identity, value by a module returning v), so that only the attention core runs; its scale
  is 1.

All three use shared-QK, chunks of ``bucket_size`` attending to themselves and the previous
chunk, N / bucket_size buckets and no dedup. With one hash round and N = 2 * bucket_size every
pair is met once, so the three agree under the same scale; with several rounds they differ by
design: both peers sort all rounds into one sequence, so the first chunk of round r looks back
into the last chunk of round r-1, while ours keeps rounds apart. Each peer is imported when its
call is built (ImportError when it is not installed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import effattn


class _Fixed(nn.Module):
    """Stands in for HF's value projection: returns the given (B, N, H*D) values."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.values


def _to_hf(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, H, N, D) -> (B, N, H*D)


def effattn_lsh_call(
    q: torch.Tensor, v: torch.Tensor, bucket_size: int, n_hashes: int, scale: float | None
) -> Callable[[], torch.Tensor]:
    """Our `lsh` backend on shared-QK inputs q, v: (B, H, N, D) -> (B, H, N, D).
    ``scale``: None = 1/sqrt(D) (reformer-pytorch's convention), 1.0 = HF's."""
    ours = effattn.get_backend("lsh", bucket_size=bucket_size, n_hashes=n_hashes)
    return lambda: ours(q, q, v, scale=scale)


def reformer_pytorch_call(
    q: torch.Tensor, v: torch.Tensor, bucket_size: int, n_hashes: int
) -> Callable[[], torch.Tensor]:
    """reformer-pytorch's ``LSHAttention`` on shared-QK q, v: (B, H, N, D) -> (B, H, N, D).
    Raises ImportError when reformer-pytorch is not installed."""
    from reformer_pytorch.reformer_pytorch import LSHAttention

    b, h, n, d = q.shape
    lucid = LSHAttention(bucket_size=bucket_size, n_hashes=n_hashes).eval()
    qk_flat, v_flat = q.reshape(b * h, n, d), v.reshape(b * h, n, d)  # (B, H, N, D) -> (BH, N, D)
    return lambda: lucid(qk_flat, v_flat)[0].view(b, h, n, d)  # (BH, N, D) -> (B, H, N, D)


def hf_lsh_call(
    q: torch.Tensor, v: torch.Tensor, bucket_size: int, n_hashes: int
) -> Callable[[], torch.Tensor]:
    """HF transformers' ``LSHSelfAttention`` core (projections bypassed) on shared-QK q, v:
    (B, H, N, D) -> (B, H, N, D); its scale is 1. Raises ImportError without transformers."""
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    b, h, n, d = q.shape
    config = ReformerConfig(
        attention_head_size=d,
        num_attention_heads=h,
        hidden_size=h * d,
        lsh_attn_chunk_length=bucket_size,
        num_buckets=max(2, n // bucket_size),
        num_hashes=n_hashes,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=False,
        max_position_embeddings=n,
        lsh_attention_probs_dropout_prob=0.0,
    )
    hf = LSHSelfAttention(config).eval()
    hf.query_key, hf.value = nn.Identity(), _Fixed(_to_hf(v))
    hidden = _to_hf(q)

    def run_hf() -> torch.Tensor:
        out = hf(hidden).hidden_states  # (B, N, H*D)
        return out.view(b, n, h, d).transpose(1, 2)  # (B, N, H*D) -> (B, H, N, D)

    return run_hf
