"""Input checks shared by every backend: one helper per concern, errors of the form
"<argument>: expected X, got Y" so that a user sees at once what to change."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate_qkv(q: Tensor, k: Tensor, v: Tensor, *, grouped: bool = False) -> None:
    """q: (B, H, Nq, D); k, v: (B, H, Nk, D); one floating dtype and one device. ``grouped``:
    k and v may have Hkv heads with H % Hkv == 0 (grouped-query attention)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, H, Nq, D)" if name == "q" else "(B, H, Nk, D)"
            raise ValueError(
                f"{name}: expected a 4-D tensor {layout}, got {t.dim()}-D shape {_shape(t)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
                f"got {t.dtype}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {t.device}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"v: expected the batch and head sizes of k {tuple(k.shape[:2])}, got "
            f"{tuple(v.shape[:2])}"
        )
    batch, heads = q.shape[:2]
    kv_heads = k.shape[1]
    if k.shape[0] != batch:
        raise ValueError(f"k, v: expected the batch size B={batch} of q, got {k.shape[0]}")
    if kv_heads != heads and not (grouped and kv_heads > 0 and heads % kv_heads == 0):
        wanted = f"a divisor of q's H={heads} (H % Hkv == 0)" if grouped else f"H={heads} like q"
        raise ValueError(f"k, v: expected heads {wanted}, got {kv_heads}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v: expected as many positions as k (Nk={k.shape[2]}), got {v.shape[2]}")
    if k.shape[3] != q.shape[3] or v.shape[3] != q.shape[3]:
        raise ValueError(
            f"k, v: expected the head dim D={q.shape[3]} of q, "
            f"got k {k.shape[3]} and v {v.shape[3]}"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(
            f"q, k: expected at least one position, got Nq={q.shape[2]} and Nk={k.shape[2]}"
        )
    if q.shape[3] == 0:
        raise ValueError("q: expected a head dim D >= 1, got 0")


def validate_key_padding_mask(mask: Tensor | None, q: Tensor, k: Tensor) -> None:
    """mask: None or (B, Nk) bool, True = the key takes part in attention (SDPA's convention)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"key_padding_mask: expected a bool tensor or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask: expected dtype torch.bool (True = the key takes part), "
            f"got {mask.dtype}"
        )
    expected = (q.shape[0], k.shape[2])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"key_padding_mask: expected shape (B, Nk) = {expected}, got {_shape(mask)}"
        )
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask: expected device {q.device} like q, got {mask.device}")


def validate_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(D) when None, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return float(scale)


def check_int_option(backend: str, option: str, value: object, low: int = 1) -> None:
    """A backend option that must be an int >= ``low`` (a bool is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{backend}: option {option!r} expected an int >= {low}, got {value!r}")


def check_seed_option(backend: str, seed: object) -> None:
    """A backend's ``seed`` option: an int in [0, 2**63), what torch.Generator takes."""
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{backend}: option 'seed' expected an int in [0, 2**63), got {seed!r}")
