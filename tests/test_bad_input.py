"""Bad input gets a ValueError or TypeError naming the argument, what was expected, what came."""

from __future__ import annotations

import pytest
import torch

import effattn


def _qkv(b=2, h=3, n=5, d=4, dtype=torch.float32):
    return tuple(torch.randn(b, h, n, d, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("backend", ["full", "sdpa"])
@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q: expected a 4-D tensor .* got 3-D"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"batch size B=2 of q, got 1"),
        (lambda q, k, v: (q, k[:, :2], v[:, :2]), ValueError, r"divisor of q's H=3 .* got 2"),
        (lambda q, k, v: (q, k, v[:, :1]), ValueError, r"v: expected the batch and head sizes"),
        (lambda q, k, v: (q, k[..., :2], v), ValueError, r"head dim D=4 .* got k 2"),
        (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, r"v: expected as many positions as k"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"k: expected dtype torch.float32"),
        (lambda q, k, v: (q.int(), k, v), TypeError, r"q: expected a floating dtype"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, r"q: expected a torch.Tensor, got ndarray"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, r"at least one position.*Nq=0"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, r"at least one .*Nk=0"),
    ],
)
def test_bad_tensors(backend, change, error, pattern):
    q, k, v = change(*_qkv())
    with pytest.raises(error, match=pattern):
        effattn.attention(q, k, v, backend)


def test_device_mismatch_is_reported():
    q, k, v = _qkv()
    meta = torch.empty_like(k, device="meta")
    with pytest.raises(ValueError, match=r"k: expected device cpu like q, got meta"):
        effattn.attention(q, meta, v)


@pytest.mark.parametrize(
    ("mask", "error", "pattern"),
    [
        (torch.ones(2, 5), TypeError, r"key_padding_mask: expected dtype torch.bool .* got torch"),
        (torch.ones(2, 4, dtype=torch.bool), ValueError, r"\(B, Nk\) = \(2, 5\), got \(2, 4\)"),
        (torch.ones(5, dtype=torch.bool), ValueError, r"key_padding_mask: expected shape"),
        ([[True] * 5] * 2, TypeError, r"key_padding_mask: expected a bool tensor or None"),
    ],
)
def test_bad_masks(mask, error, pattern):
    q, k, v = _qkv()
    with pytest.raises(error, match=pattern):
        effattn.attention(q, k, v, key_padding_mask=mask)


def test_bad_flags_and_scale():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"causal: expected a bool, got str"):
        effattn.attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match=r"scale: expected a float or None, got str"):
        effattn.attention(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match=r"scale: expected a finite number, got nan"):
        effattn.attention(q, k, v, scale=float("nan"))


def test_unknown_backend_lists_the_known_ones():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"unknown backend 'flash9' \(known: .*full.*sdpa"):
        effattn.attention(q, k, v, "flash9")


def test_unknown_option_lists_the_valid_ones():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"unknown option 'window' \(valid: none"):
        effattn.attention(q, k, v, "full", window=3)


def test_unsupported_combination_is_explained():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ForwardOnly(effattn.backend_class("full")):
        supports_backward = False
        dtypes = (torch.float32,)

    be = ForwardOnly()
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype=float64 \(supported: float32\)"):
        be(q, k, v)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    with pytest.raises(ValueError, match=r"backward \(this backend is forward-only\)"):
        be(q, k, v)
    with torch.no_grad():
        assert be(q, k, v).shape == q.shape
